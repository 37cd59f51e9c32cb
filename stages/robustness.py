"""Stage `robustness`: every evaluated model (at every seed) scored on corrupted test inputs, no retraining.

    python -m stages.robustness features/dataset models reports/robustness   (what `dvc repro robustness` runs)

Reads the dataset, the runs of every trained model (models/<m> and models/seeds/<m>/seed<k>) and params
`robustness`, `evaluate`, `model.seed`; writes details.json (per model and curve: mean over levels and
area under the curve of every metric, mean ± std over seeds), robustness.json (the primary metric, for
`dvc metrics`), curves/ (JSON for `dvc plots`) and plots/ (PNG).
"""
import argparse
import sys
import time

from pipeline import params
from pipeline.evaluation import runs
from pipeline.training.dataset import AssembledData
from pipeline.errors import guarded, require
from pipeline.evaluation.stats import PRIMARY
from pipeline.evaluation.robustness import RobustnessParams, load_scored, measure, summarize, write_outputs


def main(dataset: str, models: str, out: str) -> int:
    raw = params.load()
    cfg = params.read(raw, RobustnessParams)
    require(dataset, "assemble")
    started = time.time()
    scored = []
    for name, dirs in runs.base_run_dirs(raw, models).items():
        for seed, path in dirs:
            if cfg.train_seeds and seed not in cfg.train_seeds:
                continue
            require(path / "model.pt", f"train@{name}" if seed == dirs[0][0] else f"seeds@{name}-{seed}")
            scored.append(load_scored(name, seed, path))
    data = AssembledData(dataset)
    summary, points = summarize(measure(data, scored, cfg), cfg, data.modalities, PRIMARY[data.task])
    train_seeds = {name: [s.seed for s in scored if s.name == name] for name in dict.fromkeys(s.name for s in scored)}
    write_outputs(out, summary, points, data.task, data.meta, train_seeds, cfg.rates)
    print(f"robustness: {len(scored)} runs, {len(points)} curves in {time.time() - started:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("dataset", help="the folder written by `assemble`")
    cli.add_argument("models", help="the models folder (train@<model> runs, seeds/)")
    cli.add_argument("out", help="the folder to write")
    args = cli.parse_args()
    sys.exit(guarded("robustness", main, args.dataset, args.models, args.out))
