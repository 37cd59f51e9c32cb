"""Dataset conventions as data: CH-SIMS metrics exactly as MMSA's SIMS evaluation (by hand), and the
preset's label range in prepare, training (metrics, plots, checkpoint) and predict."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import row, write_fake_features, write_labels
from pipeline.training import metrics
from pipeline.errors import ParamError
from pipeline.params import parse
from pipeline.data.prepare import DataParams, read

# --------------------------------------------------------------------------- CH-SIMS metrics by hand

# Predictions on the bin edges (ties), beyond [-1, 1] (clipped) and around zero labels.
PRED = [-0.7, -0.1, 0.0, 0.1, 0.7, 1.5, -2.0, 0.05, -0.05, 0.0]
TRUE = [-0.8, -0.2, 0.0, 0.2, 0.8, 1.0, -1.0, 0.0, 0.0, 0.1]
# A value v is in class i when edges[i] < v <= edges[i+1], after clipping to [-1, 1]:
#                 -0.7 -0.1  0.0  0.1  0.7  1.5 -2.0 0.05 -0.05 0.0      true: -0.8 -0.2 0 0.2 0.8 1 -1 0 0 0.1
ACC2_PRED = [0, 0, 0, 1, 1, 1, 0, 1, 0, 0]  # 0 is negative           ACC2_TRUE = 0 0 0 1 1 1 0 0 0 1
ACC3_PRED = [0, 0, 1, 1, 2, 2, 0, 1, 1, 1]  # -0.1 negative, 0.1 neutral  ACC3_TRUE = 0 0 1 2 2 2 0 1 1 1
ACC5_PRED = [0, 1, 2, 2, 3, 4, 0, 2, 2, 2]  # -0.7 -> 0, 0.7 -> 3    ACC5_TRUE = 0 1 2 3 4 4 0 2 2 2


def test_sims_bins_put_ties_on_the_lower_side():
    assert metrics.sims_bins(PRED, 2).tolist() == ACC2_PRED
    assert metrics.sims_bins(PRED, 3).tolist() == ACC3_PRED
    assert metrics.sims_bins(PRED, 5).tolist() == ACC5_PRED


def test_sims_metrics_by_hand():
    got = metrics.regression_metrics(PRED, TRUE, "sims")
    assert set(got) == {"mae", "corr", "acc2", "acc3", "acc5", "f1"}
    assert got["acc2"] == pytest.approx(8 / 10)   # rows 7 (0.05 vs 0) and 9 (0 vs 0.1) differ
    assert got["acc3"] == pytest.approx(9 / 10)   # row 3 (0.1 neutral vs 0.2 positive)
    assert got["acc5"] == pytest.approx(8 / 10)   # rows 3 and 4 (0.7 -> weakly positive vs 0.8 positive)
    # |clipped pred - true|: .1 .1 0 .1 .1 0 0 .05 .05 .1 (1.5 -> 1 and -2 -> -1 count as exact)
    assert got["mae"] == pytest.approx(0.6 / 10, abs=1e-6)
    # weighted F1 on Acc-2 classes: negative 6 rows, TP 5 FP 1 FN 1 -> 5/6; positive 4 rows, TP 3 FP 1 FN 1 -> 3/4
    assert got["f1"] == pytest.approx((6 * 5 / 6 + 4 * 3 / 4) / 10)
    clipped = np.clip(PRED, -1, 1)
    assert got["corr"] == pytest.approx(np.corrcoef(clipped, TRUE)[0, 1], abs=1e-6)


def test_sims_zero_labels_are_negative_and_undefined_corr_is_none():
    got = metrics.regression_metrics([0.0, 0.2, -0.3], [0.0, 0.0, 0.0], "sims")
    assert got["acc2"] == pytest.approx(2 / 3)     # 0.2 is the only positive reading
    assert got["acc3"] == pytest.approx(1 / 3) and got["acc5"] == pytest.approx(1 / 3)  # only 0.0 is neutral
    assert got["corr"] is None                      # constant labels: no made-up number
    # negative: support 3, TP 2, FN 1 -> P 1, R 2/3, F1 0.8; positive has no support (weight 0)
    assert got["f1"] == pytest.approx(0.8)


def test_sims_binning_compares_in_float32_as_mmsa_does():
    stored = float(np.float32(0.1))  # 0.10000000149..., a float32 prediction widened to float64
    assert stored > 0.1
    assert metrics.sims_bins([stored], 3).tolist() == [1]  # neutral, as MMSA's float32 tensors give
    assert metrics.sims_bins([stored], 5).tolist() == [2]


def test_families_read_scores_their_own_way():
    assert metrics.is_positive(0.0, "mosi") and not metrics.is_positive(0.0, "sims")
    classes, names = metrics.score_classes([0.95, -0.05], "sims")
    assert [names[c] for c in classes] == ["positive", "neutral"]
    classes, names = metrics.score_classes([2.6, -0.4], "mosi")
    assert [names[c] for c in classes] == ["strongly positive", "neutral"]
    with pytest.raises(ValueError, match="unknown metric family"):
        metrics.regression_metrics([0.0, 1.0], [0.0, 1.0], "meld")


# --------------------------------------------------------------------------- the label range in prepare

def test_prepare_checks_labels_against_the_preset(tmp_path):
    write_labels(tmp_path, [row(clip_id="1", label="0.8"), row(clip_id="2", label="2.0"),
                            row(clip_id="3", label="-1.0", mode="held_out")])
    kept = {p: read({"root": str(tmp_path), "preset": p}, progress=False) for p in ("mosi", "sims")}
    assert kept["mosi"][0]["clip_id"].tolist() == ["1", "2"]  # held_out is no split name of MOSI
    sims_manifest, sims_rejects, sims_meta = kept["sims"]
    assert dict(zip(sims_rejects["clip_id"], sims_rejects["reason"]))["2"] == "label 2 outside [-1, 1]"
    assert sims_meta["conventions"] == {"preset": "sims", "label_range": [-1.0, 1.0], "metrics": "sims",
                                        "splits": {"train": "train", "valid": "valid", "test": "test"}}
    custom = {"root": str(tmp_path), "preset": "custom",
              "custom": {"label_range": [-1, 5], "metrics": "sims", "splits": {"train": "train", "valid": "held_out", "test": "test"}}}
    manifest, rejects, meta = read(custom, progress=False)
    assert manifest.set_index("clip_id")["split"].to_dict() == {"1": "train", "2": "train", "3": "valid"}
    assert len(rejects) == 0 and meta["conventions"]["label_range"] == [-1.0, 5.0]


def test_custom_conventions_without_the_custom_preset_are_an_error():
    with pytest.raises(ParamError, match=r"data.custom: .* is not allowed \(read only when data.preset is custom\)"):
        parse(DataParams, {"preset": "sims", "custom": {"metrics": "sims"}}, "data")
    with pytest.raises(ParamError, match=r"data.custom.label_range: \[1.0, -1.0\] is not allowed"):
        parse(DataParams, {"preset": "custom", "custom": {"label_range": [1, -1]}}, "data")


@pytest.mark.parametrize("assignment, message", [
    ("data.preset=imdb", "data.preset: 'imdb' is not allowed (mosi | mosei | sims | custom)"),
    ("data.format=csv", "data.format: 'csv' is not allowed (raw | mmsa)"),
    ("data.custom.metrics=mosi7", "data.custom.metrics: 'mosi7' is not allowed (mosi | sims)")])
def test_a_bad_data_param_ends_prepare_with_one_line(tmp_path, monkeypatch, capsys, assignment, message):
    from test_contract import _project

    from pipeline.errors import guarded
    from stages import prepare

    monkeypatch.chdir(_project(tmp_path, assignment))
    assert guarded("prepare", prepare.main, "features/manifest.parquet", "features/rejects.csv") == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"prepare: {message}"]


# --------------------------------------------------------------------------- training, plots, predict

@pytest.fixture(scope="module")
def sims_model(tmp_path_factory):
    """text_only trained on a corpus whose manifest says CH-SIMS; records what the plots were given."""
    import pyarrow.parquet as pq

    from pipeline.training import plots
    from pipeline import presets
    from pipeline.training.dataset import assemble
    from pipeline.training.train import train_model

    root = write_fake_features(tmp_path_factory.mktemp("sims") / "features", n=40)
    table = pq.read_table(root / "manifest.parquet")
    manifest = table.to_pandas()
    manifest["label"] = (manifest["label"] / 3).round(1)
    meta = {"task": "regression", "classes": None, "conventions": presets.conventions("sims")}
    import pyarrow as pa

    pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False).replace_schema_metadata(
        {b"pipeline": json.dumps(meta).encode()}), root / "manifest.parquet")
    assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in ("text", "visual", "acoustic")}, root / "dataset")
    seen = {}
    scatter, confusion = plots.scatter, plots.confusion
    plots.scatter = lambda *a, **k: seen.update(scatter=a) or scatter(*a, **k)
    plots.confusion = lambda *a, **k: seen.update(confusion=a) or confusion(*a, **k)
    try:
        result = train_model("text_only", root / "dataset", root / "model", {"epochs": 1}, progress=False)
    finally:
        plots.scatter, plots.confusion = scatter, confusion
    return root / "model", result, seen


def test_training_uses_the_corpus_conventions(sims_model):
    model_dir, result, seen = sims_model
    assert set(result["test"]) == {"mae", "corr", "acc2", "acc3", "acc5", "f1"}
    assert list(seen["scatter"][4]) == [-1.0, 1.0]               # plot axes span the label range
    assert seen["confusion"][1] == metrics.FIVE_CLASS_NAMES      # CH-SIMS's 5 classes, not MOSI's 7
    ckpt = torch.load(model_dir / "model.pt", weights_only=True)
    assert ckpt["config"]["conventions"]["metrics"] == "sims"
    predictions = pd.read_csv(model_dir / "plots" / "test_predictions.csv")
    assert predictions["label"].abs().max() <= 1.0


@pytest.mark.parametrize("raw, score, score_class, binary", [(2.5, 1.0, "positive", "positive"),
                                                              (0.0, 0.0, "neutral", "negative"),
                                                              (-0.72, -0.72, "negative", "negative")])
def test_predict_clips_and_names_scores_by_the_checkpoint(sims_model, monkeypatch, raw, score, score_class, binary):
    from pipeline import predict

    model_dir, _, _ = sims_model
    monkeypatch.setattr(predict, "clip_inputs", lambda clips, ckpt, cache_root=None, progress=False: [({"text": np.zeros((1, 8))}, [])])
    monkeypatch.setattr(predict, "forward_many", lambda model, ckpt, segments: {"pred": torch.tensor([raw])})
    result = predict.predict_clip(None, "fine", model_dir)
    assert (result["score"], result["label"], result["binary"]) == (pytest.approx(score), score_class, binary)


def test_predict_refuses_a_model_trained_on_pickle_features(sims_model, tmp_path):
    from pipeline.predict import PredictError, predict_clip

    model_dir, _, _ = sims_model
    ckpt = torch.load(model_dir / "model.pt", weights_only=True)
    ckpt["config"]["encoders"]["text"] = {"id": "pickle:mmsa:text", "name": "text features of unaligned_39.pkl",
                                          "revision": "0" * 64, "source": "pickle"}
    torch.save(ckpt, tmp_path / "model.pt")
    with pytest.raises(PredictError, match="trained on text features read from a feature pickle"):
        predict_clip(None, "fine", tmp_path / "model.pt")
