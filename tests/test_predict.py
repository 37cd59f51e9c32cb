"""`python -m pipeline.predict` on demo clips: many clips in one call, clips without transcript, warnings
for clips far from the training data, per-modality occlusion, and one-line failures before torch.

The models come from the `demo_models` fixture: gce, gexsent and text_only trained for a few epochs on
the features of 22 demo clips (the repository's feature params, video sampled at 1 frame per second).
It only needs `models/<name>/model.pt`, the feature cache that holds those clips, the assembled dataset
and the demo corpus, so a demo already run through DVC (tests/test_pipeline_e2e.py's `project`) can
provide the same fields instead (see `DemoModels`).
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, make_clip

FAST = {"epochs": 3, "patience": 10, "batch_size": 8}
CLIPS_PER_SPEAKER = {"spk01": 4, "spk02": 4, "spk03": 4, "spk04": 4, "spk09": 3, "spk11": 3}  # 16 / 3 / 3


@dataclasses.dataclass
class DemoModels:
    models: Path    # models/<name>/model.pt for gce, gexsent, text_only
    cache: Path     # the feature cache holding every clip of the dataset
    dataset: Path   # the assembled dataset the models were trained on
    demo: Path      # the demo corpus (label.csv + Raw/)

    def test_clips(self) -> list[tuple[str, Path, str]]:
        """(segment id, clip path, transcript) of the dataset's test split."""
        from pipeline.training.dataset import AssembledData

        data = AssembledData(self.dataset)
        texts = {f"{r['video_id']}/{r['clip_id']}": r["text"] for r in csv.DictReader(open(self.demo / "label.csv"))}
        ids = data.index["id"].to_numpy()[data.split_rows("test")]
        return [(i, self.demo / "Raw" / i.split("/")[0] / f"{i.split('/')[1]}.mp4", texts[i]) for i in ids]


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> DemoModels:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import params
    from pipeline.training.dataset import AssembleParams, assemble
    from pipeline.params import assign
    from pipeline.data.prepare import DataParams, read
    from pipeline.training.train import train_model

    work = tmp_path_factory.mktemp("predict")
    demo = REPO / "raw" / "demo"
    if not (demo / "label.csv").is_file():
        pytest.skip("the demo corpus raw/demo is not in this checkout")
    rows = list(csv.DictReader(open(demo / "label.csv")))
    with open(work / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["clip_id"]) <= CLIPS_PER_SPEAKER.get(r["video_id"], 0))
    raw = params.load(REPO / "params.yaml")
    assign(raw, "features.visual.fps=1.0")
    data = dataclasses.replace(params.read(raw, DataParams), root=str(demo), label_file=str(work / "labels.csv"))
    manifest, _, source = read(data)
    table = pa.Table.from_pandas(manifest, preserve_index=False)
    meta = json.dumps({"task": data.task, "classes": None, **source}).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"pipeline": meta})
    pq.write_table(table, work / "manifest.parquet")
    features = {}
    for m in ("text", "visual", "acoustic"):
        module = importlib.import_module(f"pipeline.features.{m}")
        module.run(manifest, params.read(raw, params.SECTIONS[f"features.{m}"]), work / "cache", work / f"{m}.parquet",
                   show_progress=False)
        features[m] = work / f"{m}.parquet"
    assemble(work / "manifest.parquet", features, work / "dataset", params.read(raw, AssembleParams))
    for name in ("gce", "gexsent", "text_only"):
        train_model(name, work / "dataset", work / "models" / name, FAST, raw.get(name, {}), progress=False)
    return DemoModels(work / "models", work / "cache", work / "dataset", demo)


@pytest.fixture
def models(demo_models, monkeypatch) -> DemoModels:
    monkeypatch.setenv("MSA_CACHE_DIR", str(demo_models.cache))
    return demo_models


def model_output(model_dir: Path, batch: dict) -> np.ndarray:
    """The model's scores for a batch, clipped to the label range as predict reports them."""
    from pipeline.training.train import load_checkpoint

    model, ckpt = load_checkpoint(model_dir / "model.pt")
    with torch.no_grad():
        pred = model(batch)["pred"].float().numpy()
    return np.clip(pred, *ckpt["config"]["conventions"]["label_range"])


def assembled_batch(models: DemoModels, sid: str, name: str, without: str | None = None) -> dict:
    """The assembled row of segment sid as the model's batch, straight from the dataset (not predict's
    code); `without`: that modality's mask cleared and its values zeroed, as for a segment that lacks it."""
    from pipeline.training.dataset import AssembledData
    from pipeline.training.train import load_checkpoint

    _, ckpt = load_checkpoint(models.models / name / "model.pt")
    data = AssembledData(models.dataset, modalities=list(ckpt["config"]["input_dims"]))
    row = int(np.flatnonzero(data.index["id"].to_numpy() == sid)[0])
    batch = data.batch([row])
    batch.pop("label")
    if without is not None:
        batch[f"{without}_mask"][:] = False
        batch[without].zero_()
        if f"{without}_pooled" in batch:
            batch[f"{without}_pooled"].zero_()
    return batch


# --------------------------------------------------------------------------- many clips in one call

def test_three_demo_clips_in_one_call_one_without_transcript(models, tmp_path, monkeypatch, capsys):
    from pipeline.training import train
    from pipeline.training.metrics import SEVEN_CLASS_NAMES
    from pipeline.predict import main

    loads = []
    load_checkpoint = train.load_checkpoint
    monkeypatch.setattr(train, "load_checkpoint", lambda *a, **k: loads.append(a) or load_checkpoint(*a, **k))
    (a, clip_a, text_a), (b, clip_b, text_b), (c, clip_c, _) = models.test_clips()[:3]
    listing = tmp_path / "clips.csv"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows([["id", "path", "text"], [a, clip_a, text_a], [b, clip_b, text_b], [c, clip_c, ""]])
    assert main(["--list", str(listing), "--model", str(models.models / "gce"), "--out", str(tmp_path / "s.csv")]) == 0
    assert len(loads) == 1  # the model is loaded once for every clip
    rows = {r["id"]: r for r in csv.DictReader(open(tmp_path / "s.csv"))}
    assert list(rows) == [a, b, c]
    for sid, row in rows.items():
        without = "text" if sid == c else None
        expected = model_output(models.models / "gce", assembled_batch(models, sid, "gce", without))[0]
        assert float(row["score"]) == pytest.approx(expected, abs=1e-3), sid
        assert row["label"] == SEVEN_CLASS_NAMES[int(np.round(np.clip(expected, -3, 3))) + 3]
        assert row["binary"] == ("positive" if expected >= 0 else "negative")
        assert row["error"] == "" and row["warnings"] == ""
    assert rows[a]["modalities"] == "text visual acoustic" and rows[a]["notes"] == ""
    assert rows[c]["modalities"] == "visual acoustic" and rows[c]["text"] == ""
    assert rows[c]["notes"].startswith("no transcript: scored from visual, acoustic (text masked as missing")
    err = capsys.readouterr().err
    assert "predict: scored 3 of 3 clips with gce" in err and "has0" in err  # the summary, then what the names mean


def test_a_folder_and_a_glob_with_transcripts_beside_the_clips(models, tmp_path, capsys):
    from pipeline.predict import main

    clips = models.test_clips()[:3]
    folder = tmp_path / "clips"
    folder.mkdir()
    for k, (_, clip, text) in enumerate(clips):
        (folder / f"clip{k + 8}.mp4").symlink_to(clip)
        if k:
            (folder / f"clip{k + 8}.txt").write_text(text + "\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "broken.mp4").write_bytes(b"not a video")  # a row that says why, the others scored
    assert main([str(folder), "--model", str(models.models / "gexsent")]) == 1
    written = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert written.pop(-1)["error"].startswith("cannot use broken.mp4: unreadable media file")
    assert [r["id"] for r in written] == ["clip8", "clip9", "clip10"]  # in natural order
    assert [r["text"] for r in written] == ["", clips[1][2], clips[2][2]]
    assert [r["modalities"] for r in written] == ["visual acoustic", "text visual acoustic", "text visual acoustic"]
    assert main([str(folder / "clip1*.mp4"), "--model", str(models.models / "gexsent")]) == 0
    assert [r["id"] for r in csv.DictReader(capsys.readouterr().out.splitlines())] == ["clip10"]


def test_text_only_refuses_a_clip_without_transcript(models, tmp_path, capsys):
    from pipeline.predict import PredictError, main, predict_clip

    _, clip, text = models.test_clips()[0]
    with pytest.raises(PredictError, match="text_only reads text only, and this clip has no transcript"):
        predict_clip(clip, None, models.models / "text_only")
    assert main([str(clip), "--model", str(models.models / "text_only")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no transcript" in err[0]
    listing = tmp_path / "clips.csv"  # in a list, that clip's row says why; the others are scored
    listing.write_text(f"path,text\n{clip},{text}\n{clip},\n")
    out = tmp_path / "s.csv"
    assert main(["--list", str(listing), "--model", str(models.models / "text_only"), "--out", str(out)]) == 1
    rows = list(csv.DictReader(open(out)))
    assert rows[0]["score"] != "" and rows[0]["error"] == ""
    assert rows[1]["score"] == "" and "has no transcript" in rows[1]["error"]


# --------------------------------------------------------------------------- far from the training data

def test_a_clip_far_from_the_training_data_warns(models, tmp_path, capsys):
    from pipeline.training.dataset import AssembledData
    from pipeline.predict import far_from_training, main, predict_clip

    far = make_clip(tmp_path / "far.mp4", seconds=2.0, size=(160, 120))  # flat grey frames and a pure tone
    result = predict_clip(far, "the movie was good", models.models / "gce")
    assert any(w.startswith("visual features far from the training data") for w in result["warnings"]), result
    assert main([str(far), "--text", "the movie was good", "--model", str(models.models / "gce")]) == 0
    assert "warning: visual features far from the training data" in capsys.readouterr().out
    _, clip, text = models.test_clips()[0]
    assert predict_clip(clip, text, models.models / "gce")["warnings"] == []  # a demo test clip: none
    data = AssembledData(models.dataset)  # nor any segment the model was trained on
    for row in data.split_rows("train"):
        assert far_from_training(data.segment(row), data.input_dims) == [], data.index["id"].iloc[row]


def test_far_from_training_thresholds_by_hand():
    """0.5% of values at the 20-sigma bound, or an RMS of 3 sigma, per modality (predict.py argues both)."""
    from pipeline.predict import far_from_training

    def segment(at_bound: int, rest: float) -> dict:  # 1000 values: `at_bound` of them at +20, the rest at `rest`
        values = np.full(1000, rest, np.float16)
        values[:at_bound] = 20.0
        return {"visual": values.reshape(100, 10), "text": np.zeros((0, 4), np.float16)}

    assert far_from_training(segment(4, 0.5), ["text", "visual"]) == []            # 0.4%, RMS 1.35
    warned = far_from_training(segment(6, 0.5), ["text", "visual"])                 # 0.6%, RMS 1.6
    assert len(warned) == 1 and "visual features far from the training data: 0.6% of values" in warned[0]
    assert far_from_training(segment(0, 2.9), ["visual"]) == []                     # RMS 2.9
    warned = far_from_training(segment(0, 3.1), ["visual"])                         # RMS 3.1
    assert len(warned) == 1 and "RMS 3.1 sigma" in warned[0]


# --------------------------------------------------------------------------- --explain

@pytest.mark.parametrize("name", ["gce", "gexsent", "text_only"])
def test_occlusion_equals_the_model_without_that_modality(models, name):
    from pipeline.predict import predict_clip

    sid, clip, text = models.test_clips()[1]
    result = predict_clip(clip, text, models.models / name, explain=True)
    full = model_output(models.models / name, assembled_batch(models, sid, name))[0]
    assert result["score"] == pytest.approx(full, abs=1e-4)
    assert set(result["occlusion"]) == ({"text"} if name == "text_only" else {"text", "visual", "acoustic"})
    for m, shown in result["occlusion"].items():
        without = model_output(models.models / name, assembled_batch(models, sid, name, without=m))[0]
        assert shown["score"] == pytest.approx(without, abs=1e-4), m
        assert shown["change"] == pytest.approx(without - full, abs=1e-4), m


def test_explain_leads_with_occlusion_and_labels_the_internals(models, capsys):
    from pipeline.predict import main

    sid, clip, text = models.test_clips()[0]
    for name, label in (("gce", "internals (training-only: the graders and the relation filter do not change the"),
                        ("gexsent", "internals (shares of weight and routing, not effects on the score)")):
        assert main([str(clip), "--text", text, "--model", str(models.models / name), "--explain"]) == 0
        out = capsys.readouterr().out
        assert out.index("what moves the score") < out.index(label) < out.index("meaning:"), out
        assert "  without visual    score " in out


def test_gce_graders_and_relation_filter_do_not_change_the_score(models):
    """What --explain says of them: randomising every grader and relation filter weight leaves the score."""
    from pipeline.training.train import load_checkpoint

    sid, _, _ = models.test_clips()[0]
    batch = assembled_batch(models, sid, "gce")
    model, _ = load_checkpoint(models.models / "gce" / "model.pt")
    with torch.no_grad():
        before = model(batch)["pred"]
        touched = [p.normal_() for n, p in model.named_parameters() if "grader" in n or "relation" in n]
        after = model(batch)["pred"]
    assert touched and torch.equal(before, after)


# --------------------------------------------------------------------------- fast, one-line failures

def test_bad_input_fails_in_one_line_before_torch(models, tmp_path):
    """Each case: exit code 2, one line on stderr, and torch never imported (so it takes well under a second)."""
    model = models.models / "gce" / "model.pt"
    data = model.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    _, clip, _ = models.test_clips()[0]
    cases = {
        "clip not found: nope.mp4": ["nope.mp4", "--model", str(model)],
        "no trained model at": [str(clip), "--model", str(tmp_path / "none")],
        "cut.pt is not a complete model file (cut short or damaged": [str(clip), "--model", str(tmp_path / "cut.pt")],
        "damaged.pt is damaged": [str(clip), "--model", str(tmp_path / "damaged.pt")],
        "unrecognized arguments: --txt": [str(clip), "--txt", "hi", "--model", str(model)],
        "--text is empty": [str(clip), "--text", " ", "--model", str(model)],
        "--text is the transcript of one clip": [str(clip), str(clip), "--text", "hi", "--model", str(model)],
        "no media files": [str(tmp_path / "*.mkv"), "--model", str(model)],
        "list not found": ["--list", str(tmp_path / "none.csv"), "--model", str(model)],
        "nothing to score": ["--model", str(model)],
    }
    script = ("import contextlib, io, json, sys\nfrom pipeline.predict import main\nout = {}\n"
              f"for key, argv in {cases!r}.items():\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err):\n"
              "        out[key] = [main(argv), err.getvalue()]\n"
              "print(json.dumps({'cases': out, 'torch': 'torch' in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    report = json.loads(done.stdout)
    for expected, (code, err) in report["cases"].items():
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, (expected, err)
    assert report["torch"] is False
