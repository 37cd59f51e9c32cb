"""The prepare stage: every bad input gets its own reason, nothing is dropped silently."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import wave

import av
import numpy as np
import pandas as pd
import pytest

from conftest import REPO, make_clip, row, write_labels
from pipeline.data.media import probe_video
from pipeline.data.prepare import build_manifest


def _wav(path, seconds=1.0, rate=16000):
    samples = (0.3 * np.sin(2 * np.pi * 200 * np.arange(int(seconds * rate)) / rate) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(samples.tobytes())


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    """One corpus holding every kind of bad input next to good segments.
    Returns (root, {clip_id: expected reason fragment})."""
    root = tmp_path_factory.mktemp("corpus")
    raw = root / "Raw"
    expected = {}
    rows = []

    def add(clip_id, reason=None, **kw):
        rows.append(row(video_id=kw.pop("video_id", "v1"), clip_id=clip_id, **kw))
        if reason:
            expected[clip_id] = reason

    good = make_clip(raw / "v1" / "good.mp4")
    add("good")
    add("good2"), make_clip(raw / "v1" / "good2.mp4")
    shutil.copy(good, raw / "v1" / "unreadable.mp4")
    (raw / "v1" / "unreadable.mp4").write_bytes(b"this is not a video" * 50)
    add("unreadable", "unreadable media file")
    data = good.read_bytes()
    (raw / "v1" / "truncated.mp4").write_bytes(data[: len(data) // 2])
    add("truncated", "truncated")
    (raw / "v1" / "empty.mp4").write_bytes(b"")
    add("empty", "zero-length")
    make_clip(raw / "v1" / "mute.mp4", audio="none")
    add("mute", "no audio track")
    make_clip(raw / "v1" / "silent.mp4", audio="silent")
    add("silent", "silent audio")
    add("nofile", "missing media file")
    make_clip(raw / "v1" / "orphan.mp4")
    expected["orphan"] = "no label row"
    make_clip(raw / "v1" / "blank.mp4")
    add("blank", "empty transcript", text="   ")
    make_clip(raw / "v1" / "nolabel.mp4")
    add("nolabel", "label missing", label="")
    make_clip(raw / "v1" / "nanlabel.mp4")
    add("nanlabel", "NaN", label="nan")
    make_clip(raw / "v1" / "big.mp4")
    add("big", "outside [-3, 3]", label="3.5")
    make_clip(raw / "v1" / "word.mp4")
    add("word", "not a number", label="great")
    add("good", "duplicate id")
    make_clip(raw / "v1" / "split.mp4")
    add("split", "unknown split", mode="holdout")
    add("escape", "escapes the data root", video_id="..")
    # separate audio beside a video without a track: usable
    make_clip(raw / "v2" / "sep.mp4", audio="none")
    _wav(raw / "v2" / "sep.wav")
    add("sep", video_id="v2")
    write_labels(root, rows)
    # a non-UTF-8 transcript: raw latin-1 bytes appended to the CSV
    make_clip(raw / "v1" / "latin.mp4")
    with open(root / "label.csv", "ab") as f:
        f.write("v1,latin,caf\xe9 was nice,1.0,train\r\n".encode("latin-1"))
    expected["latin"] = "not valid UTF-8"
    return root, expected, len(rows) + 1


@pytest.fixture(scope="module")
def prepared(bad_corpus):
    root, expected, n_rows = bad_corpus
    manifest, rejects = build_manifest({"root": str(root)}, progress=False)
    return manifest, rejects, expected, n_rows


REASONS = ["unreadable", "truncated", "empty", "mute", "silent", "nofile", "orphan", "blank", "nolabel",
           "nanlabel", "big", "word", "split", "escape", "latin"]


@pytest.mark.parametrize("clip_id", REASONS)
def test_each_bad_input_has_its_own_reason(prepared, clip_id):
    manifest, rejects, expected, _ = prepared
    found = rejects[rejects["clip_id"] == clip_id]
    assert len(found) == 1, f"{clip_id}: {found.to_dict('records')}"
    assert expected[clip_id] in found["reason"].iloc[0]
    assert clip_id not in set(manifest["clip_id"])


def test_duplicates_keep_the_first_and_reject_the_rest(prepared):
    manifest, rejects, _, _ = prepared
    assert (manifest["id"] == "v1/good").sum() == 1
    dup = rejects[(rejects["clip_id"] == "good")]
    assert len(dup) == 1 and "duplicate id (first on line 2)" == dup["reason"].iloc[0]


def test_counts_add_up(prepared):
    manifest, rejects, expected, n_rows = prepared
    orphans = (rejects["reason"] == "media file with no label row").sum()
    assert orphans == 1
    assert len(manifest) + len(rejects) == n_rows + orphans
    assert sorted(manifest["clip_id"]) == ["good", "good2", "sep"]


def test_reasons_are_distinct(prepared):
    _, rejects, _, _ = prepared
    by_clip = rejects.drop_duplicates("clip_id").set_index("clip_id")["reason"]
    assert len({by_clip[c] for c in REASONS}) == len(REASONS)


def test_good_row_metadata(prepared):
    manifest, _, _, _ = prepared
    good = manifest.set_index("clip_id").loc["good"]
    assert good["id"] == "v1/good" and good["media"] == "video" and good["split"] == "train"
    assert good["width"] == 64 and good["height"] == 48 and good["fps"] == 10
    assert abs(good["duration"] - 1.0) < 0.15
    assert good["has_audio"] and good["audio_sample_rate"] == 16000 and good["audio_channels"] == 1
    assert len(good["content_hash"]) == 64
    sep = manifest.set_index("clip_id").loc["sep"]
    assert sep["audio_path"].endswith("sep.wav") and sep["has_audio"]


def test_content_hash_follows_bytes(tmp_path):
    raw = tmp_path / "Raw" / "v"
    shutil.copy(make_clip(raw / "a.mp4"), raw / "b.mp4")
    write_labels(tmp_path, [row("v", "a"), row("v", "b")])
    m1, _ = build_manifest({"root": str(tmp_path)}, progress=False)
    assert m1["content_hash"].iloc[0] == m1["content_hash"].iloc[1]  # same bytes, same key
    make_clip(raw / "b.mp4", seconds=1.5)
    m2, _ = build_manifest({"root": str(tmp_path)}, progress=False)
    assert m2["content_hash"].iloc[0] == m1["content_hash"].iloc[0]
    assert m2["content_hash"].iloc[1] != m1["content_hash"].iloc[1]


def test_classification_labels(tmp_path):
    raw = tmp_path / "Raw" / "v"
    for c in "abc":
        make_clip(raw / f"{c}.mp4")
    write_labels(tmp_path, [row("v", "a", label="positive"), row("v", "b", label="Negative"), row("v", "c", label="meh")])
    manifest, rejects = build_manifest({"root": str(tmp_path), "task": "classification",
                                        "classes": ["negative", "neutral", "positive"]}, progress=False)
    assert manifest.set_index("clip_id")["label_name"].to_dict() == {"a": "positive", "b": "negative"}
    assert manifest.set_index("clip_id")["label"].to_dict() == {"a": 2.0, "b": 0.0}
    assert "not a known class" in rejects.set_index("clip_id").loc["c", "reason"]


def test_image_and_text_dataset(tmp_path):
    from PIL import Image
    (tmp_path / "Raw" / "memes").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "Raw" / "memes" / "m1.jpg")
    write_labels(tmp_path, [row("memes", "m1")])
    manifest, rejects = build_manifest({"root": str(tmp_path)}, progress=False)
    assert len(rejects) == 0
    m = manifest.iloc[0]
    assert m["media"] == "image" and m["image_path"].endswith("m1.jpg") and (m["width"], m["height"]) == (40, 30)
    assert not m["has_audio"]


def test_transcript_only_mosi(mosi_text):
    manifest, rejects = build_manifest({"root": str(mosi_text.parent), "label_file": mosi_text.name}, progress=False)
    assert len(manifest) == 2199 and len(rejects) == 0
    assert manifest["split"].value_counts().to_dict() == {"train": 1284, "valid": 229, "test": 686}
    assert (manifest["media"] == "none").all()
    assert manifest["label"].between(-3, 3).all()


def test_real_clips_probe_matches_a_full_decode(real_clips):
    for path in real_clips:
        info = probe_video(path)
        with av.open(str(path)) as c:
            frames = list(c.decode(video=0))
        with av.open(str(path)) as c:
            audio_rates = {f.sample_rate for f in c.decode(audio=0)}
        assert (frames[0].width, frames[0].height) == (info.width, info.height), path.name
        assert abs(len(frames) / info.fps - info.duration) < 2.5 / info.fps, path.name
        assert audio_rates == {info.audio_sample_rate}, path.name
        assert info.audio_sample_rate in (44100, 48000)


def _faststart_copy(src, dst):
    """The clip remuxed (no re-encode) with its mp4 index first, as web and phone videos are written."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in (inp.streams.video[0], inp.streams.audio[0])}
        for packet in inp.demux(*(inp.streams[i] for i in streams)):
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    return dst


def test_truncated_real_clip_gets_its_own_reason(tmp_path, real_clips):
    """A real clip cut at several points: its index opens, the streams end early; prepare says so
    (with where each stream ends) instead of 'silent audio track', with or without require_audio."""
    raw = tmp_path / "corpus" / "Raw" / "v"
    raw.mkdir(parents=True)
    whole = _faststart_copy(real_clips[0], raw / "whole.mp4").read_bytes()
    cuts = (0.1, 0.33, 0.5, 0.66, 0.9)
    for cut in cuts:
        (raw / f"cut{int(cut * 100)}.mp4").write_bytes(whole[:int(len(whole) * cut)])
    plain = real_clips[0].read_bytes()   # index last: a cut loses it, so the container itself fails to open
    (raw / "noindex.mp4").write_bytes(plain[:len(plain) // 2])
    ids = ["whole"] + [f"cut{int(c * 100)}" for c in cuts] + ["noindex"]
    write_labels(tmp_path / "corpus", [row("v", i) for i in ids])
    duration = probe_video(raw / "whole.mp4").duration
    for require_audio in (True, False):
        manifest, rejects = build_manifest({"root": str(tmp_path / "corpus"), "require_audio": require_audio},
                                           progress=False)
        assert list(manifest["clip_id"]) == ["whole"] and manifest["has_audio"].all()
        reasons = dict(zip(rejects["clip_id"], rejects["reason"]))
        assert reasons["noindex"].startswith("truncated or corrupt mp4 container")
        ends, samples = [], []
        for cut in cuts:
            match = re.fullmatch(r"truncated media \(video ends at ([\d.]+) s of ([\d.]+) s; "
                                 r"audio decodes to (\d+) of (\d+) samples\)", reasons[f"cut{int(cut * 100)}"])
            assert match, reasons[f"cut{int(cut * 100)}"]
            assert float(match[2]) == pytest.approx(duration, abs=0.01) and float(match[1]) < float(match[2])
            assert int(match[3]) < int(match[4])
            ends.append(float(match[1]))
            samples.append(int(match[3]))
        assert ends == sorted(ends) and samples == sorted(samples) and ends[-1] > 0.5 * duration  # follows the cut


def _run_stage(cwd, strict):
    (cwd / "params.yaml").write_text(f"data:\n  root: corpus\n  strict: {str(strict).lower()}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stages.prepare", "features/manifest.parquet", "features/rejects.csv"],
                          cwd=cwd, env=env, capture_output=True, text=True)


def test_stage_writes_outputs_and_strict_fails(tmp_path):
    corpus = tmp_path / "corpus"
    make_clip(corpus / "Raw" / "v" / "a.mp4")
    write_labels(corpus, [row("v", "a"), row("v", "b")])  # b has no media
    shutil.copytree(REPO / "stages", tmp_path / "stages")
    result = _run_stage(tmp_path, strict=False)
    assert result.returncode == 0, result.stderr
    manifest = pd.read_parquet(tmp_path / "features" / "manifest.parquet")
    rejects = pd.read_csv(tmp_path / "features" / "rejects.csv")
    assert list(manifest["id"]) == ["v/a"] and list(rejects["reason"]) == ["missing media file"]
    result = _run_stage(tmp_path, strict=True)
    assert result.returncode != 0 and "missing media file" in result.stderr


def test_a_failed_run_leaves_no_stale_lists(tmp_path, monkeypatch, capsys):
    from pipeline.errors import guarded
    from stages.prepare import main

    (tmp_path / "features").mkdir()
    for name in ("manifest.parquet", "rejects.csv"):
        (tmp_path / "features" / name).write_text("from an earlier run")
    (tmp_path / "params.yaml").write_text("data:\n  root: nowhere\n")
    monkeypatch.chdir(tmp_path)
    assert guarded("prepare", main, "features/manifest.parquet", "features/rejects.csv") == 2
    assert "label file not found" in capsys.readouterr().err
    assert list((tmp_path / "features").iterdir()) == []


def test_links_out_of_the_root_are_rejected_unless_followed(tmp_path):
    outside, root = tmp_path / "elsewhere", tmp_path / "corpus"
    make_clip(outside / "v2" / "2.mp4")
    make_clip(outside / "loose.mp4", seconds=1.5)
    make_clip(root / "Raw" / "v1" / "1.mp4")
    (root / "Raw" / "v1" / "3.mp4").symlink_to(root / "Raw" / "v1" / "1.mp4")  # a link inside the root: fine
    (root / "Raw" / "v1" / "4.mp4").symlink_to(outside / "loose.mp4")           # a file outside
    (root / "Raw" / "v2").symlink_to(outside / "v2", target_is_directory=True)  # a folder outside
    write_labels(root, [row("v1", "1"), row("v1", "3"), row("v1", "4"), row("v2", "2")])
    manifest, rejects = build_manifest({"root": str(root)}, progress=False)
    assert list(manifest["id"]) == ["v1/1", "v1/3"]
    reasons = dict(zip(rejects["id"], rejects["reason"]))
    assert sorted(reasons) == ["v1/4", "v2/2"], reasons
    assert all(r.startswith("link resolves outside data.root") and "follow_links" in r for r in reasons.values())
    manifest, rejects = build_manifest({"root": str(root), "follow_links": True}, progress=False)
    assert list(manifest["id"]) == ["v1/1", "v1/3", "v1/4", "v2/2"] and len(rejects) == 0


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_label_files_with_a_byte_order_mark_are_read(tmp_path, encoding):
    if encoding == "utf-16-be":  # Python writes no BOM for an explicit byte order: add one
        write_labels(tmp_path, [row(text="ça va très bien")], encoding="utf-16-be")
        data = (tmp_path / "label.csv").read_bytes()
        (tmp_path / "label.csv").write_bytes(b"\xfe\xff" + data)
    else:
        write_labels(tmp_path, [row(text="ça va très bien")], encoding=encoding)
    manifest, rejects = build_manifest({"root": str(tmp_path)}, progress=False)
    assert manifest["text"].tolist() == ["ça va très bien"] and len(rejects) == 0


def test_utf16_without_a_byte_order_mark_is_named(tmp_path):
    from pipeline.data.prepare import PrepareError

    write_labels(tmp_path, [row()], encoding="utf-16-le")
    with pytest.raises(PrepareError, match="UTF-16 or UTF-32 without a byte-order mark"):
        build_manifest({"root": str(tmp_path)}, progress=False)


def test_a_row_with_more_fields_than_the_header_is_named_as_such(tmp_path):
    """An unquoted decimal comma (3,0) makes one field too many: that is the reason, not the split it shifted."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "label.csv").write_text("video_id,clip_id,text,label,mode\n"
                                    "v1,1,it was good,3.0,train\n"
                                    "v1,2,it was great,3,0,train\n")
    manifest, rejects = build_manifest({"root": str(root)}, progress=False)
    assert list(manifest["clip_id"]) == ["1"]
    (reason,) = rejects["reason"]
    assert reason.startswith("6 fields where the header has 5: an unquoted comma (a decimal comma such as 3,0")
    assert rejects["line"].tolist() == [3]
