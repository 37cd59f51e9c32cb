"""The benchmarks' own machinery: the training benchmark end to end on tiny data, and the RSS sampler."""
from __future__ import annotations

import json
import sys

from conftest import make_clip, row, write_labels
from tools import bench, bench_extractors


def test_train_benchmark_times_every_model(tmp_path):
    out = tmp_path / "train.json"
    argv = ["train", "--device", "cpu", "--epochs", "2", "--batch-size", "8", "--segments", "48", "--train", "24",
            "--valid", "8", "--text-dim", "16", "--visual-dim", "12", "--acoustic-dim", "6", "--text-steps", "6",
            "--visual-steps", "4", "--acoustic-steps", "10", "--set", "gce.fusion_dim=32", "--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["models"]] == ["gce", "gexsent", "text_only", "late_fusion"]
    for r in report["models"]:
        assert r["steps_per_epoch"] == 3 and r["epochs_timed"] == 1      # 24 / 8; the first epoch is warm-up
        assert r["samples_per_s"] > 0 and r["epoch_s"] >= r["train_s"] > 0 and r["gpu_peak_mb"] is None
        assert 0 < r["batch_build_ms"] < r["step_ms"]
    assert report["dims"] == {"text": 16, "visual": 12, "acoustic": 6}


def test_rss_sampler_sees_the_whole_process_tree():
    # the child holds ~40 MiB, its own child ~300 MiB: a tree peak must count the grandchild
    grandchild = "import time; b = bytearray(300 * 2**20); time.sleep(1.5)"
    child = f"import subprocess, sys; x = bytearray(40 * 2**20); subprocess.run([sys.executable, '-c', {grandchild!r}])"
    done, peak_mb, worker_mb = bench.run_sampling_rss([sys.executable, "-c", child], interval=0.05)
    assert done.returncode == 0
    assert 340 < peak_mb < 600, peak_mb
    assert 300 < worker_mb < 400, worker_mb


def test_extractor_benchmarks_report_every_option(tmp_path):
    corpus = tmp_path / "corpus"
    for i in range(2):
        make_clip(corpus / "Raw" / "v" / f"{i}.mp4", seconds=1.0, size=(64, 48))
    write_labels(corpus, [row("v", str(i)) for i in range(2)])
    out = tmp_path / "faces.json"
    assert bench_extractors.main(["faces", "--real-clips", str(tmp_path / "none"), "--demo", str(corpus),
                                  "--sizes", "180", "360", "--json", str(out)]) == 0
    rates = json.loads(out.read_text())["demo (2 clips)"]
    assert set(rates) == {"haar@180", "haar@360", "mtcnn@180", "mtcnn@360"}
    assert all(r["n"] == 6 and r["found"] == 0.0 and r["fps"] > 0 for r in rates.values())  # flat frames: no face
    out = tmp_path / "acoustic.json"
    assert bench_extractors.main(["acoustic", "--corpus", str(corpus), "--extractors", "librosa", "egemaps",
                                  "--seeds", "--cpu-clips", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["media_s_per_s"]) == set(report["media_s_per_cpu_s"]) == {"librosa", "egemaps"}
def test_synthetic_mosei_pickle_is_mmsa_shaped_and_zero_after_each_length(tmp_path):
    import numpy as np

    from pipeline.data import safe_pickle

    sizes = {"train": 7, "valid": 3, "test": 2}
    path = bench.write_mosei_pickle(tmp_path / "m.pkl", sizes, bench.MOSEI_DIMS, steps=12)
    data = safe_pickle.load(path)
    for split, n in sizes.items():
        values = data[split]
        audio, mask = np.asarray(values["audio"]), np.asarray(values["text_bert"])[:, 1]
        assert audio.shape == (n, 12, 74) and np.asarray(values["vision"]).shape == (n, 12, 35)
        for i, length in enumerate(values["audio_lengths"]):
            assert audio[i, :length].all() and not audio[i, length:].any()
        text = np.asarray(values["text"])
        assert ((np.abs(text).sum(-1) > 0) == (mask > 0)).all()
        assert len(values["id"]) == len(values["regression_labels"]) == n
