"""Shared test fixtures: tiny media files made on the fly, and the real data in ../shared."""
from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np
import pytest

import pipeline  # noqa: F401  (torchvision compat shim first)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_CLIPS = SHARED_DATA / "real-clips"
MOSI_TEXT = SHARED_DATA / "mosi-text" / "mosi_text_labels.csv"


def make_clip(path: Path, seconds: float = 1.0, fps: int = 10, size=(64, 48), audio: str = "tone",
              sample_rate: int = 16000) -> Path:
    """Write a small H.264 (+ AAC) mp4. audio: 'tone' | 'silent' | 'none'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream("aac", rate=sample_rate, layout="mono") if audio != "none" else None
        for i in range(int(seconds * fps)):
            img = np.full((height, width, 3), (i * 20) % 255, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(video.encode())
        if sound is not None:
            t = np.arange(int(seconds * sample_rate)) / sample_rate
            wave = np.zeros_like(t) if audio == "silent" else 0.3 * np.sin(2 * np.pi * 220 * t)
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
