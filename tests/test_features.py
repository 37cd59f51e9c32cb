"""The feature stages: shapes and lengths, determinism, the cache (hit, miss, resume), bad input, real clips.

Models are tiny and made here: a ModernBERT (hidden 32, 2 layers) with a tokenizer
trained on the spot, and an open_clip ViT (16-d), both saved to folders and loaded
through the same code path as hub models.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, make_clip
from pipeline.cache import FeatureCache, file_sha256
from pipeline.features.encoders import load_image_encoder, load_text_encoder, resolve_image_encoder, resolve_text_encoder
from pipeline.features import acoustic, text, visual
from pipeline import params as params_mod
from pipeline.features.compute import Compute
from pipeline.features.table import read_feature_table, read_meta
from pipeline.data.media import iter_video_frames, probe_video, read_audio, sample_times

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- tiny models

@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """ModernBERT, hidden 32, 2 layers, WordPiece tokenizer trained here; saved like a hub model."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import ModernBertConfig, ModernBertModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-modernbert")
    corpus = ["this movie was really good", "i did not like it at all", "the acting was great but the plot was bad",
              "a tone clip with a face and a voice"] * 4
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)  # case-sensitive, so `lowercase` matters
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out)
    config = ModernBertConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=128, local_attention=16,
                              pad_token_id=fast.pad_token_id, cls_token_id=cls, sep_token_id=sep,
                              bos_token_id=cls, eos_token_id=sep)
    torch.manual_seed(0)
    ModernBertModel(config).save_pretrained(out)
    return out


TINY_CLIP_CFG = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """An open_clip ViT (32 px input, 16-d) saved as config + checkpoint, loaded via local-dir."""
    import open_clip

    out = tmp_path_factory.mktemp("tiny-open-clip")
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    torch.manual_seed(0)
    torch.save(open_clip.model.CLIP(**TINY_CLIP_CFG).state_dict(), out / "open_clip_pytorch_model.bin")
    return out


def make_params(bert: Path, clip: Path, **over) -> dict:
    params = {
        "compute": {"backend": "local", "n_jobs": 1, "scheduler": "local:2"},
        "features": {
            "text": {"encoder": str(bert), "max_length": 12, "layers": [-1], "lowercase": False, "dtype": "float16",
                     "batch_size": 2, "device": "cpu"},
            "visual": {"encoder": str(clip), "fps": 4.0, "face_crop": True, "face_pad": 0.25, "face_smooth": 0.5,
                       "max_frames": 0, "dtype": "float16", "batch_size": 5, "device": "cpu"},
            "acoustic": {"extractor": "librosa", "sample_rate": 16000, "hop_ms": 10, "win_ms": 25, "n_mfcc": 13,
                         "f0": "yin", "fmin": 60, "fmax": 500, "pool": 1},
        },
    }
    for dotted, value in over.items():
        *path, last = dotted.split("__")
        node = params
        for part in path:
            node = node[part]
        node[last] = value
    return params


# --------------------------------------------------------------------------- corpora

def manifest_of(entries: list[dict]) -> pd.DataFrame:
    """Manifest rows in the prepare contract, probed from the files (as prepare would)."""
    rows = []
    for i, e in enumerate(entries):
        media = e.get("media", "video")
        row = {"id": e.get("id", f"v/{i}"), "video_id": "v", "clip_id": str(i), "split": "train", "label": 0.0,
               "label_name": "", "text": e.get("text", "a tone clip with a face and a voice"), "media": media,
               "video_path": "", "audio_path": str(e.get("audio_path", "")), "image_path": "", "duration": 0.0,
               "fps": 0.0, "width": 0, "height": 0, "has_audio": bool(e.get("audio_path")), "audio_sample_rate": 0,
               "audio_channels": 0, "content_hash": ""}
        if media == "video":
            info = probe_video(e["path"])
            row.update(video_path=str(e["path"]), duration=info.duration, fps=info.fps, width=info.width,
                       height=info.height, has_audio=info.has_audio or bool(e.get("audio_path")),
                       audio_sample_rate=info.audio_sample_rate, audio_channels=info.audio_channels,
                       content_hash=file_sha256(e["path"]))
        elif media == "image":
            row.update(image_path=str(e["path"]), content_hash=file_sha256(e["path"]))
        rows.append(row)
    return pd.DataFrame(rows)


def write_wav(path: Path, seconds: float, rate: int = 16000, freq: float = 220.0) -> Path:
    samples = (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return path


def corrupt_middle(src: Path, dst: Path) -> Path:
    """Random bytes over the middle of the media data: headers probe fine, decoding fails halfway."""
    data = bytearray(src.read_bytes())
    lo, hi = int(len(data) * 0.3), int(len(data) * 0.7)
    data[lo:hi] = np.random.default_rng(0).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("media")
    files = {
        "short": make_clip(root / "short.mp4", seconds=1.0, fps=10, size=(64, 48)),
        "long": make_clip(root / "long.mp4", seconds=2.2, fps=10, size=(80, 64)),
        "other": make_clip(root / "other.mp4", seconds=1.5, fps=10, size=(64, 48), audio="silent"),
        "mute": make_clip(root / "mute.mp4", seconds=1.0, fps=10, size=(64, 48), audio="none"),
    }
    files["broken"] = corrupt_middle(make_clip(root / "src.mp4", seconds=2.0, fps=10, size=(64, 48)), root / "broken.mp4")
    files["image"] = root / "still.jpg"
    cv2.imwrite(str(files["image"]), np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    files["blip"] = write_wav(root / "blip.wav", 0.01)      # shorter than one 25 ms analysis window
    return files


def run_stage(module, manifest, params, cache, out):
    """A stage's run() with its section and `compute` parsed out of a params mapping, as stage_main does."""
    name = module.__name__.rsplit(".", 1)[1]
    cfg = params_mod.read(params, params_mod.SECTIONS[f"features.{name}"])
    return module.run(manifest, cfg, cache, out, compute=params_mod.read(params, Compute), show_progress=False)


# --------------------------------------------------------------------------- media decoding

def test_sampling_follows_duration_and_fps(media):
    info = probe_video(media["long"])
    frames = list(iter_video_frames(media["long"], 4.0, duration=info.duration))
    times = np.array([t for t, _ in frames])
    assert len(frames) == round(info.duration * 4.0) == 9
    assert np.all(np.diff(times) > 0) and times[0] >= 0 and times[-1] < info.duration
    # each sample is the frame on screen at its target time (10 fps source: within one frame)
    assert np.allclose(times, sample_times(info.duration, 4.0), atol=0.1 + 1e-6)
    assert frames[0][1].shape == (64, 80, 3) and frames[0][1].dtype == np.uint8
    capped = list(iter_video_frames(media["long"], 4.0, max_frames=3, duration=info.duration))
    assert len(capped) == 3 and capped[-1][0] > info.duration / 2   # spread over the clip, not its start

    audio = read_audio(media["long"], 16000)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / 16000 - 2.2) < 0.15   # AAC pads to whole 64 ms frames


# --------------------------------------------------------------------------- text

def test_text_tiny_modernbert(tmp_path, tiny_bert, tiny_clip):
    long_text = "the acting was great but the plot was bad and i did not like it at all"
    man = manifest_of([{"media": "none", "text": "this movie was really good"},
                       {"media": "none", "text": long_text},
                       {"media": "none", "text": "this movie was really good"}])   # same transcript: one extraction
    params = make_params(tiny_bert, tiny_clip)
    meta = run_stage(text, man, params, tmp_path / "cache", tmp_path / "text.parquet")
    assert meta["counts"] == {"segments": 3, "ok": 3, "failed": 0, "skipped": 0, "cached": 0, "extracted": 2,
                              "repaired": 0}
    assert meta["dim"] == 32 and meta["encoder"]["revision"] and meta["encoder"]["id"] == str(tiny_bert)
    assert [n["id"] for n in meta["notes"]] == ["v/1"] and "truncated" in meta["notes"][0]["note"]
    assert json.loads((tmp_path / "text.run.json").read_text()) == meta  # the whole report, timing included
    assert json.loads((tmp_path / "text.json").read_text()) == read_meta(tmp_path / "text.parquet") == \
        {k: v for k, v in meta.items() if k not in ("wall_s", "throughput", "retries", "repaired")} | \
        {"counts": {"segments": 3, "ok": 3, "failed": 0, "skipped": 0}}

    table, _ = read_feature_table(tmp_path / "text.parquet")
    tokenizer, model = load_text_encoder(resolve_text_encoder(str(tiny_bert)), CPU)
    for i, t in enumerate(["this movie was really good", long_text, "this movie was really good"]):
        id_ = f"v/{i}"
        ids = tokenizer(t, truncation=True, max_length=12)["input_ids"]
        hidden = table.get(id_, "hidden")
        assert table.get(id_, "token_ids").tolist() == ids
        assert table.get(id_, "n_tokens") == len(ids) == hidden.shape[0] and hidden.shape[1] == 32
        assert hidden.dtype == np.float16 and table.get(id_, "pooled_mean").dtype == np.float32
        assert bool(table.get(id_, "truncated")) == (i == 1)
        # the batched, padded, length-sorted pass equals encoding this segment alone
        with torch.inference_mode():
            alone = model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
        assert np.allclose(hidden, alone, atol=2e-3)
        assert np.allclose(table.get(id_, "pooled_mean"), alone.mean(0), atol=1e-4)

    # deterministic: a fresh cache gives the same bytes; a second run is all cache hits
    again = run_stage(text, man, params, tmp_path / "cache2", tmp_path / "text2.parquet")
    table2, _ = read_feature_table(tmp_path / "text2.parquet")
    assert again["counts"]["extracted"] == 2
    assert np.array_equal(table.columns["hidden"].values, table2.columns["hidden"].values)
    hit = run_stage(text, man, params, tmp_path / "cache", tmp_path / "text3.parquet")
    assert hit["counts"]["cached"] == 2 and hit["counts"]["extracted"] == 0
    assert np.array_equal(read_feature_table(tmp_path / "text3.parquet")[0].columns["hidden"].values,
                          table.columns["hidden"].values)
    # what DVC hashes is the same whether the clips came from a cold or a warm cache (no times, no cache counts)
    for suffix in (".parquet", ".json"):
        first = (tmp_path / f"text{suffix}").read_bytes()
        assert (tmp_path / f"text2{suffix}").read_bytes() == first == (tmp_path / f"text3{suffix}").read_bytes(), suffix


def test_text_params_change_the_result(tmp_path, tiny_bert, tiny_clip):
    man = manifest_of([{"media": "none", "text": "This Movie was GOOD"}])
    base = run_stage(text, man, make_params(tiny_bert, tiny_clip), tmp_path / "c", tmp_path / "a.parquet")
    lower = run_stage(text, man, make_params(tiny_bert, tiny_clip, features__text__lowercase=True),
                      tmp_path / "c", tmp_path / "b.parquet")
    layers = run_stage(text, man, make_params(tiny_bert, tiny_clip, features__text__layers=[0, -1],
                                              features__text__dtype="float32"), tmp_path / "c", tmp_path / "d.parquet")
    assert lower["counts"]["extracted"] == layers["counts"]["extracted"] == 1   # new keys, not stale hits
    a, b, d = (read_feature_table(tmp_path / f"{n}.parquet")[0] for n in "abd")
    assert a.get("v/0", "token_ids").tolist() != b.get("v/0", "token_ids").tolist()
    assert d.get("v/0", "hidden").dtype == np.float32
    assert not np.allclose(d.get("v/0", "hidden"), a.get("v/0", "hidden"), atol=1e-2)


# --------------------------------------------------------------------------- visual

def test_visual_tiny_open_clip(tmp_path, media, tiny_bert, tiny_clip):
    man = manifest_of([{"path": media["short"]}, {"path": media["long"]},
                       {"media": "image", "path": media["image"]}, {"media": "none"}])
    params = make_params(tiny_bert, tiny_clip)
    meta = run_stage(visual, man, params, tmp_path / "cache", tmp_path / "visual.parquet")
    assert meta["counts"]["ok"] == 3 and meta["dim"] == 16 and meta["image_size"] == 32
    assert meta["failures"] == [{"id": "v/3", "reason": "no media (transcript-only segment)", "skipped": True}]
    # flat grey frames: no face anywhere, recorded per clip and per frame
    assert {n["id"] for n in meta["notes"]} == {"v/0", "v/1", "v/2"}
    assert all("no face" in n["note"] for n in meta["notes"])

    table, _ = read_feature_table(tmp_path / "visual.parquet")
    encoder = load_image_encoder(resolve_image_encoder(str(tiny_clip)), CPU)
    for id_, path, seconds in [("v/0", media["short"], 1.0), ("v/1", media["long"], 2.2)]:
        n = table.get(id_, "n_frames")
        ts, emb, found = table.get(id_, "timestamps"), table.get(id_, "emb"), table.get(id_, "face_found")
        assert n == round(seconds * 4.0) == len(ts) == len(found) == emb.shape[0]
        assert emb.shape[1] == 16 and emb.dtype == np.float16 and not found.any()
        assert np.all(np.diff(ts) > 0) and 0 <= ts[0] and ts[-1] < seconds
        # the stored embeddings are the encoder applied to the full frames, whatever the batching
        frames = [visual.full_frame(rgb, 32) for _, rgb in iter_video_frames(path, 4.0, max_short=64)]
        direct = encoder(torch.from_numpy(np.stack(frames))).numpy()
        assert np.allclose(emb, direct, atol=2e-2)
    assert table.get("v/2", "n_frames") == 1 and table.get("v/2", "timestamps").tolist() == [0.0]

    # parallel decoding (2 local workers) gives the same result as inline
    par = run_stage(visual, man, make_params(tiny_bert, tiny_clip, compute__n_jobs=2), tmp_path / "cache_par",
                    tmp_path / "par.parquet")
    assert par["counts"]["extracted"] == 3 and par["throughput"]["workers"] == 2
    assert np.allclose(read_feature_table(tmp_path / "par.parquet")[0].columns["emb"].values.astype(np.float32),
                       table.columns["emb"].values.astype(np.float32), atol=2e-3)


def test_visual_params_rekey_and_cap_frames(tmp_path, media, tiny_bert, tiny_clip):
    man = manifest_of([{"path": media["long"]}])
    run_stage(visual, man, make_params(tiny_bert, tiny_clip), tmp_path / "c", tmp_path / "a.parquet")
    meta = run_stage(visual, man, make_params(tiny_bert, tiny_clip, features__visual__fps=2.0, features__visual__max_frames=3),
                     tmp_path / "c", tmp_path / "b.parquet")
    assert meta["counts"]["extracted"] == 1
    table, _ = read_feature_table(tmp_path / "b.parquet")
    assert table.get("v/0", "n_frames") == 3   # round(2.2 * 2) = 4 capped at 3, spread over the clip
    assert table.get("v/0", "timestamps")[-1] > 1.1
    for key, value in (("detect_size", 180), ("face_detector", "haar")):   # who looks for faces, and how closely
        again = run_stage(visual, man, make_params(tiny_bert, tiny_clip, **{f"features__visual__{key}": value}),
                          tmp_path / "c", tmp_path / "c.parquet")
        assert again["counts"]["extracted"] == 1, key


def test_mtcnn_weights_missing_is_one_clear_error(monkeypatch):
    import importlib.util

    from pipeline.errors import UserError
    from pipeline.features import faces

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "facenet_pytorch"
                        else real_find_spec(name, *a))
    monkeypatch.setattr(faces, "_MTCNN", None)
    with pytest.raises(UserError, match=r"'mtcnn' needs the MTCNN weights of facenet-pytorch \(pip install --no-deps"):
        faces.detect_face(np.zeros((64, 64, 3), np.uint8), "mtcnn")


# --------------------------------------------------------------------------- acoustic

@pytest.fixture(scope="session")
def librosa_warm():
    """librosa JIT-compiles its pitch trackers on first use (~30 s once per venv): pay it once."""
    cfg = acoustic.AcousticParams(extractor="librosa")
    acoustic.acoustic_features(np.zeros(1600, np.float32), acoustic.settings_from(cfg))


def test_acoustic_descriptors(tmp_path, media, tiny_bert, tiny_clip, librosa_warm):
    man = manifest_of([{"path": media["short"]}, {"path": media["mute"]}, {"media": "image", "path": media["image"]},
                       {"path": media["other"], "audio_path": media["blip"]}, {"media": "none"}])
    params = make_params(tiny_bert, tiny_clip)
    meta = run_stage(acoustic, man, params, tmp_path / "cache", tmp_path / "acoustic.parquet")
    reasons = {f["id"]: f["reason"] for f in meta["failures"]}
    assert reasons == {"v/1": "no audio track", "v/2": "no audio (image segment)",
                       "v/3": "audio shorter than one analysis window (10.0 ms < 25 ms)",
                       "v/4": "no media (transcript-only segment)"}
    names = meta["feature_names"]
    assert meta["dim"] == len(names) == 3 * 13 + 7 and meta["counts"]["ok"] == 1

    table, _ = read_feature_table(tmp_path / "acoustic.parquet")
    feats = table.get("v/0", "feats")
    samples = len(read_audio(media["short"], 16000))
    assert feats.shape == (1 + samples // 160, len(names)) and feats.dtype == np.float32
    middle = feats[10:-10]
    assert np.allclose(middle[:, names.index("f0_hz")], 220, rtol=0.03)   # the 220 Hz tone
    assert middle[:, names.index("voicing")].min() > 0.9

    # pooling shortens the sequence by averaging groups of steps
    pooled = run_stage(acoustic, man, make_params(tiny_bert, tiny_clip, features__acoustic__pool=5),
                       tmp_path / "cache", tmp_path / "pooled.parquet")
    assert pooled["counts"]["extracted"] == 2   # new settings: the good clip and the short one re-run
    p = read_feature_table(tmp_path / "pooled.parquet")[0].get("v/0", "feats")
    assert p.shape[0] == -(-feats.shape[0] // 5) and np.allclose(p[1], feats[5:10].mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extractor, dim, frame_ms, f0_name, f0_of_220hz", [
    ("egemaps", 25, 20, "F0semitoneFrom27.5Hz_sma3nz", 36.0),   # 12 * log2(220 / 27.5) semitones
    ("compare", 130, 60, "F0final_sma", 220.0)])
def test_acoustic_opensmile_sets_through_the_cache(tmp_path, media, tiny_bert, tiny_clip, extractor, dim, frame_ms,
                                                   f0_name, f0_of_220hz):
    import opensmile

    man = manifest_of([{"path": media["short"]}, {"path": media["other"], "audio_path": media["blip"]}])
    params = make_params(tiny_bert, tiny_clip, features__acoustic__extractor=extractor)
    meta = run_stage(acoustic, man, params, tmp_path / "cache", tmp_path / "a.parquet")
    assert meta["encoder"] == {"id": f"opensmile:{acoustic.OPENSMILE_SETS[extractor]}", "revision": opensmile.__version__}
    assert meta["dim"] == len(meta["feature_names"]) == dim and meta["throughput"]["extractor"] == extractor
    assert meta["failures"] == [{"id": "v/1", "reason": f"audio shorter than one openSMILE frame (10.0 ms < {frame_ms} ms)"}]
    feats = read_feature_table(tmp_path / "a.parquet")[0].get("v/0", "feats")
    assert feats.shape == (1 + len(read_audio(media["short"], 16000)) // 160, dim)  # librosa's step count
    assert np.allclose(np.median(feats[20:-20, meta["feature_names"].index(f0_name)]), f0_of_220hz, rtol=0.02)
    if extractor == "compare":   # the deltas are the regression of each descriptor over +-2 frames
        lld = feats[:, :65]
        assert np.allclose(feats[10:-10, 65:], acoustic.deltas(lld.astype(np.float64), 2)[10:-10], atol=1e-3)

    # cached; librosa's own knobs do not re-key openSMILE; the extractor and the hop do
    again = run_stage(acoustic, man, make_params(tiny_bert, tiny_clip, features__acoustic__extractor=extractor,
                                                 features__acoustic__n_mfcc=20), tmp_path / "cache", tmp_path / "b.parquet")
    assert again["counts"]["extracted"] == 0 and again["failures"] == meta["failures"]
    hop = run_stage(acoustic, man, make_params(tiny_bert, tiny_clip, features__acoustic__extractor=extractor,
                                               features__acoustic__hop_ms=20, features__acoustic__pool=2),
                    tmp_path / "cache", tmp_path / "c.parquet")
    assert hop["counts"]["extracted"] == 2
    coarse = read_feature_table(tmp_path / "c.parquet")[0].get("v/0", "feats")
    assert coarse.shape == (-(-(1 + len(read_audio(media["short"], 16000)) // 320) // 2), dim)


def test_acoustic_pyin_and_backends_agree(tmp_path, media, tiny_bert, tiny_clip, librosa_warm):
    man = manifest_of([{"path": media["short"]}, {"path": media["long"]}])
    pyin = run_stage(acoustic, man, make_params(tiny_bert, tiny_clip, features__acoustic__f0="pyin"),
                     tmp_path / "c", tmp_path / "pyin.parquet")
    assert pyin["counts"]["ok"] == 2
    feats = read_feature_table(tmp_path / "pyin.parquet")[0].get("v/0", "feats")
    f0 = feats[10:-10, pyin["feature_names"].index("f0_hz")]
    assert np.allclose(f0, 220, rtol=0.03)

    inline = run_stage(acoustic, man, make_params(tiny_bert, tiny_clip), tmp_path / "inline", tmp_path / "a.parquet")
    dask = run_stage(acoustic, man, make_params(tiny_bert, tiny_clip, compute__backend="dask",
                                                compute__scheduler="local:2"), tmp_path / "dask", tmp_path / "b.parquet")
    assert inline["counts"]["ok"] == dask["counts"]["ok"] == 2 and dask["throughput"]["backend"] == "dask"
    a, b = (read_feature_table(tmp_path / f"{n}.parquet")[0] for n in "ab")
    assert np.array_equal(a.columns["feats"].values, b.columns["feats"].values)


# --------------------------------------------------------------------------- cache, resume, bad input

def test_resume_after_crash_and_incremental_corpus(tmp_path, media, tiny_bert, tiny_clip, monkeypatch):
    clips = [media["short"], media["long"], media["other"]]
    params = make_params(tiny_bert, tiny_clip, features__visual__batch_size=4)
    reference = run_stage(visual, manifest_of([{"path": c} for c in clips]), params, tmp_path / "ref", tmp_path / "ref.parquet")

    real_put, calls = FeatureCache.put, []

    def crashing_put(self, key, arrays, **meta):   # dies (like Ctrl-C) after the first clip is stored
        if calls:
            raise KeyboardInterrupt
        calls.append(key)
        real_put(self, key, arrays, **meta)

    monkeypatch.setattr(FeatureCache, "put", crashing_put)
    with pytest.raises(KeyboardInterrupt):
        run_stage(visual, manifest_of([{"path": c} for c in clips]), params, tmp_path / "cache", tmp_path / "v.parquet")
    monkeypatch.setattr(FeatureCache, "put", real_put)
    assert not (tmp_path / "v.parquet").exists()
    assert len(list((tmp_path / "cache").rglob("*.tmp"))) == 0          # no half-written entry

    resumed = run_stage(visual, manifest_of([{"path": c} for c in clips]), params, tmp_path / "cache", tmp_path / "v.parquet")
    assert resumed["counts"]["cached"] == 1 and resumed["counts"]["extracted"] == 2
    assert np.array_equal(read_feature_table(tmp_path / "v.parquet")[0].columns["emb"].values,
                          read_feature_table(tmp_path / "ref.parquet")[0].columns["emb"].values)
    assert reference["counts"]["ok"] == 3

    # a corpus that grows by one clip extracts that clip only
    grown = manifest_of([{"path": c} for c in clips] + [{"path": media["broken"], "id": "v/new"}])
    more = run_stage(visual, grown, params, tmp_path / "cache", tmp_path / "v.parquet")
    assert more["counts"]["cached"] == 3 and more["counts"]["extracted"] == 1

    # an entry damaged on disk (e.g. a kill -9 during a copy) is a miss, not a crash
    entry = next((tmp_path / "cache" / "visual").rglob("*.npz"))
    entry.write_bytes(entry.read_bytes()[:50])
    healed = run_stage(visual, grown, params, tmp_path / "cache", tmp_path / "v.parquet")
    assert healed["counts"]["extracted"] == 1 and healed["counts"]["ok"] == 3


def test_bad_clip_fails_alone_with_its_reason(tmp_path, media, tiny_bert, tiny_clip, librosa_warm):
    man = manifest_of([{"path": media["short"]}, {"path": media["broken"]}])
    params = make_params(tiny_bert, tiny_clip)
    for module, name in [(visual, "visual"), (acoustic, "acoustic")]:
        meta = run_stage(module, man, params, tmp_path / "cache", tmp_path / f"{name}.parquet")
        assert meta["counts"]["ok"] == 1 and [f["id"] for f in meta["failures"]] == ["v/1"]
        assert "decode failed after" in meta["failures"][0]["reason"]
        table, _ = read_feature_table(tmp_path / f"{name}.parquet")
        assert table.ids == ["v/0"]
        # the failure is cached with its reason: not retried, still reported
        again = run_stage(module, man, params, tmp_path / "cache", tmp_path / f"{name}.parquet")
        assert again["counts"]["extracted"] == 0 and again["failures"] == meta["failures"]


def test_transcript_only_stages_write_empty_tables(tmp_path, tiny_bert, tiny_clip, monkeypatch):
    """The stage entry points as DVC runs them, from a project root holding params.yaml."""
    import yaml

    from pipeline.features.runner import stage_main

    (tmp_path / "features").mkdir()
    manifest_of([{"media": "none"}, {"media": "none", "text": "i did not like it"}]).to_parquet(
        tmp_path / "features" / "manifest.parquet")
    params = make_params(tiny_bert, tiny_clip)
    params["cache"] = {"dir": str(tmp_path / "cache")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.delenv("MSA_CACHE_DIR", raising=False)
    # one real process for the script itself; the other two stages through the same function in-process
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "stages.visual", "features/manifest.parquet", "features/visual.parquet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("visual: skipped: no media") and "failed" not in done.stdout
    monkeypatch.chdir(tmp_path)
    assert stage_main("acoustic", acoustic, ["features/manifest.parquet", "features/acoustic.parquet"]) == 0
    assert stage_main("text", text, ["features/manifest.parquet", "features/text.parquet"]) == 0
    for stage in ("visual", "acoustic", "text"):
        table, meta = read_feature_table(tmp_path / "features" / f"{stage}.parquet")
        assert json.loads((tmp_path / "features" / f"{stage}.json").read_text()) == meta
        if stage == "text":
            assert len(table) == 2 and meta["counts"]["ok"] == 2
        else:
            assert len(table) == 0 and meta["note"].startswith("no media") and meta["counts"]["skipped"] == 2
            assert meta["counts"]["failed"] == 0
            assert {f["reason"] for f in meta["failures"]} == {"no media (transcript-only segment)"}
    assert (tmp_path / "cache" / "text").is_dir()   # cache.dir from params.yaml


def test_unavailable_encoder_is_one_clear_error(tmp_path, tiny_bert, tiny_clip, monkeypatch, capsys):
    import yaml

    from pipeline.features.runner import stage_main

    (tmp_path / "features").mkdir()
    manifest_of([{"media": "none"}]).to_parquet(tmp_path / "features" / "manifest.parquet")
    params = make_params(tiny_bert, tiny_clip, features__text__encoder="modernbert-base")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert stage_main("text", text, ["features/manifest.parquet", "features/text.parquet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'modernbert-base'" in err[0] and "'minilm'" in err[0]
    assert not (tmp_path / "features" / "text.parquet").exists()


# --------------------------------------------------------------------------- the real clips

def test_real_clips_through_all_stages(tmp_path, real_clips, tiny_bert, tiny_clip, librosa_warm):
    params = make_params(tiny_bert, tiny_clip)
    cwd = os.getcwd()
    os.chdir(REPO)  # manifest paths are relative to the repo root, as prepare writes them
    try:
        man = manifest_of([{"path": os.path.relpath(p, REPO)} for p in real_clips])
        metas = {name: run_stage(module, man, params, tmp_path / "cache", tmp_path / f"{name}.parquet")
                 for name, module in [("text", text), ("visual", visual), ("acoustic", acoustic)]}
    finally:
        os.chdir(cwd)
    for name, meta in metas.items():
        assert meta["counts"]["ok"] == len(real_clips), (name, meta["failures"])
    vis, _ = read_feature_table(tmp_path / "visual.parquet")
    ac, ac_meta = read_feature_table(tmp_path / "acoustic.parquet")
    assert vis.columns["face_found"].values.mean() > 0.8   # webcam talking heads: faces nearly everywhere
    for id_, duration in zip(man["id"], man["duration"]):
        assert vis.get(id_, "n_frames") == round(duration * 4.0)
        assert abs(ac.get(id_, "n_frames") - duration * 100) < 10
    f0 = ac.columns["feats"].values.reshape(-1, ac_meta["dim"])[:, ac_meta["feature_names"].index("f0_hz")]
    assert 80 < np.median(f0[f0 > 0]) < 400   # human speech


# --------------------------------------------------------------------------- logs

@pytest.mark.parametrize("stage", ["text", "visual", "acoustic"])
def test_piped_progress_is_plain_lines(tmp_path, media, tiny_bert, tiny_clip, monkeypatch, capsys, stage):
    """stderr is not a terminal here (as under CI or `| tee`): progress lines, no carriage returns."""
    import re

    import yaml

    from pipeline import progress
    from pipeline.features.runner import stage_main

    (tmp_path / "features").mkdir()
    manifest_of([{"path": media["short"], "text": "this movie was really good"},
                 {"path": media["long"], "text": "i did not like it"},
                 {"path": media["other"], "text": "the plot was bad"}]).to_parquet(tmp_path / "features" / "manifest.parquet")
    params = make_params(tiny_bert, tiny_clip, features__text__batch_size=1, features__visual__batch_size=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "cache": {"dir": str(tmp_path / "cache")}}))
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line per update instead of one per ~10 s
    monkeypatch.chdir(tmp_path)
    module = {"text": text, "visual": visual, "acoustic": acoustic}[stage]
    assert stage_main(stage, module, ["features/manifest.parquet", f"features/{stage}.parquet"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{stage}")]
    assert "\r" not in err and len(lines) == 3, err
    assert all(re.fullmatch(rf"{stage}( \((yin|librosa|egemaps|compare)\))?: [123]/3 (seg|clip)s, [\d.]+ (seg|clip)s/s, ETA \d+s", line)
               for line in lines), lines


def test_the_too_long_warning_is_silenced_where_truncation_is_recorded(tiny_bert, caplog):
    from transformers import AutoTokenizer

    long = "the acting was great but the plot was bad and i did not like it at all"
    plain = AutoTokenizer.from_pretrained(tiny_bert, model_max_length=8)
    plain([long])  # transformers warns about this once per tokenizer
    assert "indexing errors" in caplog.text
    caplog.clear()
    ours = AutoTokenizer.from_pretrained(tiny_bert, model_max_length=8)
    ids, full_lengths = text.tokenize(ours, [long], max_length=8, lowercase=False)
    assert len(ids[0]) == 8 < full_lengths[0]  # cut, and the cut is known (the stage records it per segment)
    assert "indexing errors" not in caplog.text


def test_text_resumed_stores_exactly_what_an_uninterrupted_run_stores(tmp_path, tiny_bert, tiny_clip):
    """MiniLM on CPU rounds differently with a batch's shape: segments re-extracted after a crash (or a repair)
    must still be encoded with the companions an uninterrupted run gives them."""
    texts = pd.read_csv(REPO / "raw" / "demo" / "label.csv")["text"].astype(str).tolist()[:12]
    man = manifest_of([{"media": "none", "text": t} for t in texts])
    params = make_params(tiny_bert, tiny_clip, features__text__encoder="minilm", features__text__batch_size=8)
    run_stage(text, man, params, tmp_path / "cache", tmp_path / "ref.parquet")
    entries = sorted((tmp_path / "cache" / "text").glob("*/*.npz"))
    for entry in entries[::6]:  # lost in a crash: one in each batch, or two in one
        entry.unlink()
    resumed = run_stage(text, man, params, tmp_path / "cache", tmp_path / "resumed.parquet")
    assert resumed["counts"]["extracted"] == len(entries[::6]) == 2
    ref, got = (read_feature_table(tmp_path / f"{n}.parquet")[0] for n in ("ref", "resumed"))
    assert np.array_equal(ref.columns["hidden"].values, got.columns["hidden"].values)
    assert np.array_equal(ref.columns["pooled_mean"].values, got.columns["pooled_mean"].values)


def test_faces_found_in_real_hd_clips(real_clips):
    """The shipped detector at the shipped detection size, on frames sampled as the visual stage samples
    them: a face in most frames of every real clip of 720p and above (the film scene among them)."""
    from pipeline.features.faces import detect_face

    cfg = visual.VisualParams()
    hd = [p for p in real_clips if min(probe_video(p).width, probe_video(p).height) >= 720]
    if not hd:
        pytest.skip("no real clip of 720p or above in ../shared/data/real-clips")
    for path in hd:
        frames = [rgb for _, rgb in iter_video_frames(path, cfg.fps, cfg.max_frames, max_short=max(448, cfg.detect_size))]
        found = [detect_face(rgb, cfg.face_detector, cfg.detect_size) is not None for rgb in frames]
        assert np.mean(found) >= 0.8, f"{path.name}: a face in {sum(found)}/{len(found)} frames"
