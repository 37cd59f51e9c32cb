"""Faults: what the feature stages survive (the scenarios live in tools/faults.py; `python -m tools.faults`
runs more of them). Every outcome must equal an uninterrupted run: the same table, the same failures with
the same reasons, every segment a row or a failure, nothing left behind.

The uninterrupted run is itself held to a yardstick made another way: three of its segments extracted
straight from the extractor (no cache, no runner), and the checksums of a known-good run stored in
tests/data/faults_known_good.json (rewrite them with MSA_WRITE_KNOWN_GOOD=1 after a change that is meant
to change the features, once the extractor comparison passes). So a stage that writes the wrong clip's
features into a row fails here even though every run makes the same mistake.

A 12-segment corpus: 8 clips with a tone (each its own length, shade and pitch), a clip without audio, a
clip that fails to decode, a still image and a transcript alone, each with its own transcript; the tiny
encoders of test_features.
"""
from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from conftest import REPO, make_clip, write_fake_features
from pipeline.cache import Claims, DamagedEntry, FeatureCache, make_key
from pipeline.features.runner import Extracted, Plan, run_stage
from test_features import corrupt_middle, librosa_warm, make_params, manifest_of, tiny_clip  # noqa: F401
from tools import faults

STAGES = ("text", "visual", "acoustic")
KNOWN_GOOD = Path(__file__).parent / "data" / "faults_known_good.json"
WRITE_KNOWN_GOOD = os.environ.get("MSA_WRITE_KNOWN_GOOD") == "1"
SUBPROCESS_ENV = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def fixed_bert(tmp_path_factory) -> Path:
    """tiny_bert with a vocabulary written out instead of trained (training one is not deterministic across
    runs), so the known-good checksums of the text stage hold on any machine."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import ModernBertConfig, ModernBertModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("fixed-modernbert")
    words = ["segment", "was", "good", "bad", "really", *map(str, range(12))]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out)
    config = ModernBertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=128, local_attention=16,
                              pad_token_id=0, cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    ModernBertModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory, fixed_bert, tiny_clip, librosa_warm):  # noqa: F811
    import cv2

    media = tmp_path_factory.mktemp("fault-media")
    cv2.imwrite(str(media / "still.jpg"), np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    entries = [{"path": make_clip(media / f"tone{i}.mp4", seconds=1.0 + 0.1 * i, fps=10, shade=3 * i, freq=200 + 40 * i)}
               for i in range(8)]
    entries += [{"path": make_clip(media / "mute.mp4", audio="none")},
                {"path": corrupt_middle(make_clip(media / "src.mp4", seconds=2.0), media / "broken.mp4")},
                {"media": "image", "path": media / "still.jpg"}, {"media": "none"}]
    for i, e in enumerate(entries):
        e["text"] = f"segment {i} was {'good' if i % 2 else 'bad'}" + " really" * (i % 3)
    return faults.make_project(tmp_path_factory.mktemp("faults") / "project", make_params(fixed_bert, tiny_clip),
                               manifest_of(entries))


@pytest.fixture(scope="module")
def references(project):
    """stage -> (the outcome of an uninterrupted run on an empty cache, with its yardstick; its disk events)."""
    known = json.loads(KNOWN_GOOD.read_text()) if KNOWN_GOOD.is_file() and not WRITE_KNOWN_GOOD else {}
    refs = {stage: faults.reference(faults.fresh(project, project.parent / f"ref-{stage}"), stage, known.get(stage))
            for stage in STAGES}
    if WRITE_KNOWN_GOOD:
        KNOWN_GOOD.parent.mkdir(exist_ok=True)
        KNOWN_GOOD.write_text(json.dumps({s: faults.known_good(want["table"], s) for s, (want, _) in refs.items()},
                                         indent=1) + "\n")
    return refs


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
def test_the_reference_is_what_the_extractor_and_a_known_good_run_give(references, ids, stage):
    want, _ = references[stage]
    rows = want["table"].column("id").to_pylist()
    assert len(want["truth"]) == 3 and set(want["truth"]) <= set(rows)
    if not WRITE_KNOWN_GOOD:
        assert want["known"] is not None and set(want["known"]) == set(rows), "no stored checksums for every row"
    tally = faults.Tally()
    faults.check_reference(want, stage, ids, tally)
    (row,) = tally.rows.values()
    assert row["problems"] == []


def test_the_yardstick_sees_a_row_holding_the_next_clips_features(references, ids):
    """What a deterministic bug (each row written from the next clip's entry) does to a table: caught."""
    want, _ = references["acoustic"]
    table = want["table"]
    shifted = pa.table({name: pa.concat_arrays([table.column(name).combine_chunks()[1:],
                                               table.column(name).combine_chunks()[:1]]) if name != "id"
                        else table.column(name) for name in table.column_names})
    problems = faults.yardstick_problems(shifted, "acoustic", want["truth"], want["known"])
    assert len(problems) >= 3 and any("extractor" in p for p in problems) and any("known-good" in p for p in problems)


@pytest.mark.parametrize("stage", STAGES)
def test_kill_9_at_random_disk_events_then_rerun(project, references, ids, stage):
    want, events = references[stage]
    tally = faults.Tally()
    points = faults.kill_points(events.count, 2, random.Random(f"{stage}-0"))
    faults.try_kills(project, stage, want, points, ids, tally)
    (row,) = tally.rows.values()
    assert row["problems"] == []


@pytest.mark.parametrize("stage", STAGES)
def test_each_kind_of_damaged_entry_is_repaired(project, references, ids, stage):
    want, _ = references[stage]
    run = faults.fresh(project, project.parent / f"damage-{stage}")
    assert faults.run_stage_in(run, stage)[0] == 0
    tally = faults.Tally()
    damaged = faults.try_damage(run, stage, want, ids, tally)
    assert {kind for _, kind in damaged} == set(faults.DAMAGE)
    assert {k: r["problems"] for k, r in tally.rows.items() if r["problems"]} == {}
    kept = {p.stem for p in (run / "cache" / stage / ".damaged").glob("*.npz")}
    assert kept == {key for key, _ in damaged}  # every damaged entry, and nothing else, moved aside for a look


def test_an_entry_under_another_key_is_damaged(tmp_path):
    cache = FeatureCache(tmp_path, "toy")
    a, b = make_key("toy", "a"), make_key("toy", "b")
    cache.put(a, {"x": np.arange(3, dtype=np.float32)}, content="sha-of-a")
    assert cache.get(a).meta["key"] == a and cache.get(a).meta["content"] == "sha-of-a"
    cache.path(b).parent.mkdir(parents=True, exist_ok=True)
    cache.path(b).write_bytes(cache.path(a).read_bytes())  # a valid entry, but a's
    with pytest.raises(DamagedEntry, match="written for another key"):
        cache.meta(b)
    with pytest.raises(DamagedEntry, match="written for another key"):
        cache.get(b)


@pytest.mark.parametrize("stage", STAGES)
def test_a_full_disk_stops_the_stage_in_one_line(project, references, ids, stage):
    want, events = references[stage]
    tally = faults.Tally()
    faults.try_disk_full(project, stage, want, ids, faults.full_disk_points(events.fsyncs, 2, random.Random(0)), tally)
    (row,) = tally.rows.values()
    assert row["problems"] == []


# --------------------------------------------------------------------------- a disk that really fills up

def _full_disk_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "No space left on device" in lines[0] or "File too large" in lines[0], lines[0]
    return lines[0]


def test_a_full_disk_under_the_parquet_writer(project, references):
    run = faults.fresh(project, project.parent / "full-parquet")
    assert faults.run_stage_in(run, "text")[0] == 0  # every segment cached: the table is all that is written
    size_kb = max(4, (run / "features" / "text.parquet").stat().st_size // 2048)
    rc, _, err, left = faults.run_on_small_disk(
        [sys.executable, "-m", "stages.text", "features/manifest.parquet", "out/text.parquet"], run / "out", size_kb,
        run, SUBPROCESS_ENV)
    line = _full_disk_line(err)
    assert rc == 2 and line.startswith("text: ") and "writing out/text.parquet" in line, line
    assert left == []


def test_a_full_disk_under_a_worker(project):
    run = faults.fresh(project, project.parent / "full-worker")
    raw = yaml.safe_load((run / "params.yaml").read_text())
    raw["compute"]["n_jobs"] = 2  # the workers write the cache entries
    (run / "params.yaml").write_text(yaml.safe_dump(raw))
    rc, _, err, left = faults.run_on_small_disk(
        [sys.executable, "-m", "stages.acoustic", "features/manifest.parquet", "features/acoustic.parquet"],
        run / "cache", 24, run, SUBPROCESS_ENV)
    line = _full_disk_line(err)
    assert rc == 2 and "cache/acoustic/" in line and ".npz" in line and "kept in the cache" in line, line
    assert left == []


def test_a_full_disk_under_torch_save(tmp_path):
    from pipeline.training.dataset import assemble

    root = write_fake_features(tmp_path / "features", n=40)
    assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in STAGES}, root / "dataset")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"].update(epochs=1, device="cpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "models" / "gce"
    rc, _, err, left = faults.run_on_small_disk(
        [sys.executable, "-m", "stages.train", "gce", "features/dataset", "models/gce"], out, 40, tmp_path,
        SUBPROCESS_ENV)
    line = _full_disk_line(err)
    assert rc == 2 and "writing models/gce/model.pt" in line, line
    assert left == []


# --------------------------------------------------------------------------- processes and workers

def test_a_dead_dask_worker(project, references, ids):
    want, _ = references["acoustic"]
    tally = faults.Tally()
    faults.try_dead_worker(project.parent / "ref-acoustic", want, ids, tally, clips=1)
    (row,) = tally.rows.values()
    assert row["problems"] == []


def test_two_processes_on_one_cache_share_the_clips(project, references, ids):
    """The second stage starts once the first has written its first entry: it must find clips left to claim
    (the first claims a few at a time) and extract them while the first still extracts its own."""
    want, _ = references["visual"]
    first = faults.fresh(project, project.parent / "concurrent-a")
    second = faults.fresh(first, project.parent / "concurrent-b")
    second.joinpath("params.yaml").write_text(first.joinpath("params.yaml").read_text())  # first's cache
    a, b = faults.run_concurrently([first, second], "visual")
    keys = len(list((first / "cache" / "visual").glob("*/*.npz")))
    assert len(a["puts"]) + len(b["puts"]) == keys == 11, (a, b)  # 8 clips, the mute, the broken (its failure), the image
    assert len(a["puts"]) >= 2 and len(b["puts"]) >= 2, (a, b)  # each extracted its share ...
    assert b["claims"][0] < a["puts"][-1], (a, b)  # ... the second while the first still had clips to write
    for run in (first, second):
        assert faults.differences(faults.outcome(run, "visual"), want, ids) == []
    assert faults.leftovers(first) == []


# --------------------------------------------------------------------------- claims and leftovers, directly

def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_stale_locks_are_broken_and_live_ones_respected(tmp_path):
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


def test_a_dead_holders_other_locks_go_when_one_is_taken_over(tmp_path):
    cache = FeatureCache(tmp_path, "toy")
    dead, host = _dead_pid(), socket.gethostname()
    keys = [make_key("toy", i) for i in range(4)]
    for key, holder in zip(keys, [f"{dead}@{host}"] * 3 + ["1@another-host"]):
        lock = cache.path(key).with_suffix(".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(holder)
    with Claims(cache) as claims:
        assert claims.take(keys[0])
        # the dead holder's claims on clips this process never asks for are gone too; a live holder's stay
        assert [cache.path(k).with_suffix(".lock").exists() for k in keys[1:]] == [False, False, True]


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


# --------------------------------------------------------------------------- a cache shared by a group

def test_files_follow_the_umask(project):
    run = faults.fresh(project, project.parent / "umask")
    previous = os.umask(0o027)
    try:
        assert faults.run_stage_in(run, "text")[0] == 0
    finally:
        os.umask(previous)
    written = [p for p in (run / "cache").rglob("*")] + list((run / "features").glob("text.*"))
    modes = {stat.S_IMODE(p.stat().st_mode) for p in written}
    assert modes == {0o640, 0o750}, {oct(m) for m in modes}  # group-readable, as the umask says (mkstemp: 0600)


def test_a_group_folder_stays_group_writable_under_umask_022(project):
    run = faults.fresh(project, project.parent / "group")
    (run / "cache").mkdir()
    os.chmod(run / "cache", 0o2775)  # set up for a group: `chmod 2775` (and chgrp)
    previous = os.umask(0o022)
    try:
        assert faults.run_stage_in(run, "text")[0] == 0
    finally:
        os.umask(previous)
    folders = [p for p in (run / "cache").rglob("*") if p.is_dir()]
    assert len(folders) >= 3 and {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o2775}
    assert {stat.S_IMODE(p.stat().st_mode) & 0o060 for p in (run / "cache").rglob("*.npz")} == {0o040}


@pytest.fixture
def shared_folder():
    """A folder every user may enter (pytest's own temp folders are private to their owner)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="msa-shared-"))
    os.chmod(folder, 0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a stage as another user")
def test_another_member_of_the_group_adds_a_clip_under_umask_022(project, shared_folder):
    """Two users of one group share a cache: the first sets it up (chgrp + chmod 2775) and extracts a clip;
    the second, umask 022, adds another clip to it."""
    import pandas as pd

    group, other_user, shared = 100, 65534, shared_folder  # users, nobody
    clips = [make_clip(shared / f"c{i}.mp4", seconds=0.6 + 0.2 * i, freq=300 + 100 * i) for i in range(2)]
    for clip in clips:
        os.chmod(clip, 0o644)
    cache = shared / "cache"
    cache.mkdir()
    os.chown(cache, 0, group)
    os.chmod(cache, 0o2775)
    params = yaml.safe_load((project / "params.yaml").read_text())
    manifest = pd.read_parquet(project / "features" / "manifest.parquet").head(2)
    manifest["video_path"] = [str(c) for c in clips]
    manifest["content_hash"] = ""
    first, second = faults.make_project(shared / "first", params, manifest.head(1)), \
        faults.make_project(shared / "second", params, manifest)
    for run in (first, second):  # one cache for both
        (run / "params.yaml").write_text(yaml.safe_dump({**params, "cache": {"dir": str(cache)}}))
    for folder in (second, second / "features"):
        os.chmod(folder, 0o777)
    for path in (second / "params.yaml", second / "features" / "manifest.parquet"):
        os.chmod(path, 0o644)
    previous = os.umask(0o022)
    try:
        assert faults.run_stage_in(first, "acoustic")[0] == 0
        read, write = os.pipe()
        child = os.fork()  # the other user: a fork (the interpreter may lie where only this user can read)
        if child == 0:
            os.close(read)
            try:
                os.chdir(shared)  # where the other user may be: the checkout itself can be private to its owner
                os.setgroups([])
                os.setgid(group)
                os.setuid(other_user)
                try:
                    rc, out, err = faults.run_stage_in(second, "acoustic")
                except BaseException:
                    rc, out, err = -1, "", traceback.format_exc()
                os.write(write, json.dumps([rc, out, err]).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            rc, out, err = json.loads(pipe.read() or "[-1, \"\", \"the child died\"]")
        os.waitpid(child, 0)
    finally:
        os.umask(previous)
    assert rc == 0, err[-2000:]
    assert "2/2 segments" in out and "1 cached, 1 extracted" in out, out
