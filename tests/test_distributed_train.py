"""DDP: `torchrun --nproc_per_node 2 -m stages.train` on gloo (CPU) matches a single process."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import REPO, write_fake_features
from pipeline.dataset import assemble

PARAMS = """
features: {text: {encoder: fake}}
model: {epochs: 5, patience: 10, batch_size: 16, lr: 0.003, seed: 0, device: cpu}
late_fusion: {dropout: 0.0}   # dropout masks come from per-rank RNG streams: off for an exact comparison
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _project(tmp_path, name, dataset):
    work = tmp_path / name
    (work / "features").mkdir(parents=True)
    shutil.copytree(dataset, work / "features" / "dataset")
    (work / "params.yaml").write_text(PARAMS)
    return work


def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    root = write_fake_features(tmp_path / "feat", n=96)
    assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in ("text", "visual", "acoustic")}, root / "dataset")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single = _project(tmp_path, "single", root / "dataset")
    args = ["late_fusion", "features/dataset", "models/late_fusion"]
    run = subprocess.run([sys.executable, "-m", "stages.train", *args], cwd=single, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    ddp = _project(tmp_path, "ddp", root / "dataset")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                          "-m", "stages.train", *args], cwd=ddp, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("world size 2") == 1          # only rank 0 logs
    a = json.loads((single / "models" / "late_fusion" / "metrics.json").read_text())
    b = json.loads((ddp / "models" / "late_fusion" / "metrics.json").read_text())
    assert a["best_epoch"] == b["best_epoch"]
    for key in ("mae", "corr"):
        assert b["test"][key] == pytest.approx(a["test"][key], abs=2e-3), key
    assert not list((ddp / "models").glob("**/*.tmp"))
