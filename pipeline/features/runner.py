"""The life of a feature stage, shared by text, visual and acoustic.

  1. plan     each manifest row -> a cache key (content hash + encoder + the params
              that change the result), or a reason it has nothing to extract (no
              media of this stage's kind: `skipped`);
  2. extract  the keys without a cache entry, each distinct key once, claimed a few
              at a time (cache.Claims; `claim_size`), so that a concurrent stage on the
              same cache shares what is left, and this one waits for the clips the
              other holds; every result, or its bad-input failure, goes into the cache
              as soon as it is done;
  3. check    pass 1, entries' metadata only: the recorded shapes must fit the
              stage's columns and width;
  4. write    pass 2: the Parquet is streamed from the cache in manifest order, a row
              group of a few hundred segments at a time (memory stays flat in corpus
              size), every entry checked against its checksum; renamed into place
              with its metadata.

A damaged entry found in 3 or 4 is moved aside and its clip extracted again (the
report lists it under `repaired`). A killed stage resumes at step 2 where it stopped
(its temp files, locks and attempt folders are swept at the next start), and a grown
corpus only extracts what is new. Every segment ends up a row, or in `failures` with
its reason (`skipped: true` when it has no media for this stage); a segment with
neither ends the stage with an error, never with a silently missing row.
"""
from __future__ import annotations

import contextvars
import math
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ..cache import Claims, DamagedEntry, FeatureCache, sweep_temp_files
from .compute import close_dask, retry_log
from ..errors import UserError
from ..progress import progress
from .table import list_array, write_feature_batches

MAX_ROUNDS = 3   # extract -> check -> write, again while damaged entries turn up
POLL_S = 1.0     # how often a stage looks at clips another process is extracting
CLAIM_MIN, CLAIM_MAX = 4, 32   # clips claimed at a time (claim_size), unless the stage needs more in flight


@dataclass
class Plan:
    ids: list[str]                                            # manifest ids, in order
    keys: list[str | None]                                    # cache key per row; None: see skipped
    skipped: dict[int, str] = field(default_factory=dict)     # row -> why there is nothing to extract
    units: dict[str, Any] = field(default_factory=dict)       # key -> work unit (one per distinct key)
    # the keys in the groups they are best extracted in (text: its encoder batches), called only when
    # something is to be extracted; None: one key at a time, in units order
    groups: Callable[[], list[list[str]]] | None = None
    claim_size: int | None = None                             # keys claimed at a time (None: claim_size())
    claim_min: int = CLAIM_MIN                                # claim at least this many (workers' window)


_BAR: contextvars.ContextVar = contextvars.ContextVar("stage_bar", default=None)


def stage_bar():
    """The progress bar run_stage keeps over every clip the stage extracts (the stages' extract steps update
    it), or a silent one outside run_stage."""
    return _BAR.get() or progress(0, "", enabled=False)


def claim_size(remaining: int, at_least: int = CLAIM_MIN) -> int:
    """Keys claimed at a time out of those remaining: an eighth of them (a second stage started on the same
    cache now still finds work), at least `at_least` (the workers' window: keep them busy), at most CLAIM_MAX
    (fewer, longer rounds would not leave a concurrent stage its share)."""
    return max(at_least, min(CLAIM_MAX, math.ceil(remaining / 8)))


@dataclass
class Extracted:
    """What the stage's extract step reports back."""
    errors: dict[str, str] = field(default_factory=dict)      # key -> transient failure (not cached)
    clips: int = 0                                            # units processed
    frames: int = 0                                           # frames / tokens / analysis steps produced
    media_s: float = 0.0                                      # seconds of media processed
    extra: dict = field(default_factory=dict)                 # stage-specific timing

    def add(self, other: Extracted) -> None:
        """Add another extract step's report (a stage extracts a few claimed clips at a time): counts and
        timings ("..._s") add up, other extras are the latest."""
        self.errors.update(other.errors)
        self.clips, self.frames, self.media_s = self.clips + other.clips, self.frames + other.frames, \
            self.media_s + other.media_s
        summed = {k: round(self.extra[k] + v, 3) for k, v in other.extra.items()
                  if k.endswith("_s") and isinstance(v, (int, float)) and isinstance(self.extra.get(k), (int, float))}
        self.extra = {**self.extra, **other.extra, **summed}


# extras that are rates: frames (or tokens) per second of one step, from the summed timings
RATES = {"encoder_frames_per_s": "encode_s", "tokens_per_s_model": "model_s"}


# column name -> (arrow value type, shape of the cached array): () is a scalar column; a tuple of
# "n" (the segment's steps), "dim" (the stage's width) or sizes is a list column, stored flattened
Columns = dict[str, tuple[pa.DataType, tuple]]


class MissingResults(UserError):
    """Segments with neither a result nor a recorded reason after extraction."""


class DamagedEntries(Exception):
    def __init__(self, entries: dict[str, str]):
        super().__init__(f"{len(entries)} damaged cache entries")
        self.entries = entries  # key -> why


def run_stage(stage: str, plan: Plan, cache: FeatureCache, extract: Callable[[dict], Extracted],
              columns: Columns, meta: dict, out_path, *, dim_column: str | None = None,
              show_progress: bool = False, progress_desc: str = "", progress_unit: str = "clip") -> dict:
    """Extract what the cache lacks, check, write out_path (+ .json). Returns the report.

    `meta` may leave "dim" None when only extraction knows it (no encoder is loaded when
    everything is cached); it is then the width of `dim_column` that the entries record.
    With show_progress, one bar (`stage_bar`) runs over every clip extracted.
    """
    t0 = time.perf_counter()
    out_path = Path(out_path)
    sweep_temp_files(out_path.parent)  # what a killed run of any stage left beside its outputs
    cache.sweep()
    done, extracted, repaired, extract_s = Extracted(), set(), {}, 0.0
    arrow_schema = pa.schema([("id", pa.string())] + [
        (name, pa.list_(dtype) if shape else dtype) for name, (dtype, shape) in columns.items()])
    with retry_log(cache.dir / ".attempts") as retries, Claims(cache) as claims:  # markers in the cache: Dask workers share it
        try:
            for _ in range(MAX_ROUNDS):
                t1 = time.perf_counter()
                todo = {key: unit for key, unit in plan.units.items() if not cache.has(key)}
                bar = progress(len(todo), progress_desc or stage, enabled=show_progress and bool(todo), unit=progress_unit)
                token = _BAR.set(bar)
                try:
                    _extract_claimed(plan, todo, extract, cache, claims, done, extracted)
                finally:
                    _BAR.reset(token)
                    bar.close()
                extract_s += time.perf_counter() - t1
                rows, bad = _check(plan, cache, columns, meta, dim_column, done)
                if not bad:
                    report = _report(stage, plan, meta, rows, extracted, repaired, retries, done, extract_s, t0)
                    try:
                        write_feature_batches(out_path, arrow_schema, _record_batches(cache, rows, columns, arrow_schema),
                                              report)
                        return report
                    except DamagedEntries as err:
                        bad = err.entries
                for key, reason in bad.items():
                    repaired[key] = f"{reason}; moved to {cache.move_aside(key).parent}, extracted again"
        finally:
            close_dask()  # the LocalCluster (or client) kept across this stage's maps
    raise UserError(f"{stage}: cache entries under {cache.dir} still fail their checks after {MAX_ROUNDS} "
                    f"rounds of re-extraction (a failing disk?): {next(iter(bad.values()))}")


def _extract_claimed(plan: Plan, todo: dict, extract: Callable[[dict], Extracted], cache: FeatureCache,
                     claims: Claims, done: Extracted, extracted: set) -> None:
    """Extract the clips of `todo`, claiming them a group at a time (about claim_size keys), so that concurrent
    stages on one cache share what is left; then wait for the clips another process claimed, taking over any
    whose holder ends without a result or dies."""
    if not todo:
        return
    groups = plan.groups() if plan.groups else [[key] for key in plan.units]
    queue = deque(g for g in ([k for k in group if k in todo] for group in groups) if g)
    elsewhere, told = [], False  # keys another process held when this one tried them
    while queue or elsewhere:
        size = plan.claim_size or claim_size(sum(map(len, queue)) + len(elsewhere), plan.claim_min)
        mine = {}
        while queue and len(mine) < size:
            for key in queue.popleft():
                if cache.has(key):
                    continue
                if not claims.take(key):
                    elsewhere.append(key)
                elif cache.has(key):  # its holder finished it just now
                    claims.release([key])
                else:
                    mine[key] = todo[key]
        if mine:
            try:
                done.add(extract(mine))
            finally:
                claims.release(mine)
            extracted.update(mine)
            continue
        elsewhere = [key for key in elsewhere if not cache.has(key)]
        if elsewhere:  # nothing left to claim: wait for the others' clips, then try them again
            if not told:
                print(f"{len(elsewhere)} clip(s) are being extracted by another process on {cache.dir}: waiting for them",
                      file=sys.stderr, flush=True)
                told = True
            time.sleep(POLL_S)
            queue.extend([key] for key in elsewhere)
            elsewhere = []


@dataclass
class Rows:
    ids: list[str] = field(default_factory=list)        # segments with a result, in manifest order
    keys: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"id", "reason"[, "skipped": True]}
    notes: list[dict] = field(default_factory=list)


def _check(plan: Plan, cache: FeatureCache, columns: Columns, meta: dict, dim_column: str | None,
           done: Extracted) -> tuple[Rows, dict[str, str]]:
    """Pass 1, entries' metadata only -> (rows to write, damaged entries: key -> why). Sets meta["dim"]."""
    metas, bad = {}, {}
    for key in plan.units:
        try:
            metas[key] = cache.meta(key)
        except DamagedEntry as err:
            bad[key] = str(err)
    if meta.get("dim") is None:  # the width most entries record (a stray one is then the odd one out)
        widths = Counter(m["shapes"][dim_column][-1] for m in metas.values()
                         if m and m.get("ok") and dim_column and m["shapes"].get(dim_column))
        meta["dim"] = int(widths.most_common(1)[0][0]) if widths else 0
    for key, entry_meta in metas.items():
        problem = entry_meta and entry_meta.get("ok") and _shape_problem(entry_meta["shapes"], columns, meta["dim"])
        if problem:
            bad[key] = problem
    rows, missing = Rows(), []
    for i, (id_, key) in enumerate(zip(plan.ids, plan.keys)):
        entry_meta = metas.get(key) if key is not None else None
        if key is None:
            rows.failures.append({"id": id_, "reason": plan.skipped[i], "skipped": True})
        elif key in bad:
            continue
        elif entry_meta is None and key in done.errors:  # transient: not cached, the next run tries again
            rows.failures.append({"id": id_, "reason": done.errors[key]})
        elif entry_meta is None:
            missing.append(id_)
        elif not entry_meta.get("ok"):
            rows.failures.append({"id": id_, "reason": entry_meta.get("reason", "unknown")})
        else:
            rows.ids.append(id_)
            rows.keys.append(key)
            if entry_meta.get("note"):
                rows.notes.append({"id": id_, "note": entry_meta["note"]})
    if missing and not bad:
        raise MissingResults(f"{len(missing)} segment(s) have no result in {cache.dir} and no recorded reason "
                             f"(first {missing[0]}): was the cache changed by another process? Re-run the stage")
    return rows, bad


def _shape_problem(shapes: dict, columns: Columns, dim: int) -> str | None:
    """Why an entry's recorded array shapes do not fit the stage's columns, or None."""
    steps = None
    for name, (_, want) in columns.items():
        if name not in shapes:
            return f"no {name} array"
        got = tuple(shapes[name])
        if len(got) != len(want):
            return f"{name} has shape {got}, expected {want}"
        for size, w in zip(got, want):
            if w == "n" and steps is not None and size != steps:
                return f"{name} has {size} steps, other arrays {steps}"
            if w == "n":
                steps = size
            elif w == "dim" and dim and size != dim:
                return f"{name} is {size} wide, expected {dim}"
            elif isinstance(w, int) and size != w:
                return f"{name} has shape {got}, expected {want}"
    return None


def _report(stage: str, plan: Plan, meta: dict, rows: Rows, extracted: set, repaired: dict, retries: list,
            done: Extracted, extract_s: float, t0: float) -> dict:
    first_id = {}
    for id_, key in zip(plan.ids, plan.keys):
        first_id.setdefault(key, id_)
    skipped = sum(1 for f in rows.failures if f.get("skipped"))
    return {
        "stage": stage,
        **meta,
        "counts": {"segments": len(plan.ids), "ok": len(rows.ids), "failed": len(rows.failures) - skipped,
                   "skipped": skipped, "cached": len(plan.units) - len(extracted), "extracted": len(extracted),
                   "repaired": len(repaired)},
        "failures": rows.failures,
        "notes": rows.notes,
        # entries that failed a check: moved aside and extracted again (cache.py)
        "repaired": [{"id": first_id.get(key), "key": key, "reason": reason} for key, reason in repaired.items()],
        # units re-run after their worker process died (compute.py): none lost, listed here
        "retries": [{"id": first_id.get(r["key"]), **r} for r in retries],
        "wall_s": round(time.perf_counter() - t0, 3),
        "throughput": _throughput(done, extract_s),
    }


def _record_batches(cache: FeatureCache, rows: Rows, columns: Columns, arrow_schema, rows_per_batch: int = 256):
    """Pass 2: the cached arrays, a few hundred segments at a time (a row group each), each entry checked.
    Damaged entries stop the writing (the temp file is dropped) once all of them are known."""
    bad = {}
    for start in range(0, len(rows.ids), rows_per_batch):
        entries = []
        for key in rows.keys[start:start + rows_per_batch]:
            try:
                entry = cache.get(key)
                entries.append(entry.arrays if entry else None)
                if entry is None:
                    bad[key] = "entry vanished while the table was written"
            except DamagedEntry as err:
                bad[key] = str(err)
        if bad:
            continue
        arrays = [pa.array(rows.ids[start:start + rows_per_batch], pa.string())]
        for name, (dtype, shape) in columns.items():
            np_type = dtype.to_pandas_dtype()
            if shape:
                arrays.append(list_array([e[name] for e in entries], np_type))
            else:
                arrays.append(pa.array(np.asarray([e[name] for e in entries]).reshape(-1).astype(np_type), dtype))
        yield pa.RecordBatch.from_arrays(arrays, schema=arrow_schema)
    if bad:
        raise DamagedEntries(bad)
    if not rows.ids:
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
        **{rate: round(done.frames / done.extra[step], 2) if done.extra.get(step) else None
           for rate, step in RATES.items() if step in done.extra},
    }


def row_str(value) -> str:
    """Manifest strings may arrive as None/NaN from pandas; treat those as empty."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def stage_main(stage: str, module, argv: list[str] | None = None) -> int:
    """Entry point shared by stages/{text,visual,acoustic}.py: `python -m stages.<stage> MANIFEST OUT.parquet`.

    Reads params `features.<stage>` (the section class registered by the module), `cache`, and
    `compute` when the module runs clips in parallel (`module.PARALLEL`). Run from the repo root,
    as DVC does. Bad params, a missing manifest, an unavailable encoder or a full disk: one line, exit
    code 2. Progress goes to stderr: a bar on a terminal, a line every ~10 s when piped."""
    import argparse

    from .. import params
    from ..cache import DISK_FULL, CacheParams
    from .compute import Compute
    from ..errors import guarded, os_error_line, require
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
        try:
            meta = run(manifest, cfg, cache_root, args.out, compute=compute, show_progress=True)
        except OSError as err:
            line = os_error_line(err)
            if line is None:
                raise
            if err.errno in DISK_FULL:
                line += "; the clips already extracted are kept in the cache"
            elif Path(err.filename or "").absolute().is_relative_to(Path(cache_root).absolute()):
                line += (f" (a cache shared by a group: `chgrp -R GROUP {cache_root} && chmod -R g+rwX {cache_root} && "
                         f"find {cache_root} -type d -exec chmod g+s {{}} +`, see docs/faults.md)")
            raise UserError(line) from None
        _print_summary(stage, meta, args.out)
        return 0

    return guarded(stage, main)


def _print_summary(stage: str, meta: dict, out) -> None:
    c, tp = meta["counts"], meta["throughput"]
    skipped = Counter(f["reason"] for f in meta["failures"] if f.get("skipped"))
    if c["skipped"] == c["segments"]:  # e.g. the visual stage of a transcript-only corpus
        reasons = "; ".join(f"{reason}: {n}" for reason, n in skipped.items())
        print(f"{stage}: skipped: no media for this stage in {c['segments']} segments [{reasons}] -> {out} (an empty table)")
        return
    rate = f", {tp['clips_per_s']:.2f} clips/s, {tp['media_s_per_s']:.1f} s media/s" if "clips_per_s" in tp else ""
    print(f"{stage}: {c['ok']}/{c['segments']} segments -> {out} (dim {meta['dim']}; {c['cached']} cached, "
          f"{c['extracted']} extracted, {c['failed']} failed, {c['skipped']} skipped, {c['repaired']} repaired) "
          f"in {meta['wall_s']:.1f} s{rate}")
    for reason, n in skipped.items():
        print(f"  skipped {n}: {reason}")
    for label, items in (("repaired", meta["repaired"]), ("re-run", meta["retries"]),
                         ("failed", [f for f in meta["failures"] if not f.get("skipped")])):
        for item in items[:5]:
            print(f"  {label} {item['id']}: {item['reason']}")
        if len(items) > 5:
            print(f"  ... {len(items) - 5} more {label} in {Path(out).with_suffix('.run.json')}")
