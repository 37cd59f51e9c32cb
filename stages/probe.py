"""Stage `probe`: the linear-probe baseline (ridge / logistic regression on pooled features).

    python -m stages.probe features/dataset models/linear_probe     (what `dvc repro probe` runs)

Reads the dataset folder and params `probe` + `model.modalities`; writes <out>/metrics.json (with
the data hashes) and plots/test_predictions.csv.
"""
import argparse
import sys
from pathlib import Path

from pipeline import params, schema
from pipeline.errors import guarded, require
from pipeline.evaluation.probe import ProbeParams, fit_probe
from pipeline.training.provenance import stamp


def main(dataset: str, out: str) -> int:
    raw = params.load()
    cfg = params.read(raw, ProbeParams)
    # model.modalities as train@<model> reads it (checked there); absent means every registered modality
    modalities = params.lookup(raw, "model.modalities") or list(schema.names())
    require(dataset, "assemble")
    result = fit_probe(dataset, out, cfg, modalities)
    stamp(Path(out) / "metrics.json", dataset)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result["test"].items() if v is not None)
    print(f"linear probe on {', '.join(result['modalities'])} (alpha {result['alpha']:g}): test {shown}")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("dataset", help="the folder written by `assemble`")
    cli.add_argument("out", help="the folder to write")
    args = cli.parse_args()
    sys.exit(guarded("probe", main, args.dataset, args.out))
