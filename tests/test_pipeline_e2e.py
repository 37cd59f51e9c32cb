"""End to end through DVC as a user drives it, on one fresh copy of the repository (its tracked files,
the committed baseline included), with the committed params, i.e. what `make demo` runs:

    dvc repro                          -> reproduces the committed metrics/ and report exactly
    dvc exp run -S model.lr=-1         -> stops in `check`, one line, every output untouched
    dvc exp run -S model.lr=1e-4       -> then dvc metrics diff / exp show / plots diff against HEAD

This is also the demo's proof of fusion: the corpus hides part of every label in the face and the
voice, so GCE and GEXSent must beat the text-only model on test MAE by a clear margin.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

MODELS = ("gexsent", "gce", "text_only", "late_fusion")
FUSION_MARGIN = 0.15  # test MAE points by which each fusion model must beat text_only


def _run(args, cwd, env, ok=True):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if ok:
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout + result.stderr
    return result


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


def _digests(work: Path) -> dict[str, str]:
    """sha256 of every model.pt and metrics.json under models/ and of the versioned files."""
    files = [*(work / "models").rglob("model.pt"), *(work / "models").rglob("metrics.json"),
             *(work / "metrics").glob("*.json"), work / "reports" / "summary.md"]
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _lean(work: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (work / "metrics").glob("*.json")}


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
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(work),
           "MSA_CACHE_DIR": str(work.parent / "cache"), "COLUMNS": "200", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "project with its committed baseline"], work, env)
    versioned = _run(["git", "ls-files", "metrics", "reports"], work, env).split()
    committed = {p: _run(["git", "show", f"HEAD:{p}"], work, env) for p in versioned}  # the yardstick, kept apart
    started = time.time()
    log = _run(["dvc", "repro"], work, env)
    print(f"dvc repro: {time.time() - started:.0f} s")
    return {"work": work, "env": env, "log": log, "lean": _lean(work), "committed": committed}


@pytest.fixture(scope="module")
def baseline_here(project):
    """This machine's run committed as the baseline, as a user does before experimenting: HEAD's outputs are
    then in the local DVC cache, which `dvc plots diff HEAD` reads (a run that matches the committed one only
    within BASELINE_TOLERANCE has other file hashes than the committed dvc.lock names)."""
    work, env = project["work"], project["env"]
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "the baseline as run here", "--allow-empty"], work, env)


@pytest.fixture(scope="module")
def failed(project, baseline_here):
    """An invalid value through `dvc exp run -S`, then the undo the message names."""
    work, env = project["work"], project["env"]
    before = _digests(work)
    result = _run(["dvc", "exp", "run", "-S", "model.lr=-1"], work, env, ok=False)
    after = _digests(work)
    left_in_params = "lr: -1" in (work / "params.yaml").read_text()
    _run(["git", "checkout", "params.yaml"], work, env)
    restored = _run(["dvc", "repro"], work, env)
    return {"result": result, "before": before, "after": after, "left_in_params": left_in_params, "restored": restored}


@pytest.fixture(scope="module")
def experiment(project, failed):
    """`dvc exp run -S model.lr=1e-4` after the baseline (and after the failed run: it must not matter)."""
    work, env = project["work"], project["env"]
    started = time.time()
    log = _run(["dvc", "exp", "run", "-S", "model.lr=1e-4"], work, env)
    print(f"dvc exp run -S model.lr=1e-4: {time.time() - started:.0f} s")
    diff = json.loads(_run(["dvc", "metrics", "diff", "--json"], work, env))
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], work, env))
    return {"log": log, "diff": diff, "shown": shown}


# --------------------------------------------------------------------------- the baseline

def test_repro_runs_every_stage_and_is_then_up_to_date(project):
    work, env, log = project["work"], project["env"], project["log"]
    for stage in ("check", "prepare", "text", "visual", "acoustic", "assemble", "probe", "robustness", "report",
                  *(f"train@{m}" for m in MODELS)):
        assert f"Running stage '{stage}'" in log, stage
    assert any(s.startswith("ablation@") for s in _ran(log))
    for m in MODELS:
        assert (work / "models" / m / "model.pt").is_file()
        for png in ("loss.png", "scatter.png", "confusion.png"):
            assert (work / "models" / m / "plots" / png).is_file()
    again = _run(["dvc", "repro"], work, env)
    assert "Running stage" not in again
    assert "up to date" in _run(["dvc", "status"], work, env)


# A cold `dvc repro` can store a few visual embedding values one float16 step apart from another cold run's
# (seen: 2 of 120 demo clips), which moved a training metric by at most 2e-6; training itself is bit for bit
# deterministic on CPU (`model.threads`). 1e-4 is 50 times the largest change seen and 10 times below the
# 3 decimals the report prints; the robustness AUCs jitter by up to 1e-5 between runs as well.
BASELINE_TOLERANCE = 1e-4
NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")


def _numbers_apart(markdown: str) -> tuple[str, list[float]]:
    """The report with its decimal numbers taken out (returned apart)."""
    return NUMBER.sub("#", markdown), [float(x) for x in NUMBER.findall(markdown)]


def _close(made, committed, tolerance, where=""):
    """Two parsed JSON documents equal in structure and strings, their numbers within tolerance."""
    if isinstance(committed, dict):
        assert isinstance(made, dict) and set(made) == set(committed), where
        for k in committed:
            _close(made[k], committed[k], tolerance, f"{where}.{k}")
    elif isinstance(committed, list):
        assert isinstance(made, list) and len(made) == len(committed), where
        for i, (a, b) in enumerate(zip(made, committed)):
            _close(a, b, tolerance, f"{where}[{i}]")
    elif isinstance(committed, float) and not isinstance(committed, bool):
        assert made == pytest.approx(committed, abs=tolerance), (where, committed, made)
    else:
        assert made == committed, (where, committed, made)


def test_a_fresh_clone_reproduces_the_committed_baseline(project):
    """The committed metrics/ and report are what a fresh clone's `dvc repro` writes: every number within
    BASELINE_TOLERANCE (why: above it), the report's text exactly, its printed numbers within one unit of the
    last decimal. The yardstick is git's copy, made by `make baseline`."""
    work, env = project["work"], project["env"]
    hint = ("the committed baseline is not what a fresh clone reproduces: regenerate it with `make baseline` (after "
            "the code and params are committed)")
    kept = project["committed"]
    committed = {Path(p).stem: json.loads(text) for p, text in kept.items() if p.startswith("metrics/")}
    assert set(project["lean"]) == set(committed), hint
    _close(project["lean"], committed, BASELINE_TOLERANCE, hint)
    _close(json.loads((work / "reports" / "summary.json").read_text()),
           json.loads(kept["reports/summary.json"]), BASELINE_TOLERANCE * 10, hint)
    text, numbers = _numbers_apart((work / "reports" / "summary.md").read_text())
    committed_text, committed_numbers = _numbers_apart(kept["reports/summary.md"])
    assert text == committed_text, hint
    assert numbers == pytest.approx(committed_numbers, abs=0.0011), hint  # one unit of the 3rd decimal


def test_metrics_show_is_a_metrics_by_models_table_within_120_columns(project):
    work, env = project["work"], project["env"]
    shown = _run(["dvc", "metrics", "show"], work, env)
    print(shown)
    lines = shown.strip().splitlines()
    assert max(map(len, lines)) <= 120, shown
    assert lines[0].split() == ["Path", "gce", "gexsent", "late_fusion", "linear_probe", "text_only"]
    assert any(line.startswith("metrics/mae.json ") for line in lines) and "sha256" not in shown


def test_the_report_on_the_demo(project):
    work = project["work"]
    summary = (work / "reports" / "summary.md").read_text()
    for table in ("models", "pairwise", "ablations", "robustness", "subsets"):
        assert f"<!-- table: {table} -->" in summary, table
    assert "None: every result comes from the same manifest and split" in summary
    assert "Params that differ from the committed baseline (HEAD's params.yaml): none." in summary
    for m in MODELS + ("linear_probe",):
        assert f"| {m} | 1 |" in summary, m
        assert f"| `{m if m != 'linear_probe' else 'probe'}` | " in summary, m  # its hyperparameters
    robustness = json.loads((work / "reports" / "robustness" / "details.json").read_text())
    assert set(robustness["models"]) == set(MODELS)
    assert set(robustness["models"]["gce"]) == {"random-all", "block-all", "noise-all", "subsets"}


def test_fusion_beats_text_only_on_the_demo(project):
    mae = project["lean"]["mae"]
    print("demo test MAE:", mae)
    for m in ("gce", "gexsent"):
        assert mae[m] < mae["text_only"] - FUSION_MARGIN, mae


# --------------------------------------------------------------------------- a failed experiment destroys nothing

def test_an_invalid_value_stops_before_any_output_is_removed(project, failed):
    result = failed["result"]
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("check: ")]
    assert len(ours) == 1 and ours[0].startswith("check: model.lr: -1 is not allowed (> 0)"), result.stderr
    assert "git checkout params.yaml" in ours[0]
    assert _ran(result.stdout + result.stderr) == {"check"}
    assert failed["after"] == failed["before"]  # every model.pt, metrics.json and metrics/ file, byte for byte
    assert failed["left_in_params"]  # DVC leaves -S in params.yaml: hence the line says how to undo it
    assert _ran(failed["restored"]) <= {"check"}  # undone: the check passes again (or is restored), nothing else re-runs


# --------------------------------------------------------------------------- an experiment against the baseline

def test_exp_run_retrains_what_reads_model_params(project, experiment):
    ran = _ran(experiment["log"])
    ablations = {s for s in _ran(project["log"]) if s.startswith("ablation@")}
    assert ran == {"check", *(f"train@{m}" for m in MODELS), *ablations, "robustness", "report"}, ran


def test_metrics_diff_has_numbers_at_head_and_in_the_workspace(experiment):
    diff = experiment["diff"]
    for m in MODELS:
        change = diff["metrics/mae.json"][m]
        assert isinstance(change["old"], float) and isinstance(change["new"], float), (m, change)
        assert change["old"] != change["new"], (m, change)
        assert isinstance(diff["metrics/valid_mae.json"][m]["old"], float), m


def test_exp_show_has_the_baseline_and_the_experiment_with_numbers(experiment):
    shown = experiment["shown"]
    baseline = next(row for row in shown if row["rev"] != "workspace")
    (exp,) = [e["revs"][0] for e in baseline["experiments"] or []
              if (e["revs"][0].get("data") or {}).get("params", {}).get("params.yaml", {}).get("data", {})
              .get("model", {}).get("lr") == 1e-4]
    for row in (baseline, exp):
        mae = row["data"]["metrics"]["metrics/mae.json"]["data"]
        assert all(isinstance(mae[m], float) for m in MODELS), row["name"]
    assert exp["data"]["params"]["params.yaml"]["data"]["model"]["lr"] == 1e-4
    assert baseline["data"]["params"]["params.yaml"]["data"]["model"]["lr"] == 0.001


def test_the_exp_show_command_of_the_docs_shows_every_cell_in_200_columns(project, experiment):
    docs = (REPO / "docs" / "experiments.md").read_text()
    (command,) = re.findall(r"^COLUMNS=200 (dvc exp show .+?)\s*(?:#.*)?$", docs, re.M)
    shown = subprocess.run(command, shell=True, cwd=project["work"], env=project["env"], capture_output=True,
                           text=True).stdout
    print(shown)
    assert "…" not in shown and "metrics/mae.json:gce" in shown and "model.lr" in shown, shown
    assert max(map(len, shown.splitlines())) <= 200


def test_plots_diff_renders_offline(project, experiment, tmp_path):
    work, env = project["work"], project["env"]
    _run([sys.executable, "-m", "tools.plots_offline"], work, env)
    _run(["dvc", "plots", "diff", "HEAD", "-o", str(tmp_path / "plots")], work, env)
    page = tmp_path / "plots" / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr" not in html and "window.vegaEmbed=" in html
    from tools.plots_offline import check, specs

    assert check(page) >= 30  # every Vega-Lite chart renders to PNG with no network
    charts = specs(page)
    revs = {row.get("rev") for spec in charts for row in spec.get("data", {}).get("values", [])}
    assert {"HEAD", "workspace"} <= revs  # both sides of the diff are drawn
    assert len(list((tmp_path / "plots" / "static").glob("*.png"))) >= 2 * len(MODELS)


# --------------------------------------------------------------------------- predict, on the trained demo models

def test_predict_a_generated_clip_and_one_without_audio(project, tmp_path, monkeypatch):
    from tools.demo import write_clip
    from pipeline.predict import PredictError, main, predict_clip

    work, env = project["work"], project["env"]
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

    work, env = project["work"], project["env"]
    monkeypatch.setenv("MSA_CACHE_DIR", env["MSA_CACHE_DIR"])
    assert main([str(real_clips[0]), "--text", "I really liked it", "--model", str(work / "models" / "gce")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"score [+-]\d\.\d{3}", out) and "from text, visual, acoustic" in out


def test_predict_equals_assemble_and_training(project, monkeypatch):
    """Train/serve parity: predict's model inputs for demo test clips are the assembled dataset's rows,
    bit for bit, and its scores are the test predictions training wrote."""
    import numpy as np
    import pandas as pd

    from pipeline.training.dataset import AssembledData
    from pipeline.predict import model_inputs, score
    from pipeline.training.train import load_checkpoint

    work, env = project["work"], project["env"]
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

    work, env = project["work"], project["env"]
    monkeypatch.setenv("MSA_CACHE_DIR", env["MSA_CACHE_DIR"])
    ckpt = torch.load(work / "models" / "gce" / "model.pt", weights_only=True)
    ckpt["config"]["encoders"]["text"]["revision"] = "0" * 64  # as if trained on other weights
    torch.save(ckpt, tmp_path / "model.pt")
    with pytest.raises(PredictError, match="text encoder 'minilm' now resolves to .* revision .* trained on"):
        predict_clip(None, "the movie was good", tmp_path / "model.pt")


def test_predict_audio_only_and_text_only_notes(project, tmp_path, monkeypatch, capsys):
    import wave

    import numpy as np

    from pipeline.data.media import read_audio
    from pipeline.predict import main, predict_clip

    work, env = project["work"], project["env"]
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
