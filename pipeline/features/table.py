"""Feature tables on disk: Parquet with flattened sequences, metadata in the schema.

Every features/<stage>.parquet has one row per extracted segment (column `id`
joins the manifest). A sequence column is a Parquet list whose values are one
flat array: a segment's (n, dim) matrix is stored row-major, so loading a whole
table is one contiguous numpy array + offsets per column, with no per-row Python
work over the numbers. The schema metadata key b"pipeline" holds the stage's JSON
metadata (encoder, dim, params, counts, failures), also written beside it as
features/<stage>.json for people. How the run went (wall time, throughput, what came
from the cache, retries, repairs) changes from run to run, so it stays out of both
files, whose hashes DVC records in dvc.lock, and goes to features/<stage>.run.json.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import schema
from ..cache import atomic_write

META_KEY, read_meta = schema.META_KEY, schema.read_meta  # the report in the footer: part of the contract


def list_array(rows: list[np.ndarray], dtype) -> pa.Array:
    """Flatten per-segment arrays (any shape) into one Arrow list column."""
    sizes = np.fromiter((r.size for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    values = np.concatenate([r.ravel() for r in rows]).astype(dtype, copy=False) if rows else np.zeros(0, dtype)
    if offsets[-1] < 2**31 - 1:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))  # beyond int32 offsets


def write_feature_table(path: str | os.PathLike, columns: dict[str, pa.Array], meta: dict) -> None:
    """Write a whole table held in memory (temp file + rename) and its JSON sidecar."""
    table = pa.table(columns)
    write_feature_batches(path, table.schema, [table], meta)


RUN_KEYS = ("wall_s", "throughput", "retries", "repaired")  # how this run went, not what it made
RUN_COUNTS = ("cached", "extracted", "repaired")             # depend on what the cache held


def reproducible(meta: dict) -> dict:
    """The report without what changes from run to run: the same clips and params give the same bytes."""
    out = {k: v for k, v in meta.items() if k not in RUN_KEYS}
    if isinstance(out.get("counts"), dict):
        out["counts"] = {k: v for k, v in out["counts"].items() if k not in RUN_COUNTS}
    return out


def write_feature_batches(path: str | os.PathLike, arrow_schema: pa.Schema, batches, meta: dict) -> None:
    """Stream record batches (or tables) into the Parquet, one row group each, so memory holds one batch
    at a time; temp file + rename, then the JSON sidecars. The reproducible part of the report goes into
    the footer and <stem>.json, the whole report into <stem>.run.json."""
    path, kept = Path(path), reproducible(meta)
    arrow_schema = arrow_schema.with_metadata({META_KEY: json.dumps(kept).encode()})

    def write(f):
        with pq.ParquetWriter(f, arrow_schema, compression="zstd", compression_level=1) as writer:
            for batch in batches:
                writer.write(batch.replace_schema_metadata(arrow_schema.metadata))
    atomic_write(path, write)
    sidecar = json.dumps(kept, indent=1).encode() + b"\n"
    atomic_write(path.with_suffix(".json"), lambda f: f.write(sidecar))
    run = json.dumps(meta, indent=1).encode() + b"\n"
    atomic_write(path.with_suffix(".run.json"), lambda f: f.write(run))


@dataclass
class Ragged:
    """A list column as one flat array + offsets; row i is values[offsets[i]:offsets[i+1]]."""
    values: np.ndarray
    offsets: np.ndarray  # int64, len = rows + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]


class FeatureTable:
    """A loaded feature table: `ids`, `columns` (numpy arrays or Ragged), `meta`."""

    def __init__(self, ids: list[str], columns: dict, meta: dict):
        self.ids, self.columns, self.meta = ids, columns, meta
        self.index = {id_: i for i, id_ in enumerate(ids)}
        self.dim = int(meta.get("dim", 0))

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, id_: str) -> bool:
        return id_ in self.index

    def get(self, id_: str, column: str) -> np.ndarray:
        """One segment's value; sequences of vectors come back as (n, dim) views."""
        col = self.columns[column]
        if not isinstance(col, Ragged):
            return col[self.index[id_]]
        row = col[self.index[id_]]
        is_matrix = any(m.sequence == column for m in schema.REGISTRY.values())
        return row.reshape(-1, self.dim) if self.dim and is_matrix else row

    def sequences(self, column: str) -> dict[str, np.ndarray]:
        """id -> (n, dim) view for every segment (no copies of the numbers)."""
        return {id_: self.get(id_, column) for id_ in self.ids}


def _column(array: pa.ChunkedArray):
    array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        offsets = array.offsets.to_numpy().astype(np.int64)
        values = array.values.to_numpy(zero_copy_only=False)
        values = values[offsets[0]:offsets[-1]]  # a sliced array's values may extend beyond it
        return Ragged(values, offsets - offsets[0])
    return array.to_numpy(zero_copy_only=False)


def read_feature_table(path: str | os.PathLike, columns: list[str] | None = None) -> tuple[FeatureTable, dict]:
    """Load features/<stage>.parquet -> (FeatureTable, meta). `columns` picks a subset (id is always read)."""
    if columns is not None and "id" not in columns:
        columns = ["id", *columns]
    table = pq.read_table(path, columns=columns)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    cols = {name: _column(table.column(name)) for name in table.column_names if name != "id"}
    return FeatureTable(table.column("id").to_pylist(), cols, meta), meta
