"""Fault injection: what the feature stages survive. tests/test_faults.py runs a few of each fault
on tiny encoders; this command runs more, on the demo corpus and the real encoders, and prints the
figures of the README's "Faults: what survives what":

    python -m tools.faults --corpus raw/demo --clips 12 --points 10 --seed 0

A project folder (params.yaml, features/manifest.parquet, its own cache) goes through each feature
stage as DVC runs it (`stage_main`, from the project folder), and every outcome is compared with a
reference run on an empty cache:

  kill -9      the stage process SIGKILLs itself right after its N-th disk event (a temp file made,
               completed or renamed into place, a lock taken or released, a Parquet row group
               written), N drawn at random from the events of the reference run; then the stage is run
               again. The disk only changes at these events, so every state a kill at any moment can
               leave is one of those sampled;
  damaged      cache entries damaged in each way of DAMAGE, one entry each, then the stage run again:
               each must be listed under `repaired`;
  ENOSPC       os.fsync raises "No space left on device" from its N-th call on: the stage must stop
               with one line (exit 2) and leave no temp file; then a normal run;
  dead worker  acoustic on a 2-worker Dask LocalCluster whose worker process is killed in the middle
               of two clips.

"Identical" means: the same table (ids and every value), the same failures with the same reasons,
every segment a row or a failure, and nothing left behind (temp files, locks, attempt folders).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import io
import json
import multiprocessing
import os
import random
import signal
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

STAGES = ("text", "visual", "acoustic")


# --------------------------------------------------------------------------- a project, run in-process

def make_project(folder: Path, params: dict, manifest) -> Path:
    """A folder holding params.yaml (its cache inside the folder) and features/manifest.parquet."""
    import yaml

    (folder / "features").mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump({**params, "cache": {"dir": str(folder / "cache")}}))
    manifest.to_parquet(folder / "features" / "manifest.parquet")
    return folder


def run_stage_in(project: Path, stage: str) -> tuple[int, str, str]:
    """Run a feature stage as `python -m stages.<stage>` would, in this process -> (exit code, stdout, stderr)."""
    from pipeline.features.runner import stage_main

    module = importlib.import_module(f"pipeline.features.{stage}")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(project), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = stage_main(stage, module, ["features/manifest.parquet", f"features/{stage}.parquet"])
    return rc, out.getvalue(), err.getvalue()


def outcome(project: Path, stage: str) -> dict:
    """What a run leaves that must not depend on faults: the table's data, failures and notes (with reasons)."""
    import pyarrow.parquet as pq

    path = project / "features" / f"{stage}.parquet"
    if not path.is_file():
        return {"table": None}
    table = pq.read_table(path)
    report = json.loads(table.schema.metadata[b"pipeline"])
    return {"table": table.replace_schema_metadata(None), "report": report,
            "failures": sorted((f["id"], f["reason"]) for f in report["failures"]),
            "notes": sorted((n["id"], n["note"]) for n in report["notes"])}


def differences(got: dict, want: dict, manifest_ids: list[str]) -> list[str]:
    """Why `got` is not the reference outcome `want` (empty when it is)."""
    if got["table"] is None:
        return ["no table written"]
    problems = [] if got["table"].equals(want["table"]) else ["table differs"]
    problems += [f"{k} differ: {got[k]} vs {want[k]}" for k in ("failures", "notes") if got[k] != want[k]]
    rows, listed = got["table"].column("id").to_pylist(), [i for i, _ in got["failures"]]
    if sorted(rows + listed) != sorted(manifest_ids):
        problems.append("segments neither a row nor a failure, or both")
    return problems


def leftovers(project: Path) -> list[str]:
    """Temp files, lock files and attempt folders left under the project (none after a finished run)."""
    found = [*project.rglob("*.tmp"), *project.rglob("*.lock"), *project.rglob(".attempts")]
    return sorted(str(p.relative_to(project)) for p in found)


# --------------------------------------------------------------------------- kill -9 at a disk event

class DiskEvents:
    """Counts the disk events of this process under `root` (see the module doc); with kill_at N, the
    process SIGKILLs itself right after the N-th. Installed by patching os, tempfile and pyarrow."""

    def __init__(self, root: Path, kill_at: int = 0):
        self.root, self.kill_at, self.count, self._undo = str(Path(root).resolve()), kill_at, 0, []
        self.fsyncs = 0  # completed writes: where ENOSPC can strike

    def _event(self, name: str, path=None) -> None:
        if path is not None and not os.path.abspath(os.fspath(path)).startswith(self.root):
            return
        self.count += 1
        self.fsyncs += name == "fsync"
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def _wrap(self, owner, name: str, path_of) -> None:
        real = getattr(owner, name)

        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            self._event(name, path_of(args, kwargs, result))
            return result
        setattr(owner, name, wrapped)
        self._undo.append((owner, name, real))

    def __enter__(self) -> DiskEvents:
        import pyarrow.parquet as pq

        self._wrap(tempfile, "mkstemp", lambda a, k, r: r[1])
        self._wrap(os, "fsync", lambda a, k, r: None)
        for name in ("replace", "link"):
            self._wrap(os, name, lambda a, k, r: a[1])
        self._wrap(os, "unlink", lambda a, k, r: a[0])
        self._wrap(pq.ParquetWriter, "write", lambda a, k, r: None)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, real in reversed(self._undo):
            setattr(owner, name, real)


def _killed_child(project: str, stage: str, kill_at: int) -> None:
    with DiskEvents(Path(project), kill_at):
        rc = run_stage_in(Path(project), stage)[0]
    os._exit(rc)


_FORKSERVER = None


def _forkserver():
    """Children are forked from a server that has imported the libraries but run nothing (fork-safe, and
    a child starts in a fraction of a second instead of paying the imports)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["pipeline", "torch", "transformers", "open_clip", "librosa",
                                            *(f"pipeline.features.{s}" for s in STAGES)])
    return _FORKSERVER


def run_killed(project: Path, stage: str, kill_at: int) -> int:
    """Run the stage in a child process that kills itself (-9) after disk event kill_at -> its exit code."""
    target = importlib.import_module("tools.faults")._killed_child  # by that name, also under `python -m tools.faults`
    child = _forkserver().Process(target=target, args=(str(project), stage, kill_at))
    child.start()
    child.join()
    return child.exitcode


def _concurrent_child(project: str, stage: str, barrier) -> None:
    from pipeline.cache import FeatureCache

    real, puts = FeatureCache.put, [0]

    def counted(self, *args, **kwargs):
        puts[0] += 1
        return real(self, *args, **kwargs)
    FeatureCache.put = counted
    barrier.wait()
    rc = run_stage_in(Path(project), stage)[0]
    (Path(project) / "puts").write_text(str(puts[0]))
    os._exit(rc)


def run_concurrently(projects: list[Path], stage: str) -> list[int]:
    """The stage in one child process per project, released together -> cache entries each one wrote."""
    ctx = _forkserver()
    barrier = ctx.Barrier(len(projects))
    target = importlib.import_module("tools.faults")._concurrent_child
    children = [ctx.Process(target=target, args=(str(p), stage, barrier)) for p in projects]
    for child in children:
        child.start()
    for child in children:
        child.join()
    if any(child.exitcode for child in children):
        raise RuntimeError(f"{stage}: exit codes {[child.exitcode for child in children]}")
    return [int((p / "puts").read_text()) for p in projects]


def kill_points(total_events: int, n: int, rng: random.Random) -> list[int]:
    return sorted(rng.sample(range(1, total_events + 1), min(n, total_events)))


# --------------------------------------------------------------------------- damaged entries

def _member_span(path: Path) -> tuple[int, int]:
    """(offset, size) of the largest member's data inside an .npz."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
    return info.header_offset + 30 + int(name_len) + int(extra_len), info.compress_size


def _flip(path: Path) -> None:
    """64 bytes flipped in the middle of the largest array (the zip index intact: its CRC catches it)."""
    start, size = _member_span(path)
    lo = start + max(0, size // 2 - 32)
    data = bytearray(path.read_bytes())
    data[lo:lo + min(64, size)] = bytes(b ^ 0xFF for b in data[lo:lo + min(64, size)])
    path.write_bytes(bytes(data))


def _rewrite(path: Path, change) -> None:
    """Re-save an entry as a plain .npz after change(arrays, meta) (valid zip, valid CRCs)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("__meta__")))
    change(arrays, meta)
    np.savez(path, **arrays, __meta__=np.array(json.dumps(meta)))


def _wrong_width(path: Path, stage: str) -> None:
    """Rewritten through the cache itself (a valid checksum) with the sequence cut to 10 wide."""
    from pipeline import schema
    from pipeline.cache import FeatureCache

    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
    seq = schema.get(stage).sequence
    arrays[seq] = arrays[seq].reshape(len(arrays[seq]), -1)[:, :10]
    FeatureCache(path.parents[2], stage).put(path.stem, arrays)


def _garble_meta(path: Path) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
    np.savez(path, **arrays, __meta__=np.array("{not json"))


def _bump(arrays: dict) -> None:
    name = next(k for k, v in arrays.items() if v.dtype.kind == "f" and v.size)
    arrays[name] = arrays[name] + 1


DAMAGE = {  # kind -> damage(entry path, stage)
    "truncated (zip index lost)": lambda p, s: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zero-length file": lambda p, s: p.write_bytes(b""),
    "64 bytes flipped (zip index intact)": lambda p, s: _flip(p),
    "metadata not JSON": lambda p, s: _garble_meta(p),
    "no checksum (hand-made entry)": lambda p, s: _rewrite(p, lambda a, m: m.pop("sha256")),
    "values changed, CRCs valid": lambda p, s: _rewrite(p, lambda a, m: _bump(a)),
    "10-wide sequence, valid checksum": _wrong_width,
}


def damage_entries(project: Path, stage: str) -> dict[str, str]:
    """Damage one good cache entry per kind of DAMAGE -> {entry key: kind}."""
    from pipeline.cache import FeatureCache

    keys = good_keys(project, stage)
    if len(keys) < len(DAMAGE):
        raise ValueError(f"{stage}: {len(keys)} good entries, {len(DAMAGE)} kinds of damage to apply")
    cache = FeatureCache(project / "cache", stage)
    for key, damage in zip(keys, DAMAGE.values()):
        damage(cache.path(key), stage)
    return dict(zip(keys, DAMAGE))


# --------------------------------------------------------------------------- a full disk, a dead worker

@contextlib.contextmanager
def disk_full_from(n: int):
    """os.fsync raises ENOSPC from its n-th call on (every write completes with an fsync: atomic_write)."""
    real, calls = os.fsync, [0]

    def fsync(fd):
        calls[0] += 1
        if calls[0] >= n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    os.fsync = fsync
    try:
        yield calls
    finally:
        os.fsync = real


DIE_ENV = "MSA_FAULT_DIE"  # "<flag folder>|key,key": units whose worker dies on their first attempt


def extract_clip_dying(unit: dict) -> dict:
    """acoustic.extract_clip, except that the worker process is killed (-9, as the OOM killer would)
    the first time it runs one of the units named in $MSA_FAULT_DIE."""
    from pipeline.features import acoustic

    flags, _, keys = os.environ.get(DIE_ENV, "|").partition("|")
    flag = Path(flags) / unit["key"]
    if unit["key"] in keys.split(",") and not flag.exists():
        flag.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return acoustic.extract_clip(unit)


@contextlib.contextmanager
def workers_dying_on(keys: list[str], flags: Path):
    """Within the block, acoustic clips run through extract_clip_dying, killing a worker on each of `keys` once."""
    from pipeline.features import acoustic

    flags.mkdir(parents=True, exist_ok=True)
    real, saved = acoustic.extract_clip, os.environ.get(DIE_ENV)
    os.environ[DIE_ENV] = f"{flags}|{','.join(keys)}"  # before the cluster starts: its workers inherit it
    acoustic.extract_clip = extract_clip_dying
    try:
        yield
    finally:
        acoustic.extract_clip = real
        if saved is None:
            os.environ.pop(DIE_ENV, None)
        else:
            os.environ[DIE_ENV] = saved


def good_keys(project: Path, stage: str) -> list[str]:
    """Keys of the stage's cache entries holding a result (which clips a fault should hit)."""
    from pipeline.cache import FeatureCache

    cache = FeatureCache(project / "cache", stage)
    return sorted(p.stem for p in cache.dir.glob("*/*.npz") if cache.meta(p.stem).get("ok"))


# --------------------------------------------------------------------------- the scenarios

class Tally:
    """Outcomes per (stage, fault): tried, identical, and what differed."""

    def __init__(self):
        self.rows: dict[tuple[str, str], dict] = {}

    def add(self, stage: str, fault: str, problems: list[str]) -> None:
        row = self.rows.setdefault((stage, fault), {"tried": 0, "identical": 0, "problems": []})
        row["tried"] += 1
        row["identical"] += not problems
        row["problems"] += problems

    def table(self) -> str:
        lines = ["| stage | fault | tried | identical |", "|---|---|---|---|"]
        lines += [f"| {s} | {f} | {r['tried']} | {r['identical']} |" for (s, f), r in self.rows.items()]
        return "\n".join(lines)


def fresh(project: Path, folder: Path) -> Path:
    """A copy of the project's params and manifest with an empty cache and no outputs."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    (folder / "features").mkdir(parents=True)
    shutil.copy(project / "features" / "manifest.parquet", folder / "features")
    (folder / "params.yaml").write_text((project / "params.yaml").read_text().replace(
        str(project / "cache"), str(folder / "cache")))
    return folder


def reference(project: Path, stage: str) -> tuple[dict, DiskEvents]:
    """An uninterrupted run on an empty cache -> (its outcome, its disk events counted)."""
    with DiskEvents(project) as events:
        rc, out, err = run_stage_in(project, stage)
    if rc != 0:
        raise RuntimeError(f"reference {stage} run failed: {err.strip()}")
    return outcome(project, stage), events


def try_kills(project: Path, stage: str, want: dict, points: list[int], ids: list[str], tally: Tally) -> None:
    """Kill at each point, then run again: identical to the reference, nothing left behind."""
    for point in points:
        run = fresh(project, project.parent / f"{project.name}-kill")
        code = run_killed(run, stage, point)
        killed = code == -signal.SIGKILL
        rc, _, err = run_stage_in(run, stage)
        problems = [] if killed else [f"point {point}: not killed (exit {code})"]
        problems += [f"point {point}: exit {rc} {err.strip()}"] if rc else []
        problems += [f"point {point}: {p}" for p in differences(outcome(run, stage), want, ids)]
        problems += [f"point {point}: left {leftovers(run)}"] if leftovers(run) else []
        tally.add(stage, "kill -9 at a random disk event, then re-run", problems)


def try_damage(project: Path, stage: str, want: dict, ids: list[str], tally: Tally) -> None:
    """One entry per kind of DAMAGE (on the reference's cache), then a run: identical, each listed as repaired."""
    damaged = damage_entries(project, stage)
    rc, _, err = run_stage_in(project, stage)
    got = outcome(project, stage)
    repaired = {r["key"] for r in got["report"]["repaired"]} if got["table"] is not None else set()
    for key, kind in damaged.items():
        problems = [f"exit {rc} {err.strip()}"] if rc else []
        problems += differences(got, want, ids) + ([] if key in repaired else ["not listed as repaired"])
        tally.add(stage, f"damaged entry: {kind}", problems)


def try_disk_full(project: Path, stage: str, want: dict, ids: list[str], points: list[int], tally: Tally) -> None:
    """ENOSPC from the N-th write: one line, exit 2, no temp file; then a normal run equals the reference."""
    for point in points:
        run = fresh(project, project.parent / f"{project.name}-full")
        with disk_full_from(point):
            rc, _, err = run_stage_in(run, stage)
        last = (err.strip().splitlines() or [""])[-1]  # the stage's error: one line, no traceback
        problems = [] if rc == 2 and last.startswith(f"{stage}: No space left") and "Traceback" not in err else \
            [f"write {point}: exit {rc}, stderr {err.strip()[-300:]!r}"]
        problems += [f"write {point}: left {leftovers(run)}"] if leftovers(run) else []
        rc, _, err = run_stage_in(run, stage)
        problems += [f"write {point}: re-run exit {rc}"] if rc else []
        problems += [f"write {point}: {p}" for p in differences(outcome(run, stage), want, ids)]
        tally.add(stage, "ENOSPC on a write, then re-run", problems)



def try_dead_worker(project: Path, want: dict, ids: list[str], tally: Tally, clips: int = 2) -> None:
    """acoustic on a 2-worker Dask LocalCluster; a worker dies (-9) in the middle of each of `clips` clips
    (picked among the project cache's good entries)."""
    import yaml

    run = fresh(project, project.parent / f"{project.name}-dask")
    raw = yaml.safe_load((run / "params.yaml").read_text())
    raw["compute"] = {**raw.get("compute", {}), "backend": "dask", "scheduler": "local:2"}
    (run / "params.yaml").write_text(yaml.safe_dump(raw))
    keys = good_keys(project, "acoustic")[:clips]
    with workers_dying_on(keys, run / "die-flags"):
        rc, _, err = run_stage_in(run, "acoustic")
    got = outcome(run, "acoustic")
    problems = [f"exit {rc} {err.strip()}"] if rc else []
    problems += differences(got, want, ids)
    retried = {r["key"] for r in got["report"]["retries"]} if got["table"] is not None else set()
    problems += [] if retried >= set(keys) else [f"retries {sorted(retried)} miss {sorted(set(keys) - retried)}"]
    problems += [f"left {leftovers(run)}"] if leftovers(run) else []
    tally.add("acoustic", f"Dask worker killed mid-clip ({clips} clips)", problems)


def run_all(project: Path, stages, kills: int, disk_full: int, seed: int, dask: bool = True) -> Tally:
    """Every scenario on every stage of a project -> the tally. The project's own cache ends up damaged."""
    import pandas as pd

    ids = list(pd.read_parquet(project / "features" / "manifest.parquet")["id"])
    rng, tally = random.Random(seed), Tally()
    for stage in stages:
        t0 = time.perf_counter()
        want, events = reference(project, stage)
        points, writes = kill_points(events.count, kills, rng), full_disk_points(events.fsyncs, disk_full, rng)
        print(f"faults: {stage}: kill -9 after disk events {points} of {events.count}; ENOSPC from writes {writes} "
              f"of {events.fsyncs}", flush=True)
        try_kills(project, stage, want, points, ids, tally)
        try_disk_full(project, stage, want, ids, writes, tally)
        if stage == "acoustic" and dask:
            try_dead_worker(project, want, ids, tally)
        try_damage(project, stage, want, ids, tally)
        print(f"faults: {stage} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return tally


def full_disk_points(writes: int, n: int, rng: random.Random) -> list[int]:
    """The first write (a cache entry), the Parquet (the second last: the JSON sidecar is last), then random ones."""
    points = [1, max(1, writes - 1)]
    points += rng.sample(range(2, max(2, writes - 1)), min(max(0, n - 2), max(0, writes - 3)))
    return sorted(set(points))[:n]


# --------------------------------------------------------------------------- the benchmark

def demo_project(folder: Path, corpus: Path, clips: int) -> Path:
    """A project over the first `clips` segments of a corpus, params.yaml's defaults with inline workers
    (so that the stage process is the one that writes, and is killed)."""
    import yaml

    from pipeline.prepare import build_manifest

    raw = yaml.safe_load(Path("params.yaml").read_text())
    manifest, _ = build_manifest({**raw["data"], "root": str(corpus)}, progress=False)
    params = {"features": raw["features"], "compute": {**raw["compute"], "n_jobs": 1}}
    return make_project(folder, params, manifest.head(clips))


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(prog="python -m tools.faults", description=__doc__.split("\n\n")[0])
    cli.add_argument("--corpus", default="raw/demo", help="a corpus in the MMSA layout (default raw/demo)")
    cli.add_argument("--clips", type=int, default=12, help="segments of the corpus to use (default 12)")
    cli.add_argument("--points", type=int, default=10, help="kill -9 points per stage (default 10)")
    cli.add_argument("--disk-full", type=int, default=3, help="ENOSPC points per stage (default 3)")
    cli.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--no-dask", action="store_true", help="skip the dead Dask worker")
    args = cli.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="msa-faults-") as tmp:
        project = demo_project(Path(tmp) / "project", Path(args.corpus).resolve(), args.clips)
        tally = run_all(project, args.stages, args.points, args.disk_full, args.seed, dask=not args.no_dask)
    print(f"\n{args.clips} segments of {args.corpus}, seed {args.seed}, {time.perf_counter() - t0:.0f} s\n")
    print(tally.table())
    bad = {k: r["problems"] for k, r in tally.rows.items() if r["problems"]}
    for (stage, fault), problems in bad.items():
        print(f"{stage} / {fault}: {problems[:3]}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
