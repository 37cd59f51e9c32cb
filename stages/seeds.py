"""Stage `seeds@<model>-<seed>`: train one model at one more seed (a `matrix` over evaluate.models x
evaluate.seeds in dvc.yaml; model.seed itself is train@<model>).

    python -m stages.seeds gce 1 features/dataset models/seeds/gce/seed1     (what `dvc repro seeds@gce-1` runs)

Reads the dataset folder and params `model` + `<model>`; writes <out>/model.pt, metrics.json
(with the data hashes) and plots/, as train@<model> does.
"""
import argparse
import sys

from pipeline import params
from pipeline.errors import guarded, require
from pipeline.training.train import TrainingFailed
from pipeline.evaluation.variants import summary_line, train_variant


def main(model: str, seed: int, dataset: str, out: str) -> int:
    raw = params.load()
    require(dataset, "assemble")
    try:
        result = train_variant(raw, model, dataset, out, seed=seed)
    except TrainingFailed as err:  # a non-finite loss or no finite validation score: one line, no model.pt
        print(f"seeds: {err}", file=sys.stderr)
        return 1
    if result:  # rank 0 (under torchrun the others return {})
        print(f"{model} seed {seed}: {summary_line(result)}")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("model")
    cli.add_argument("seed", type=int)
    cli.add_argument("dataset", help="the folder written by `assemble`")
    cli.add_argument("out", help="the run folder to write")
    args = cli.parse_args()
    sys.exit(guarded("seeds", main, args.model, args.seed, args.dataset, args.out))
