"""The `prepare` stage: a raw corpus in the MMSA layout -> a manifest of usable segments.
(`data.format: mmsa` reads an MMSA feature pickle instead: pipeline/data/mmsa.py; `read` dispatches.)

    <root>/label.csv                      video_id,clip_id,text,label,mode
    <root>/Raw/<video_id>/<clip_id>.mp4   one clip per labelled segment (any of media.VIDEO_EXTS)
    <root>/Raw/<video_id>/<clip_id>.wav   optional separate audio (.wav/.flac), used instead of the clip's track
    <root>/Raw/<video_id>/<clip_id>.jpg   image + text datasets (Memotion): one still per row, no audio

Media is looked up inside the root: a link (or a linked folder) that resolves outside
it is rejected with its reason unless `data.follow_links` is true. A corpus without a `Raw/` folder is transcript-only: every row is text alone. A row with only an
audio file (or a container with an audio stream and no video) is an audio + text segment.

Every label row and every media file ends up in exactly one of two places:
`manifest` (usable segments) or `rejects` (one line each with a reason), so
usable + rejected == label rows + orphan media files. Probing reads container
headers, then one pass over the packets (media.scan_tracks: audio decoded, video
demuxed only) catches files cut short and silent tracks, each with its own reason.
"""
from __future__ import annotations

import codecs
import csv
import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from ..cache import file_sha256, make_key
from ..errors import UserError
from .media import (AUDIO_EXTS, IMAGE_EXTS, VIDEO_EXTS, MediaError, NoVideoStream, TrackScan, probe_audio, probe_image,
                    probe_video, scan_tracks)
from ..params import fail, one_of, param, parse, section
from ..progress import progress as progress_bar
from ..presets import PRESETS, CustomPreset, conventions
from ..schema import segment_id

REQUIRED_COLUMNS = ("video_id", "clip_id", "text", "label", "mode")
SPLIT_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "dev": "valid", "test": "test"}
SILENCE_PEAK = 1e-4  # peak |amplitude| below which an audio track counts as silent
# byte-order marks of the encodings a label file may come in besides UTF-8 (UTF-32's first: it starts like UTF-16's)
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))

MANIFEST_COLUMNS = {  # name -> dtype; the contract the feature stages read
    "id": "str", "video_id": "str", "clip_id": "str", "split": "str",
    "label": "float64", "label_name": "str", "text": "str",
    "media": "str",  # video | image | audio | none
    "video_path": "str", "audio_path": "str", "image_path": "str",
    "duration": "float64", "fps": "float64", "width": "int32", "height": "int32",
    "has_audio": "bool", "audio_sample_rate": "int32", "audio_channels": "int32",
    "content_hash": "str",
}


@section("data")
@dataclass
class DataParams:
    root: str = param("raw/demo", doc="MMSA raw layout: <root>/label.csv + <root>/Raw/<video_id>/<clip_id>.mp4")
    format: str = param("raw", one_of("raw", "mmsa"), "raw: the layout above | mmsa: root is an MMSA or MulT/CMU feature pickle")
    label_file: str = param("label.csv", doc="columns video_id,clip_id,text,label,mode")
    task: str = param("regression", one_of("regression", "classification"))
    classes: list[str] = param(["negative", "neutral", "positive"], doc="class names when task is classification")
    strict: bool = param(False, doc="true: any rejected segment fails the stage")
    require_audio: bool = param(True, doc="false: keep clips with no or silent audio (acoustic masked)")
    follow_links: bool = param(False, doc="true: accept media links (or linked folders) resolving outside root")
    preset: str = param("mosi", one_of(*PRESETS, "custom"), "label range, metric family, split names (pipeline/presets.py)")
    custom: CustomPreset = param(CustomPreset(), doc="the conventions when preset is custom")

    def __post_init__(self):
        if self.task == "classification" and len(self.classes) < 2:
            raise fail("classes", self.classes, "at least two class names when task is classification")
        if self.preset != "custom" and self.custom != CustomPreset():
            raise fail("custom", self.custom.__dict__, "read only when data.preset is custom")

    def conventions(self) -> dict:
        return conventions(self.preset, self.custom)


class PrepareError(UserError):
    """The corpus as a whole cannot be read (no label file, missing columns)."""


def content_hash(*paths: str | Path) -> str:
    """sha256 of one media file, or of the concatenated digests of a clip and its audio file."""
    return file_sha256(paths[0]) if len(paths) == 1 else make_key(*(file_sha256(p) for p in paths))


def checked_audio(scan: TrackScan) -> float:
    """The audio's peak, once the scan shows a track that decodes; raises MediaError with the reason."""
    if scan.audio_error:
        raise MediaError(f"audio track fails to decode ({scan.audio_error})")
    return scan.audio_peak


def read_label_rows(label_path: Path) -> list[dict]:
    """label.csv rows as dicts (with their 1-based file line)."""
    if not label_path.is_file():
        raise PrepareError(f"label file not found: {label_path}")
    text = _decode_labels(label_path, label_path.read_bytes())
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise PrepareError(f"{label_path}: missing column(s) {', '.join(missing)}; expected {','.join(REQUIRED_COLUMNS)}")
    rows = []
    for row in reader:
        row["_line"] = reader.line_num
        rows.append(row)
    return rows


def _decode_labels(label_path: Path, data: bytes) -> str:
    """UTF-8 (with or without a BOM), or UTF-16/32 with a BOM. Bytes that are not UTF-8 are kept as
    surrogates, so their row is rejected on its own instead of failing the whole file."""
    for bom, codec in BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)  # the codec drops the BOM
            except UnicodeDecodeError as err:
                raise PrepareError(f"{label_path}: starts with a {codec.upper()} byte-order mark but is not valid "
                                   f"{codec.upper()} ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if b"\x00" in data[:4096]:
        raise PrepareError(f"{label_path}: holds NUL bytes, as UTF-16 or UTF-32 without a byte-order mark would; "
                           f"save it as UTF-8 (or UTF-16 with a BOM)")
    return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates from undecodable bytes
        return False


def _check_label(raw: str | None, task: str, classes: list[str], label_range=(-3.0, 3.0)) -> tuple[float, str]:
    """(label value, class name) or raises ValueError with the reject reason."""
    raw = (raw or "").strip()
    if task == "classification":
        lookup = {c.lower(): i for i, c in enumerate(classes)}
        if raw.lower() not in lookup:
            raise ValueError(f"label {raw!r} is not a known class ({', '.join(classes)})" if raw else "label missing")
        index = lookup[raw.lower()]
        return float(index), classes[index]
    if not raw:
        raise ValueError("label missing")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"label {raw!r} is not a number") from None
    if math.isnan(value):
        raise ValueError("label is NaN")
    lo, hi = label_range
    if not lo <= value <= hi:
        raise ValueError(f"label {value:g} outside [{lo:g}, {hi:g}]")
    return value, ""


def _safe_name(name: str) -> bool:
    """A video_id/clip_id that stays inside its folder when used as a path component."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") and not name.startswith("~")


def _find_media(raw_dir: Path, video_id: str, clip_id: str, exts) -> Path | None:
    """The first <raw_dir>/<video_id>/<clip_id><ext> that exists, trying exts in order."""
    for ext in exts:
        path = raw_dir / video_id / f"{clip_id}{ext}"
        if path.is_file():
            return path
    return None


def _probe_row(row: dict, require_audio: bool = True) -> dict:
    """Fill media metadata into a row that has media; raises MediaError with the reason.
    require_audio False keeps a clip without usable audio (has_audio False, audio masked)."""
    if row["media"] == "image":
        width, height = probe_image(row["image_path"])
        row.update(width=width, height=height, content_hash=content_hash(row["image_path"]))
        return row
    if row["media"] == "audio":
        return _probe_audio_only(row, require_audio)
    try:
        info = probe_video(row["video_path"])
    except NoVideoStream:
        if row["audio_path"]:
            raise
        probe_audio(row["video_path"])  # a container holding audio alone: an audio + text segment
        row.update(media="audio", audio_path=row["video_path"], video_path="")
        return _probe_audio_only(row, require_audio)
    row.update(duration=info.duration, fps=info.fps, width=info.width, height=info.height)
    scan = scan_tracks(row["video_path"], decode_audio=not row["audio_path"])
    if scan.truncation():  # a file cut short: its own reason, whatever require_audio says
        raise MediaError(scan.truncation())
    audio_source = row["audio_path"] or (row["video_path"] if info.has_audio else "")
    hashed = [row["video_path"]] + ([row["audio_path"]] if row["audio_path"] else [])
    if not audio_source:
        if require_audio:
            raise MediaError("video has no audio track")
        row.update(note="video has no audio track", content_hash=content_hash(*hashed))
        return row
    if row["audio_path"]:
        audio = probe_audio(row["audio_path"])
        rate, channels = audio.sample_rate, audio.channels
        scan = scan_tracks(row["audio_path"])
        if scan.truncation():
            raise MediaError(scan.truncation())
    else:
        rate, channels = info.audio_sample_rate, info.audio_channels
    peak = checked_audio(scan)
    if peak < SILENCE_PEAK:
        if require_audio:
            raise MediaError("silent audio track")
        row.update(note="silent audio track", content_hash=content_hash(*hashed))
        return row
    row.update(has_audio=True, audio_sample_rate=rate, audio_channels=channels, content_hash=content_hash(*hashed))
    return row


def _candidate(row: dict, raw_dir: Path | None, data: DataParams, seen: dict[str, int], claimed: set[Path]):
    """One label row -> (manifest candidate, None) or (None, reject dict). Marks the media it points at."""
    video_id, clip_id = (row.get("video_id") or "").strip(), (row.get("clip_id") or "").strip()
    line = row["_line"]

    def reject(reason, path=""):
        sid = segment_id(video_id, clip_id) if (video_id or clip_id) else ""
        return None, {"id": sid, "video_id": video_id, "clip_id": clip_id, "line": line, "path": str(path), "reason": reason}

    if row.get(None):  # csv.DictReader puts the fields beyond the header here
        header = len(row) - 2  # less None and _line
        return reject(f"{header + len(row[None])} fields where the header has {header}: an unquoted comma (a decimal "
                      f"comma such as 3,0, or one in the transcript)? Quote that field")
    if not video_id or not clip_id:
        return reject("missing video_id or clip_id")
    if not (_safe_name(video_id) and _safe_name(clip_id)):
        return reject("id escapes the data root")
    sid = segment_id(video_id, clip_id)
    media_path = _find_media(raw_dir, video_id, clip_id, VIDEO_EXTS + IMAGE_EXTS) if raw_dir else None
    audio_path = _find_media(raw_dir, video_id, clip_id, AUDIO_EXTS) if raw_dir else None
    claimed.update(p.resolve() for p in (media_path, audio_path) if p is not None)
    if sid in seen:
        return reject(f"duplicate id (first on line {seen[sid]})")
    seen[sid] = line
    text = row.get("text") or ""
    if not _is_utf8(text):
        return reject("transcript is not valid UTF-8")
    if not text.strip():
        return reject("empty transcript")
    try:
        label, label_name = _check_label(row.get("label"), data.task, data.classes, data.conventions()["label_range"])
    except ValueError as err:
        return reject(str(err))
    split_raw = (row.get("mode") or "").strip()
    names = {name.lower(): split for split, name in data.conventions()["splits"].items()}
    split = names.get(split_raw.lower()) or SPLIT_ALIASES.get(split_raw.lower())
    if split is None:
        return reject(f"unknown split {split_raw!r} (expected train, valid or test)")
    if raw_dir and media_path is None and audio_path is None:
        return reject("missing media file", path=raw_dir / video_id / f"{clip_id}.mp4")
    for found in (media_path, audio_path):
        if found is not None and not data.follow_links and not found.resolve().is_relative_to(raw_dir.parent.resolve()):
            return reject(f"link resolves outside data.root (to {found.resolve()}); set data.follow_links: true "
                          f"to accept it", path=found)
    if media_path is None:
        media = "audio" if audio_path else "none"
    else:
        media = "image" if media_path.suffix.lower() in IMAGE_EXTS else "video"
    return {
        "id": sid, "video_id": video_id, "clip_id": clip_id, "split": split,
        "label": label, "label_name": label_name, "text": text.strip(), "media": media,
        "video_path": str(media_path) if media == "video" else "",
        "audio_path": str(audio_path) if (audio_path and media in ("video", "audio")) else "",
        "image_path": str(media_path) if media == "image" else "",
        "duration": 0.0, "fps": 0.0, "width": 0, "height": 0,
        "has_audio": False, "audio_sample_rate": 0, "audio_channels": 0, "content_hash": "",
        "_line": line,
    }, None


def _probe_all(candidates: list[dict], require_audio: bool, workers: int, progress: bool) -> list[dict]:
    """Probe every candidate with media (in threads: PyAV and hashing release the GIL, probing is
    I/O-bound); returns a reject dict per candidate whose media is unusable."""
    with_media = [c for c in candidates if c["media"] != "none"]

    def probe(candidate):
        try:
            return _probe_row(candidate, require_audio), None
        except MediaError as err:
            return candidate, str(err)

    rejects = []
    bar = progress_bar(total=len(with_media), desc="prepare: probe", enabled=progress and bool(with_media))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for c, reason in pool.map(probe, with_media):
            bar.update(1)
            if reason:
                rejects.append({"id": c["id"], "video_id": c["video_id"], "clip_id": c["clip_id"], "line": c["_line"],
                                "path": c["video_path"] or c["image_path"] or c["audio_path"], "reason": reason})
    bar.close()
    return rejects


def _orphans(raw_dir: Path, claimed: set[Path]) -> list[dict]:
    """Media nobody labelled: reported, never silently ignored."""
    out = []
    for path in sorted(raw_dir.rglob("*")):
        if path.is_file() and path.suffix.lower() in VIDEO_EXTS + AUDIO_EXTS + IMAGE_EXTS and path.resolve() not in claimed:
            rel = path.relative_to(raw_dir)
            out.append({"id": "", "video_id": rel.parts[0] if len(rel.parts) > 1 else "", "clip_id": path.stem,
                        "line": None, "path": str(path), "reason": "media file with no label row"})
    return out


def _probe_audio_only(row: dict, require_audio: bool) -> dict:
    audio = probe_audio(row["audio_path"])
    row.update(duration=audio.duration, content_hash=content_hash(row["audio_path"]))
    scan = scan_tracks(row["audio_path"])
    if scan.truncation():
        raise MediaError(scan.truncation())
    if checked_audio(scan) < SILENCE_PEAK:
        if require_audio:
            raise MediaError("silent audio track")
        return row
    row.update(has_audio=True, audio_sample_rate=audio.sample_rate, audio_channels=audio.channels)
    return row


def read(data: DataParams | dict, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The corpus of `data.format` -> (manifest, rejects, what the manifest's metadata records about it)."""
    data = parse(DataParams, data, "data")
    if data.format == "mmsa":
        from .mmsa import read_pickle

        rows, rejects, source, columns = read_pickle(data)
        defaults = {c: "" if t == "str" else False if t == "bool" else 0 for c, t in MANIFEST_COLUMNS.items()}
        columns = {**MANIFEST_COLUMNS, **columns}
        manifest = pd.DataFrame([{**defaults, **r} for r in rows], columns=list(columns)).astype(columns)
        rejects = _rejects_frame(rejects)
    else:
        manifest, rejects = build_manifest(data, progress=progress)
        source = {"format": "raw", "notes": []}
    return manifest, rejects, {"conventions": data.conventions(), "source": source}


def build_manifest(data: DataParams | dict, workers: int = 8, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the raw corpus described by params' `data:` section -> (manifest, rejects)."""
    data = parse(DataParams, data, "data")
    if data.format != "raw":
        raise PrepareError(f"data.format is {data.format}: read it with prepare.read")
    root = Path(data.root)
    raw_dir = root / "Raw" if (root / "Raw").is_dir() else None  # no Raw/: transcript-only
    rows = read_label_rows(root / data.label_file)
    candidates, rejects, seen, claimed = [], [], {}, set()
    for row in rows:
        candidate, rejected = _candidate(row, raw_dir, data, seen, claimed)
        (candidates if candidate else rejects).append(candidate or rejected)
    media_rejects = _probe_all(candidates, data.require_audio, workers, progress)
    rejects += media_rejects + (_orphans(raw_dir, claimed) if raw_dir else [])
    bad = {r["id"] for r in media_rejects}
    manifest = pd.DataFrame([c for c in candidates if c["id"] not in bad], columns=list(MANIFEST_COLUMNS) + ["_line"])
    manifest = manifest.sort_values("_line").drop(columns="_line").reset_index(drop=True).astype(MANIFEST_COLUMNS)
    return manifest, _rejects_frame(rejects)


def _rejects_frame(rejects: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rejects, columns=["id", "video_id", "clip_id", "line", "path", "reason"])
    frame["line"] = frame["line"].astype("Int64")
    return frame


def summary(manifest: pd.DataFrame, rejects: pd.DataFrame) -> str:
    """A few human lines: counts per split and per reject reason."""
    lines = [f"{len(manifest)} usable segments ({', '.join(f'{s} {n}' for s, n in manifest['split'].value_counts().items())}), "
             f"{len(rejects)} rejected"]
    if len(manifest):
        kinds = manifest["media"].value_counts().to_dict()
        lines.append("media: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    for reason, count in rejects["reason"].value_counts().items():
        lines.append(f"  rejected {count:5d}: {reason}")
    return "\n".join(lines)
