"""End to end through DVC, as a user drives it: `dvc repro` on the bundled demo corpus with the
repository's own params, then `dvc exp run -S model.lr=...`, `dvc exp show`, `dvc metrics diff`.

This is also the demo's proof of fusion: the corpus hides part of every label in the face and
the voice, so GCE and GEXSent must beat the text-only model on test MAE by a clear margin.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

MODELS = ("gexsent", "gce", "text_only", "late_fusion")
FUSION_MARGIN = 0.15  # test MAE points by which each fusion model must beat text_only
# The evaluation stages at CI size (README "Evaluation"): one seed, one cheap ablation, a coarse robustness grid
SMALL_EVALUATION = {"evaluate.seeds": [], "report.bootstrap": 500,
                    "evaluate.ablations": {"late_fusion-no-acoustic": {"model": "late_fusion",
                                                                       "set": ["model.modalities=[text, visual]"]}},
                    "robustness.rates": [0.0, 0.5, 1.0], "robustness.seeds": [0], "robustness.snr_db": [10.0]}
EVALUATION_STAGES = ("probe", "ablation@late_fusion-no-acoustic", "robustness", "report")


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh git + DVC repository holding the project's tracked files, after `dvc repro`."""
    work = tmp_path_factory.mktemp("e2e") / "project"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    if not any(f.startswith("raw/demo/") for f in files):
        pytest.skip("the demo corpus raw/demo is not committed")
    for f in files:
        (work / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, work / f)
    import yaml

    from pipeline.params import assign

    raw = yaml.safe_load((work / "params.yaml").read_text())
    for key, value in SMALL_EVALUATION.items():
        assign(raw, f"{key}={json.dumps(value)}")
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(work),
           "MSA_CACHE_DIR": str(work.parent / "cache"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "project"], work, env)
    log = _run(["dvc", "repro"], work, env)
    _run(["git", "add", "dvc.lock"], work, env)
    _run(["git", "commit", "-qm", "baseline"], work, env)
    return work, env, log


def test_repro_runs_every_stage_and_is_then_up_to_date(project):
    work, env, log = project
    for stage in ("prepare", "text", "visual", "acoustic", "assemble") + tuple(f"train@{m}" for m in MODELS) + EVALUATION_STAGES:
        assert f"Running stage '{stage}'" in log, stage
    for m in MODELS:
        assert (work / "models" / m / "model.pt").is_file()
        for png in ("loss.png", "scatter.png", "confusion.png"):
            assert (work / "models" / m / "plots" / png).is_file()
    again = _run(["dvc", "repro"], work, env)
    assert "Running stage" not in again
    assert "up to date" in _run(["dvc", "status"], work, env)


def test_the_report_on_the_demo(project):
    work, _, _ = project
    summary = (work / "reports" / "summary.md").read_text()
    for table in ("models", "pairwise", "ablations", "robustness", "subsets"):
        assert f"<!-- table: {table} -->" in summary, table
    assert "None: every result comes from the same manifest and split" in summary
    for m in MODELS + ("linear_probe",):
        assert f"| {m} | 1 |" in summary, m
    robustness = json.loads((work / "reports" / "robustness" / "details.json").read_text())
    assert set(robustness["models"]) == set(MODELS)
    assert set(robustness["models"]["gce"]) == {"random-all", "block-all", "noise-all", "subsets"}


def test_fusion_beats_text_only_on_the_demo(project):
    work, _, _ = project
    mae = {m: json.loads((work / "models" / m / "metrics.json").read_text())["test"]["mae"] for m in MODELS}
    print("demo test MAE:", mae)
    for m in ("gce", "gexsent"):
        assert mae[m] < mae["text_only"] - FUSION_MARGIN, mae


def test_exp_run_retrains_only_and_metrics_differ(project):
    work, env, _ = project
    log = _run(["dvc", "exp", "run", "-S", "model.lr=0.0003"], work, env)
    ran = set(re.findall(r"Running stage '([^']+)'", log))
    # training and what reads the trained models; never the features, nor the probe (it reads no model.* but modalities)
    assert ran == {f"train@{m}" for m in MODELS} | set(EVALUATION_STAGES) - {"probe"}, ran
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=work, env=env, capture_output=True, text=True).stdout
    text = json.dumps(json.loads(shown))
    for m in MODELS:
        assert f"models/{m}/metrics.json" in text, m
    diff = json.loads(subprocess.run(["dvc", "metrics", "diff", "--json"], cwd=work, env=env,
                                     capture_output=True, text=True).stdout)
    for m in MODELS:
        change = diff[f"models/{m}/metrics.json"]["test.mae"]
        assert change["old"] != change["new"], (m, change)


def test_predict_a_generated_clip_and_one_without_audio(project, tmp_path, monkeypatch):
    from tools.demo import write_clip
    from pipeline.predict import PredictError, main, predict_clip

    work, env, _ = project
    monkeypatch.setenv("MSA_CACHE_DIR", env["MSA_CACHE_DIR"])
    happy, sad = tmp_path / "happy.mp4", tmp_path / "sad.mp4"
    write_clip(happy, s_face=1.0, s_voice=1.0, seed=5, index=1)
    write_clip(sad, s_face=-1.0, s_voice=-1.0, seed=5, index=1)
    up = predict_clip(happy, "the movie was really amazing", work / "models" / "gce")
    down = predict_clip(sad, "the movie was absolutely terrible", work / "models" / "gce")
    assert -3 <= down["score"] < up["score"] <= 3
    assert up["binary"] == "positive" and down["binary"] == "negative" and up["notes"] == []
    mute = tmp_path / "mute.mp4"
    write_clip(mute, s_face=1.0, with_audio=False, seed=5, index=2)
    result = predict_clip(mute, "the movie was good", work / "models" / "gexsent")
    assert any("no acoustic features (no audio track)" in n for n in result["notes"]) and "acoustic" not in result["modalities"]
    with pytest.raises(PredictError, match="clip not found"):
        predict_clip(tmp_path / "nope.mp4", "text", work / "models" / "gce")
    assert main([str(happy), "--text", "good", "--model", str(work / "models" / "text_only")]) == 0
    assert main([str(happy), "--text", "  ", "--model", str(work / "models" / "gce")]) == 2  # empty transcript


def test_predict_a_real_clip(project, real_clips, monkeypatch, capsys):
    from pipeline.predict import main

    work, env, _ = project
    monkeypatch.setenv("MSA_CACHE_DIR", env["MSA_CACHE_DIR"])
    assert main([str(real_clips[0]), "--text", "I really liked it", "--model", str(work / "models" / "gce")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"score [+-]\d\.\d{3}", out) and "from text, visual, acoustic" in out


def test_predict_equals_assemble_and_training(project, monkeypatch):
    """Train/serve parity: predict's model inputs for demo test clips are the assembled dataset's rows,
    bit for bit, and its scores are the test predictions training wrote."""
    import numpy as np
    import pandas as pd

    from pipeline.dataset import AssembledData
    from pipeline.predict import model_inputs, score
    from pipeline.train import load_checkpoint

    work, env, _ = project
    monkeypatch.setenv("MSA_CACHE_DIR", env["MSA_CACHE_DIR"])
    data = AssembledData(work / "features" / "dataset")
    labels = pd.read_csv(work / "raw" / "demo" / "label.csv", dtype={"clip_id": str})
    for name in ("gexsent", "gce"):
        model, ckpt = load_checkpoint(work / "models" / name / "model.pt")
        written = pd.read_csv(work / "models" / name / "plots" / "test_predictions.csv").set_index("id")["pred"]
        for row in data.split_rows("test")[:3]:
            sid = data.index["id"].iloc[row]
            video_id, clip_id = sid.split("/")
            text = labels[(labels.video_id == video_id) & (labels.clip_id == clip_id)]["text"].iloc[0]
            segment, notes = model_inputs(work / "raw" / "demo" / "Raw" / video_id / f"{clip_id}.mp4", text, ckpt)
            assembled = data.segment(row, with_token_ids=True)
            assert notes == [] and set(segment) == set(assembled)
            for key in assembled:
                assert segment[key].dtype == assembled[key].dtype, key
                assert np.array_equal(segment[key], assembled[key]), (name, sid, key)
            assert score(model, ckpt, segment).item() == pytest.approx(written[sid], abs=1e-4), (name, sid)


def test_predict_refuses_an_encoder_that_changed(project, tmp_path, monkeypatch):
    import torch

    from pipeline.predict import PredictError, predict_clip

    work, env, _ = project
    monkeypatch.setenv("MSA_CACHE_DIR", env["MSA_CACHE_DIR"])
    ckpt = torch.load(work / "models" / "gce" / "model.pt", weights_only=True)
    ckpt["config"]["encoders"]["text"]["revision"] = "0" * 64  # as if trained on other weights
    torch.save(ckpt, tmp_path / "model.pt")
    with pytest.raises(PredictError, match="text encoder 'minilm' now resolves to .* revision .* trained on"):
        predict_clip(None, "the movie was good", tmp_path / "model.pt")


def test_predict_audio_only_and_text_only_notes(project, tmp_path, monkeypatch, capsys):
    import wave

    import numpy as np

    from pipeline.media import read_audio
    from pipeline.predict import main, predict_clip

    work, env, _ = project
    monkeypatch.setenv("MSA_CACHE_DIR", env["MSA_CACHE_DIR"])
    clip = next((work / "raw" / "demo" / "Raw" / "spk01").glob("*.mp4"))
    audio = (read_audio(clip, 16000) * 32767).astype(np.int16)
    with wave.open(str(tmp_path / "voice.wav"), "wb") as w:   # audio + text, no video stream
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(audio.tobytes())
    result = predict_clip(tmp_path / "voice.wav", "the movie was good", work / "models" / "gexsent")
    assert result["modalities"] == ["text", "acoustic"]
    assert any("no visual features (no video (audio-only segment))" in n for n in result["notes"])
    assert main([str(clip), "--text", "the movie was good", "--model", str(work / "models" / "text_only")]) == 0
    out = capsys.readouterr().out
    assert "note: text_only reads text only: the clip's media is unused" in out and "[text_only, from text]" in out
    assert main([str(clip), "--text", "the movie was good", "--model", str(work / "models" / "gexsent"), "--explain"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"modality shares: text \d\.\d\d, visual \d\.\d\d, acoustic \d\.\d\d", out) and "top experts (visual)" in out
