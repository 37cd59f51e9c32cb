"""Training-loop measurements on the demo: DDP against one process at the default dropout, and what one
gradient-clipping norm over every parameter does to the predictor's step.

    python -m tools.bench_train ddp --seeds 0 1 2 3 4      # 1 process vs torchrun 2 ranks (gloo), GCE and GEXSent
    python -m tools.bench_train clip --seeds 0 1 2          # GCE: the predictor's step under one norm vs clipped apart

Both read the demo's `features/dataset` (run `dvc repro assemble` first, from the repository root) and the
params' defaults (`params.yaml` is not read: every run is `model.seed` = the seed, everything else default).

`ddp` trains each model at each seed twice, in one process (batch 16) and under `torchrun --nproc_per_node 2`
on gloo (2 ranks x 8), at the default dropout (0.1): each rank draws its own dropout masks, so the two runs
are not the same run, and should agree only as well as two seeds do. It prints test MAE per seed for both,
their mean and sample std over seeds, the mean and largest per-seed |difference|, and the verdict:
"within the seed spread" when the mean difference is smaller than the seed std of either. At dropout 0
the two are equal (tests/test_distributed_train.py).

`clip` trains GCE (each variant, recipe ours) and records at every step the gradient norms of the prediction
path (g_p) and of the branches trained on detached inputs (g_b: graders, the improved filter). One norm
over every parameter scales the predictor's gradient by min(1, c / |(g_p, g_b)|), clipping apart by
min(1, c / |g_p|) (c = model.grad_clip); it prints how much smaller the first makes the predictor's step
(1 - ratio): mean, median, 90th percentile and largest over the steps, and on how many steps it shrinks it
at all. Clipping apart (the default, `pipeline.training.train.clip_gradients`) makes it 0 by construction.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATASET = Path("features/dataset")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(model: str, seed: int, out: Path) -> dict:
    from pipeline.training.train import train_model

    started = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train_model(model, DATASET.resolve(), out, {"seed": seed}, {}, progress=False)
    return {"mae": result["test"]["mae"], "best_epoch": result["best_epoch"], "wall_s": time.time() - started}


def two_ranks(model: str, seed: int, work: Path) -> dict:
    """`torchrun --nproc_per_node 2 -m stages.train` in a project folder whose params.yaml sets only the seed."""
    import yaml

    (work / "features").mkdir(parents=True)
    (work / "features" / "dataset").symlink_to(DATASET.resolve())
    (work / "params.yaml").write_text(yaml.safe_dump({"model": {"seed": seed}}))
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "OMP_NUM_THREADS": "1"}
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "stages.train", model, "features/dataset", "out"],
                         cwd=work, env=env, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"torchrun {model} seed {seed} failed:\n{run.stderr[-2000:]}")
    result = json.loads((work / "out" / "metrics.json").read_text())
    return {"mae": result["test"]["mae"], "best_epoch": result["best_epoch"], "wall_s": time.time() - started}


def ddp(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for seed in args.seeds:
                single = one_process(model, seed, Path(tmp) / f"{model}-{seed}-single")
                ranks = two_ranks(model, seed, Path(tmp) / f"{model}-{seed}-ddp")
                rows.append({"model": model, "seed": seed, "single": single, "ddp": ranks})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| model | seed | MAE, 1 process x 16 | MAE, 2 ranks x 8 | difference |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['seed']} | {r['single']['mae']:.3f} | {r['ddp']['mae']:.3f} | "
              f"{r['ddp']['mae'] - r['single']['mae']:+.3f} |")
    print("\n| model | 1 process (mean ± std) | 2 ranks (mean ± std) | mean difference | largest per-seed "
          "difference (absolute) | verdict |\n|---|---|---|---|---|---|")
    for model in args.models:
        one = np.array([r["single"]["mae"] for r in rows if r["model"] == model])
        two = np.array([r["ddp"]["mae"] for r in rows if r["model"] == model])
        spread = min(one.std(ddof=1), two.std(ddof=1)) if len(one) > 1 else float("nan")
        diff = two.mean() - one.mean()
        verdict = "within the seed spread" if abs(diff) < spread else "outside the seed spread"
        print(f"| {model} | {one.mean():.3f} ± {one.std(ddof=1):.3f} | {two.mean():.3f} ± {two.std(ddof=1):.3f} | "
              f"{diff:+.3f} | {np.abs(two - one).max():.3f} | {verdict} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


def clip(args) -> None:
    import torch

    from pipeline.training import train as train_mod

    real = train_mod.clip_gradients
    shrink: list[float] = []

    def measured(groups, max_norm):
        norms = [float(torch.nn.utils.get_total_norm([p.grad for p in g if p.grad is not None])) for g in groups]
        if len(groups) == 2 and max_norm:  # prediction path, detached branches
            together, apart = min(1.0, max_norm / (np.hypot(*norms) + 1e-6)), min(1.0, max_norm / (norms[0] + 1e-6))
            shrink.append(1 - together / apart)
        return real(groups, max_norm)

    train_mod.clip_gradients = measured
    print("| GCE variant | steps | predictor's step smaller by: mean | median | 90th pct | largest | steps shrunk |\n"
          "|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("improved", "reference"):
            shrink.clear()
            for seed in args.seeds:
                with contextlib.redirect_stdout(io.StringIO()):
                    train_mod.train_model("gce", DATASET, Path(tmp) / f"{variant}-{seed}", {"seed": seed},
                                          {"variant": variant}, progress=False)
            s = np.array(shrink)
            print(f"| {variant} | {len(s)} | {s.mean():.1%} | {np.median(s):.1%} | {np.quantile(s, 0.9):.1%} | "
                  f"{s.max():.1%} | {np.mean(s > 0):.0%} |")
    train_mod.clip_gradients = real


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(prog="python -m tools.bench_train", description=__doc__.split("\n\n")[0])
    cli.add_argument("study", choices=("ddp", "clip"))
    cli.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    cli.add_argument("--models", nargs="+", default=["gce", "gexsent"], help="ddp only")
    cli.add_argument("--out", help="ddp only: write every run as JSON here")
    args = cli.parse_args(argv)
    if not (DATASET / "meta.json").is_file():
        print("bench_train: no features/dataset here: run `dvc repro assemble` first (from the repository root)",
              file=sys.stderr)
        return 2
    (ddp if args.study == "ddp" else clip)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
