"""Stage `assemble`: join the modality features into one normalised training set.

    python -m stages.assemble features/manifest.parquet features features/dataset     (what `dvc repro assemble` runs)

Reads the manifest and features/<m>.parquet for every registered modality that has one (a
transcript-only corpus has empty visual/acoustic tables), and params `assemble`; writes the
dataset folder (float16 model inputs, train-split normalisation statistics, meta.json). Segments
whose features hold NaN/inf are rejected with their reason (or stop it: `non_finite: stop`); an
empty split or constant train labels stop it with one line.
"""
import argparse
import json
import sys
from pathlib import Path

from pipeline import params, schema
from pipeline.training.dataset import AssembleParams, assemble
from pipeline.errors import guarded, require


def main(manifest: str, features: str, out: str) -> int:
    cfg = params.read(params.load(), AssembleParams)
    require(manifest, "prepare")
    for m in schema.names():
        require(Path(features) / f"{m}.parquet", m)
    meta = assemble(manifest, {m: Path(features) / f"{m}.parquet" for m in schema.names()}, out, cfg)
    for m, info in meta["modalities"].items():
        extras = "".join(f", {c} {info[c]:.3g}" for c, _, _ in schema.get(m).extras if info.get(c) is not None)
        print(f"assemble: {m:8s} dim {info['dim']:5d}, {info['present']} segments "
              f"({info['missing']} missing), mean length {info['mean_len']:.1f}{extras}")
    for m, why in meta["skipped"].items():
        print(f"assemble: {m:8s} skipped: {why}")
    rejected = meta["rejected"]
    for item in rejected[:5]:
        print(f"assemble: rejected {item['id']}: {item['reason']}")
    if len(rejected) > 5:
        print(f"assemble: ... {len(rejected) - 5} more rejected (meta.json `rejected` in {out})")
    for warning in meta["warnings"]:
        print(f"assemble: warning: {warning}")
    print("assemble: splits " + json.dumps(meta["splits"]) + (f", {len(rejected)} rejected" if rejected else ""))
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("manifest", help="the manifest written by `prepare`")
    cli.add_argument("features", help="the folder holding <modality>.parquet for each registered modality")
    cli.add_argument("out", help="the dataset folder to write")
    args = cli.parse_args()
    sys.exit(guarded("assemble", main, args.manifest, args.features, args.out))
