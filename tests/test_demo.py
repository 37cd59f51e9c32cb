"""tools.demo: the synthetic talking-head corpus is reproducible, well-formed, and its
face, voice and text really carry the sentiment components the label is built from."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
import pytest

import pipeline  # noqa: F401  (torchvision compat shim first)
from tools import demo

SIZE = (320, 240)  # the default size: the Haar check is only meaningful there
N_CLIPS, N_SPEAKERS = 6, 3


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "Raw").rglob("*.mp4"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    labels = demo.generate_corpus(root, N_CLIPS, seed=5, size=SIZE, n_speakers=N_SPEAKERS)
    return root, labels


def _decode(path: Path):
    """(video frames as BGR, mono audio, sample rate, container info)."""
    with av.open(str(path)) as container:
        info = {
            "video_codec": container.streams.video[0].codec_context.name if container.streams.video else None,
            "audio_codec": container.streams.audio[0].codec_context.name if container.streams.audio else None,
            "duration": container.duration / av.time_base,
            "stream_durations": [float(s.duration * s.time_base) for s in container.streams],
        }
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    audio, rate = None, None
    if info["audio_codec"]:
        with av.open(str(path)) as container:
            rate = container.streams.audio[0].sample_rate
            audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    return frames, audio, rate, info


# ----------------------------------------------------------------------------- layout, determinism

def test_layout_columns_and_files(corpus):
    root, labels = corpus
    header = (root / "label.csv").read_text().splitlines()[0]
    assert header == "video_id,clip_id,text,label,mode"
    table = pd.read_csv(root / "label.csv", dtype={"clip_id": str})
    assert len(table) == N_CLIPS and table.equals(labels.astype({"clip_id": str}))
    assert table["text"].str.strip().str.len().min() > 0
    assert set(table["video_id"]) == {f"spk{i:02d}" for i in range(1, N_SPEAKERS + 1)}
    for video_id, group in table.groupby("video_id"):  # clip ids run 1..k per speaker
        assert sorted(group["clip_id"].astype(int)) == list(range(1, len(group) + 1))
    expected = {f"Raw/{v}/{c}.mp4" for v, c in zip(table["video_id"], table["clip_id"])}
    assert set(_hashes(root)) == expected
    components = pd.read_csv(root / "components.csv", dtype={"clip_id": str})
    assert list(components[["video_id", "clip_id"]].itertuples(index=False)) == \
        list(table[["video_id", "clip_id"]].itertuples(index=False))


def test_same_seed_is_byte_identical_and_other_seed_differs(corpus, tmp_path):
    root, _ = corpus
    again = tmp_path / "again"
    demo.generate_corpus(again, N_CLIPS, seed=5, size=SIZE, n_speakers=N_SPEAKERS)
    assert (again / "label.csv").read_bytes() == (root / "label.csv").read_bytes()
    assert _hashes(again) == _hashes(root)
    other = tmp_path / "other"
    demo.generate_corpus(other, N_CLIPS, seed=6, size=SIZE, n_speakers=N_SPEAKERS)
    assert (other / "label.csv").read_bytes() != (root / "label.csv").read_bytes()
    assert not set(_hashes(other).values()) & set(_hashes(root).values())


def test_clip_depends_only_on_seed_and_index(corpus, tmp_path):
    """Why --jobs cannot change the output: one clip re-made on its own is the same file."""
    root, _ = corpus
    speakers, clips = demo.plan_corpus(N_CLIPS, 5, N_SPEAKERS)
    clip = clips[4]
    alone = tmp_path / "alone.mp4"
    demo.write_clip(alone, speaker=speakers[4 % N_SPEAKERS], s_face=clip.s_face, s_voice=clip.s_voice,
                    duration=clip.duration, size=SIZE, seed=5, index=4)
    assert alone.read_bytes() == (root / "Raw" / clip.video_id / f"{clip.clip_id}.mp4").read_bytes()


def test_parallel_jobs_give_the_same_corpus(tmp_path):
    """The jobs > 1 path (joblib). Threads instead of the default worker processes keep this test
    fast: a fresh process pays seconds importing torch (pipeline/__init__) before its first clip."""
    from joblib import parallel_config

    one, two = tmp_path / "one", tmp_path / "two"
    demo.generate_corpus(one, 6, seed=1, size=(96, 64), fps=8, n_speakers=3, jobs=1)
    with parallel_config(backend="threading"):
        demo.generate_corpus(two, 6, seed=1, size=(96, 64), fps=8, n_speakers=3, jobs=3)
    assert (one / "label.csv").read_bytes() == (two / "label.csv").read_bytes()
    assert _hashes(one) == _hashes(two)


def test_rerun_with_fewer_clips_removes_stale_clips(tmp_path):
    demo.generate_corpus(tmp_path, 4, seed=2, size=(96, 64), fps=8, n_speakers=3)
    demo.generate_corpus(tmp_path, 2, seed=2, size=(96, 64), fps=8, n_speakers=3)
    assert sorted(_hashes(tmp_path)) == ["Raw/spk01/1.mp4", "Raw/spk02/1.mp4"]


# ----------------------------------------------------------------------------- media

def test_every_clip_is_h264_aac_between_2_and_4_seconds(corpus):
    root, labels = corpus
    for video_id, clip_id in zip(labels["video_id"], labels["clip_id"]):
        frames, audio, rate, info = _decode(root / "Raw" / video_id / f"{clip_id}.mp4")
        assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
        assert 2.0 <= info["duration"] <= 4.0
        assert all(2.0 <= d <= 4.0 for d in info["stream_durations"])
        assert frames[0].shape == (SIZE[1], SIZE[0], 3)
        assert abs(len(frames) / demo.FPS - info["stream_durations"][0]) < 0.1
        assert rate == demo.SAMPLE_RATE and abs(len(audio) / rate - info["duration"]) < 0.2
        assert 0.02 < np.sqrt(np.mean(audio ** 2)) < 0.5  # a real, unclipped voice


def test_faces_are_found_by_the_haar_cascade(corpus):
    """The visual stage crops faces with OpenCV's Haar cascade: it must find ours."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    hits = []
    root, labels = corpus
    for video_id, clip_id in zip(labels["video_id"], labels["clip_id"]):  # decoded frames
        frames, *_ = _decode(root / "Raw" / video_id / f"{clip_id}.mp4")
        for frame in frames[::10]:
            hits.append(len(cascade.detectMultiScale(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), 1.1, 5)) > 0)
    for speaker in demo.make_speakers(0):  # every speaker look, extreme expressions
        for s_face in (-1.0, 1.0):
            rng = demo.rng_for(0, 9)
            syllables = demo.plan_syllables(1.0, 0.0, speaker, rng)
            frame = next(demo.render_frames(speaker, s_face, syllables, 1.0, SIZE, demo.FPS, rng))
            hits.append(len(cascade.detectMultiScale(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), 1.1, 5)) > 0)
    assert np.mean(hits) >= 0.85, f"Haar cascade found a face in only {np.mean(hits):.0%} of frames"


def test_write_clip_options(tmp_path):
    demo.write_clip(tmp_path / "mute.mp4", duration=2.0, size=(96, 64), fps=10, with_audio=False)
    frames, audio, _, info = _decode(tmp_path / "mute.mp4")
    assert info["audio_codec"] is None and audio is None and len(frames) == 20
    demo.write_clip(tmp_path / "long.mp4", duration=5.0, size=(96, 64), fps=10)
    frames, audio, rate, info = _decode(tmp_path / "long.mp4")
    assert len(frames) == 50 and abs(info["duration"] - 5.0) < 0.15
    demo.write_clip(tmp_path / "silent.mp4", duration=2.0, size=(96, 64), fps=10, audio_gain=0.0)
    _, audio, _, _ = _decode(tmp_path / "silent.mp4")
    assert np.abs(audio).max() < 1e-4
    with pytest.raises(ValueError):
        demo.write_clip(tmp_path / "odd.mp4", size=(95, 64))


# ----------------------------------------------------------------------------- labels and splits

def test_split_is_speaker_independent(corpus):
    _, labels = corpus
    assert (labels.groupby("video_id")["mode"].nunique() == 1).all()
    assert set(labels["mode"]) == {"train", "valid", "test"}
    assert demo.speaker_splits(12).count("train") == 8 and demo.speaker_splits(12).count("test") == 2
    speakers, clips = demo.plan_corpus(90, 0)
    modes = {c.video_id: c.mode for c in clips}
    assert all(modes[s.video_id] == s.split for s in speakers)
    assert all(sum(m == split for m in modes.values()) >= 2 for split in ("train", "valid", "test"))


def test_labels_follow_the_documented_rule(corpus):
    root, labels = corpus
    components = pd.read_csv(root / "components.csv")
    expected = [demo.sentiment_label(t, f, v) for t, f, v in
                zip(components["s_text"], components["s_face"], components["s_voice"])]
    assert np.allclose(labels["label"], expected, atol=1e-9)
    _, clips = demo.plan_corpus(3000, 0)
    s = np.array([[c.s_text, c.s_face, c.s_voice] for c in clips])
    label = np.array([c.label for c in clips])
    assert label.min() >= -3 and label.max() <= 3
    assert np.allclose(label / 0.2, np.round(label / 0.2), atol=1e-6)       # the 0.2 grid
    assert label.min() <= -2.8 and label.max() >= 2.8 and 1.2 < label.std() < 1.8
    assert set(np.round(np.abs(s[:, 0]) * 3)) == {0, 1, 2, 3}               # text levels
    for k in range(3):
        neutral = np.mean(s[:, k] == 0)
        assert 0.2 < neutral < 0.3
        assert np.abs(s[s[:, k] != 0, k]).min() >= 0.2 - 1e-9 and np.abs(s[:, k]).max() <= 1
        r2 = np.corrcoef(s[:, k], label)[0, 1] ** 2
        assert 0.15 < r2 < 0.5, f"modality {k} alone explains {r2:.2f} of the label"
    fit = np.linalg.lstsq(np.c_[s, np.ones(len(s))], label, rcond=None)[0]
    residual = label - np.c_[s, np.ones(len(s))] @ fit
    assert 1 - residual.var() / label.var() > 0.9  # all three together determine it


# ----------------------------------------------------------------------------- cues

def _score_transcript(text: str) -> float:
    """An independent reading of the grammar: find the polar word, apply negation/intensifier."""
    tokens = text.split()
    polar = {w: (sign, level) for sign, lexicon in ((1, demo.POSITIVE), (-1, demo.NEGATIVE))
             for level, words in lexicon.items() for w in words}
    hits = [i for i, t in enumerate(tokens) if t in polar]
    if not hits:
        return 0.0
    assert len(hits) == 1, text
    k = hits[0]
    sign, level = polar[tokens[k]]
    before = tokens[k - 1] if k >= 1 else ""
    if before == "not":
        sign, level = -sign, (2 if k >= 2 and tokens[k - 2] in demo.NEGATION_INTENSIFIERS else 1)
    elif before in demo.MILD_INTENSIFIERS + demo.STRONG_INTENSIFIERS:
        level += 1
    return sign * level / 3


def test_transcripts_express_s_text_with_negation_and_intensifiers():
    _, clips = demo.plan_corpus(600, 3)
    for clip in clips:
        assert _score_transcript(clip.text) == pytest.approx(clip.s_text, abs=1e-3), clip.text
    texts = [c.text for c in clips]
    by_level = {k: [c.text for c in clips if round(abs(c.s_text) * 3) == k] for k in (1, 2, 3)}
    negated = r"(?<!really )(?<!just )(?<!definitely )\bnot \w+"
    assert any(re.search(negated, t) for t in by_level[1])                            # "not bad"
    assert any(re.search(r"\b(really|just|definitely) not \w+", t) for t in by_level[2])  # "really not good"
    assert any(re.search(r"\b(really|very|so|super) (" + "|".join(demo.POSITIVE[1] + demo.NEGATIVE[1]) + r")\b", t)
               for t in by_level[2])                                                   # "very good"
    assert all(re.search(r"\b(really|absolutely|just|truly) \w+", t) for t in by_level[3])  # "truly awful"
    for lexicon in (demo.POSITIVE, demo.NEGATIVE):  # both polarities get negated
        assert any(re.search(r"\bnot (" + "|".join(lexicon[1] + lexicon[2]) + r")\b", t) for t in texts)
    assert len(set(texts)) > 400  # a grammar, not a handful of fixed lines
    misleading = [c for c in clips if c.s_text * c.label < 0]
    assert len(misleading) > 30  # text polarity opposing the label is common


def _median_f0(audio: np.ndarray, rate: int) -> float:
    """Median autocorrelation pitch over the loud 40 ms frames."""
    n, hop = int(0.04 * rate), int(0.01 * rate)
    low, high = rate // 500, rate // 60
    rms = np.sqrt(np.mean(audio ** 2))
    f0 = []
    for start in range(0, len(audio) - n, hop):
        frame = audio[start:start + n] - audio[start:start + n].mean()
        if np.sqrt(np.mean(frame ** 2)) < 0.5 * rms:
            continue
        ac = np.correlate(frame, frame, "full")[n - 1:]
        lag = low + int(np.argmax(ac[low:high]))
        if ac[lag] > 0.4 * ac[0]:
            f0.append(rate / lag)
    return float(np.median(f0))


def _voiced_segments(audio: np.ndarray, rate: int) -> int:
    """Number of loud stretches (syllables) in a 10 ms RMS envelope."""
    hop = rate // 100
    rms = np.sqrt(np.mean(audio[: len(audio) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    loud = rms > 0.3 * rms.max()
    return int(np.sum(loud[1:] & ~loud[:-1]) + loud[0])


def test_voice_pitch_and_tempo_follow_s_voice(tmp_path):
    speaker = demo.make_speakers(0)[0]
    pitches, counts = [], []
    for s_voice in (-1.0, -0.4, 0.3, 1.0):
        path = tmp_path / f"v{s_voice}.mp4"
        demo.write_clip(path, speaker=speaker, s_voice=s_voice, duration=3.0, size=(64, 48), fps=5, index=11)
        _, audio, rate, _ = _decode(path)
        pitches.append(_median_f0(audio, rate))
        counts.append(_voiced_segments(audio, rate))
    assert np.all(np.diff(pitches) > 0), pitches
    assert pitches[-1] / pitches[0] > 1.4, pitches  # ~8 semitones apart by design
    assert counts[-1] > 1.4 * counts[0], counts      # syllable rate x2 by design
    rates = {s: np.mean([len(demo.plan_syllables(3.0, s, speaker, demo.rng_for(0, 8, i)).onset) for i in range(20)])
             for s in (-1.0, 0.0, 1.0)}
    assert rates[-1.0] < rates[0.0] < rates[1.0]


def _mouth_bend(speaker, s_face: float, size=SIZE) -> float:
    """How far the mouth corners sit above its middle (pixels; > 0 smile, < 0 frown)."""
    head = demo.draw_head(speaker, s_face, *size)
    face = head.copy()
    demo.draw_mouth(face, speaker, s_face, talk=0.0)
    ys, xs = np.nonzero(np.abs(face.astype(int) - head).max(axis=2) > 25)  # the mouth's pixels
    left, right = xs.min(), xs.max()
    width = right - left
    corners = (xs < left + 0.15 * width) | (xs > right - 0.15 * width)
    middle = np.abs(xs - (left + right) / 2) < 0.1 * width
    return float(ys[middle].mean() - ys[corners].mean())


def _inner_brow_row(speaker, s_face: float, size=SIZE) -> int:
    """Row of the darkest band just inside the eyes: where the inner brow end sits."""
    head = demo.draw_head(speaker, s_face, *size)
    g = demo.face_geometry(speaker, *size)
    gray = cv2.cvtColor(head, cv2.COLOR_BGR2GRAY).astype(float)
    x0, x1 = int(g.cx + 0.12 * g.a), int(g.cx + 0.22 * g.a)
    y0, y1 = int(g.cy - 0.55 * g.b), int(g.cy - 0.2 * g.b)
    return y0 + int(np.argmin(gray[y0:y1, x0:x1].mean(axis=1)))


def test_face_expression_follows_s_face():
    for speaker in demo.make_speakers(4)[:4]:
        bends = [_mouth_bend(speaker, s) for s in (-1.0, -0.5, 0.0, 0.5, 1.0)]
        assert np.all(np.diff(bends) > 0), bends
        assert bends[0] < -4 and bends[-1] > 6, bends  # clearly frowning vs clearly smiling at 320x240
        assert _inner_brow_row(speaker, -1.0) - _inner_brow_row(speaker, 1.0) >= 3  # furrowed brows sit lower
    # a smile shows teeth: the mouth box gets brighter than in a frown
    speaker = demo.make_speakers(4)[0]
    g = demo.face_geometry(speaker, *SIZE)
    box = (slice(int(g.cy + 0.3 * g.b), int(g.cy + 0.75 * g.b)), slice(int(g.cx - 0.4 * g.a), int(g.cx + 0.4 * g.a)))
    brightness = {}
    for s in (-1.0, 1.0):
        img = demo.draw_head(speaker, s, *SIZE)
        demo.draw_mouth(img, speaker, s, talk=0.0)
        brightness[s] = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[box]
    assert (brightness[1.0] > 200).sum() > 20 + (brightness[-1.0] > 200).sum()
