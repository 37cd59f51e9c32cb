"""Evaluation: the statistics on hand-made inputs, the robustness protocols against training-time
masking and the plain test metric, the leakage guards, and the seeds -> probe -> ablation -> robustness ->
report stages on a small fake project."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, write_fake_features
from pipeline import params, schema
from pipeline.errors import guarded
from pipeline.evaluation.stats import auc, batched_metrics, bootstrap_replicates, compare, sign_test, summarize
from pipeline.training.metrics import classification_metrics, regression_metrics

MODS = ("text", "visual", "acoustic")


# --------------------------------------------------------------------------- statistics, by hand

def test_mean_std_and_t_interval_by_hand():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["mean"] == 3.0 and s["n"] == 5
    assert s["std"] == pytest.approx(math.sqrt(2.5))                 # sample std, ddof 1
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)                  # t(0.975, 4) = 2.776445
    assert s["ci"] == pytest.approx([3.0 - half, 3.0 + half], abs=1e-6)
    assert summarize([0.7]) == {"mean": 0.7, "std": None, "n": 1, "ci": None}
    assert summarize([None, 2.0, 4.0])["mean"] == 3.0                 # undefined values are skipped
    assert summarize([0.5, 0.5, 0.5])["ci"] == [0.5, 0.5]


def test_sign_test_by_hand():
    # MAE: lower wins. 5 wins of 5 -> two-sided p = 2 / 2^5
    assert sign_test([0.8, 0.8, 0.8, 0.8, 0.8], [0.9, 0.9, 0.9, 0.9, 0.9], "mae") == \
        {"wins": 5, "losses": 0, "ties": 0, "p": 0.0625}
    r = sign_test([0.8, 0.8, 0.8, 0.8, 1.0], [0.9] * 5, "mae")         # 4 / 1: p = 2 * (1 + 5) / 32
    assert (r["wins"], r["losses"], r["p"]) == (4, 1, 0.375)
    r = sign_test([0.7, 0.6, 0.5], 0.6, "acc7")                       # against one value; the tie is dropped
    assert (r["wins"], r["losses"], r["ties"], r["p"]) == (1, 1, 1, 1.0)


def _mae(pred, true):
    return {"mae": np.abs(pred - true).mean(1)}


def test_paired_bootstrap_by_hand():
    labels = np.linspace(-2, 2, 40)
    worse = labels + np.where(np.arange(40) % 2, 1.0, -1.0)            # |error| 1 everywhere
    better = labels + np.where(np.arange(40) % 2, 0.5, -0.5)           # |error| 0.5 everywhere
    boot = bootstrap_replicates({"a": better[None], "b": worse[None], "c": worse[None]}, labels, _mae, 500, seed=1)
    c = compare(0.5, 1.0, boot["a"]["mae"], boot["b"]["mae"], "mae")
    # no replicate on the other side of 0: the add-one p, 2 * (0 + 1) / (500 + 1), never 0
    assert c["diff"] == -0.5 and c["ci"] == pytest.approx([-0.5, -0.5]) and c["p"] == pytest.approx(2 / 501)
    assert c["significant"] and c["better"] == "a"
    same = compare(1.0, 1.0, boot["b"]["mae"], boot["c"]["mae"], "mae")
    assert same["p"] == 1.0 and not same["significant"] and same["better"] is None
    # a wins on half the segments by exactly what it loses on the other half: nothing to tell apart
    mixed = labels + np.where(np.arange(40) < 20, 0.5, 1.5) * np.where(np.arange(40) % 2, 1, -1)
    boot = bootstrap_replicates({"a": mixed[None], "b": worse[None]}, labels, _mae, 500, seed=1)
    c = compare(1.0, 1.0, boot["a"]["mae"], boot["b"]["mae"], "mae")
    assert not c["significant"] and c["ci"][0] < 0 < c["ci"][1]


def test_bootstrap_resamples_seeds_too():
    """A seed that went badly widens the interval: seeds are resampled, not averaged away."""
    labels = np.zeros(30)
    steady = np.stack([np.full(30, 0.5), np.full(30, 0.5)])
    shaky = np.stack([np.full(30, 0.2), np.full(30, 0.8)])            # same mean error 0.5
    boot = bootstrap_replicates({"steady": steady, "shaky": shaky}, labels, _mae, 400, seed=0)
    assert np.ptp(boot["steady"]["mae"]) == 0 and np.ptp(boot["shaky"]["mae"]) == pytest.approx(0.6)
    assert not compare(0.5, 0.5, boot["shaky"]["mae"], boot["steady"]["mae"], "mae")["significant"]


def test_batched_metrics_equal_the_metrics_module():
    rng = np.random.default_rng(0)
    true = np.round(rng.uniform(-3, 3, (30, 25)), 1)
    true[:, :4] = 0.0
    true[0] = 0.0                                                      # non0 metrics undefined in one row
    pred = np.round(true + rng.normal(0, 1, true.shape), 1)
    pred[1] = 0.5                                                      # constant prediction: corr undefined
    fast = batched_metrics("regression")(pred, true)
    for b in range(len(true)):
        for key, value in regression_metrics(pred[b], true[b]).items():
            assert (value is None and np.isnan(fast[key][b])) or fast[key][b] == pytest.approx(value, abs=1e-12), key
    sims_true = np.clip(np.round(true / 3, 1), -1, 1)                 # CH-SIMS: [-1, 1], ties at the bin edges
    sims_pred = np.round(np.clip(pred / 3, -1.2, 1.2), 1)
    sims_pred[2, :5] = [-0.7, -0.1, 0.0, 0.1, 0.7]
    fast = batched_metrics("regression", family="sims")(sims_pred, sims_true)
    assert set(fast) == {"mae", "corr", "acc2", "acc3", "acc5", "f1"}
    for b in range(len(true)):
        for key, value in regression_metrics(sims_pred[b], sims_true[b], "sims").items():
            assert (value is None and np.isnan(fast[key][b])) or fast[key][b] == pytest.approx(value, abs=1e-9), key
    yc, pc = rng.integers(0, 3, (30, 20)), rng.integers(0, 3, (30, 20))
    fast = batched_metrics("classification", 4)(pc, yc)                # class 3 never occurs
    for b in range(len(yc)):
        for key, value in classification_metrics(pc[b], yc[b], 4)[0].items():
            assert fast[key][b] == pytest.approx(value, abs=1e-12), key


def test_auc_is_the_trapezoid_over_rates_per_unit_of_rate():
    from pipeline.evaluation.robustness import RobustnessParams

    rates = [round(0.1 * i, 1) for i in range(11)]
    assert auc(rates, [0.7] * 11) == pytest.approx(0.7)                # a flat curve scores its value
    assert auc(rates, [1 - r for r in rates]) == pytest.approx(0.5)
    assert auc([0, 0.5, 1], [1.0, 0.5, 0.5]) == pytest.approx(0.625)
    assert auc(rates, [0.7] * 10 + [None]) is None
    lnln = RobustnessParams().rates                                    # the default: LNLN's 0..0.9, no r = 1
    assert lnln == pytest.approx([0.1 * i for i in range(10)])
    assert auc(lnln, [0.7] * 10) == pytest.approx(0.7)                 # flat, whatever the span
    assert auc(lnln, [1 - r for r in lnln]) == pytest.approx(1 - 0.45)  # area 0.9 - 0.405 over span 0.9


# --------------------------------------------------------------------------- a small project, through the stages

FAST = {"model.epochs": 3, "model.patience": 5, "model.batch_size": 16, "evaluate.seeds": [1],
        "evaluate.models": ["gexsent", "late_fusion"],
        "evaluate.ablations": {"late-no-acoustic": {"model": "late_fusion", "set": ["model.modalities=[text, visual]"]}},
        "robustness.rates": [0.0, 0.5, 1.0], "robustness.seeds": [0, 1], "robustness.snr_db": [10.0],
        "robustness.targets": ["visual", "acoustic"], "report.bootstrap": 200}


def _call(stage: str, *args) -> None:
    import importlib

    module = importlib.import_module(f"stages.{stage}")
    assert guarded(stage, module.main, *args) == 0, stage


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """params.yaml (the repository's, made small), a fake dataset, and every evaluation stage run in-process."""
    import os

    work = tmp_path_factory.mktemp("evaluation")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in FAST.items():
        params.assign(raw, f"{key}={json.dumps(value)}")
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    root = write_fake_features(work / "features", n=64)
    from pipeline.training.dataset import assemble

    assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in MODS}, root / "dataset")
    before = os.getcwd()
    os.chdir(work)
    torch.set_num_threads(1)
    try:
        for model in FAST["evaluate.models"]:
            _call("train", model, "features/dataset", f"models/{model}")
            _call("seeds", model, 1, "features/dataset", f"models/seeds/{model}/seed1")
        _call("ablation", "late-no-acoustic", "features/dataset", "models/ablations/late-no-acoustic")
        _call("probe", "features/dataset", "models/linear_probe")
        _call("robustness", "features/dataset", "models", "reports/robustness")
        _call("report", "models", "reports/robustness/details.json", "reports", "metrics")
    finally:
        os.chdir(before)
    return work


def _corruptor(project):
    from pipeline.training.dataset import AssembledData
    from pipeline.evaluation.robustness import Corruptor

    data = AssembledData(project / "features" / "dataset")
    rows = data.split_rows("test")
    return data, rows, Corruptor(data, rows, reencode_text=False)


def test_rate_zero_is_the_plain_test_metric(project):
    from pipeline.evaluation.robustness import load_scored, predict

    data, rows, corruptor = _corruptor(project)
    for protocol in ("random", "block"):
        segments = corruptor.drop(protocol, 0.0, 0, data.modalities)
        for name in FAST["evaluate.models"]:
            run = load_scored(name, 0, project / "models" / name)
            got = regression_metrics(predict(run, segments, 7), data.labels[rows])
            written = json.loads((project / "models" / name / "metrics.json").read_text())["test"]
            assert got == pytest.approx({k: v for k, v in written.items()}, abs=2e-6), (protocol, name)
    curve = json.loads((project / "reports/robustness/curves/random-visual/gexsent.json").read_text())
    seeds = [json.loads((p / "metrics.json").read_text())["test"]["mae"]
             for p in (project / "models/gexsent", project / "models/seeds/gexsent/seed1")]
    assert curve[0]["level"] == 0.0 and curve[0]["mae"] == pytest.approx(np.mean(seeds), abs=2e-6)


@pytest.mark.parametrize("modality", MODS)
def test_rate_one_drop_equals_training_time_masking(project, modality):
    """r = 1 of one modality (random or block) = the model's output with that modality's mask all False."""
    from pipeline.evaluation.robustness import load_scored, predict

    data, rows, corruptor = _corruptor(project)
    for name in ("gexsent", "late_fusion"):
        run = load_scored(name, 0, project / "models" / name)
        batch = data.batch(rows)
        batch.pop("label")
        batch[f"{modality}_mask"][:] = False
        if f"{modality}_pooled" in batch:           # assemble stores a missing text with a zero pooled vector
            batch[f"{modality}_pooled"].zero_()
        with torch.no_grad():
            masked = run.model(batch)["pred"].numpy()
        for protocol in ("random", "block"):
            dropped = predict(run, corruptor.drop(protocol, 1.0, 3, [modality]), 64)
            np.testing.assert_allclose(dropped, masked, atol=1e-5, err_msg=f"{name} {protocol} {modality}")
        np.testing.assert_allclose(predict(run, corruptor.without([modality]), 64), masked, atol=1e-5)


def test_drop_masks_and_noise_levels():
    from pipeline.evaluation.robustness import add_noise, drop_mask

    rng = np.random.default_rng(0)
    assert drop_mask(1000, 0.3, "random", rng).mean() == pytest.approx(0.3, abs=0.05)
    block = drop_mask(20, 0.3, "block", rng)
    assert block.sum() == 6 and np.ptp(np.flatnonzero(block)) == 5       # one contiguous block of round(0.3 * 20)
    assert drop_mask(7, 1.0, "block", rng).all() and not drop_mask(7, 0.0, "random", rng).any()
    x = rng.normal(0, 2, (400, 16)).astype(np.float16)
    noisy = add_noise(x, 10.0, rng)
    snr = 10 * np.log10(np.mean(x.astype(float) ** 2) / np.mean((noisy.astype(float) - x) ** 2))
    assert noisy.dtype == np.float16 and snr == pytest.approx(10.0, abs=0.3)


def test_report_tables_flags_and_records(project):
    md = (project / "reports" / "summary.md").read_text()
    for name in ("models", "pairwise", "ablations", "robustness", "subsets"):
        assert f"<!-- table: {name} -->" in md, name
    assert "## Flags" in md and "None: every result" in md
    assert "AUC over drop rates 0–1, r = 1 included" in md and "| noise-visual mean (own protocol) |" in md
    for row in ("| gexsent | 2 |", "| late_fusion | 2 |", "| linear_probe | 1 |", "| late-no-acoustic | late_fusion |"):
        assert row in md, row
    record = json.loads((project / "reports" / "details.json").read_text())
    maes = [json.loads((p / "metrics.json").read_text())["test"]["mae"]
            for p in (project / "models/late_fusion", project / "models/seeds/late_fusion/seed1")]
    assert record["models"]["late_fusion"]["mae"]["mean"] == pytest.approx(np.mean(maes))
    assert record["models"]["late_fusion"]["mae"]["std"] == pytest.approx(np.std(maes, ddof=1))
    assert set(record["pairwise"]) >= {"gexsent vs late_fusion", "late_fusion vs linear_probe"}
    assert (project / "reports" / "figures" / "seeds_mae.png").is_file()
    assert json.loads((project / "reports" / "summary.json").read_text())["models"]["late_fusion"]["mae_std"] == \
        pytest.approx(np.std(maes, ddof=1))                                  # what `dvc metrics show` gets
    lean = json.loads((project / "reports/robustness/robustness.json").read_text())
    assert set(lean["gexsent"]["random-visual"]) == {"auc_mae", "auc_mae_std", "mean_mae", "mean_mae_std"}
    rob = json.loads((project / "reports/robustness/details.json").read_text())
    assert set(rob["models"]["gexsent"]) == {"random-visual", "block-visual", "noise-visual", "random-acoustic",
                                             "block-acoustic", "noise-acoustic", "subsets"}
    assert rob["models"]["gexsent"]["random-visual"]["auc_mae"]["n"] == 2 and rob["rates"] == [0.0, 0.5, 1.0]
    assert len(rob["models"]["gexsent"]["subsets"]["levels"]) == 6           # each modality or pair missing
    from pipeline.evaluation.runs import recorded

    for run in ("models/gexsent", "models/seeds/gexsent/seed1", "models/ablations/late-no-acoustic/seed1", "models/linear_probe"):
        written = recorded(project / run)
        assert written["data"] == rob["data"], run
        assert {read["split"] for read in written["selection"].values()} == {"valid"}, run
    assert set(recorded(project / "models/gexsent")["selection"]) == {"early_stopping", "checkpoint"}
    assert set(recorded(project / "models/linear_probe")["selection"]) == {"penalty"}


def test_the_dvc_metrics_are_one_small_file_per_number_keyed_by_model(project):
    """metrics/ (what `dvc metrics` and `dvc exp show` compare): per model the mean over seeds of the headline
    test metrics and of the validation score, the std of the primary metric, the robustness AUCs; nothing else."""
    runs = {"gexsent": ["models/gexsent", "models/seeds/gexsent/seed1"],
            "late_fusion": ["models/late_fusion", "models/seeds/late_fusion/seed1"], "linear_probe": ["models/linear_probe"]}
    written = {p.stem: json.loads(p.read_text()) for p in (project / "metrics").glob("*.json")}
    assert set(written) == {"mae", "corr", "acc2_has0", "acc2_non0", "f1_has0", "f1_non0", "mae_std", "valid_mae",
                            "auc_random-visual", "auc_block-visual", "auc_random-acoustic", "auc_block-acoustic"}
    for model, folders in runs.items():
        by_seed = [json.loads((project / f / "metrics.json").read_text()) for f in folders]
        for metric in ("mae", "corr", "acc2_non0", "f1_has0"):
            assert written[metric][model] == pytest.approx(np.mean([m["test"][metric] for m in by_seed]), abs=1e-6)
        assert written["valid_mae"][model] == pytest.approx(np.mean([m["valid"]["mae"] for m in by_seed]), abs=1e-6)
    maes = [json.loads((project / f / "metrics.json").read_text())["test"]["mae"] for f in runs["gexsent"]]
    assert written["mae_std"]["gexsent"] == pytest.approx(np.std(maes, ddof=1), abs=1e-6)
    assert "linear_probe" not in written["mae_std"]  # one run: no std, rather than a made-up 0
    rob = json.loads((project / "reports/robustness/details.json").read_text())
    assert written["auc_random-visual"]["late_fusion"] == pytest.approx(rob["models"]["late_fusion"]["random-visual"]["auc_mae"]["mean"])
    assert all(isinstance(v, float) for by_model in written.values() for v in by_model.values())
    md = (project / "reports" / "summary.md").read_text()
    this_run = md[md.index("## This run"):md.index("## Flags")]
    assert "not possible, no committed params.yaml" in this_run  # no git here: said, not guessed
    shared = next(line for line in this_run.splitlines() if line.startswith("| `model` (every model) | "))
    lr = yaml.safe_load((project / "params.yaml").read_text())["model"]["lr"]
    assert f"lr {lr}," in shared and "epochs 3," in shared and 'modalities ["text", "visual", "acoustic"]' in shared
    assert 'variant "improved"' in next(line for line in this_run.splitlines() if line.startswith("| `gexsent` | "))
    assert "| `probe` | alphas [" in this_run


def test_every_trained_model_is_reported_with_the_seeds_it_has(project):
    from pipeline.evaluation import runs

    raw = yaml.safe_load((project / "params.yaml").read_text())
    dirs = runs.base_run_dirs(raw, project / "models")
    assert [s for s, _ in dirs["gexsent"]] == [0, 1] and list(dirs) == ["gexsent", "late_fusion"]
    params.assign(raw, "evaluate.models=[late_fusion]")       # gexsent: trained by train@ only, so one seed
    dirs = runs.base_run_dirs(raw, project / "models")
    assert list(dirs) == ["late_fusion", "gexsent"] and [s for s, _ in dirs["gexsent"]] == [0]
    params.assign(raw, "evaluate.models=[gce]")
    with pytest.raises(Exception, match="no trained gce in"):
        runs.base_run_dirs(raw, project / "models")


def test_report_flags_mixed_data_and_selection_off_validation(project, tmp_path):
    from pipeline.evaluation import runs
    from pipeline.evaluation.report import flags

    run = runs.read_run(project / "models" / "gexsent", "gexsent", 0)
    other = runs.read_run(project / "models" / "late_fusion", "late_fusion", 0)
    assert flags([run, other], None) == []
    other.record = {"selection": {"checkpoint": {"split": "test", "segments": 16}},  # as older runs recorded it
                    "data": {**other.record["data"], "split_sha256": "f" * 64}}
    found = flags([run, other], None)
    assert any("late_fusion seed 0: checkpoint selected on test, not on the validation split" in f for f in found)
    assert any(f.startswith("results come from different data") for f in found)
    other.record = {**run.record, "selection": None}
    assert flags([run, other], None) == ["late_fusion seed 0: no selection recorded (which split chose its checkpoint "
                                         "is unknown: re-run it)"]


def test_readme_tables_splices_between_markers_and_is_idempotent(project, tmp_path):
    from tools.readme_tables import main

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- report: demo (tables: models, ablations) -->\nhand-pasted, stale\n"
                      "<!-- /report: demo -->\nafter\n")
    summary = project / "reports" / "summary.md"
    assert main(["demo", str(summary), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("<!-- /report: demo -->\nafter\n")
    assert "| linear_probe | 1 |" in text and "| late-no-acoustic | late_fusion |" in text and "without text" not in text
    assert text.count("<!-- table:") == 0 and "do not edit by hand" in text
    assert main(["demo", str(summary), "--readme", str(readme)]) == 0 and readme.read_text() == text
    assert main(["mosi", str(summary), "--readme", str(readme)]) == 2      # no such block: one line, exit 2


def test_readme_tables_into_another_file_and_a_file_without_the_block(tmp_path, capsys):
    from tools.readme_tables import SpliceError, main, splice

    summary = tmp_path / "summary.md"
    summary.write_text("# Report\n\nData `x` (regression), 4 test segments.\n\n<!-- table: models -->\n"
                       "| model | MAE |\n|---|---|\n| gce | 0.9 |\n<!-- /table -->\n\n"
                       "<!-- table: pairwise -->\n| pair | p |\n|---|---|\n<!-- /table -->\n")
    page = tmp_path / "results.md"
    page.write_text("# Results\n<!-- report: demo-full (tables: models) -->\nold\n<!-- /report: demo-full -->\nend\n")
    assert main(["demo-full", str(summary), "--into", str(page)]) == 0
    text = page.read_text()
    assert "old" not in text and "| gce | 0.9 |" in text and "| pair | p |" not in text and text.endswith("end\n")
    assert f"--into {page}`; do not edit by hand" in text and "Data `x` (regression)" in text
    readme = tmp_path / "README.md"
    readme.write_text("# x\nno blocks here\n")
    assert main(["demo-full", str(summary), "--into", str(readme)]) == 2
    assert f"no block '<!-- report: demo-full ... -->' ... '<!-- /report: demo-full -->' in {readme}" \
        in capsys.readouterr().err
    assert readme.read_text() == "# x\nno blocks here\n"
    with pytest.raises(SpliceError, match="in docs/results.md"):
        splice("nothing", "demo-full", summary.read_text(), "s.md", "docs/results.md")


# --------------------------------------------------------------------------- leakage guards

def test_assemble_refuses_a_video_in_two_splits_unless_allowed(tmp_path):
    from pipeline.training.dataset import AssembleParams, assemble
    from pipeline.errors import UserError

    root = write_fake_features(tmp_path / "feat", n=24)
    manifest = pd.read_parquet(root / "manifest.parquet")
    paths = {m: root / f"{m}.parquet" for m in MODS}
    clean = assemble(root / "manifest.parquet", paths, root / "dataset")["provenance"]
    assert clean["shared_videos"] == 0 and len(clean["manifest_sha256"]) == len(clean["split_sha256"]) == 64
    import pyarrow.parquet as pq

    table = pq.read_table(root / "manifest.parquet")
    manifest.loc[manifest["split"] == "test", "video_id"] = manifest["video_id"].iloc[0]   # a training speaker
    leaky = table.set_column(table.schema.get_field_index("video_id"), "video_id", [manifest["video_id"].tolist()])
    pq.write_table(leaky, root / "manifest.parquet")
    with pytest.raises(UserError, match=r"video_id 'tr0' appears in splits test and train .*allow_shared_videos"):
        assemble(root / "manifest.parquet", paths, root / "dataset")
    meta = assemble(root / "manifest.parquet", paths, root / "dataset", AssembleParams(allow_shared_videos=True))
    assert meta["provenance"]["shared_videos"] == 1
    assert meta["provenance"]["split_sha256"] == clean["split_sha256"]       # same ids and splits
    assert meta["provenance"]["manifest_sha256"] != clean["manifest_sha256"]  # other content


def test_the_demo_and_mosi_splits_are_speaker_independent(mosi_text):
    from pipeline.training.dataset import shared_videos

    for path in (REPO / "raw" / "demo" / "label.csv", mosi_text):
        labels = pd.read_csv(path).rename(columns={"mode": "split"})
        assert shared_videos(labels) == {}, path


def test_ablations_are_overrides_checked_like_exp_run():
    from pipeline.errors import ParamError
    from pipeline.evaluation.runs import Ablation, EvaluateParams, with_overrides

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    out = with_overrides(raw, ["gce.contrastive_weight=0", "model.modalities=[text, visual]"], seed=3)
    assert out["gce"]["contrastive_weight"] == 0 and out["model"]["modalities"] == ["text", "visual"]
    assert out["model"]["seed"] == 3 and raw["model"]["seed"] == 0            # the original is untouched
    with pytest.raises(ParamError, match=r"set: 'features.text.encoder=x' is not allowed \(KEY=VALUE with KEY in model"):
        params.parse(EvaluateParams, {"ablations": {"a": {"model": "gce", "set": ["features.text.encoder=x"]}}})
    with pytest.raises(ParamError, match="evaluate.ablations.a b"):
        params.parse(EvaluateParams, {"ablations": {"a b": {"model": "gce"}}})
    assert Ablation("gexsent", ["gexsent.ablate=[experts]"]).set == ["gexsent.ablate=[experts]"]


def test_text_drop_keeps_special_tokens_and_reencodes_as_the_text_stage(tmp_path, monkeypatch):
    """Dropped tokens become [UNK], [CLS]/[SEP] stay, and re-encoding unchanged ids gives back the stored inputs."""
    from pipeline.training.dataset import AssembledData, assemble
    from pipeline.evaluation import robustness
    from pipeline.features import text as text_stage
    from pipeline.evaluation.robustness import Corruptor

    root = write_fake_features(tmp_path / "feat", n=16, dims={"text": 384, "visual": 4})
    manifest = pd.read_parquet(root / "manifest.parquet")
    manifest["text"] = [f"the film number {i} was {'really good' if i % 2 else 'not great at all'}, said the critic"
                        for i in range(len(manifest))]
    text_stage.run(manifest, text_stage.TextParams(), tmp_path / "cache", root / "text.parquet", show_progress=False)
    assemble(root / "manifest.parquet", {"text": root / "text.parquet", "visual": root / "visual.parquet"}, root / "dataset")
    data = AssembledData(root / "dataset")
    corruptor = Corruptor(data, data.split_rows("test"), reencode_text=True)
    encoder = corruptor.encoder()
    again = encoder([seg["text_token_ids"] for seg in corruptor.clean], batch_size=3)
    for seg, new in zip(corruptor.clean, again):
        assert new["text"].dtype == seg["text"].dtype and new["text"].shape == seg["text"].shape
        np.testing.assert_allclose(new["text"].astype(np.float32), seg["text"].astype(np.float32), atol=2e-2)
        np.testing.assert_allclose(new["text_pooled"], seg["text_pooled"], atol=1e-3)
    monkeypatch.setattr(robustness, "CACHE_ENTRIES", len(again))  # full: the next call clears the cache
    again_and_more = encoder([seg["text_token_ids"] for seg in corruptor.clean] + [np.array([101, 100, 102])])
    assert len(again_and_more) == len(again) + 1                       # cached entries survive the clearing
    dropped = corruptor.drop("random", 0.5, 0, ["text"])
    changed = 0
    for seg, new in zip(corruptor.clean, dropped):
        ids, out = seg["text_token_ids"], new["text_token_ids"]
        special = np.isin(ids, list(encoder.special))
        assert special[0] and special[-1] and (out[special] == ids[special]).all()
        assert set(out[out != ids].tolist()) <= {encoder.unk}
        if (out != ids).any():
            changed += 1
            assert not np.allclose(new["text_pooled"], seg["text_pooled"], atol=1e-2)   # re-encoded
    assert changed >= 2


def test_report_says_when_an_ablated_component_never_acted(tmp_path):
    """gce-no-relation against a full GCE whose relation loss never fired before its selected epoch (seed 0, 1) or
    fired (seed 2): the note names the ablation and says it measures seed noise only when it never fired at all."""
    from pipeline.evaluation import runs
    from pipeline.evaluation.report import Group, never_acted

    def run(name, seed, relation_steps):
        folder = tmp_path / name / f"seed{seed}"
        (folder / "interpret").mkdir(parents=True)
        acted = {"selected_epoch": 3, "relation": {"steps": relation_steps, "of": 12, "first_step": None, "first_epoch": None},
                 "contrastive": {"steps": 12, "of": 12, "first_step": 1, "first_epoch": 1}}
        (folder / "interpret" / "summary.json").write_text(json.dumps({"acted": acted}))
        return runs.Run(name, seed, folder, {}, None)

    spec = {"gce-no-relation": runs.Ablation("gce", ["gce.ablate=[relation]"]),
            "gce-no-contrastive": runs.Ablation("gce", ["gce.ablate=[contrastive]"])}
    ablated = {n: Group(n, [runs.Run(n, s, tmp_path, {}, None) for s in (0, 1)], None) for n in spec}
    full = Group("gce", [run("gce", 0, 0), run("gce", 1, 0), run("gce", 2, 5)], None)
    note = never_acted({"gce": full, **ablated}, spec)
    assert note.strip().splitlines() == ["- gce-no-relation: the relation loss never fired before the selected epoch in "
                                         "the full model (gce) in every run: this ablation measures seed noise."]
    ablated["gce-no-relation"].runs.append(runs.Run("gce-no-relation", 2, tmp_path, {}, None))  # seed 2: it fired
    note = never_acted({"gce": full, **ablated}, spec)
    assert "at seed 0, 1." in note and "seed noise" not in note


def test_an_unknown_model_in_evaluate_models_is_named_not_sent_to_dvc_repro(tmp_path):
    from pipeline.evaluation import runs
    from pipeline.errors import UserError

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params.assign(raw, "evaluate.models=[gce, gcee]")
    with pytest.raises(UserError) as caught:
        runs.base_run_dirs(raw, tmp_path)
    assert "evaluate.models: 'gcee' is not a model (params.yaml has no section of that name" in str(caught.value)
    assert "dvc repro" not in str(caught.value)
