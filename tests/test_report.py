"""The report's statistics on hand-made runs: Holm over each table, comparisons on the seeds and segments
both sides have, the selection flag from what runs recorded, vacuous ablations skipped, single-seed
reports without spread, and the classification lines of the seeds and ablation stages."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, write_fake_features
from pipeline import params
from pipeline.evaluation import runs
from pipeline.evaluation.stats import batched_metrics, holm
from pipeline.evaluation.report import Comparisons, ReportParams, ablation_table, groups_of, model_table, pairwise_table

N = 60
LABELS = np.linspace(-2.5, 2.5, N)


def _run(name: str, seed, errors, ids=None, record=None) -> runs.Run:
    """A regression run whose prediction misses each label by `errors` (sign alternating)."""
    errors = np.broadcast_to(np.asarray(errors, float), (N,))
    pred = LABELS + errors * np.where(np.arange(N) % 2, 1.0, -1.0)
    frame = pd.DataFrame({"id": [f"s{i}" for i in range(N)], "label": LABELS, "pred": pred}).set_index("id")
    if ids is not None:
        frame = frame.loc[ids]
    mae = float(np.abs(frame["pred"] - frame["label"]).mean())
    return runs.Run(name, seed, Path(name), {"test": {"mae": mae}}, frame, record or {})


def _compared(named: dict, boot: int = 1000):
    groups, labels, task, classes = groups_of(named)
    cfg = ReportParams(bootstrap=boot)
    return groups, Comparisons(groups, labels, batched_metrics(task, len(classes)), cfg), cfg


# --------------------------------------------------------------------------- Holm

def _holm_step_down(p: list[float], alpha: float) -> list[bool]:
    """Holm's procedure as its paper states it (not adjusted p): reject the i-th smallest while p_(i) <= alpha / (m - i)."""
    order, reject = sorted(range(len(p)), key=p.__getitem__), [False] * len(p)
    for i, k in enumerate(order):
        if p[k] > alpha / (len(p) - i):
            break
        reject[k] = True
    return reject


def test_holm_adjusted_p_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005 = 0.02, 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([None, 0.2, 0.3]) == [None, pytest.approx(0.4), pytest.approx(0.4)]   # undefined: not in the family
    assert holm([0.6, 0.7]) == [1.0, 1.0] and holm([]) == []


def test_a_family_where_raw_and_holm_verdicts_differ():
    """Three models each better than two others on a modest margin: raw p < 0.05 in several pairs, but not after
    Holm over the ten pairs; the verdicts follow Holm's step-down procedure applied by hand to the raw p."""
    rng = np.random.default_rng(3)
    base = np.ones(N)
    better = base.copy()
    better[rng.choice(N, 24, replace=False)] = 0.0       # wins on 24 segments by 1 ...
    loses = rng.choice(np.flatnonzero(better == 1.0), 9, replace=False)
    better[loses] = 2.0                                  # ... loses on 9 by 1: mean difference -0.25
    named = {"a": [_run("a", 0, better)], "b": [_run("b", 0, base)], "c": [_run("c", 0, base)],
             "d": [_run("d", 0, base)], "probe": [_run("probe", None, base)]}
    groups, compared, cfg = _compared(named)
    _, records = pairwise_table(groups, compared, "mae", cfg)
    raw = [r["p"] for r in records]
    assert sum(p < 0.05 for p in raw) == 4                              # a vs b, c, d, probe: raw "a better"
    expected = _holm_step_down(raw, cfg.alpha)
    assert [r["significant"] for r in records] == expected
    assert not any(expected)                                            # Holm over 10 pairs keeps none of them
    for r in records:
        assert r["p_holm"] >= r["p"]
    md, _ = pairwise_table(groups, compared, "mae", cfg)
    assert "| a vs b | 0 ⚠ | -0.250 |" in md and "no significant difference" in md and "better" not in md


def test_holm_decides_the_ablation_table_and_the_model_marks():
    rng = np.random.default_rng(4)
    base = np.ones(N)
    slightly = base.copy()
    slightly[rng.choice(N, 22, replace=False)] = 2.0     # worse on 22 segments, better on 8: +0.233
    slightly[rng.choice(np.flatnonzero(slightly == 1.0), 8, replace=False)] = 0.0
    clearly = np.full(N, 1.5)                             # worse everywhere
    seeds = [0, 1, 2]
    named = {"m": [_run("m", s, base) for s in seeds], "probe": [_run("probe", None, base * 3)],
             "m-x": [_run("m-x", s, slightly) for s in seeds], "m-y": [_run("m-y", s, clearly) for s in seeds],
             "m-z": [_run("m-z", s, base) for s in seeds]}
    groups, compared, cfg = _compared(named)
    ablations = {k: runs.Ablation("m", []) for k in ("m-x", "m-y", "m-z")}
    md, records = ablation_table(groups, ablations, {}, compared, "mae", cfg)
    raw = [records[k]["vs_full"]["p"] for k in ablations]
    assert raw[0] < 0.05 and raw[1] < 0.01 and raw[2] == 1.0
    assert [records[k]["vs_full"]["significant"] for k in ablations] == _holm_step_down(raw, cfg.alpha)
    assert "| m-y | m | – | 0–2 | 1.500 ± 0.000 | 1.000 ± 0.000 | 0.500 |" in md
    # the models table: per column, the comparisons with the best (here m) are one family
    table, stats = model_table({g: groups[g] for g in ("m", "m-x", "m-y", "probe")}, compared, ["mae"], cfg)
    family = [stats[g]["mae"]["vs_best"]["p"] for g in ("m-x", "m-y", "probe")]
    marks = _holm_step_down(family, cfg.alpha)
    for g, marked in zip(("m-x", "m-y", "probe"), marks):
        assert (stats[g]["mae"]["vs_best"]["better"] == "b") == marked
        assert (" †" in next(line for line in table.splitlines() if line.startswith(f"| {g} |"))) == marked


# --------------------------------------------------------------------------- pairing: the seeds and segments both have

def test_an_ablation_at_one_seed_is_compared_with_that_seed_of_the_full_model():
    """The full model ran seeds 0-2 (MAE 1.0, 0.5, 0.5), the ablation seed 0 only (0.9) and not the last 5 segments.
    Mean against mean says the ablation is worse (0.9 vs 0.667); paired on seed 0 and the 55 segments both scored,
    it is better by exactly 0.1 (on the 5 it skipped the full model's seed 0 is perfect: counting them would shift it)."""
    seed0 = np.ones(N)
    seed0[-5:] = 0.0
    full = [_run("gce", 0, seed0), _run("gce", 1, 0.5), _run("gce", 2, 0.5)]
    ablation = [_run("gce-x", 0, 0.9, ids=[f"s{i}" for i in range(N - 5)])]
    groups, compared, cfg = _compared({"gce": full, "probe": [_run("probe", None, 1.2)], "gce-x": ablation})
    old_diff = ablation[0].metrics["test"]["mae"] - np.mean([r.metrics["test"]["mae"] for r in full])
    assert old_diff > 0.2                                                # what mean-vs-mean reported: worse
    md, records = ablation_table(groups, {"gce-x": runs.Ablation("gce", ["gce.ablate=[relation]"])}, {}, compared, "mae", cfg)
    r = records["gce-x"]
    assert r["seeds"] == [0] and r["segments"] == N - 5
    assert r["vs_full"]["diff"] == pytest.approx(-0.1) and r["vs_full"]["ci"] == pytest.approx([-0.1, -0.1])
    assert r["vs_full"]["better"] == "a" and r["full"]["mean"] == pytest.approx(1.0)
    assert f"| gce-x | gce | `gce.ablate=[relation]` | 0 ⚠; {N - 5} of {N} segments | 0.900 | 1.000 | -0.100 |" in md
    assert "| better |" in md and "rests on fewer than 3 seeds" in md


def test_models_pair_on_common_seeds_and_the_probe_on_every_seed():
    a = [_run("a", s, e) for s, e in ((0, 0.4), (1, 0.6), (3, 0.2))]
    b = [_run("b", s, e) for s, e in ((0, 0.5), (1, 0.5), (2, 0.5))]
    groups, compared, cfg = _compared({"a": a, "b": b, "probe": [_run("probe", None, 0.45)]})
    ab = compared("a", "b")
    assert ab["seeds"] == [0, 1] and ab["metrics"]["mae"]["diff"] == pytest.approx(0.0)   # (0.4 + 0.6) / 2 - 0.5
    assert compared("b", "a")["metrics"]["mae"]["diff"] == pytest.approx(0.0)
    ap = compared("a", "probe")
    assert ap["seeds"] == [0, 1, 3] and ap["metrics"]["mae"]["diff"] == pytest.approx(0.4 - 0.45)
    pb = compared("probe", "b")
    assert pb["seeds"] == [0, 1, 2] and pb["metrics"]["mae"]["diff"] == pytest.approx(-0.05)
    md, records = pairwise_table(groups, compared, "mae", cfg)
    assert "| a vs b | 0, 1 ⚠ |" in md and "| a vs probe | 0, 1, 3 |" in md
    assert records[0]["sign_test"] == {"wins": 1, "losses": 1, "ties": 0, "p": 1.0}    # seed 0 won, seed 1 lost
    groups, compared, cfg = _compared({"a": a, "probe": [_run("probe", None, 0.45)], "c": [_run("c", 2, 0.1)]})
    md, records = ablation_table(groups, {"c": runs.Ablation("a", [])}, {}, compared, "mae", cfg)
    assert "| c | a | – | none in common |" in md and records["c"]["vs_full"]["p"] is None   # seed 2: a never ran it


def test_a_single_seed_report_has_no_sign_test_and_no_spread_figure(tmp_path):
    from pipeline.evaluation.report import write

    named = {"a": [_run("a", 0, 0.5)], "b": [_run("b", 0, 0.6)], "probe": [_run("probe", None, 0.7)]}
    groups, compared, cfg = _compared(named)
    md, records = pairwise_table(groups, compared, "mae", cfg)
    assert "sign test" not in md and all(r["sign_test"] is None for r in records)
    assert len({line.count("|") for line in md.splitlines() if line.startswith("|")}) == 1   # rows as wide as the header
    _, stats = model_table(groups, compared, ["mae"], cfg)
    assert stats["a"]["mae"]["ci"] is None
    record = {"task": "regression", "flags": [], "models": stats, "ablations": {}}
    write(tmp_path, "x", record, groups, "mae")
    assert not (tmp_path / "figures" / "seeds_mae.png").exists()
    named["a"].append(_run("a", 1, 0.4))
    named["b"].append(_run("b", 1, 0.7))
    groups, compared, cfg = _compared(named)
    md, _ = pairwise_table(groups, compared, "mae", cfg)
    assert "sign test" in md


# --------------------------------------------------------------------------- selection, from what a run recorded

@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    from pipeline.training.dataset import assemble

    root = write_fake_features(tmp_path_factory.mktemp("small") / "features", n=40)
    assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in ("text", "visual", "acoustic")}, root / "dataset")
    return root / "dataset"


def test_a_run_that_selected_on_test_is_flagged(small_dataset, tmp_path, monkeypatch):
    """The flag follows the split the training loop and the probe actually read: point them at test and the
    report says so; the same runs on validation raise nothing."""
    from pipeline.evaluation import probe
    from pipeline.training import train
    from pipeline.evaluation.probe import ProbeParams, fit_probe
    from pipeline.training.provenance import stamp
    from pipeline.evaluation.report import flags, render
    from pipeline.training.train import train_model

    def trained(out):
        train_model("late_fusion", small_dataset, out, {"epochs": 2, "batch_size": 8}, {}, progress=False)
        stamp(out / "metrics.json", small_dataset)
        fit_probe(small_dataset, out / "probe", ProbeParams(alphas=[1.0, 10.0]), ["text", "visual", "acoustic"])
        stamp(out / "probe" / "metrics.json", small_dataset)
        return [runs.read_run(out, "late_fusion", 0), runs.read_run(out / "probe", "linear_probe", None)]

    assert flags(trained(tmp_path / "valid"), None) == []
    monkeypatch.setattr(train, "SELECT_SPLIT", "test")
    monkeypatch.setattr(probe, "SELECT_SPLIT", "test")
    found = flags(trained(tmp_path / "test"), None)
    assert found == ["late_fusion seed 0: early stopping selected on test, not on the validation split",
                     "late_fusion seed 0: checkpoint selected on test, not on the validation split",
                     "linear_probe: penalty selected on test, not on the validation split"]
    md = render({"root": "x", "task": "regression", "test": 10, "data": {}, "seeds": [0], "bootstrap": 100,
                 "alpha": 0.05, "metric": "mae", "spread": False},
                {"models": "", "pairwise": "", "ablations": "", "robustness": ""}, found)
    assert "- ⚠ late_fusion seed 0: checkpoint selected on test" in md and "None: every result" not in md


# --------------------------------------------------------------------------- a text-only 3-class corpus through the stages

ABLATIONS = {"gce-no-relation": {"model": "gce", "set": ["gce.ablate=[relation]"]},
             "gexsent-no-acoustic": {"model": "gexsent", "set": ["model.modalities=[text, visual]"]},
             "gexsent-no-experts": {"model": "gexsent", "set": ["gexsent.ablate=[experts]"]},
             "text_only-fast": {"model": "text_only", "set": ["model.lr=0.01"], "seeds": [1]}}


@pytest.fixture(scope="module")
def text_only_corpus(tmp_path_factory):
    """A transcript-only 3-class corpus and params as a user would write them: every default ablation."""
    from pipeline.training.dataset import assemble

    work = tmp_path_factory.mktemp("textonly")
    root = write_fake_features(work / "features", n=48, dims={"text": 8}, task="classification")
    assemble(root / "manifest.parquet", {"text": root / "text.parquet"}, root / "dataset")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {"model.epochs": 2, "model.batch_size": 8, "evaluate.seeds": [1], "evaluate.models": ["text_only"],
                       "evaluate.ablations": ABLATIONS}.items():
        params.assign(raw, f"{key}={json.dumps(value)}")
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    return work


def _stage(work: Path, monkeypatch, stage: str, *args) -> int:
    import importlib

    from pipeline.errors import guarded

    monkeypatch.chdir(work)
    return guarded(stage, importlib.import_module(f"stages.{stage}").main, *args)


def test_ablations_that_cannot_change_the_model_are_skipped_with_a_note(text_only_corpus, monkeypatch, capsys):
    work = text_only_corpus
    for name in ("gce-no-relation", "gexsent-no-acoustic"):
        assert _stage(work, monkeypatch, "ablation", name, "features/dataset", f"models/ablations/{name}") == 0
        log = capsys.readouterr().out
        assert log.count("\n") == 1 and log.startswith(f"ablation {name}: skipped, not trained: ")
        assert "the dataset has no visual, acoustic" in log
        folder = work / "models" / "ablations" / name
        assert json.loads((folder / "skipped.json").read_text())["reason"] in log
        assert not list(folder.glob("seed*"))
    from pipeline.evaluation.variants import vacuous

    raw = yaml.safe_load((work / "params.yaml").read_text())
    assert vacuous(raw, "gexsent", ["gexsent.ablate=[experts]"], work / "features/dataset") is None   # experts act on text
    assert vacuous(raw, "gce", ["gce.variant=reference"], work / "features/dataset") is None          # another model
    assert vacuous(raw, "text_only", ["model.lr=0.01"], work / "features/dataset") is None            # other training


def test_a_skipped_ablation_is_listed_in_the_report():
    named = {"gce": [_run("gce", 0, 0.5)], "probe": [_run("probe", None, 0.6)]}
    groups, compared, cfg = _compared(named)
    ablations = {"gce-no-relation": runs.Ablation("gce", ["gce.ablate=[relation]"])}
    md, records = ablation_table(groups, ablations, {"gce-no-relation": "gce reads text here (...)"}, compared, "mae", cfg)
    assert records == {} and "- `gce-no-relation` skipped, not trained: gce reads text here (...)" in md


def test_on_three_modalities_nothing_is_skipped(small_dataset):
    """A switch that changes no parameter and acts late (the relation loss fires only once graders separate the
    pairs) looks like nothing at step one: with every modality present it is trained, never skipped."""
    from pipeline.evaluation.variants import vacuous

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for overrides in (["gce.relation_weight=0"], ["gce.ablate=[relation]"], ["model.modalities=[text, visual]"]):
        assert vacuous(raw, "gce", overrides, small_dataset) is None, overrides


def test_with_one_pair_only_the_pair_free_switches_are_vacuous(tmp_path):
    """Text and visual: one pair, so GCE has no relation transfer (it needs two pairs) but does have its
    contrastive loss, a switch that changes no parameter and acts from the first step."""
    from pipeline.training.dataset import assemble
    from pipeline.evaluation.variants import vacuous

    root = write_fake_features(tmp_path / "features", n=24, dims={"text": 8, "visual": 6})
    assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in ("text", "visual")}, root / "dataset")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params.assign(raw, "gce.fusion_dim=32")
    assert "the dataset has no acoustic" in vacuous(raw, "gce", ["gce.ablate=[relation]"], root / "dataset")
    assert vacuous(raw, "gce", ["gce.contrastive_weight=0"], root / "dataset") is None
    assert vacuous(raw, "gce", ["gce.ablate=[grading]", "gce.contrastive_weight=0"], root / "dataset") is None


def test_classification_seed_and_ablation_runs_print_their_f1(text_only_corpus, monkeypatch, capsys):
    work = text_only_corpus
    assert _stage(work, monkeypatch, "seeds", "text_only", 1, "features/dataset", "models/seeds/text_only/seed1") == 0
    assert _stage(work, monkeypatch, "ablation", "text_only-fast", "features/dataset", "models/ablations/text_only-fast") == 0
    out = capsys.readouterr().out
    written = json.loads((work / "models/seeds/text_only/seed1/metrics.json").read_text())["test"]
    line = next(x for x in out.splitlines() if x.startswith("text_only seed 1: "))
    assert line == (f"text_only seed 1: test weighted-F1 {written['weighted_f1']:.4f}, macro-F1 {written['macro_f1']:.4f}, "
                    f"accuracy {written['accuracy']:.4f}")
    assert "ablation text_only-fast (text_only with model.lr=0.01) seed 1: test weighted-F1 " in out
    assert "mae" not in out.lower()


# --------------------------------------------------------------------------- figures

@pytest.fixture
def kept_figures(monkeypatch):
    """The figures a plotting function made, kept open for inspection."""
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for fig in kept:
        plt.figure(fig.number)
        plt.clf()


def test_missing_modality_subsets_are_points_not_lines(tmp_path, kept_figures):
    from pipeline.evaluation.figures import robustness_curve

    subsets = [{"level": lvl, "mae": v} for lvl, v in (("-text", 1.1), ("-visual", 0.9), ("-text-visual", 1.3))]
    robustness_curve({"a": subsets, "b": subsets}, "mae", "modalities missing", tmp_path / "s.png", "subsets")
    rates = [{"level": r, "mae": 1 + r} for r in (0.0, 0.5, 0.9)]
    robustness_curve({"a": rates}, "mae", "drop rate", tmp_path / "r.png", "rates")
    categorical, numeric = (fig.axes[0].get_lines() for fig in kept_figures)
    assert len(categorical) == 2 and all(line.get_linestyle() == "None" for line in categorical)
    assert all(len(line.get_xdata()) == 3 for line in categorical)
    assert categorical[0].get_xdata()[0] != categorical[1].get_xdata()[0]       # side by side, not on top
    assert numeric[0].get_linestyle() == "-" and (tmp_path / "s.png").is_file()


def test_task_losses_keep_their_own_axis(tmp_path, kept_figures):
    """Auxiliary terms 50x the task loss: the task curves get a panel scaled to them, the total its own."""
    from pipeline.training.plots import loss_curves

    history = [{"epoch": e, "train_loss": 1.0 / e, "valid_loss": 1.2 / e, "train_total": 50.0 / e, "select": 1.2 / e}
               for e in range(1, 6)]
    loss_curves(history, tmp_path / "loss.png", "m")
    (fig,) = kept_figures
    task, total = fig.axes
    assert {line.get_label() for line in task.get_lines()} >= {"train task loss", "valid task loss"}
    assert task.get_ylim()[1] < 2.0                                               # not squashed by the total
    assert max(max(line.get_ydata()) for line in total.get_lines()) == 50.0
    loss_curves([{**h, "train_total": h["train_loss"]} for h in history], tmp_path / "plain.png", "m")
    assert len(kept_figures[1].axes) == 1                                         # no auxiliary loss: one panel
