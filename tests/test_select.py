"""tools.select: experiments are chosen on the validation split; test numbers never move the choice.

The planted `dvc exp show --json` below is laid out as DVC 3 writes it (a baseline commit, its
experiments, one failed). Validation and test disagree on purpose: the best test MAE belongs to the
experiment with the worst validation score.
"""
from __future__ import annotations

import csv
import json

import pytest

from tools import select

MODELS = ("gexsent", "gce")


def _entry(name: str, params: dict, valid: dict | None, test: dict | None) -> dict:
    metrics = {}
    if valid is not None:
        metrics["metrics/valid_mae.json"] = {"data": valid}
        metrics["metrics/mae.json"] = {"data": test}
        metrics["metrics/mae_std.json"] = {"data": {m: 0.01 for m in test}}
        metrics["metrics/auc_random-all.json"] = {"data": {m: 9.0 for m in test}}
    return {"rev": f"{abs(hash(name)):040x}"[:40], "name": name,
            "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics, "deps": {}, "outs": {}}}


def _params(lr: float, seed: int = 0, batch: int = 16) -> dict:
    return {"model": {"lr": lr, "batch_size": batch, "seed": seed}, "features": {"acoustic": {"extractor": "compare"}}}


def _shown(rows: list[dict], running: list[dict] = ()) -> list[dict]:
    baseline, *exps = rows
    workspace = {**_entry("workspace", _params(9.0), {m: 0.0 for m in MODELS}, {m: 0.0 for m in MODELS}),
                 "rev": "workspace", "name": None}
    done = [{"executor": {"state": "success", "name": "dvc-task"}, "name": e["name"], "revs": [e]} for e in exps]
    busy = [{"executor": {"state": "running", "name": "dvc-task"}, "name": e["name"], "revs": [e]} for e in running]
    return [workspace, {**baseline, "error": None, "experiments": done + busy}]


PLANTED = _shown([
    _entry("main", _params(1e-3), {"gexsent": 0.90, "gce": 0.92}, {"gexsent": 0.85, "gce": 0.95}),
    _entry("exp-valid-best", _params(3e-4), {"gexsent": 0.80, "gce": 0.84}, {"gexsent": 0.99, "gce": 1.01}),
    _entry("exp-test-best", _params(1e-4), {"gexsent": 0.95, "gce": 0.97}, {"gexsent": 0.70, "gce": 0.72}),
    _entry("exp-failed", _params(1e-2), None, None),
], running=[  # DVC lists a queued or running experiment with its baseline's metrics: no candidate
    _entry("exp-running", _params(3e-3), {"gexsent": 0.10, "gce": 0.10}, {"gexsent": 0.9, "gce": 0.9}),
])


def test_the_winner_is_the_best_validation_score_not_the_best_test_score(tmp_path, capsys):
    source = tmp_path / "shown.json"
    source.write_text(json.dumps(PLANTED))
    assert select.main(["--from", str(source), "--out", str(tmp_path / "sel")]) == 0
    out = capsys.readouterr().out
    assert "Winner: **exp-valid-best** (model.lr=0.0003)" in out
    ranking, after = out.split("Winner:")
    assert "0.99" not in ranking and "0.70" not in ranking  # no test number in the ranking itself
    assert "| gexsent | 0.9900 |" in after  # the winner's test MAE, shown after the choice
    with open(tmp_path / "sel.csv") as f:
        table = list(csv.reader(f))
    assert [r[1] for r in table[1:]] == ["exp-valid-best", "main", "exp-test-best"]  # not the failed or running one
    assert table[1][3] == "0.8200" and table[0][3] == "valid_mae (mean)"
    assert (tmp_path / "sel.md").read_text().startswith("Ranked by validation alone")


def test_models_choose_whose_validation_counts():
    rows = select.candidates(PLANTED)
    ranked, key, models = select.rank(rows, ["gce"], [])
    assert key == "valid_mae" and models == ["gce"] and ranked[0]["name"] == "exp-valid-best"
    ranked, _, models = select.rank(rows, None, [])
    assert models == ["gce", "gexsent"]  # every model but the probe


def test_seeds_are_averaged_into_one_candidate():
    """A grid over model.seed: lr 3e-4 wins one seed by luck, lr 1e-3 wins on average over both seeds."""
    rows = _shown([
        _entry("main", _params(1e-3, 0), {"gexsent": 0.85, "gce": 0.85}, {"gexsent": 0.9, "gce": 0.9}),
        _entry("a", _params(1e-3, 1), {"gexsent": 0.85, "gce": 0.85}, {"gexsent": 0.9, "gce": 0.9}),
        _entry("b", _params(3e-4, 0), {"gexsent": 0.80, "gce": 0.80}, {"gexsent": 0.9, "gce": 0.9}),
        _entry("c", _params(3e-4, 1), {"gexsent": 0.95, "gce": 0.95}, {"gexsent": 0.9, "gce": 0.9}),
    ])
    ranked, _, _ = select.rank(select.candidates(rows), None, ["model.seed"])
    assert [c["name"] for c in ranked] == ["main, a", "b, c"]
    assert ranked[0]["score"] == pytest.approx(0.85) and ranked[1]["score"] == pytest.approx(0.875)
    single, _, _ = select.rank(select.candidates(rows), None, [])
    assert single[0]["name"] == "b"  # without averaging, the lucky seed would win


def test_where_keeps_one_sweep_of_several(tmp_path, capsys):
    """Two sweeps queued on one baseline (learning rate; batch size): --where ranks one of them."""
    rows = _shown([
        _entry("main", _params(1e-3), {"gexsent": 0.70, "gce": 0.70}, {"gexsent": 0.9, "gce": 0.9}),
        _entry("lr-small", _params(1e-4), {"gexsent": 0.90, "gce": 0.90}, {"gexsent": 0.9, "gce": 0.9}),
        _entry("bs-8", _params(1e-3, batch=8), {"gexsent": 0.80, "gce": 0.80}, {"gexsent": 0.9, "gce": 0.9}),
        _entry("bs-32", _params(1e-3, batch=32), {"gexsent": 0.85, "gce": 0.85}, {"gexsent": 0.9, "gce": 0.9}),
    ])
    source = tmp_path / "shown.json"
    source.write_text(json.dumps(rows))
    assert select.main(["--from", str(source), "--where", "model.lr=0.001", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "Winner: **main** (model.batch_size=16)" in out
    assert "lr-small" not in out and "| 2 | bs-8 | model.batch_size=8 |" in out
    with pytest.raises(SystemExit, match="no experiment matches"):
        select.main(["--from", str(source), "--where", "model.lr=0.5", "--out", str(tmp_path / "s")])
