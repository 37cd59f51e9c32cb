"""Stage `train@<model>`: train one model and test the checkpoint chosen on validation.

    python -m stages.train gce features/dataset models/gce                      (what `dvc repro train@gce` runs)
    torchrun --nproc_per_node 2 -m stages.train gce features/dataset models/gce (DDP; or set model.launch)

Reads the dataset folder and params `model` (shared) + `<model>` (its architecture); writes
<out>/model.pt, metrics.json, plots/ and live/ (dvclive).
"""
import argparse
import os
import sys

from pipeline import params
from pipeline.errors import guarded, require
from pipeline.models import MODELS
from pipeline.training.provenance import stamp
from pipeline.training.train import TrainingFailed, TrainParams, train_model


def main(name: str, dataset: str, out: str) -> int:
    raw = params.load()
    cfg = params.read(raw, TrainParams)
    arch = params.parse(MODELS[name].config_class, params.lookup(raw, name), name)
    require(dataset, "assemble")
    try:
        result = train_model(name, dataset, out, cfg, params.as_dict(arch))
        stamp(f"{out}/metrics.json", dataset)  # the data hashes and the selection split, for the report (rank 0)
    except TrainingFailed as err:  # a non-finite loss or gradient, or no finite validation score
        if os.environ.get("RANK", "0") == "0":  # every rank stops; rank 0 knows what is on disk
            print(f"train: {err}", file=sys.stderr)
        return 1
    test = result["test"]
    if os.environ.get("RANK", "0") == "0":
        print(f"{name}: test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items() if v is not None))
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("model", choices=sorted(MODELS))
    cli.add_argument("dataset", help="the folder written by `assemble`")
    cli.add_argument("out", help="the model folder to write")
    args = cli.parse_args()
    sys.exit(guarded("train", main, args.model, args.dataset, args.out))
