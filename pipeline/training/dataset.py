"""Assemble the per-modality feature tables into one training set, and load it fast.

`assemble` joins features/<m>.parquet (every modality in `schema.REGISTRY` that has a table) to the
manifest by segment id and writes a folder of flat numpy arrays, each row already turned into model
input by `schema.to_model_input` (train-split statistics):

    index.parquet                 id, video_id, split, label, label_name (manifest order)
    <m>.values.npy                (total_steps, dim) float16: every segment's steps, stacked
    <m>.offsets.npy               (N + 1,) int64: segment i is values[offsets[i]:offsets[i+1]]
    <m>_pooled.npy                (N, dim) float32, for modalities with a pooled vector
    <m>_token_ids.values/offsets  token ids, for modalities that keep them (fine-tuning)
    norm.npz                      '<key>_mean' / '<key>_std' for each key of schema.norm_keys(m)
    meta.json                     modalities (dim, counts, encoder, params, extras), task, classes,
                                  conventions (label range, metric family: pipeline/presets.py)

Both passes over a feature table stream its row groups and the values are written into
memory-mapped files, so memory stays flat in corpus size; loading is `np.load(mmap_mode="r")`.
A segment whose modality failed extraction keeps its other modalities; that one has length 0 and
its mask is all False at training time.

Nothing non-finite gets in: a segment whose features hold NaN or infinity is rejected (listed in
meta.json `rejected` with its reason, left out of every split and of the statistics), or with
`non_finite: stop` the stage stops naming the segments. An empty split, or labels that are all
the same in train, stop the stage with one line: there would be nothing to select on, report or
learn.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import presets, schema
from ..errors import UserError
from ..params import fail, ge, one_of, param, section

# the manifest columns that say what the data is (not where it lies): hashed into every result
CONTENT_COLUMNS = ("id", "video_id", "split", "label", "label_name", "text", "content_hash")


@section("assemble")
@dataclass
class AssembleParams:
    max_steps: dict[str, int] = param({"text": 64, "visual": 32, "acoustic": 128}, ge(0),
                                      "per modality: longer sequences are mean-pooled down to this many steps (0 = no cap)")
    allow_shared_videos: bool = param(False, doc="let a video_id (speaker/video) appear in two splits; "
                                                 "false: assemble fails on it (leakage guard)")
    non_finite: str = param("reject", one_of("reject", "stop"),
                            "a segment whose features hold NaN/inf: reject it (listed with its reason) | stop the stage")

    def __post_init__(self):
        for m in self.max_steps:
            if m not in schema.REGISTRY:
                raise fail(f"max_steps.{m}", self.max_steps[m], f"keys among the modalities {', '.join(schema.names())}")


def _rows(path: Path, columns: list[str]):
    """(id, {column: row value}) for each row of a feature table, streamed a row group at a time (the
    stages write a few hundred rows per group). Not `iter_batches`: it reads ahead, measured 1.36 GB
    peak over a 580 MB table of token states where reading by row group peaks at 0.24 GB. List columns
    come back as flat numpy arrays, scalars as numpy scalars."""
    table = pq.ParquetFile(path)
    groups = (table.read_row_group(g, columns=["id", *columns]) for g in range(table.num_row_groups))
    for batch in (b for group in groups for b in group.to_batches()):
        cols = {}
        for name in columns:
            col = batch.column(name)
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                cols[name] = (col.values.to_numpy(zero_copy_only=False), col.offsets.to_numpy())
            else:
                cols[name] = (col.to_numpy(zero_copy_only=False), None)
        for j, id_ in enumerate(batch.column("id").to_pylist()):
            yield id_, {name: (v[o[j]:o[j + 1]] if o is not None else v[j]) for name, (v, o) in cols.items()}


def _summarise_extra(reducer: str, values: list) -> float | None:
    """What assemble reports about an extra column: 'mean' of all values, or 'mean_step' within rows."""
    if reducer == "mean_step":
        steps = [np.diff(np.asarray(v, np.float64)) for v in values if np.size(v) > 1]
        return float(np.concatenate(steps).mean()) if steps else None
    flat = [np.asarray(v, np.float64).ravel() for v in values]
    return float(np.concatenate(flat).mean()) if flat and sum(map(len, flat)) else None


@dataclass
class Scan:
    """Pass 1 over one feature table: per manifest row its steps (after max_steps), token ids and count of
    non-finite values; the train statistics; the extras' values."""
    lengths: np.ndarray
    n_ids: np.ndarray
    non_finite: np.ndarray
    norm: dict
    extras: dict


def _scan_modality(m: schema.Modality, path: Path, row_of: dict[str, int], is_train: np.ndarray,
                   max_steps: int) -> Scan:
    """Lengths, train statistics and non-finite values of one feature table, streamed."""
    dim, n = int(schema.read_meta(path)["dim"]), len(is_train)
    lengths, n_ids, non_finite = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    steps, pooled = schema.Moments(dim), schema.Moments(dim)
    present_columns = set(pq.read_schema(path).names)
    extras: dict[str, list] = {column: [] for column, _, _ in m.extras if column in present_columns}
    first = [m.sequence] + ([m.pooled] if m.pooled else []) + ([m.token_ids] if m.token_ids else []) + list(extras)
    for id_, row in _rows(path, first):
        r = row_of.get(id_)
        if r is None:
            continue
        if dim == 0 or row[m.sequence].size % dim:
            raise UserError(f"{path}: {id_} holds {row[m.sequence].size} {m.name} values, not whole steps of "
                            f"the table's width {dim}: re-run the `{m.name}` stage")
        seq = row[m.sequence].reshape(-1, dim)
        non_finite[r] = int((~np.isfinite(seq)).sum()) + (int((~np.isfinite(row[m.pooled])).sum()) if m.pooled else 0)
        lengths[r] = schema.shrunk_length(len(seq), max_steps)
        if m.token_ids:
            n_ids[r] = len(row[m.token_ids])
        for column in extras:
            extras[column].append(row[column])
        if is_train[r] and not non_finite[r]:
            steps.add(schema.shrink(seq, max_steps))
            if m.pooled:
                pooled.add(row[m.pooled])
    norm = {}
    for key, moments in zip(schema.norm_keys(m), (steps, pooled)):
        norm[f"{key}_mean"], norm[f"{key}_std"] = moments.stats()
    return Scan(lengths, n_ids, non_finite, norm, extras)


def _assemble_modality(m: schema.Modality, path: Path, out: Path, row_of: dict[str, int], scan: Scan,
                       max_steps: int) -> dict:
    """Pass 2 over one feature table: the model inputs, into memory-mapped arrays; returns the modality's info."""
    fmeta = schema.read_meta(path)
    dim, n, lengths, n_ids, norm = int(fmeta["dim"]), len(scan.lengths), scan.lengths, scan.n_ids, scan.norm
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.lib.format.open_memmap(out / f"{m.name}.values.npy", "w+", schema.STORE_DTYPE, (int(offsets[-1]), dim))
    vectors = np.lib.format.open_memmap(out / f"{m.name}_pooled.npy", "w+", np.float32, (n, dim)) if m.pooled else None
    id_offsets = np.concatenate([[0], np.cumsum(n_ids)])
    ids = np.lib.format.open_memmap(out / f"{m.name}_token_ids.values.npy", "w+", np.int32,
                                    (int(id_offsets[-1]),)) if m.token_ids else None
    second = [m.sequence] + ([m.pooled] if m.pooled else []) + ([m.token_ids] if m.token_ids else [])
    for id_, row in _rows(path, second):
        r = row_of.get(id_)
        if r is None:
            continue
        model_input = schema.to_model_input(m, row[m.sequence].reshape(-1, dim), row.get(m.pooled), max_steps, norm)
        values[offsets[r]:offsets[r + 1]] = model_input[m.name]
        if vectors is not None:
            vectors[r] = model_input[f"{m.name}_pooled"]
        if ids is not None:
            ids[id_offsets[r]:id_offsets[r + 1]] = row[m.token_ids]
    for array in (values, vectors, ids):
        if array is not None:
            array.flush()
    np.save(out / f"{m.name}.offsets.npy", offsets)
    if ids is not None:
        np.save(out / f"{m.name}_token_ids.offsets.npy", id_offsets)
    present = lengths > 0
    info = {"dim": dim, "present": int(present.sum()), "missing": int((~present).sum()),
            "max_len": int(lengths.max(initial=0)), "mean_len": float(lengths[present].mean()) if present.any() else 0.0,
            "encoder": fmeta.get("encoder"), "params": fmeta.get("params")}
    info.update({column: _summarise_extra(reducer, scan.extras[column])
                 for column, reducer, _ in m.extras if column in scan.extras})
    return info


def provenance(manifest: pd.DataFrame) -> dict:
    """Content hashes of a manifest and of its split (sha256 of canonical CSV text): results carry them, so a
    report can tell which data and which split each number came from."""
    columns = [c for c in CONTENT_COLUMNS if c in manifest.columns]
    content = manifest[columns].sort_values("id").to_csv(index=False)
    split = "".join(f"{i}\t{s}\n" for i, s in sorted(zip(manifest["id"], manifest["split"])))
    return {"manifest_sha256": hashlib.sha256(content.encode()).hexdigest(),
            "split_sha256": hashlib.sha256(split.encode()).hexdigest()}


def shared_videos(manifest: pd.DataFrame) -> dict[str, list[str]]:
    """video_id -> its splits, for every video_id found in more than one split."""
    splits = manifest.groupby("video_id")["split"].unique()
    return {str(v): sorted(s) for v, s in splits.items() if len(s) > 1}


def _check_leakage(manifest: pd.DataFrame, allow: bool) -> dict[str, list[str]]:
    shared = shared_videos(manifest)
    if shared and not allow:
        video, splits = next(iter(shared.items()))
        raise UserError(f"video_id {video!r} appears in splits {' and '.join(splits)} ({len(shared)} video(s) shared "
                        f"across splits: speaker leakage); use a speaker-independent split or set "
                        f"assemble.allow_shared_videos: true")
    return shared


def _constant(labels: np.ndarray) -> bool:
    """All the same, up to rounding (0.1 + 0.2 and 0.3 are one label): spread below 1e-6 of their magnitude."""
    return len(labels) == 0 or np.ptp(labels) <= 1e-6 * max(1.0, float(np.abs(labels).max()))


def _check_splits(manifest: pd.DataFrame, task: str) -> list[str]:
    """Stop on an empty split or on train labels that are all the same; warnings for a constant valid/test."""
    sizes = {s: int((manifest["split"] == s).sum()) for s in presets.SPLITS}
    shown = "/".join(map(str, sizes.values()))
    for split, size in sizes.items():
        if not size:
            raise UserError(f"the {split} split has no segments (train/valid/test: {shown}): training chooses its "
                            f"checkpoint on valid and reports test; give every split segments")
    warnings = []
    for split in presets.SPLITS:
        labels = manifest.loc[manifest["split"] == split, "label"].to_numpy(np.float64)
        if task == "classification" and len(np.unique(labels)) > 1 or task != "classification" and not _constant(labels):
            continue
        if split == "train":
            raise UserError(f"every train label is {labels[0]:g}: nothing to learn (and Corr undefined); check the "
                            f"labels (label.csv, or the pickle's) and data.task")
        warnings.append(f"every {split} label is {labels[0]:g}: its Corr (and F1) will be undefined")
    return warnings


def _rejections(scans: dict[str, Scan], manifest: pd.DataFrame, rejected: dict[str, str]) -> dict[str, str]:
    """id -> why, for segments whose features hold non-finite values (not yet in `rejected`)."""
    found: dict[str, list[str]] = {}
    ids = manifest["id"].to_numpy()
    for name, scan in scans.items():
        for r in np.flatnonzero(scan.non_finite):
            found.setdefault(ids[r], []).append(f"{name} features hold {scan.non_finite[r]} NaN/inf values")
    return {id_: "; ".join(why) for id_, why in found.items() if id_ not in rejected}


def assemble(manifest_path: str | Path, feature_paths: dict[str, str | Path], out_dir: str | Path,
             cfg: AssembleParams | None = None) -> dict:
    """Build the training set folder from the manifest and whichever feature tables exist; returns its meta."""
    cfg = cfg or AssembleParams()
    full = pd.read_parquet(manifest_path)
    manifest_meta = schema.read_meta(manifest_path)
    task = manifest_meta.get("task") or "regression"
    shared = _check_leakage(full, cfg.allow_shared_videos)
    tables, skipped = {}, {}
    for name in schema.REGISTRY:
        path = Path(feature_paths.get(name, ""))
        if not path.is_file():
            skipped[name] = f"no {path.name or name + ' features'}"
        elif pq.ParquetFile(path).metadata.num_rows == 0:
            skipped[name] = schema.read_meta(path).get("note") or "no segment has this modality"
        else:
            tables[name] = path
    if not tables:
        raise UserError("no modality has features: nothing to train on")
    rejected: dict[str, str] = {}
    while True:  # twice at most: statistics again without the rejected segments
        manifest = full[~full["id"].isin(rejected)].reset_index(drop=True)
        warnings = _check_splits(manifest, task)
        row_of = {sid: i for i, sid in enumerate(manifest["id"])}
        is_train = manifest["split"].to_numpy() == "train"
        scans = {name: _scan_modality(schema.get(name), path, row_of, is_train, cfg.max_steps.get(name, 0))
                 for name, path in tables.items()}
        found = _rejections(scans, manifest, rejected)
        if not found:
            break
        if cfg.non_finite == "stop":
            first = next(iter(found.items()))
            raise UserError(f"{len(found)} segment(s) have non-finite features ({', '.join(list(found)[:5])}"
                            f"{', ...' if len(found) > 5 else ''}; {first[0]}: {first[1]}); fix or re-extract them, "
                            f"or set assemble.non_finite: reject")
        rejected.update(found)
    out = Path(str(out_dir) + ".tmp")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        meta = {"task": task, "classes": manifest_meta.get("classes") if task == "classification" else None,
                "conventions": manifest_meta.get("conventions") or presets.DEFAULT,
                "segments": len(manifest), "max_steps": dict(cfg.max_steps),
                "splits": manifest["split"].value_counts().to_dict(), "modalities": {}, "skipped": skipped,
                "rejected": [{"id": id_, "reason": why} for id_, why in rejected.items()], "warnings": warnings,
                "provenance": {**provenance(manifest), "shared_videos": len(shared)}}
        norm = {}
        for name, path in tables.items():
            meta["modalities"][name] = _assemble_modality(schema.get(name), path, out, row_of, scans[name],
                                                          cfg.max_steps.get(name, 0))
            norm.update(scans[name].norm)
        np.savez(out / "norm.npz", **norm)
        manifest[["id", "video_id", "split", "label", "label_name"]].to_parquet(out / "index.parquet", index=False)
        (out / "meta.json").write_text(json.dumps(meta, indent=2, default=float))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(out, out_dir)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-written dataset left beside the outputs
        raise
    return meta


# --------------------------------------------------------------------------- loading

@dataclass
class Sequences:
    """One modality's stacked sequences: segment i is values[offsets[i]:offsets[i+1]]."""
    values: np.ndarray   # (total_steps, ...), memory-mapped
    offsets: np.ndarray  # (N + 1,)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self, rows: np.ndarray) -> np.ndarray:
        return self.offsets[rows + 1] - self.offsets[rows]


def collate(segments: list[dict], dims: dict[str, int], with_token_ids: bool = False) -> dict[str, torch.Tensor]:
    """Model inputs of several segments (as `schema.to_model_input` makes them; a missing modality is a
    0-step array) -> padded (B, L, D) float32 tensors and (B, L) masks, True = real step."""
    out: dict[str, torch.Tensor] = {}
    for name, dim in dims.items():
        m, keys = schema.get(name), schema.get(name).batch_keys()
        x, mask = schema.pad([s[name] for s in segments], dim)
        out[keys["sequence"]], out[keys["mask"]] = torch.from_numpy(x), torch.from_numpy(mask)
        if m.pooled:
            out[keys["pooled"]] = torch.from_numpy(np.stack([np.asarray(s[keys["pooled"]], np.float32) for s in segments]))
        if m.token_ids and with_token_ids:
            ids, id_mask = schema.pad([s[keys["token_ids"]] for s in segments], 0, np.int64)
            out[keys["token_ids"]], out[keys["token_mask"]] = torch.from_numpy(ids), torch.from_numpy(id_mask)
    return out


class AssembledData:
    """The assembled training set, memory-mapped; `batch(rows)` builds padded tensors."""

    def __init__(self, root: str | Path, modalities: list[str] | None = None):
        root = Path(root)
        self.meta = json.loads((root / "meta.json").read_text())
        self.index = pd.read_parquet(root / "index.parquet")
        self.modalities = [m for m in schema.names()
                           if m in self.meta["modalities"] and (modalities is None or m in modalities)]
        self.seqs = {m: Sequences(np.load(root / f"{m}.values.npy", mmap_mode="r"), np.load(root / f"{m}.offsets.npy"))
                     for m in self.modalities}
        self.pooled = {m: np.load(root / f"{m}_pooled.npy", mmap_mode="r")
                       for m in self.modalities if schema.get(m).pooled}
        self.token_ids = {m: Sequences(np.load(root / f"{m}_token_ids.values.npy", mmap_mode="r"),
                                       np.load(root / f"{m}_token_ids.offsets.npy"))
                          for m in self.modalities if schema.get(m).token_ids}
        with np.load(root / "norm.npz") as z:
            keys = {k for m in self.modalities for k in schema.norm_keys(schema.get(m))}
            self.norm = {k: z[k] for k in z.files if k.rsplit("_", 1)[0] in keys}
        self.labels = self.index["label"].to_numpy()
        self.task = self.meta["task"]

    @property
    def conventions(self) -> dict:
        """Label range and metric family of the corpus (pipeline/presets.py)."""
        return self.meta.get("conventions") or presets.DEFAULT

    @property
    def input_dims(self) -> dict[str, int]:
        return {m: int(self.meta["modalities"][m]["dim"]) for m in self.modalities}

    def split_rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.index["split"].to_numpy() == split)

    def segment(self, i: int, with_token_ids: bool = False) -> dict[str, np.ndarray]:
        """Row i's model inputs, as `schema.to_model_input` made them (plus token ids if asked)."""
        out = {}
        for m in self.modalities:
            keys = schema.get(m).batch_keys()
            out[m] = self.seqs[m][i]
            if m in self.pooled:
                out[keys["pooled"]] = self.pooled[m][i]
            if with_token_ids and m in self.token_ids:
                out[keys["token_ids"]] = self.token_ids[m][i]
        return out

    def batch(self, rows, with_token_ids: bool = False) -> dict[str, torch.Tensor]:
        """Padded tensors for these rows, plus their labels."""
        rows = np.asarray(rows)
        out = collate([self.segment(i, with_token_ids) for i in rows], self.input_dims, with_token_ids)
        labels = self.labels[rows]
        out["label"] = torch.from_numpy(labels.astype(np.int64) if self.task == "classification" else labels.astype(np.float32))
        return out
