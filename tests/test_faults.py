"""Faults: what the feature stages survive (the scenarios live in tools/faults.py; `python -m tools.faults`
runs more of them). Every outcome must equal an uninterrupted run: the same table, the same failures with
the same reasons, every segment a row or a failure, nothing left behind.

A 12-segment corpus: 8 clips with a tone, a clip without audio, a clip that fails to decode, a still image
and a transcript alone, each with its own transcript; the tiny encoders of test_features.
"""
from __future__ import annotations

import random
import socket
import subprocess

import numpy as np
import pyarrow as pa
import pytest

from conftest import make_clip
from pipeline.cache import Claims, FeatureCache, make_key
from pipeline.features.runner import Extracted, Plan, run_stage
from test_features import corrupt_middle, librosa_warm, make_params, manifest_of, tiny_bert, tiny_clip  # noqa: F401
from tools import faults

STAGES = ("text", "visual", "acoustic")


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert, tiny_clip, librosa_warm):  # noqa: F811
    import cv2

    media = tmp_path_factory.mktemp("fault-media")
    cv2.imwrite(str(media / "still.jpg"), np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    entries = [{"path": make_clip(media / f"tone{i}.mp4", seconds=1.0 + 0.1 * i, fps=10)} for i in range(8)]
    entries += [{"path": make_clip(media / "mute.mp4", audio="none")},
                {"path": corrupt_middle(make_clip(media / "src.mp4", seconds=2.0), media / "broken.mp4")},
                {"media": "image", "path": media / "still.jpg"}, {"media": "none"}]
    for i, e in enumerate(entries):
        e["text"] = f"segment {i} was {'good' if i % 2 else 'bad'}" + " really" * (i % 3)
    return faults.make_project(tmp_path_factory.mktemp("faults") / "project", make_params(tiny_bert, tiny_clip),
                               manifest_of(entries))


@pytest.fixture(scope="module")
def references(project):
    """stage -> (the outcome of an uninterrupted run on an empty cache, its disk events)."""
    return {stage: faults.reference(faults.fresh(project, project.parent / f"ref-{stage}"), stage)
            for stage in STAGES}


@pytest.fixture(scope="module")
def ids(project):
    import pandas as pd

    return list(pd.read_parquet(project / "features" / "manifest.parquet")["id"])


def test_the_reference_runs_cover_every_kind_of_segment(references):
    want, _ = references["acoustic"]
    reasons = dict(want["failures"])
    assert want["table"].num_rows == 8 and "decode failed after" in reasons["v/9"]
    assert {reasons[i] for i in ("v/8", "v/10", "v/11")} == {"no audio track", "no audio (image segment)",
                                                             "no media (transcript-only segment)"}


@pytest.mark.parametrize("stage", STAGES)
def test_kill_9_at_random_disk_events_then_rerun(project, references, ids, stage):
    want, events = references[stage]
    tally = faults.Tally()
    points = faults.kill_points(events.count, 2, random.Random(f"{stage}-0"))
    faults.try_kills(project, stage, want, points, ids, tally)
    (row,) = tally.rows.values()
    assert row["tried"] == 2 and row["problems"] == []


@pytest.mark.parametrize("stage", STAGES)
def test_each_kind_of_damaged_entry_is_repaired(project, references, ids, stage):
    want, _ = references[stage]
    run = faults.fresh(project, project.parent / f"damage-{stage}")
    assert faults.run_stage_in(run, stage)[0] == 0
    tally = faults.Tally()
    faults.try_damage(run, stage, want, ids, tally)
    assert len(tally.rows) == len(faults.DAMAGE)
    assert {k: r["problems"] for k, r in tally.rows.items() if r["problems"]} == {}
    assert len(list((run / "cache" / stage / ".damaged").glob("*.npz"))) == len(faults.DAMAGE)  # kept for a look


@pytest.mark.parametrize("stage", STAGES)
def test_a_full_disk_stops_the_stage_in_one_line(project, references, ids, stage):
    want, events = references[stage]
    tally = faults.Tally()
    faults.try_disk_full(project, stage, want, ids, faults.full_disk_points(events.fsyncs, 2, random.Random(0)), tally)
    (row,) = tally.rows.values()
    assert row["tried"] == 2 and row["problems"] == []


def test_a_dead_dask_worker(project, references, ids):
    want, _ = references["acoustic"]
    tally = faults.Tally()
    faults.try_dead_worker(project.parent / "ref-acoustic", want, ids, tally, clips=1)
    (row,) = tally.rows.values()
    assert row["problems"] == []


def test_two_processes_on_one_cache_extract_each_clip_once(project, references, ids):
    want, _ = references["visual"]
    first = faults.fresh(project, project.parent / "concurrent-a")
    second = faults.fresh(first, project.parent / "concurrent-b")
    second.joinpath("params.yaml").write_text(first.joinpath("params.yaml").read_text())  # first's cache
    puts = faults.run_concurrently([first, second], "visual")
    keys = len(list((first / "cache" / "visual").glob("*/*.npz")))
    assert sum(puts) == keys == 11, puts  # 8 clips, the mute one, the broken one (its failure), the image
    for run in (first, second):
        assert faults.differences(faults.outcome(run, "visual"), want, ids) == []
    assert faults.leftovers(first) == []


# --------------------------------------------------------------------------- claims and leftovers, directly

def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_stale_locks_are_broken_and_live_ones_respected(tmp_path):
    import os

    cache = FeatureCache(tmp_path, "toy")
    keys = [make_key("toy", i) for i in range(3)]
    host = socket.gethostname()
    for key, holder in zip(keys, [f"{_dead_pid()}@{host}", "1@another-host", "1@another-host"]):
        lock = cache.path(key).with_suffix(".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(holder)
    old = os.stat(cache.path(keys[2]).with_suffix(".lock")).st_mtime - 3600
    os.utime(cache.path(keys[2]).with_suffix(".lock"), (old, old))
    with Claims(cache) as claims:
        # a dead process here: stale; another machine, refreshed just now: alive; not refreshed for an hour: stale
        assert [claims.take(k) for k in keys] == [True, False, True]
        assert cache.path(keys[0]).with_suffix(".lock").read_text() == f"{os.getpid()}@{host}"
    assert not cache.path(keys[0]).with_suffix(".lock").exists()  # released on exit
    assert cache.path(keys[1]).with_suffix(".lock").exists()      # never ours


def test_a_clip_claimed_by_another_process_is_waited_for(tmp_path):
    import threading

    cache = FeatureCache(tmp_path / "cache", "toy")
    plan = Plan(ids=["v/0", "v/1", "v/2"], keys=[make_key("toy", i) for i in range(3)])
    plan.units = {k: i for i, k in enumerate(plan.keys)}
    columns = {"n_frames": (pa.int32(), ()), "feats": (pa.float32(), ("n", "dim"))}

    def write(key, i):
        feats = np.full((2 + i, 4), i, np.float32)
        cache.put(key, {"n_frames": np.int32(len(feats)), "feats": feats})

    other = Claims(cache)  # "another process" (a live holder): its clip is being extracted, wait for it
    assert other.take(plan.keys[1])
    threading.Timer(1.5, lambda: (write(plan.keys[1], 1), other.release([plan.keys[1]]))).start()
    asked = []

    def extract(todo):
        asked.extend(todo)
        for key, i in todo.items():
            write(key, i)
        return Extracted(clips=len(todo))

    meta = run_stage("toy", plan, cache, extract, columns, {"dim": 4}, tmp_path / "toy.parquet")
    assert sorted(asked) == sorted([plan.keys[0], plan.keys[2]])
    assert meta["counts"]["ok"] == 3 and meta["counts"]["extracted"] == 2 and meta["counts"]["cached"] == 1


def test_leftovers_of_dead_processes_are_swept_live_ones_kept(project, references):
    import os
    import time

    run = faults.fresh(project, project.parent / "sweep")
    assert faults.run_stage_in(run, "text")[0] == 0
    dead, host, old = _dead_pid(), socket.gethostname(), time.time() - 7200
    shard = next((run / "cache" / "text").glob("??"))
    planted = {  # path -> kept after the next run?
        run / "features" / f".text.parquet.{dead}@{host}.x1.tmp": False,     # killed mid-write here
        run / "features" / ".text.parquet.abc123.tmp": False,                # an older run's, no owner, old
        shard / f".{'0' * 64}.npz.7@other-host.x2.tmp": True,                 # another machine, writing now
        shard / f"{'1' * 64}.lock": False,                                    # a dead holder here
        run / "cache" / "text" / ".attempts" / f"map-{dead}@{host}-abc" / "3.died": False,
    }
    for path, _ in planted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{dead}@{host}" if path.suffix == ".lock" else "x")
    os.utime(run / "features" / ".text.parquet.abc123.tmp", (old, old))
    assert faults.run_stage_in(run, "text")[0] == 0
    assert {str(p.relative_to(run)): p.exists() for p in planted} == {str(p.relative_to(run)): k for p, k in planted.items()}
    assert not (run / "cache" / "text" / ".attempts").exists()


def test_files_follow_the_umask(project):
    import os
    import stat

    run = faults.fresh(project, project.parent / "umask")
    previous = os.umask(0o027)
    try:
        assert faults.run_stage_in(run, "text")[0] == 0
    finally:
        os.umask(previous)
    written = [p for p in (run / "cache").rglob("*")] + list((run / "features").glob("text.*"))
    modes = {stat.S_IMODE(p.stat().st_mode) for p in written}
    assert modes == {0o640, 0o750}, {oct(m) for m in modes}  # group-readable, as the umask says (mkstemp: 0600)
