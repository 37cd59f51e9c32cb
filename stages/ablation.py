"""Stage `ablation@<name>`: train one ablation (evaluate.ablations.<name>: a model and its overrides)
at model.seed and every evaluate.seeds, so the report can pair it with the full model seed by seed.

    python -m stages.ablation gce-no-contrastive features/dataset models/ablations/gce-no-contrastive

Writes <out>/seed<k>/ (model.pt, metrics.json with the data hashes, plots/) per seed. An ablation that
cannot change its model on this dataset (`pipeline.evaluation.variants.vacuous`: GCE's pair components on a
text-only corpus, removing a modality the corpus lacks) is not trained: <out>/skipped.json holds the
reason, which the stage prints and the report lists.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from pipeline import params
from pipeline.evaluation import runs
from pipeline.errors import ParamError, guarded, require
from pipeline.training.train import TrainingFailed
from pipeline.evaluation.variants import summary_line, train_variant, vacuous


def main(name: str, dataset: str, out: str) -> int:
    raw = params.load()
    ablations = params.read(raw, runs.EvaluateParams).ablations
    if name not in ablations:
        raise ParamError(f"evaluate.ablations.{name}: no such ablation (known: {', '.join(ablations) or 'none'})")
    require(dataset, "assemble")
    spec = ablations[name]
    reason = vacuous(raw, spec.model, spec.set, dataset)
    if reason:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank decides the same; rank 0 writes
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / runs.SKIPPED).write_text(json.dumps({"ablation": name, "reason": reason}, indent=1) + "\n")
            print(f"ablation {name}: skipped, not trained: {reason}")
        return 0
    for seed in runs.ablation_seeds(raw, spec):
        try:
            result = train_variant(raw, spec.model, dataset, Path(out) / f"seed{seed}", spec.set, seed,
                                   where=f"evaluate.ablations.{name}.model")
        except TrainingFailed as err:  # one line, as train@ says it
            print(f"ablation {name} seed {seed}: {err}", file=sys.stderr)
            return 1
        if result:  # rank 0 prints
            print(f"ablation {name} ({spec.model} with {', '.join(spec.set) or 'no change'}) seed {seed}: "
                  f"{summary_line(result)}")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("name", help="a key of evaluate.ablations")
    cli.add_argument("dataset", help="the folder written by `assemble`")
    cli.add_argument("out", help="the folder to write, one seed<k>/ per seed")
    args = cli.parse_args()
    sys.exit(guarded("ablation", main, args.name, args.dataset, args.out))
