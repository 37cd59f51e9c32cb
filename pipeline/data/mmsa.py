"""MMSA feature pickles (and the MulT/CMU ones GCE trains from) as a data source.

With `data.format: mmsa`, `data.root` is a pickle and the DAG is unchanged: `prepare` writes the
manifest from it (this module's `read_pickle`), and each feature stage writes its table from
the pickle's array for that modality (`pipeline/features/from_pickle.py`, hooked in at one place,
the feature runner) instead of extracting from media. `features.text.source: encoder` sends the transcripts
(`raw_text`) through the normal text stage instead, e.g. to use ModernBERT on MMSA data.

Two layouts, told apart by their keys; each is {split: {key: array}}:

    mmsa   id ('<video_id>$_$<clip_id>'), raw_text, text (N, L, 768 BERT states), text_bert
           (N, 3, L: ids, mask, segment ids), audio (N, La, Da), vision (N, Lv, Dv),
           audio_lengths, vision_lengths, regression_labels, classification_labels, annotations,
           CH-SIMS also regression_labels_T/_A/_V. A row's steps are its first <length> ones.
    mult   text (N, 50, 300 GloVe), audio (N, 375, 5), vision (N, 500, 20), labels (N, 1, 1),
           id (bytes rows). No lengths and no transcripts: as GCE's loader reads them, a row
           has L - (its all-zero steps) steps, the last ones.

Ids come in two styles, told apart per file: one string '<video_id><sep><clip_id>' (MMSA's
'$_$', MOSI's MulT rows '<video>_<clip>' in their first column), or MulT/CMU MOSEI rows
[video_id, start, end] (the video id may hold '_'; the clip id is then '<start>-<end>'). A file
whose first columns repeat with other times, or mostly do not end in '_<number>', is the latter.

Lengths: text from the text_bert mask, or where there is none L minus the row's all-zero steps;
audio and vision from *_lengths. An aligned MMSA file (no *_lengths; audio and vision as many
steps as text) has them on text's word steps: zeros under [CLS] and [SEP], so a row has as many
audio and vision steps as text tokens. An MMSA file without *_lengths whose audio or vision steps
differ from text's cannot be read that way and is refused. MulT files: L minus the all-zero steps.

Every split must hold rows, whole (N, steps, dim) arrays (a ragged per-row list is refused) and
the same feature widths as train; otherwise prepare stops with one line.

Values: -inf (real MOSI/MOSEI audio has them) is set to 0, as MMSA's loader does, and counted;
never a reason to reject. Other non-finite values (NaN, +inf) are set to 0 and counted too,
unless a row's modality holds nothing else: that row is rejected ("wholly non-finite"). Rows are
also rejected for lengths beyond the array, duplicate or malformed ids, and labels that are NaN or
outside `data.preset`'s range. Split sizes are compared with the preset's standard ones and the
file's SHA-256 with the sums MMSA's README publishes (pipeline/presets.py); both are reported.

Memory: the pickle is opened with `safe_pickle.load` (arrays stay in the file) and every pass
reads a block of rows at a time, so prepare and the stages are flat in corpus size.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import presets, schema
from . import safe_pickle
from ..errors import UserError

MODALITY_KEYS = {"text": "text", "visual": "vision", "acoustic": "audio"}  # registry name -> pickle key
LENGTH_KEYS = {"visual": "vision_lengths", "acoustic": "audio_lengths"}
UNIMODAL = ("T", "A", "V")  # CH-SIMS regression_labels_<X>, kept as manifest columns label_<X>
SOURCE_COLUMNS = {"pickle_split": "str", "pickle_row": "int64"}  # where a manifest row lies in the pickle


@dataclass(frozen=True)
class Layout:
    name: str
    label_key: str
    id_separator: str
    pad_front: bool  # padding before the steps (mult) or after them (mmsa)
    has_text: bool   # raw_text present


LAYOUTS = {"mmsa": Layout("mmsa", "regression_labels", "$_$", False, True),
           "mult": Layout("mult", "labels", "_", True, False)}


class PickleError(UserError):
    """The pickle as a whole cannot be used (layout, shapes); the message says what is wrong."""


# --------------------------------------------------------------------------- reading the pickle

@dataclass
class Split:
    """One split of the pickle: its arrays (ndarray or FileArray) and per-modality lengths."""
    name: str                      # the pickle's key for it
    values: dict
    layout: Layout
    lengths_cache: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(np.asarray(self.values[self.layout.label_key]).reshape(-1))

    def array(self, m: str):
        return self.values.get(MODALITY_KEYS[m])

    def lengths(self, m: str) -> np.ndarray:
        """Steps per row of modality m (may exceed the array for corrupt rows: prepare rejects those)."""
        if m not in self.lengths_cache:
            self.lengths_cache[m] = self._lengths(m)
        return self.lengths_cache[m]

    def _lengths(self, m: str) -> np.ndarray:
        key = LENGTH_KEYS.get(m)
        if key in self.values:
            return np.asarray(self.values[key], np.float64).reshape(-1).astype(np.int64)
        if m == "text" and "text_bert" in self.values:
            return np.concatenate([b[:, 1].sum(-1) for b in safe_pickle.row_blocks(self.values["text_bert"])]).astype(np.int64)
        if m != "text" and not self.layout.pad_front:  # MMSA without *_lengths: an aligned file, or unreadable
            if self.aligned():
                return self.lengths("text")
            text = self.array("text")
            raise PickleError(f"{self.name} has no {key}, and its {MODALITY_KEYS[m]} has {self.array(m).shape[1]} steps "
                              + (f"where text has {text.shape[1]}" if text is not None else "and no text to align to")
                              + ": not an aligned file, so which steps are real cannot be told; add "
                              + ", ".join(LENGTH_KEYS.values()) + " (as MMSA's unaligned files have)")
        array = self.array(m)
        return np.concatenate([array.shape[1] - (~np.any(b != 0, axis=-1)).sum(-1)
                               for b in safe_pickle.row_blocks(array)]).astype(np.int64)

    def aligned(self) -> bool:
        """Word-aligned: no *_lengths, and audio and vision (those present) as many steps as text."""
        text = self.array("text")
        others = [self.array(m) for m in LENGTH_KEYS if self.array(m) is not None]
        return text is not None and not any(k in self.values for k in LENGTH_KEYS.values()) \
            and all(a.shape[1] == text.shape[1] for a in others)


def open_pickle(path: str | os.PathLike, conventions: dict) -> tuple[Layout, dict[str, Split]]:
    """The pickle's layout and its splits under our names (train/valid/test); PickleError if unusable."""
    data = safe_pickle.load(path)
    names = conventions["splits"]
    if not isinstance(data, dict) or any(names[s] not in data for s in presets.SPLITS):
        found = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise PickleError(f"{path}: expected a dict of splits {', '.join(names.values())}, found {found}")
    first = data[names["train"]]
    layout = next((lay for lay in LAYOUTS.values() if isinstance(first, dict) and lay.label_key in first), None)
    if layout is None:
        raise PickleError(f"{path}: neither the MMSA layout (regression_labels) nor the MulT/CMU one (labels); "
                          f"train holds {', '.join(map(str, first)) if isinstance(first, dict) else type(first).__name__}")
    splits = {s: Split(names[s], data[names[s]], layout) for s in presets.SPLITS}
    for s, split in splits.items():
        if not isinstance(split.values, dict):
            raise PickleError(f"{path}: {split.name} is a {type(split.values).__name__}, expected a dict of arrays")
        _check_shapes(path, split)
    _check_widths(path, splits)
    return layout, splits


def _check_shapes(path, split: Split) -> None:
    """Every split: a label key, rows, an id, and whole arrays of as many rows as labels."""
    if split.layout.label_key not in split.values:
        raise PickleError(f"{path}: {split.name} has no {split.layout.label_key}")
    for key in (split.layout.label_key, "id", *MODALITY_KEYS.values(), *LENGTH_KEYS.values(), "text_bert", "raw_text"):
        if key not in split.values:
            continue
        value = split.values[key]
        if isinstance(value, (list, tuple)) and key != "raw_text":  # per-row lists: one array, or refused
            shapes = list(dict.fromkeys(np.shape(v) for v in value))
            if len(shapes) > 1:
                raise PickleError(f"{path}: {split.name}/{key} is a list of {len(value)} per-row arrays of differing "
                                  f"shapes ({', '.join(map(str, shapes[:3]))}...): expected one (N, ...) array, padded")
            split.values[key] = value = np.asarray(value)
        rows = len(value)
        if rows != len(split):
            raise PickleError(f"{path}: {split.name}/{key} has {rows} rows but {split.name} has {len(split)} labels")
        if key in MODALITY_KEYS.values() and np.ndim(value) != 3:
            raise PickleError(f"{path}: {split.name}/{key} has shape {tuple(np.shape(value))}, expected (N, steps, dim)")
    if "id" not in split.values:
        raise PickleError(f"{path}: {split.name} has no id")
    if not len(split):
        raise PickleError(f"{path}: {split.name} has no rows: every split needs segments (training chooses its "
                          f"checkpoint on valid and reports test)")


def _check_widths(path, splits: dict[str, Split]) -> None:
    """The same modalities, each as wide, in every split (a model has one input width)."""
    train = splits["train"]
    for m, key in MODALITY_KEYS.items():
        want = train.array(m)
        for split in splits.values():
            got = split.array(m)
            if (got is None) != (want is None):
                has, lacks = (split, train) if want is None else (train, split)
                raise PickleError(f"{path}: {has.name} has {key} but {lacks.name} has none: every split needs the "
                                  f"same modalities")
            if got is not None and got.shape[2] != want.shape[2]:
                raise PickleError(f"{path}: {split.name}/{key} is {got.shape[2]} wide but {train.name}/{key} is "
                                  f"{want.shape[2]}: every split needs the same feature width")


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def id_fields(split: Split) -> list[list[str]]:
    """Each row's id as text fields: [the id] for a string, the columns of a row ([video, start, end], ...)."""
    raw = split.values["id"]
    rows = np.asarray(raw, dtype=object) if not isinstance(raw, list) else raw
    return [[_text(value)] if isinstance(value, (str, bytes)) else
            [_text(v) for v in np.asarray(value, dtype=object).reshape(-1)] for value in rows]


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
VIDEO_START_END, JOINED = "[video_id, start, end]", "<video_id><sep><clip_id>"


def _timed(fields: list[str]) -> bool:
    return len(fields) >= 3 and all(_NUMBER.fullmatch(f.strip()) for f in fields[1:3])


def id_style(splits: dict[str, Split]) -> str:
    """JOINED or VIDEO_START_END for the whole file (see the module doc)."""
    rows = [fields for split in splits.values() for fields in id_fields(split)]
    timed = [f for f in rows if _timed(f)]
    if not timed or len(timed) < len(rows) / 2:
        return JOINED
    times = defaultdict(set)
    for f in timed:
        times[f[0]].add((f[1], f[2]))
    sep = next(iter(splits.values())).layout.id_separator
    joined = sum(1 for f in timed if re.fullmatch(rf".+{re.escape(sep)}\d+", f[0]))
    return VIDEO_START_END if any(len(t) > 1 for t in times.values()) or joined < len(timed) / 2 else JOINED


def parse_ids(split: Split, style: str = JOINED) -> list[tuple[str, str] | str]:
    """(video_id, clip_id) per row, or the reason the id is unusable."""
    out, sep = [], split.layout.id_separator
    for fields in id_fields(split):
        if style == VIDEO_START_END:
            if not _timed(fields) or not fields[0].strip():
                out.append(f"id {fields!r} is not [video_id, start, end]")
                continue
            video_id, clip_id, shown = fields[0].strip(), f"{fields[1].strip()}-{fields[2].strip()}", repr(fields[:3])
        else:
            value = fields[0] if fields else ""
            video_id, found, clip_id = value.rpartition(sep)
            shown = repr(value)
            if not found or not video_id or not clip_id:
                out.append(f"id {shown} is not <video_id>{sep}<clip_id>")
                continue
        if "/" in video_id or "/" in clip_id:
            out.append(f"id {shown} contains '/'")
        else:
            out.append((video_id, clip_id))
    return out


# --------------------------------------------------------------------------- values

def block_slices(rows: np.ndarray, array) -> list[tuple[int, int]]:
    """Cut sorted pickle row numbers into runs [i, j) whose rows span about one read block."""
    step, cuts, start = safe_pickle.block_rows(array), [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] - rows[start] >= step:
            cuts.append((start, i))
            start = i
    return cuts


def read_rows(array, rows: np.ndarray) -> np.ndarray:
    """The given sorted rows of an array (one contiguous read covering them)."""
    block = array.rows(int(rows[0]), int(rows[-1]) + 1) if isinstance(array, safe_pickle.FileArray) \
        else np.asarray(array[int(rows[0]):int(rows[-1]) + 1])
    return block[rows - rows[0]]


def clean(block: np.ndarray, lengths: np.ndarray, pad_front: bool) -> dict[str, np.ndarray]:
    """A (B, L, D) block of rows with their lengths -> the valid steps cleaned and the counts per row:
    'block' (float32; non-finite values in valid steps set to 0), 'neg_inf', 'nonfinite' (NaN/+inf),
    'wholly' (True: every valid value was NaN/+inf)."""
    block = np.array(block, np.float32)
    steps = np.arange(block.shape[1])[None, :]
    n = np.clip(lengths, 0, block.shape[1])[:, None]
    valid = (steps >= block.shape[1] - n) if pad_front else (steps < n)
    valid = np.broadcast_to(valid[..., None], block.shape)
    neg_inf = (block == -np.inf) & valid
    other = ~np.isfinite(block) & ~neg_inf & valid
    counts = {"neg_inf": neg_inf.sum((1, 2)), "nonfinite": other.sum((1, 2)),
              "wholly": (other.sum((1, 2)) == valid.sum((1, 2))) & (valid.sum((1, 2)) > 0)}
    block[neg_inf | other] = 0.0
    return {"block": block, **counts}


def steps_of(row: np.ndarray, n: int, pad_front: bool) -> np.ndarray:
    return row[row.shape[0] - n:] if pad_front else row[:n]


# --------------------------------------------------------------------------- prepare

def _labels(split: Split, data) -> tuple[np.ndarray, list[str], list[str | None]]:
    """(label values, class names, reject reason or None) per row."""
    lo, hi = data.conventions()["label_range"]
    if data.task == "classification":
        if "classification_labels" not in split.values:
            raise PickleError(f"{data.root}: data.task is classification but the pickle has no classification_labels")
        values = np.asarray(split.values["classification_labels"], np.float64).reshape(-1)
        ok = (values == np.round(values)) & (values >= 0) & (values < len(data.classes))
        names = [data.classes[int(v)] if k else "" for v, k in zip(values, ok)]
        return values, names, [None if k else f"classification label {v:g} is not a class index 0..{len(data.classes) - 1}"
                               for v, k in zip(values, ok)]
    values = np.asarray(split.values[split.layout.label_key], np.float64).reshape(-1)
    reasons = ["label is NaN" if np.isnan(v) else (f"label {v:g} outside [{lo:g}, {hi:g}]" if not lo <= v <= hi else None)
               for v in values]
    return values, [""] * len(values), reasons


def _scan_modalities(split: Split, reasons: list) -> dict[str, dict[str, np.ndarray]]:
    """Check lengths and values of every modality of one split: adds reject reasons, returns per modality
    and row the number of -inf ('neg_inf') and of NaN/+inf ('nonfinite') values that become 0."""
    counts = {}
    for m in MODALITY_KEYS:
        array = split.array(m)
        if array is None:
            continue
        lengths, steps = split.lengths(m), array.shape[1]
        for i in np.flatnonzero((lengths < 0) | (lengths > steps)):
            key = LENGTH_KEYS.get(m, "text_bert mask")
            reasons[i] = reasons[i] or f"{key} {lengths[i]} beyond the array's {steps} steps"
        rows = np.arange(len(split))
        counts[m] = {"neg_inf": np.zeros(len(split), np.int64), "nonfinite": np.zeros(len(split), np.int64)}
        for a, b in block_slices(rows, array):
            got = clean(read_rows(array, rows[a:b]), lengths[a:b], split.layout.pad_front)
            for i in np.flatnonzero(got["wholly"]):
                reasons[a + i] = reasons[a + i] or f"{MODALITY_KEYS[m]} features wholly non-finite"
            for kind in ("neg_inf", "nonfinite"):
                counts[m][kind][a:b] = got[kind]
    return counts


def read_pickle(data) -> tuple[list[dict], list[dict], dict, dict[str, str]]:
    """An MMSA/MulT pickle (`data.root`) -> (manifest rows, rejects, the report for the manifest metadata,
    the manifest columns beyond prepare's own with their dtypes)."""
    from ..cache import file_sha256

    path = Path(data.root)
    if not path.is_file():
        raise PickleError(f"data.root {path} is not a file: with data.format mmsa it is the feature pickle")
    layout, splits = open_pickle(path, data.conventions())
    style = id_style(splits)
    rows, rejects, seen, counts = [], [], {}, {}
    for s, split in splits.items():
        labels, names, reasons = _labels(split, data)
        per_row = _scan_modalities(split, reasons)
        texts = np.asarray(split.values["raw_text"], dtype=object) if "raw_text" in split.values else None
        unimodal = {x: np.asarray(split.values[f"regression_labels_{x}"], np.float64).reshape(-1)
                    for x in UNIMODAL if f"regression_labels_{x}" in split.values}
        for i, parsed in enumerate(parse_ids(split, style)):
            where = f"{split.name}[{i}]"
            video_id, clip_id = parsed if isinstance(parsed, tuple) else ("", "")
            sid = schema.segment_id(video_id, clip_id) if video_id else ""
            reason = parsed if isinstance(parsed, str) else reasons[i]
            if not reason and sid in seen:
                reason = f"duplicate id (first at {seen[sid]})"
            if reason:
                rejects.append({"id": sid, "video_id": video_id, "clip_id": clip_id, "line": None, "path": where,
                                "reason": reason})
                continue
            seen[sid] = where
            _tally(counts, per_row, i)
            rows.append({"id": sid, "video_id": video_id, "clip_id": clip_id, "split": s, "label": labels[i],
                         "label_name": names[i], "text": "" if texts is None else str(texts[i]).strip(),
                         "media": "pickle", "pickle_split": split.name, "pickle_row": i,
                         **{f"label_{x}": v[i] for x, v in unimodal.items()}})
    columns = {**SOURCE_COLUMNS, **{f"label_{x}": "float64" for x in UNIMODAL if rows and f"label_{x}" in rows[0]}}
    report = _report(path, file_sha256(path), layout, splits, counts, data.preset)
    report["id_style"] = style
    if style == VIDEO_START_END:
        report["notes"].append(f"ids: {VIDEO_START_END} rows (MulT/CMU MOSEI style); clip ids are <start>-<end>")
    if layout.name == "mmsa" and splits["train"].aligned():
        report["notes"].append("aligned: audio and vision on text's token steps (no *_lengths), as many steps as text")
    return rows, rejects, report, columns


def _tally(counts: dict, per_row: dict, i: int) -> None:
    """Add row i's values set to 0 (what the feature stages will zero in the kept rows) to the totals."""
    for m, kinds in per_row.items():
        tally = counts.setdefault(m, {"neg_inf": 0, "neg_inf_rows": 0, "nonfinite": 0, "nonfinite_rows": 0})
        for kind, per in kinds.items():
            tally[kind] += int(per[i])
            tally[f"{kind}_rows"] += int(per[i] > 0)


def _report(path: Path, sha256: str, layout: Layout, splits: dict[str, Split], counts: dict, preset: str) -> dict:
    """The source's record in the manifest metadata, with human notes (split sizes, SHA-256, values set to 0)."""
    sizes = {s: len(split) for s, split in splits.items()}
    expected = presets.PRESETS[preset].split_sizes if preset in presets.PRESETS else None
    shown = "/".join(str(v) for v in sizes.values())
    notes = [f"pickle: {layout.name} layout, splits {shown} (train/valid/test)" + (
        "" if expected is None else f", the standard {preset} sizes" if sizes == expected else
        f", NOT the standard {preset} sizes {'/'.join(str(v) for v in expected.values())}")]
    published = presets.PUBLISHED_SHA256.get(sha256)
    notes.append(f"SHA-256 {sha256[:16]}...: " + (
        f"matches MMSA's published sum of {published}" if published else
        "matches none of the sums MMSA's README publishes (its MOSI, MOSEI and SIMS feature pickles)"
        if layout.name == "mmsa" else "no published sums exist for MulT/CMU pickles"))
    for m, tally in counts.items():
        key = MODALITY_KEYS[m]
        if tally["neg_inf"]:
            notes.append(f"{key}: {tally['neg_inf']} -inf values set to 0 (as MMSA's loader does) in {tally['neg_inf_rows']} rows")
        if tally["nonfinite"]:
            notes.append(f"{key}: {tally['nonfinite']} NaN/+inf values set to 0 in {tally['nonfinite_rows']} rows")
    stat = path.stat()
    return {"format": "mmsa", "layout": layout.name, "pickle": str(path), "sha256": sha256,
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "published": published, "split_sizes": sizes,
            "expected_split_sizes": expected, "values_set_to_0": counts, "notes": notes,
            "dims": {m: int(splits["train"].array(m).shape[2]) for m in MODALITY_KEYS if splits["train"].array(m) is not None}}
