"""Shared test fixtures: tiny media files made on the fly, and the real data in ../shared."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import av
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tools` and `stages` live at the repository root, beside the library
    sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402,F401  (torchvision compat shim first)
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_CLIPS = SHARED_DATA / "real-clips"
MOSI_TEXT = SHARED_DATA / "mosi-text" / "mosi_text_labels.csv"


def make_clip(path: Path, seconds: float = 1.0, fps: int = 10, size=(64, 48), audio: str = "tone",
              sample_rate: int = 16000, shade: int = 0, freq: float = 220.0) -> Path:
    """Write a small H.264 (+ AAC) mp4. audio: 'tone' (at freq Hz) | 'silent' | 'none'; frame i is grey
    level (i + shade) * 20."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream("aac", rate=sample_rate, layout="mono") if audio != "none" else None
        for i in range(int(seconds * fps)):
            img = np.full((height, width, 3), ((i + shade) * 20) % 255, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(video.encode())
        if sound is not None:
            t = np.arange(int(seconds * sample_rate)) / sample_rate
            wave = np.zeros_like(t) if audio == "silent" else 0.3 * np.sin(2 * np.pi * freq * t)
            frame = av.AudioFrame.from_ndarray(wave.astype(np.float32)[None], format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            out.mux(sound.encode(frame))
            out.mux(sound.encode())
    return path


def write_labels(root: Path, rows: list[dict], name: str = "label.csv", encoding: str = "utf-8") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    with open(path, "w", newline="", encoding=encoding, errors="strict") as f:
        writer = csv.DictWriter(f, fieldnames=["video_id", "clip_id", "text", "label", "mode"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def row(video_id="v1", clip_id="1", text="it was good", label="1.0", mode="train") -> dict:
    return {"video_id": video_id, "clip_id": clip_id, "text": text, "label": label, "mode": mode}


@pytest.fixture
def real_clips() -> list[Path]:
    clips = sorted(REAL_CLIPS.glob("*.mp4"))
    if not clips:
        pytest.skip(f"real clips not found at {REAL_CLIPS} (../shared/data is absent on this machine)")
    return clips


@pytest.fixture
def mosi_text() -> Path:
    if not MOSI_TEXT.is_file():
        pytest.skip(f"CMU-MOSI transcripts not found at {MOSI_TEXT} (../shared/data is absent on this machine)")
    return MOSI_TEXT


def write_fake_features(root: Path, n: int = 60, dims=None, seed: int = 0, task: str = "regression",
                        missing: dict | None = None) -> Path:
    """A manifest + feature tables that follow the stages' Parquet contract, with a learnable
    signal: the label is a sum of one direction per modality. Returns the features folder."""
    import json

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    dims = dims or {"text": 8, "visual": 6, "acoustic": 5}
    missing = missing or {}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits = np.array(["train"] * (n // 2) + ["valid"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    parts = rng.uniform(-1, 1, (n, len(dims)))
    labels = np.clip(parts.sum(1), -3, 3).round(1)
    ids = [f"{split[:2]}{i % 3}/{i}" for i, split in enumerate(splits)]  # speaker-independent: no video in two splits
    manifest = pd.DataFrame({"id": ids, "video_id": [i.split("/")[0] for i in ids], "clip_id": [i.split("/")[1] for i in ids],
                             "split": splits, "label": labels.astype(float), "label_name": "", "text": "x"})
    if task == "classification":
        manifest["label"] = (labels > 0.5).astype(float) + (labels > -0.5)
    # the manifest's own metadata, as prepare writes it: assemble takes the task from there
    table = pa.Table.from_pandas(manifest, preserve_index=False)
    classes = ["negative", "neutral", "positive"] if task == "classification" else None
    table = table.replace_schema_metadata({b"pipeline": json.dumps({"task": task, "classes": classes}).encode()})
    pq.write_table(table, root / "manifest.parquet")
    from pipeline import schema

    for k, (m, dim) in enumerate(dims.items()):
        spec = schema.get(m)  # the registry says which columns a modality's table has
        keep = [i for i in range(n) if i not in set(missing.get(m, []))]
        lengths = rng.integers(1, 7, n)
        seqs = [rng.normal(0, 0.3, (lengths[i], dim)) + parts[i, k] for i in range(n)]
        cols = {"id": [ids[i] for i in keep], spec.length: pa.array([int(lengths[i]) for i in keep], pa.int32()),
                spec.sequence: [seqs[i].astype(np.float32).ravel() for i in keep]}
        if spec.token_ids:
            cols[spec.token_ids] = [np.arange(lengths[i], dtype=np.int32) for i in keep]
        if spec.pooled:
            cols[spec.pooled] = [seqs[i].mean(0).astype(np.float32) for i in keep]
        table = pa.table(cols)
        meta = {"stage": m, "dim": dim, "encoder": {"id": f"fake-{m}", "revision": "0"}, "params": {}}
        table = table.replace_schema_metadata({b"pipeline": json.dumps(meta).encode()})
        pq.write_table(table, root / f"{m}.parquet")
    return root


SLOWEST_FIRST = ("test_pipeline_e2e", "test_mmsa", "test_predict")  # whole-DAG runs and trained-model fixtures


def pytest_collection_modifyitems(items):
    """The modules with the longest fixtures run first: under `pytest -n 2 --dist loadfile` (make test) one worker
    then runs the end-to-end module while the other works through everything else."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(getattr(getattr(item, "module", None), "__name__", ""), len(rank)))
