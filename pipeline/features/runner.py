"""The life of a feature stage, shared by text, visual and acoustic.

  1. plan     each manifest row -> a cache key (content hash + encoder + the params
              that change the result), or a reason it has nothing to extract;
  2. extract  the stage computes the keys missing from the cache (cache misses
              only, each distinct key once) and writes every result, or its
              bad-input failure, into the cache as soon as it is done;
  3. write     the Parquet is streamed from the cache in manifest order, a row group of a
              few hundred segments at a time (memory stays flat in corpus size), and
              renamed into place with its metadata.

So a killed stage resumes at step 2 where it stopped, and a grown corpus only
extracts what is new. Failures are per segment: rows without a result are listed
with their reason in the metadata, never silently dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ..cache import FeatureCache
from ..compute import retry_log
from .table import list_array, write_feature_batches


@dataclass
class Plan:
    ids: list[str]                                            # manifest ids, in order
    keys: list[str | None]                                    # cache key per row; None: see skipped
    skipped: dict[int, str] = field(default_factory=dict)     # row -> why there is nothing to extract
    units: dict[str, Any] = field(default_factory=dict)       # key -> work unit (one per distinct key)


@dataclass
class Extracted:
    """What the stage's extract step reports back."""
    errors: dict[str, str] = field(default_factory=dict)      # key -> transient failure (not cached)
    clips: int = 0                                            # units processed
    frames: int = 0                                           # frames / tokens / analysis steps produced
    media_s: float = 0.0                                      # seconds of media processed
    extra: dict = field(default_factory=dict)                 # stage-specific timing


# column name -> (arrow value type, "list" | "scalar"); cache entries use the same names
Columns = dict[str, tuple[pa.DataType, str]]


def run_stage(stage: str, plan: Plan, cache: FeatureCache, extract: Callable[[dict], Extracted],
              columns: Columns, meta: dict, out_path, *, dim_column: str | None = None) -> dict:
    """Extract what the cache lacks, assemble, write out_path (+ .json). Returns the metadata.

    `meta` may leave "dim" None when only extraction knows it (no encoder is loaded when
    everything is cached); it is then read off the first result's `dim_column`.
    """
    t0 = time.perf_counter()
    todo = {key: unit for key, unit in plan.units.items() if key not in cache}
    t1 = time.perf_counter()
    with retry_log(cache.dir / ".attempts") as retries:  # markers in the cache: Dask workers share it
        done = extract(todo) if todo else Extracted()
    extract_s = time.perf_counter() - t1

    ids, keys, failures, notes = [], [], [], []
    for i, (id_, key) in enumerate(zip(plan.ids, plan.keys)):  # pass 1: entries' metadata only
        if key is None:
            failures.append({"id": id_, "reason": plan.skipped[i]})
            continue
        entry_meta = cache.meta(key)
        if entry_meta is None:
            failures.append({"id": id_, "reason": done.errors.get(key, "no result in the cache (extraction interrupted?)")})
            continue
        if not entry_meta.get("ok"):
            failures.append({"id": id_, "reason": entry_meta.get("reason", "unknown")})
            continue
        ids.append(id_)
        keys.append(key)
        if entry_meta.get("note"):
            notes.append({"id": id_, "note": entry_meta["note"]})
    if meta.get("dim") is None:
        meta["dim"] = int(cache.get(keys[0]).arrays[dim_column].shape[-1]) if dim_column and keys else 0
    n_keys = len(plan.units)
    meta = {
        "stage": stage,
        **meta,
        "counts": {"segments": len(plan.ids), "ok": len(ids), "failed": len(failures),
                   "cached": n_keys - len(todo), "extracted": len(todo)},
        "failures": failures,
        "notes": notes,
        # units re-run after their worker process died (compute.py): none lost, listed here
        "retries": [{"id": plan.ids[plan.keys.index(r["key"])] if r["key"] in plan.units else None, **r}
                    for r in retries],
        "wall_s": round(time.perf_counter() - t0, 3),
        "throughput": _throughput(done, extract_s),
    }
    arrow_schema = pa.schema([("id", pa.string())] + [
        (name, pa.list_(dtype) if kind == "list" else dtype) for name, (dtype, kind) in columns.items()])
    write_feature_batches(out_path, arrow_schema, _record_batches(cache, ids, keys, columns, arrow_schema), meta)
    return meta


def _record_batches(cache: FeatureCache, ids: list[str], keys: list[str], columns: Columns, arrow_schema,
                    rows_per_batch: int = 256):
    """Pass 2: the cached arrays, a few hundred segments at a time (a row group each)."""
    for start in range(0, len(ids), rows_per_batch):
        entries = [cache.get(key).arrays for key in keys[start:start + rows_per_batch]]
        arrays = [pa.array(ids[start:start + rows_per_batch], pa.string())]
        for name, (dtype, kind) in columns.items():
            np_type = dtype.to_pandas_dtype()
            if kind == "list":
                arrays.append(list_array([e[name] for e in entries], np_type))
            else:
                arrays.append(pa.array(np.asarray([e[name] for e in entries]).reshape(-1).astype(np_type), dtype))
        yield pa.RecordBatch.from_arrays(arrays, schema=arrow_schema)
    if not ids:
        yield pa.RecordBatch.from_arrays([pa.array([], f.type) for f in arrow_schema], schema=arrow_schema)


def _throughput(done: Extracted, seconds: float) -> dict:
    if not done.clips or seconds <= 0:
        return {"extract_s": round(seconds, 3), "note": "nothing extracted (all cached or no input)"}
    return {
        "extract_s": round(seconds, 3),
        "clips_per_s": round(done.clips / seconds, 3),
        "frames_per_s": round(done.frames / seconds, 2),
        "media_s_per_s": round(done.media_s / seconds, 3),
        "clips": done.clips, "frames": done.frames, "media_s": round(done.media_s, 3),
        **done.extra,
    }


def progress(iterable=None, total=None, desc=None, enabled=True, unit="clip"):
    """tqdm progress bar (to stderr), silent when disabled."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit=unit, dynamic_ncols=True, leave=False)


def row_str(value) -> str:
    """Manifest strings may arrive as None/NaN from pandas; treat those as empty."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def stage_main(stage: str, module, argv: list[str] | None = None) -> int:
    """Entry point shared by stages/{text,visual,acoustic}.py: `python -m stages.<stage> MANIFEST OUT.parquet`.

    Reads params `features.<stage>` (the section class registered by the module), `cache`, and
    `compute` when the module runs clips in parallel (`module.PARALLEL`). Run from the repo root,
    as DVC does. Bad params, a missing manifest or an unavailable encoder: one line, exit code 2."""
    import argparse
    import sys

    from .. import params
    from ..cache import CacheParams
    from ..compute import Compute
    from ..errors import guarded, require
    from .from_pickle import pickle_stage

    cli = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=module.__doc__.split("\n\n")[0])
    cli.add_argument("manifest", help="the manifest written by `prepare`")
    cli.add_argument("out", help=f"the {stage} feature table to write (Parquet; its report goes beside it as .json)")
    args = cli.parse_args(argv)

    def main() -> int:
        import pandas as pd

        raw = params.load()
        cfg = params.read(raw, params.SECTIONS[f"features.{stage}"])
        compute = params.read(raw, Compute) if getattr(module, "PARALLEL", False) else None
        cache_root = params.read(raw, CacheParams).root()
        require(args.manifest, "prepare")
        manifest = pd.read_parquet(args.manifest)
        run = pickle_stage(stage, args.manifest, cfg) or module.run  # data.format mmsa: read from the pickle
        meta = run(manifest, cfg, cache_root, args.out, compute=compute, show_progress=sys.stderr.isatty())
        _print_summary(stage, meta, args.out)
        return 0

    return guarded(stage, main)


def _print_summary(stage: str, meta: dict, out) -> None:
    from pathlib import Path

    c, tp = meta["counts"], meta["throughput"]
    rate = f", {tp['clips_per_s']:.2f} clips/s, {tp['media_s_per_s']:.1f} s media/s" if "clips_per_s" in tp else ""
    print(f"{stage}: {c['ok']}/{c['segments']} segments -> {out} (dim {meta['dim']}; {c['cached']} cached, "
          f"{c['extracted']} extracted, {c['failed']} failed) in {meta['wall_s']:.1f} s{rate}")
    for r in meta.get("retries", [])[:5]:
        print(f"  re-run {r['id']}: {r['reason']}")
    for f in meta["failures"][:5]:
        print(f"  failed {f['id']}: {f['reason']}")
    if c["failed"] > 5:
        print(f"  ... {c['failed'] - 5} more in {Path(out).with_suffix('.json')}")
