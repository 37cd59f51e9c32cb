"""Export the pipeline's features as an MMSA feature pickle, so MMSA's models train on them.

    python -m pipeline.data.export mmsa --out features/mmsa_features.pkl
    python -m pipeline.data.export mmsa --out feat.pkl --manifest features/manifest.parquet --features features

Reads the manifest and features/<modality>.parquet (whatever the feature stages produced:
ModernBERT / CLIP / acoustic features, or features imported from a pickle) and writes
{train, valid, test: {id, raw_text, text, [text_bert], audio, vision, audio_lengths,
vision_lengths, regression_labels, classification_labels, annotations, [regression_labels_T/A/V]}}:

  * rows in the manifest's order, which is the source's (label.csv, or the imported pickle's),
    because MMSA matches its per-modality override files (`-Fa feature.pkl`) by position, not id.
    Rows `prepare` rejected are not in the manifest: then positions differ from the source, and
    the export says so;
  * sequences zero-padded after their steps to the longest one in the corpus (one length for all
    splits, as MMSA reads seq_lens from train), float32, with their lengths; a segment a stage
    could not extract has length 0;
  * `text_bert` (N, 3, L: token ids, mask, zeros) only when the text features come from
    bert-base-uncased token ids (that encoder, or a pickle that carried text_bert); otherwise
    `text` alone, and the export says so;
  * classification_labels 0/1/2 and annotations Negative/Neutral/Positive by the label's sign;
  * pickle protocol 4, written block by block (safe_pickle.dump): memory stays one block.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from . import safe_pickle
from .. import schema
from ..errors import UserError, guarded, require
from .mmsa import LENGTH_KEYS, MODALITY_KEYS, UNIMODAL

SENTIMENT = ("Negative", "Neutral", "Positive")  # MMSA's classification_labels 0, 1, 2


class _Table:
    """One feature table, read a row group at a time by segment id."""

    def __init__(self, path: Path, columns: list[str]):
        import pyarrow.parquet as pq

        self.file, self.columns = pq.ParquetFile(path), columns
        self.row_of = {id_: i for i, id_ in enumerate(self.file.read(columns=["id"]).column("id").to_pylist())}
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.group, self.values = -1, {}

    def get(self, id_: str) -> dict[str, np.ndarray] | None:
        """The row's list columns as flat arrays, or None when the table has no row for it."""
        r = self.row_of.get(id_)
        if r is None:
            return None
        g = int(np.searchsorted(self.starts, r, side="right") - 1)
        if g != self.group:
            batch = self.file.read_row_group(g, columns=self.columns)
            self.group = g
            self.values = {c: (batch.column(c).combine_chunks().values.to_numpy(zero_copy_only=False),
                               batch.column(c).combine_chunks().offsets.to_numpy()) for c in self.columns}
        i = r - self.starts[g]
        return {c: v[o[i]:o[i + 1]] for c, (v, o) in self.values.items()}


class PaddedRows:
    """(N, L, dim) float32 sequences of one modality for the given ids, zero-padded after the steps,
    produced a block of rows at a time (what safe_pickle.dump streams)."""
    column = "sequence"  # the registry field naming the column read

    def __init__(self, path: Path, modality: schema.Modality, ids: list[str], steps: int, dim: int):
        self.path, self.m, self.ids = path, modality, ids
        self.shape, self.dtype = (len(ids), steps, dim), np.dtype(np.float32)

    def blocks(self):
        column = getattr(self.m, self.column)
        table, step = _Table(self.path, [column]), safe_pickle.block_rows(self)
        for start in range(0, len(self.ids), step):
            ids = self.ids[start:start + step]
            block = np.zeros((len(ids), *self.shape[1:]), self.dtype)
            for j, id_ in enumerate(ids):
                row = table.get(id_)
                if row is not None:
                    self.fill(block[j], row[column])
            yield block

    def fill(self, out: np.ndarray, values: np.ndarray) -> None:
        steps = values.reshape(-1, self.shape[2])
        out[:len(steps)] = steps


class TokenRows(PaddedRows):
    """(N, 3, L) int64: token ids, attention mask, segment ids (zeros), as MMSA's text_bert."""
    column = "token_ids"

    def __init__(self, path: Path, modality: schema.Modality, ids: list[str], steps: int):
        super().__init__(path, modality, ids, steps, 0)
        self.shape, self.dtype = (len(ids), 3, steps), np.dtype(np.int64)

    def fill(self, out: np.ndarray, tokens: np.ndarray) -> None:
        out[0, :len(tokens)], out[1, :len(tokens)] = tokens, 1


def _writes_text_bert(meta: dict) -> bool:
    """True when the stored token ids are bert-base-uncased's (MMSA's BERT models read text_bert)."""
    encoder = meta.get("encoder") or {}
    bert = str(encoder.get("id", "")).rstrip("/").split("/")[-1] == "bert-base-uncased"
    return bert or (meta.get("source") or {}).get("token_ids") == "text_bert"  # imported with the pickle's own


def _modality_plan(features: Path) -> dict[str, dict]:
    """Per modality with a table: its path, dim, longest sequence, lengths by id, and encoder."""
    import pyarrow.parquet as pq

    plan = {}
    for name in MODALITY_KEYS:
        path = features / f"{name}.parquet"
        require(path, name)
        meta, m = schema.read_meta(path), schema.get(name)
        lengths = pq.read_table(path, columns=["id", m.length]).to_pydict()
        plan[name] = {"path": path, "dim": int(meta.get("dim", 0)), "steps": max(lengths[m.length], default=0),
                      "lengths": dict(zip(lengths["id"], lengths[m.length])), "encoder": meta.get("encoder") or {},
                      "text_bert": name == "text" and _writes_text_bert(meta)}
    return plan


def _split_dict(rows: pd.DataFrame, plan: dict[str, dict]) -> dict:
    ids = rows["id"].tolist()
    labels = rows["label"].to_numpy(np.float64)
    out = {"id": [f"{v}$_${c}" for v, c in zip(rows["video_id"], rows["clip_id"])],
           "raw_text": rows["text"].astype(str).tolist()}
    for name, info in plan.items():
        m, key = schema.get(name), MODALITY_KEYS[name]
        out[key] = PaddedRows(info["path"], m, ids, info["steps"], info["dim"])
        if info["text_bert"]:
            out["text_bert"] = TokenRows(info["path"], m, ids, info["steps"])
        if name in LENGTH_KEYS:
            out[LENGTH_KEYS[name]] = [int(info["lengths"].get(i, 0)) for i in ids]
    sign = np.sign(labels).astype(np.int64) + 1
    out.update(regression_labels=labels.astype(np.float32), classification_labels=sign.astype(np.float32),
               annotations=[SENTIMENT[s] for s in sign])
    for x in UNIMODAL:
        if f"label_{x}" in rows:
            out[f"regression_labels_{x}"] = rows[f"label_{x}"].to_numpy(np.float32)
    return out


def export_mmsa(manifest_path: str | Path, features: str | Path, out: str | Path) -> list[str]:
    """Write the MMSA pickle; returns the lines that describe it."""
    require(manifest_path, "prepare")
    manifest, meta = pd.read_parquet(manifest_path), schema.read_meta(manifest_path)
    if meta.get("task") == "classification":
        raise UserError("export mmsa: MMSA pickles hold sentiment scores; this corpus is a classification task")
    plan = _modality_plan(Path(features))
    names = (meta.get("conventions") or {}).get("splits") or {s: s for s in ("train", "valid", "test")}
    data = {names[s]: _split_dict(manifest[manifest["split"] == s], plan) for s in ("train", "valid", "test")}
    safe_pickle.dump(data, out)
    lines = [f"export: {out}: " + ", ".join(f"{names[s]} {int((manifest['split'] == s).sum())}" for s in names)]
    for name, info in plan.items():
        missing = sum(1 for i in manifest["id"] if i not in info["lengths"])
        lines.append(f"  {MODALITY_KEYS[name]:7s} {info['dim']}-d, padded to {info['steps']} steps, from "
                     f"{info['encoder'].get('name') or info['encoder'].get('id')}"
                     + (f"; {missing} segments without features have length 0" if missing else ""))
    if not plan["text"]["text_bert"]:
        lines.append("  no text_bert: the text features are not bert-base-uncased token states (MMSA's BERT models "
                     "need text_bert; the others read text)")
    rejected = (meta.get("rejected") or 0)
    if rejected:
        lines.append(f"  {rejected} rows of the source were rejected by prepare: positions differ from the source "
                     "(MMSA matches per-modality feature files by position)")
    return lines


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(prog="python -m pipeline.data.export", description=__doc__.split("\n\n")[0])
    sub = cli.add_subparsers(dest="format", required=True)
    mmsa = sub.add_parser("mmsa", help="an MMSA feature pickle (protocol 4)")
    mmsa.add_argument("--out", required=True, help="the pickle to write")
    mmsa.add_argument("--manifest", default="features/manifest.parquet")
    mmsa.add_argument("--features", default="features", help="the folder holding <modality>.parquet")
    args = cli.parse_args(argv)
    return guarded("export", lambda: print("\n".join(export_mmsa(args.manifest, args.features, args.out))))


if __name__ == "__main__":
    sys.exit(main())
