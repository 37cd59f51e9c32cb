"""Assemble the per-modality feature tables into one training set, and load it fast.

`assemble` joins features/{text,visual,acoustic}.parquet to the manifest by segment
id and writes a folder of flat numpy arrays:

    index.parquet               id, video_id, split, label, label_name (manifest order)
    <m>.values.npy              (total_steps, dim) float16: every segment's sequence, stacked
    <m>.offsets.npy             (N + 1,) int64: segment i is values[offsets[i]:offsets[i+1]]
    text_pooled.npy             (N, dim) masked-mean text vector
    text_ids.values.npy/.offsets.npy   token ids, for fine-tuning the text encoder
    norm.npz                    per-modality mean/std, computed on the train split only
    meta.json                   modalities, dims, task, classes, encoders, counts

Values are stored already normalised, so loading is `np.load(mmap_mode="r")`: seconds
for MOSI, and a MOSEI-sized set (23k segments) is memory-mapped, not read. A segment
whose modality failed extraction keeps its other modalities; that one has length 0 and
its mask is all False at training time.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

MODALITIES = ("text", "visual", "acoustic")
SEQUENCE_COLUMN = {"text": "hidden", "visual": "emb", "acoustic": "feats"}
LENGTH_COLUMN = {"text": "n_tokens", "visual": "n_frames", "acoustic": "n_frames"}
STD_FLOOR = 1e-3   # features nearly constant on train (e.g. a dead CNN channel) are not blown up
CLIP_SIGMAS = 20.0  # normalised values are clipped: a 20-sigma step is an outlier, and float16 must not overflow


def read_feature_meta(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"pipeline", b"{}"))


def _flat_list_column(table, name: str) -> np.ndarray:
    """A list<...> column's values as one flat numpy array (no per-row Python loop)."""
    column = table.column(name).combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False)


def shrink_sequence(seq: np.ndarray, max_steps: int) -> np.ndarray:
    """Mean-pool a (L, D) sequence down to at most max_steps steps, keeping its time order."""
    if max_steps <= 0 or len(seq) <= max_steps:
        return seq
    return np.stack([chunk.mean(axis=0) for chunk in np.array_split(seq, max_steps)])


def _moments(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over every step of the given segments (float64 accumulation)."""
    dim = values.shape[1]
    total, total_sq, count = np.zeros(dim), np.zeros(dim), 0
    for i in rows:
        seq = values[offsets[i]:offsets[i + 1]].astype(np.float64)
        total += seq.sum(0)
        total_sq += (seq ** 2).sum(0)
        count += len(seq)
    if count == 0:
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    return mean.astype(np.float32), np.maximum(std, STD_FLOOR).astype(np.float32)


def assemble(manifest_path: str | Path, feature_paths: dict[str, str | Path], out_dir: str | Path,
             max_steps: dict[str, int] | None = None, task: str = "regression",
             classes: list[str] | None = None) -> dict:
    """Build the training set folder; returns its meta dict."""
    max_steps = max_steps or {}
    manifest = pd.read_parquet(manifest_path)
    n = len(manifest)
    row_of = {sid: i for i, sid in enumerate(manifest["id"])}
    train_rows = np.flatnonzero(manifest["split"].to_numpy() == "train")
    out = Path(str(out_dir) + ".tmp")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    meta = {"task": task, "classes": classes if task == "classification" else None, "segments": n,
            "max_steps": {m: int(v) for m, v in max_steps.items()},
            "splits": manifest["split"].value_counts().to_dict(), "modalities": {}, "skipped": {}}

    for m in MODALITIES:
        path = Path(feature_paths.get(m, ""))
        if not path.is_file():
            meta["skipped"][m] = f"no {path.name or m + ' features'}"
            continue
        table = pq.read_table(path)
        fmeta = read_feature_meta(path)
        if table.num_rows == 0:
            meta["skipped"][m] = fmeta.get("note") or "no segment has this modality"
            continue
        dim = int(fmeta["dim"])
        lengths_in = table.column(LENGTH_COLUMN[m]).to_numpy().astype(np.int64)
        flat = _flat_list_column(table, SEQUENCE_COLUMN[m]).reshape(-1, dim)
        starts = np.concatenate([[0], np.cumsum(lengths_in)])
        ids = table.column("id").to_pylist()
        sequences: list[np.ndarray | None] = [None] * n
        for j, sid in enumerate(ids):
            if sid in row_of:
                sequences[row_of[sid]] = shrink_sequence(flat[starts[j]:starts[j + 1]], int(max_steps.get(m, 0)))
        lengths = np.array([0 if s is None else len(s) for s in sequences], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        values = np.concatenate([s for s in sequences if s is not None and len(s)] or [np.zeros((0, dim))]).astype(np.float32)
        mean, std = _moments(values, offsets, train_rows)
        values = np.clip((values - mean) / std, -CLIP_SIGMAS, CLIP_SIGMAS).astype(np.float16)
        np.save(out / f"{m}.values.npy", values)
        np.save(out / f"{m}.offsets.npy", offsets)
        norm = {f"{m}_mean": mean, f"{m}_std": std}
        if m == "text":
            pooled = np.zeros((n, dim), np.float32)
            present = np.zeros(n, bool)
            pooled_in = _flat_list_column(table, "pooled_mean").reshape(-1, dim)
            token_ids = _flat_list_column(table, "token_ids").astype(np.int32)
            id_starts = table.column("token_ids").combine_chunks().offsets.to_numpy().astype(np.int64)
            id_seqs: list[np.ndarray] = [np.zeros(0, np.int32)] * n
            for j, sid in enumerate(ids):
                if sid in row_of:
                    pooled[row_of[sid]] = pooled_in[j]
                    present[row_of[sid]] = True
                    id_seqs[row_of[sid]] = token_ids[id_starts[j]:id_starts[j + 1]]
            train_text = pooled[train_rows[present[train_rows]]]
            p_mean = train_text.mean(0) if len(train_text) else np.zeros(dim, np.float32)
            p_std = np.maximum(train_text.std(0), STD_FLOOR) if len(train_text) else np.ones(dim, np.float32)
            pooled = np.clip((pooled - p_mean) / p_std, -CLIP_SIGMAS, CLIP_SIGMAS) * present[:, None]
            np.save(out / "text_pooled.npy", pooled.astype(np.float32))
            np.save(out / "text_ids.values.npy", np.concatenate(id_seqs) if n else np.zeros(0, np.int32))
            np.save(out / "text_ids.offsets.npy", np.concatenate([[0], np.cumsum([len(s) for s in id_seqs])]).astype(np.int64))
            norm.update(text_pooled_mean=p_mean.astype(np.float32), text_pooled_std=p_std.astype(np.float32))
        np.savez(out / f"norm_{m}.npz", **norm)
        meta["modalities"][m] = {"dim": dim, "present": int((lengths > 0).sum()), "missing": int((lengths == 0).sum()),
                                 "max_len": int(lengths.max(initial=0)), "mean_len": float(lengths[lengths > 0].mean()) if (lengths > 0).any() else 0.0,
                                 "encoder": fmeta.get("encoder"), "params": fmeta.get("params")}
    if not meta["modalities"]:
        raise ValueError("no modality has features: nothing to train on")
    manifest[["id", "video_id", "split", "label", "label_name"]].to_parquet(out / "index.parquet", index=False)
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=float))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(out, out_dir)
    return meta


@dataclass
class Sequences:
    """One modality's stacked sequences: segment i is values[offsets[i]:offsets[i+1]]."""
    values: np.ndarray   # (total_steps, dim), float16, memory-mapped
    offsets: np.ndarray  # (N + 1,)

    def lengths(self, rows: np.ndarray) -> np.ndarray:
        return self.offsets[rows + 1] - self.offsets[rows]


class AssembledData:
    """The assembled training set, memory-mapped; `batch(rows)` builds padded tensors."""

    def __init__(self, root: str | Path, modalities: list[str] | None = None, max_len: dict | None = None):
        root = Path(root)
        self.meta = json.loads((root / "meta.json").read_text())
        self.index = pd.read_parquet(root / "index.parquet")
        self.modalities = [m for m in MODALITIES if m in self.meta["modalities"] and (modalities is None or m in modalities)]
        self.seqs = {m: Sequences(np.load(root / f"{m}.values.npy", mmap_mode="r"), np.load(root / f"{m}.offsets.npy"))
                     for m in self.modalities}
        self.norm = {}
        for m in self.modalities:
            with np.load(root / f"norm_{m}.npz") as z:
                self.norm.update({k: z[k] for k in z.files})
        self.text_pooled = np.load(root / "text_pooled.npy", mmap_mode="r") if "text" in self.modalities else None
        self.text_ids = (Sequences(np.load(root / "text_ids.values.npy", mmap_mode="r"), np.load(root / "text_ids.offsets.npy"))
                         if "text" in self.modalities else None)
        self.labels = self.index["label"].to_numpy()
        self.task = self.meta["task"]

    @property
    def input_dims(self) -> dict[str, int]:
        return {m: int(self.meta["modalities"][m]["dim"]) for m in self.modalities}

    def split_rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.index["split"].to_numpy() == split)

    def batch(self, rows, with_token_ids: bool = False) -> dict[str, torch.Tensor]:
        """Padded (B, L, D) float32 tensors and (B, L) masks (True = real step) per modality."""
        rows = np.asarray(rows)
        out: dict[str, torch.Tensor] = {}
        for m, seq in self.seqs.items():
            lengths = seq.lengths(rows)
            longest = max(int(lengths.max(initial=0)), 1)  # a batch where all miss m still gets length 1
            x = np.zeros((len(rows), longest, seq.values.shape[1]), np.float32)
            for b, i in enumerate(rows):
                x[b, :lengths[b]] = seq.values[seq.offsets[i]:seq.offsets[i + 1]]
            out[m] = torch.from_numpy(x)
            out[f"{m}_mask"] = torch.from_numpy(np.arange(longest)[None, :] < lengths[:, None])
        if self.text_pooled is not None:
            out["text_pooled"] = torch.from_numpy(np.asarray(self.text_pooled[rows], np.float32))
        if with_token_ids and self.text_ids is not None:
            lengths = self.text_ids.lengths(rows)
            ids = np.zeros((len(rows), max(int(lengths.max(initial=0)), 1)), np.int64)
            for b, i in enumerate(rows):
                ids[b, :lengths[b]] = self.text_ids.values[self.text_ids.offsets[i]:self.text_ids.offsets[i + 1]]
            out["token_ids"] = torch.from_numpy(ids)
            out["token_mask"] = torch.from_numpy(np.arange(ids.shape[1])[None, :] < lengths[:, None])
        labels = self.labels[rows]
        out["label"] = torch.from_numpy(labels.astype(np.int64) if self.task == "classification" else labels.astype(np.float32))
        return out
