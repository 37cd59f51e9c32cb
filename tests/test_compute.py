"""Worker death: a unit whose worker process dies is re-run, nothing is lost, the stage report says so.

A toy stage goes through the real runner (plan -> extract into the cache -> Parquet):
its work unit writes a cache entry like the acoustic one, and kills its own worker
process (os._exit, as an out-of-memory kill would) on its first attempt, or on every
attempt. Its output must equal an inline run's, value for value.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.cache import FeatureCache, make_key
from pipeline.features.compute import ALLOWED_FAILURES, Compute, parallel_map
from pipeline.features.table import read_feature_table
from pipeline.features.runner import Extracted, Plan, run_stage

COLUMNS = {"n_frames": (pa.int32(), ()), "feats": (pa.float32(), ("n", "dim"))}


def toy_unit(unit: dict) -> dict:
    """Runs in a worker: dies as asked (never in the test's own process), else writes its entry."""
    flag = Path(unit["flags"]) / unit["key"]
    in_worker = os.getpid() != unit["parent_pid"]
    if in_worker and (unit["die"] == "always" or (unit["die"] == "once" and not flag.exists())):
        flag.touch()
        os._exit(1)
    feats = np.random.default_rng(unit["seed"]).normal(size=(3 + unit["seed"] % 4, 5)).astype(np.float32)
    FeatureCache(unit["cache_root"], "toy").put(unit["key"], {"n_frames": np.int32(len(feats)), "feats": feats})
    return {"frames": len(feats)}


def run_toy_stage(tmp: Path, name: str, compute: Compute, die: dict[int, str], cache: str = "") -> dict:
    cache_root, flags = tmp / f"cache-{cache or name}", tmp / f"flags-{name}"
    flags.mkdir()
    plan = Plan(ids=[f"v/{i}" for i in range(8)], keys=[])
    for i, id_ in enumerate(plan.ids):
        key = make_key("toy", i)
        plan.keys.append(key)
        plan.units[key] = {"key": key, "seed": i, "die": die.get(i), "flags": str(flags),
                           "parent_pid": os.getpid(), "cache_root": str(cache_root)}

    def extract(todo: dict) -> Extracted:
        units, out = list(todo.values()), Extracted()
        for i, result, error, _ in parallel_map(toy_unit, units, compute):
            out.clips += 1
            if error is not None:
                out.errors[units[i]["key"]] = error
            else:
                out.frames += result["frames"]
        return out

    return run_stage("toy", plan, FeatureCache(cache_root, "toy"), extract, COLUMNS, {"dim": 5}, tmp / f"{name}.parquet")


def feats_by_id(path: Path) -> dict:
    table = read_feature_table(path)[0]
    return {id_: table.get(id_, "feats") for id_ in table.ids}


@pytest.fixture(scope="module")
def inline_reference(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("inline")
    meta = run_toy_stage(tmp, "inline", Compute("local", 1), {})
    assert meta["counts"]["ok"] == 8 and meta["retries"] == []
    return feats_by_id(tmp / "inline.parquet")


def check_against_reference(tmp: Path, name: str, meta: dict, reference: dict, lost: set[str]) -> None:
    assert meta["counts"]["ok"] == 8 - len(lost)
    assert {f["id"] for f in meta["failures"]} == lost
    got = feats_by_id(tmp / f"{name}.parquet")
    assert set(got) == set(reference) - lost
    for id_, feats in got.items():
        assert np.array_equal(feats, reference[id_]), id_
    assert not any((tmp / f"cache-{name}" / "toy" / ".attempts").glob("*/*")), "attempt markers left behind"


def test_dask_worker_death_is_retried_and_reported(tmp_path, inline_reference):
    compute = Compute("dask", 1, "local:2")
    # Dask re-runs a unit whose worker died elsewhere; one that kills every worker it runs on
    # fails alone (KilledWorker), and the units queued behind it on those workers still finish
    meta = run_toy_stage(tmp_path, "dask", compute, {2: "once", 5: "once", 6: "always"})
    check_against_reference(tmp_path, "dask", meta, inline_reference, lost={"v/6"})
    assert "KilledWorker" in next(f["reason"] for f in meta["failures"] if f["id"] == "v/6")
    retried = {r["id"]: r for r in meta["retries"]}
    assert set(retried) == {"v/2", "v/5", "v/6"}
    assert all(retried[id_]["reason"].startswith("worker process died during attempt 1") and
               retried[id_]["reason"].endswith("re-run and finished") for id_ in ("v/2", "v/5"))
    assert retried["v/6"]["deaths"] >= 3 and retried["v/6"]["reason"].endswith("failed (see failures)")


def test_local_worker_death_is_retried_and_a_killer_unit_fails_alone(tmp_path, inline_reference):
    # loky stops the whole pool when one worker dies: the units in flight with it are re-run
    # too, and a unit that kills its worker every time is pinned down and fails on its own
    meta = run_toy_stage(tmp_path, "local", Compute("local", 2), {1: "once", 6: "always"})
    check_against_reference(tmp_path, "local", meta, inline_reference, lost={"v/6"})
    assert "v/1" in {r["id"] for r in meta["retries"]}
    reason = next(f["reason"] for f in meta["failures"] if f["id"] == "v/6")
    assert f"{ALLOWED_FAILURES + 1} runs" in reason
    # the failure is transient, not cached: a healthy re-run extracts it and nothing else
    again = run_toy_stage(tmp_path, "again", Compute("local", 2), {}, cache="local")
    assert again["counts"]["extracted"] == 1 and again["counts"]["ok"] == 8


def test_parallel_map_without_a_retry_log_still_recovers(tmp_path):
    items = [{"key": f"k{i}", "seed": i, "die": "once" if i == 3 else None, "flags": str(tmp_path),
              "parent_pid": os.getpid(), "cache_root": str(tmp_path / "cache")} for i in range(4)]
    results = {i: r for i, r, e, _ in parallel_map(toy_unit, items, Compute("local", 2)) if e is None}
    assert sorted(results) == [0, 1, 2, 3]


def stamped_unit(i: int) -> float:
    started = time.time()
    time.sleep(0.02)
    return started


@pytest.mark.parametrize("backend", ["local", "dask"])
def test_a_slow_caller_holds_back_the_workers(backend):
    # a slow consumer (the encoder) must not let finished units pile up in memory: a unit only
    # starts once fewer than 2 x n_jobs units are running or waiting to be read
    compute, consumed, started = Compute(backend, 2), [], []
    for _, t, error, _ in parallel_map(stamped_unit, list(range(10)), compute):
        assert error is None
        consumed.append(time.time())
        started.append(t)
        time.sleep(0.25)
    for t in started:
        outstanding = sum(s <= t for s in started) - sum(c <= t for c in consumed)
        assert outstanding <= 2 * compute.n_jobs, (outstanding, sorted(started), consumed)


def test_joblib_parallel_still_works_after_a_local_map():
    # the local map keeps its own process pool: joblib's shared one (the demo generator uses it) is untouched
    from joblib import Parallel, delayed

    assert sorted(r for _, r, _, _ in parallel_map(abs, [-1, -2, -3], Compute("local", 2))) == [1, 2, 3]
    assert Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(3)) == [0, 1, 2]


def test_n_jobs_is_a_worker_count_or_minus_one():
    from pipeline.errors import ParamError
    from pipeline.params import parse

    assert parse(Compute, {"n_jobs": -1}, "compute").n_jobs == (os.cpu_count() or 1)
    assert parse(Compute, {"n_jobs": 3}, "compute").n_jobs == 3
    for bad in (-5, -2, 0):
        with pytest.raises(ParamError, match=rf"compute.n_jobs.*{bad}.*a worker count >= 1, or -1 for all cores"):
            parse(Compute, {"n_jobs": bad}, "compute")


def _state(pid: int) -> str:
    """A process's state letter ('' when gone; 'Z': dead, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _children(pid: int) -> list[int]:
    """The loky processes `pid` started: its workers (and loky's resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and "loky" in Path(stat.parent, "cmdline").read_bytes().decode(errors="replace"):
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_local_workers_die_with_the_stage_process():
    """kill -9 of a stage (the OOM killer, a cancelled job) runs no clean-up: its workers must still go,
    not idle on for minutes holding their memory."""
    import signal
    import subprocess
    import sys

    from conftest import REPO

    script = ("import time; from pipeline.features.compute import Compute, parallel_map; "
              "list(parallel_map(time.sleep, [120] * 4, Compute('local', 2)))")
    stage = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline, workers = time.time() + 60, []
        while len(workers) < 3 and time.time() < deadline and stage.poll() is None:  # 2 workers + the tracker
            time.sleep(0.2)
            workers = _children(stage.pid)
        assert len(workers) == 3, f"the workers did not start ({workers})"
        os.kill(stage.pid, signal.SIGKILL)
    finally:
        stage.kill()
        stage.wait()
    deadline = time.time() + 10
    while any(_state(w) not in ("", "Z") for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert [_state(w) for w in workers if _state(w) not in ("", "Z")] == [], "workers outlived their stage"
