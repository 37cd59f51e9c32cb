"""Visual features: frames sampled at `fps`, optionally face-cropped, encoded per frame.

Workers (joblib or Dask) decode each clip once, front to back, keep the frames
on screen at the sampling times, crop the face and resize to the encoder's input
size; the main process feeds those uint8 frames to the encoder in fixed-size
batches across clip boundaries, so decoding and encoding overlap and the device
always sees full batches. Image segments (Memotion-like) are one frame at t = 0.

Face crop: a face detector (`face_detector`: OpenCV's Haar cascade or MTCNN, see
faces.py) on a copy of the frame with a `detect_size` short side; the largest
face, a square box padded by `face_pad` x its size, smoothed over the clip's
frames (exponential, `face_smooth`) so the crop does not jitter.
A frame where no face is detected is encoded as the full frame (short-side
resize + centre crop, the encoder's usual preprocessing) and flagged in
`face_found`; a clip with no face in any frame is kept, with a note saying so.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..cache import FeatureCache, file_sha256, make_key
from .compute import Compute, parallel_map
from .encoders import load_image_encoder, pick_device, resolve_image_encoder
from ..data.media import iter_video_frames, read_image
from ..params import DEVICE, as_dict, between, ge, gt, one_of, param, section
from .faces import DETECTORS, detect_face
from .runner import Extracted, Plan, row_str, run_stage, stage_bar

VERSION = 1
PARALLEL = True  # clips run on `compute` (params section compute)


@section("features.visual")
@dataclass
class VisualParams:
    encoder: str = param("efficientnet-lite0", doc="preset (efficientnet-lite0 | clip-vit-b-32 | clip-vit-l-14), "
                                                   "an open_clip folder, or an open_clip model name")
    pretrained: str = param("", doc="open_clip model name only: a tag (openai, ...) or a local checkpoint file")
    fps: float = param(3.0, gt(0), "frames sampled per second of video")
    face_crop: bool = param(True, doc="crop the largest face; the full frame when none is found")
    face_detector: str = param("mtcnn", one_of(*DETECTORS), "mtcnn (CNN cascade, weights from facenet-pytorch) | haar "
                                                             "(OpenCV, no extra dependency, frontal faces only)")
    detect_size: int = param(360, ge(0), "short side of the copy the face detector sees, px (0 = as decoded)")
    face_pad: float = param(0.25, ge(0), "box padding, fraction of the face size")
    face_smooth: float = param(0.6, between(0, 1, hi_open=True), "exponential smoothing of the box over frames (0 = none)")
    max_frames: int = param(64, ge(0), "frames per clip, spread over its length (0 = no cap)")
    dtype: str = param("float16", one_of("float16", "float32"))
    batch_size: int = param(64, ge(1), "frames per encoder batch")
    device: str = param("auto", DEVICE)


def columns(dtype: str) -> dict:
    return {
        "n_frames": (pa.int32(), ()),
        "timestamps": (pa.float32(), ("n",)),
        "face_found": (pa.bool_(), ("n",)),
        "emb": (pa.from_numpy_dtype(np.dtype(dtype)), ("n", "dim")),
    }


# --------------------------------------------------------------------------- frames -> encoder input

def square_crop(rgb: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """A side x side square around (cx, cy), moved inside the frame, resized to size x size."""
    import cv2

    h, w = rgb.shape[:2]
    side = int(round(min(side, h, w)))
    x0 = int(round(min(max(cx - side / 2, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2, 0), h - side)))
    crop = rgb[y0:y0 + side, x0:x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def full_frame(rgb: np.ndarray, size: int) -> np.ndarray:
    """Short side to `size`, centre crop: open_clip's default preprocessing, on uint8."""
    h, w = rgb.shape[:2]
    return square_crop(rgb, w / 2, h / 2, min(h, w), size)


def frames_to_pixels(frames: list[np.ndarray], size: int, s: dict) -> tuple[np.ndarray, np.ndarray]:
    """RGB frames -> (n, size, size, 3) uint8 encoder inputs and (n,) face-found flags (s: the settings)."""
    out = np.empty((len(frames), size, size, 3), np.uint8)
    found = np.zeros(len(frames), bool)
    pad, smooth = s["face_pad"], s["face_smooth"]
    box = None  # smoothed (cx, cy, side), carried across frames without a detection
    for i, rgb in enumerate(frames):
        face = detect_face(rgb, s["face_detector"], s["detect_size"]) if s["face_crop"] else None
        if face is None:
            out[i] = full_frame(rgb, size)
            continue
        found[i] = True
        padded = np.array([face[0], face[1], face[2] * (1 + 2 * pad)])
        box = padded if box is None else smooth * box + (1 - smooth) * padded
        out[i] = square_crop(rgb, *box, size)
    return out, found


def decode_clip(unit: dict) -> dict:
    """Work unit (runs in a worker): one sequential decode -> encoder-ready uint8 frames."""
    t0 = time.perf_counter()
    s = unit["settings"]
    if unit["threads"] == 1:  # one of several workers sharing the cores: no thread pools inside OpenCV either
        import cv2

        cv2.setNumThreads(1)
        if s["face_crop"] and s["face_detector"] == "mtcnn":
            import torch

            torch.set_num_threads(1)
    if unit["kind"] == "image":
        times, frames = [0.0], [read_image(unit["path"])]
    else:
        times, frames = [], []
        for t, rgb in iter_video_frames(unit["path"], s["fps"], s["max_frames"], duration=unit["duration"] or None,
                                        max_short=max(2 * unit["image_size"], s["detect_size"]),
                                        threads=unit["threads"]):
            times.append(t)
            frames.append(rgb)
    t1 = time.perf_counter()
    pixels, found = frames_to_pixels(frames, unit["image_size"], s)
    return {"pixels": pixels, "timestamps": np.asarray(times, np.float32), "face_found": found,
            "media_s": float(unit["duration"] or 0.0), "decode_s": t1 - t0, "crop_s": time.perf_counter() - t1}


# --------------------------------------------------------------------------- batched encoding

class FrameBatcher:
    """Collects clips' frames, encodes full batches across clip boundaries, returns finished clips."""

    def __init__(self, encoder, batch_size: int):
        self.encoder, self.batch_size = encoder, batch_size
        self.queue: deque = deque()  # (key, clip dict, next frame index)
        self.queued = 0
        self.encode_s = 0.0
        self.frames = 0

    def add(self, key: str, clip: dict) -> list[tuple[str, dict]]:
        clip["emb"] = np.empty((len(clip["pixels"]), self.encoder.dim), np.float32)
        self.queue.append([key, clip, 0])
        self.queued += len(clip["pixels"])
        done = []
        while self.queued >= self.batch_size:
            done += self._encode(self.batch_size)
        return done

    def flush(self) -> list[tuple[str, dict]]:
        return self._encode(self.queued) if self.queued else []

    def _encode(self, n: int) -> list[tuple[str, dict]]:
        import torch

        parts, taken = [], 0
        for item in self.queue:  # plan which frames of which clips fill this batch
            key, clip, start = item
            k = min(n - taken, len(clip["pixels"]) - start)
            parts.append((item, start, start + k))
            taken += k
            if taken == n:
                break
        t = time.perf_counter()
        batch = torch.from_numpy(np.concatenate([it[1]["pixels"][a:b] for it, a, b in parts]))
        emb = self.encoder(batch).cpu().numpy()
        self.encode_s += time.perf_counter() - t
        self.frames += n
        self.queued -= n
        done, pos = [], 0
        for item, a, b in parts:
            item[1]["emb"][a:b] = emb[pos:pos + b - a]
            pos += b - a
            item[2] = b
        while self.queue and self.queue[0][2] == len(self.queue[0][1]["pixels"]):
            key, clip, _ = self.queue.popleft()
            done.append((key, clip))
        return done


# --------------------------------------------------------------------------- the stage

def settings_from(cfg: VisualParams) -> dict:
    """The params that change the result (they key the cache)."""
    return {"fps": cfg.fps, "max_frames": cfg.max_frames, "face_crop": cfg.face_crop, "face_pad": cfg.face_pad,
            "face_smooth": cfg.face_smooth, "face_detector": cfg.face_detector, "detect_size": cfg.detect_size,
            "dtype": cfg.dtype}


def plan_rows(manifest, prefix: tuple, settings: dict, threads: int) -> Plan:
    plan = Plan(ids=list(manifest["id"]), keys=[])
    for i, row in enumerate(manifest.to_dict("records")):
        media = row_str(row.get("media"))
        path = row_str(row.get("image_path")) if media == "image" else row_str(row.get("video_path"))
        if media not in ("video", "image") or not path:
            plan.keys.append(None)
            plan.skipped[i] = "no video (audio-only segment)" if media == "audio" else "no media (transcript-only segment)"
            continue
        try:
            digest = row_str(row.get("content_hash")) or file_sha256(path)
        except OSError as err:
            plan.keys.append(None)
            plan.skipped[i] = f"unreadable media file ({err.strerror or err})"
            continue
        key = make_key(*prefix, digest)
        plan.keys.append(key)
        plan.units.setdefault(key, {"key": key, "kind": media, "path": path, "settings": settings,
                                    "duration": float(row.get("duration") or 0.0), "threads": threads,
                                    "content": digest})
    return plan


def run(manifest, cfg: VisualParams, cache_root, out_path, *, compute: Compute | None = None,
        show_progress: bool = True) -> dict:
    """The `visual` stage: manifest rows -> out_path (Parquet + JSON); clips decode on `compute`."""
    settings = settings_from(cfg)
    compute = compute or Compute(n_jobs=1)
    device = pick_device(cfg.device)
    cache = FeatureCache(cache_root, "visual")
    has_media = "media" in manifest and manifest["media"].isin(["video", "image"]).any()
    spec = resolve_image_encoder(cfg.encoder, cfg.pretrained) if has_media else None
    precision = "bf16" if device.type == "cuda" else "fp32"
    prefix = ("visual", VERSION, spec.id if spec else "", spec.revision if spec else "", settings, precision)
    # FFmpeg threads per decode: all cores when decoding inline, one per worker when the workers fill the cores
    threads = 0 if compute.workers <= 1 else max(1, (os.cpu_count() or 1) // compute.workers)
    plan = plan_rows(manifest, prefix, settings, threads)
    plan.claim_min = max(plan.claim_min, 2 * compute.workers)  # claim enough to keep every worker busy
    meta = {"encoder": spec.as_meta() if spec else {"id": "", "revision": ""}, "dim": None, "params": as_dict(cfg),
            "device": str(device)}

    loaded = {}

    def extract(todo: dict) -> Extracted:
        if not loaded:  # weights load only when something is missing, once for all claimed groups
            loaded["encoder"] = load_image_encoder(spec, device)
        encoder = loaded["encoder"]
        meta.update(dim=encoder.dim, image_size=encoder.image_size)
        return _extract(todo, encoder, cache, settings, cfg.batch_size, compute)

    if not has_media:
        meta.update(dim=0, note="no media: nothing to extract")
    return run_stage("visual", plan, cache, extract, columns(settings["dtype"]), meta, out_path, dim_column="emb",
                     show_progress=show_progress)


def _extract(todo: dict, encoder, cache: FeatureCache, settings: dict, batch_size: int, compute: Compute) -> Extracted:
    units = [{**unit, "image_size": encoder.image_size} for unit in todo.values()]
    batcher = FrameBatcher(encoder, batch_size)
    out = Extracted()
    decode_s = crop_s = 0.0
    bar = stage_bar()

    def finish(done):
        for key, clip in done:
            note = "" if clip["face_found"].any() or not settings["face_crop"] else \
                "no face found in any frame: full frames encoded"
            cache.put(key, {"n_frames": np.int32(len(clip["emb"])), "timestamps": clip["timestamps"],
                            "face_found": clip["face_found"], "emb": clip["emb"].astype(settings["dtype"])},
                      content=todo[key]["content"], note=note)
            bar.update(1)

    for i, clip, error, bad_input in parallel_map(decode_clip, units, compute):
        out.clips += 1
        if error is not None:
            if bad_input:
                cache.put_failure(units[i]["key"], error, content=units[i]["content"])
            else:
                out.errors[units[i]["key"]] = error
            bar.update(1)
            continue
        out.media_s += clip["media_s"]
        decode_s += clip["decode_s"]
        crop_s += clip["crop_s"]
        finish(batcher.add(units[i]["key"], clip))
    finish(batcher.flush())
    out.frames = batcher.frames
    out.extra = {"worker_decode_s": round(decode_s, 3), "worker_crop_s": round(crop_s, 3),
                 "encode_s": round(batcher.encode_s, 3),
                 "workers": compute.workers, "backend": compute.backend, "batch_size": batch_size}
    return out
