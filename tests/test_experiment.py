"""pipeline.evaluation.experiment: what the report says about its run (params against HEAD's, hyperparameters)."""
from __future__ import annotations

import os
import subprocess

import yaml

from conftest import REPO
from pipeline.evaluation import experiment
from pipeline import params


def _git(*args, cwd):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def test_the_report_names_every_param_that_differs_from_head(tmp_path, monkeypatch):
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(committed))
    _git("init", "-q", cwd=tmp_path)
    _git("add", "params.yaml", cwd=tmp_path)
    _git("commit", "-qm", "baseline", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    for assignment in ("model.lr=0.0001", "gce.ablate=[relation]", "evaluate.seeds=[1, 2]"):
        params.assign(raw, assignment)
    del raw["probe"]
    section = experiment.run_section(raw, experiment.committed_params(), ["gce", "probe"])
    lines = section.splitlines()
    assert "Params that differ from the committed baseline (HEAD's params.yaml): 4." in lines
    assert f"- `model.lr`: {committed['model']['lr']} → 0.0001" in lines
    assert "- `gce.ablate`: [] → [\"relation\"]" in lines and "- `evaluate.seeds`: [] → [1, 2]" in lines
    assert any(line.startswith("- `probe.alphas`: [0.1,") and line.endswith("→ (absent)") for line in lines)
    gce = next(line for line in lines if line.startswith("| `gce` | "))
    assert 'ablate ["relation"]' in gce and 'variant "improved"' in gce  # the hyperparameters as this run read them
    assert not any(line.startswith("| `probe` |") for line in lines)  # no section, no row


def test_outside_git_the_report_says_it_cannot_compare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    committed, why = experiment.committed_params()
    assert committed is None and "not a git checkout" in why
    section = experiment.run_section({"model": {"lr": 0.1}}, (committed, why), [])
    assert "Params compared with the committed baseline: not possible, no committed params.yaml" in section
    assert "| `model` (every model) | lr 0.1 |" in section


def _run(test: dict, valid: dict, **extra):
    from types import SimpleNamespace

    return SimpleNamespace(metrics={"test": test, "valid": valid, **extra})


def test_lean_metrics_follow_the_preset_and_the_selection_score():
    """Classification: accuracy and F1s, the valid loss selection minimised (train's valid_score, the probe's
    loss at its alpha); CH-SIMS: its Acc-2 and F1; a std only where there are several seeds."""
    cls = lambda acc, f1: {"accuracy": acc, "macro_f1": f1, "weighted_f1": f1}  # noqa: E731
    table = experiment.lean_metrics({
        "gce": [_run(cls(0.6, 0.5), cls(0.7, 0.6), valid_score=0.9), _run(cls(0.8, 0.7), cls(0.7, 0.6), valid_score=0.7)],
        "linear_probe": [_run(cls(0.5, 0.4), cls(0.6, 0.5), alpha=10.0, valid_loss={"1.0": 1.2, "10.0": 1.1})],
    }, None)
    assert set(table) == {"accuracy", "macro_f1", "weighted_f1", "weighted_f1_std", "valid_loss", "valid_accuracy",
                          "valid_macro_f1", "valid_weighted_f1"}
    assert table["accuracy"]["gce"] == 0.7 and table["valid_loss"] == {"gce": 0.8, "linear_probe": 1.1}
    assert table["weighted_f1_std"] == {"gce": round(2 ** 0.5 * 0.1, 6)}
    sims = {"mae": 0.4, "corr": 0.5, "acc2": 0.7, "acc3": 0.6, "acc5": 0.4, "f1": 0.69}
    table = experiment.lean_metrics({"gexsent": [_run(sims, {**sims, "mae": 0.35})]},
                                    {"models": {"gexsent": {"random-all": {"auc_mae": {"mean": 0.5}},
                                                            "noise-all": {"mean_mae": {"mean": 0.45}}}}})
    assert table == {"mae": {"gexsent": 0.4}, "corr": {"gexsent": 0.5}, "acc2": {"gexsent": 0.7},
                     "f1": {"gexsent": 0.69}, "valid_mae": {"gexsent": 0.35}, "auc_random-all": {"gexsent": 0.5}}


def test_every_committed_result_has_params_the_check_stage_accepts():
    """results/<name>/params.yaml is what `python -m tools.results <name>` runs: it must stay a valid params.yaml
    as sections change (a renamed key would otherwise only fail 40 minutes into a regeneration)."""
    import sys

    sys.path.insert(0, str(REPO))
    from stages.check import validate

    found = sorted((REPO / "results").glob("*/params.yaml"))
    assert found, "no results/<name>/params.yaml"
    for path in found:
        validate(yaml.safe_load(path.read_text()))


def test_results_names_the_results_it_has_when_asked_for_another(monkeypatch, capsys):
    from tools import results

    monkeypatch.chdir(REPO)
    assert results.main(["no-such-corpus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("results: no results/no-such-corpus/params.yaml") and "demo" in err and "\n" not in err
