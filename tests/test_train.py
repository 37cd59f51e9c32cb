"""Metrics, assembly and the training loop on small feature tables that follow the stage contract."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import yaml

from conftest import REPO, write_fake_features
from pipeline.training import train as train_mod
from pipeline.training.dataset import AssembledData, AssembleParams, assemble
from pipeline.training.metrics import classification_metrics, regression_metrics
from pipeline.training.train import NonFiniteLoss, load_checkpoint, predict_rows, train_model

MODS = ("text", "visual", "acoustic")
FAST = {"epochs": 4, "patience": 10, "batch_size": 16}


def test_regression_metrics_by_hand():
    pred = [1.0, -0.5, 0.2, -2.6]
    true = [0.8, 0.0, -1.0, -3.0]
    m = regression_metrics(pred, true)
    assert m["mae"] == pytest.approx((0.2 + 0.5 + 1.2 + 0.4) / 4)
    assert m["acc2_has0"] == pytest.approx(2 / 4)      # zero label counts as positive; -0.5 predicted negative
    assert m["f1_has0"] == pytest.approx(0.5)
    assert m["acc2_non0"] == pytest.approx(2 / 3)      # the zero label is left out
    assert m["acc7"] == pytest.approx(3 / 4)           # round(-0.5) == 0 (half to even), like MMSA
    assert m["acc5"] == pytest.approx(3 / 4)           # -2.6 and -3.0 both clip to -2
    assert m["corr"] == pytest.approx(np.corrcoef(pred, true)[0, 1])


def test_metrics_undefined_cases_are_none():
    m = regression_metrics([0.3, -0.2, 0.1], [0.0, 0.0, 0.0])
    assert m["acc2_non0"] is None and m["f1_non0"] is None and m["corr"] is None
    assert m["acc2_has0"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        regression_metrics([], [])


def test_classification_metrics_by_hand():
    logits = np.array([[2, 0, 0], [0, 2, 0], [0, 2, 0], [0, 0, 2]], float)
    metrics, matrix = classification_metrics(logits, [0, 1, 2, 2], 3)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    # per-class F1: 1, 2/3, 2/3 -> macro 7/9; weighted by support 1,1,2 -> (1 + 2/3 + 4/3) / 4
    assert metrics["macro_f1"] == pytest.approx(7 / 9)
    assert metrics["weighted_f1"] == pytest.approx(3 / 4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = write_fake_features(tmp_path_factory.mktemp("feat"), n=80, missing={"visual": [1, 2, 60]})
    assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in MODS}, root / "dataset",
             AssembleParams(max_steps={"acoustic": 3}))
    return root / "dataset"


def test_assemble_normalises_on_train_only_and_masks_missing(dataset):
    data = AssembledData(dataset)
    assert data.input_dims == {"text": 8, "visual": 6, "acoustic": 5}
    train = data.split_rows("train")
    seq = data.seqs["visual"]
    values = np.concatenate([seq.values[seq.offsets[i]:seq.offsets[i + 1]] for i in train]).astype(np.float64)
    assert np.abs(values.mean(0)).max() < 1e-2 and np.abs(values.std(0) - 1).max() < 1e-2
    assert data.seqs["acoustic"].lengths(np.arange(80)).max() <= 3      # max_steps pooling
    batch = data.batch(np.array([0, 1, 2]))
    assert batch["visual_mask"][1:].any().item() is False                 # rows 1, 2 have no visual
    assert batch["visual_mask"][0].any().item() is True
    assert batch["text"].shape[0] == 3 and batch["text"].dtype == torch.float32


@pytest.mark.parametrize("name", ["text_only", "late_fusion", "gexsent", "gce"])
def test_train_writes_outputs_and_round_trips(dataset, tmp_path, name):
    result = train_model(name, dataset, tmp_path / name, FAST, {}, progress=False)
    saved = json.loads((tmp_path / name / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert {"mae", "corr", "acc2_has0", "acc2_non0", "f1_has0", "f1_non0", "acc5", "acc7"} <= set(saved["test"])
    for png in ("loss.png", "scatter.png", "confusion.png"):
        assert (tmp_path / name / "plots" / png).stat().st_size > 1000
    assert (tmp_path / name / "interpret" / f"{name}.png").stat().st_size > 1000
    summary = json.loads((tmp_path / name / "interpret" / "summary.json").read_text())
    headline = json.loads((tmp_path / name / "interpret.json").read_text())  # what dvc metrics show lists
    assert 0 < len(pd.json_normalize(headline).columns) <= 6
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]  # what `dvc plots` reads for this model
    for entry in declared:
        path = entry if isinstance(entry, str) else next(iter(entry))
        if path.startswith(f"models/{name}/"):
            assert (tmp_path / name / path.split("/", 2)[2]).is_file(), path
    if name == "gexsent":
        table = json.loads((tmp_path / name / "interpret" / "expert_utilisation.json").read_text())
        for m in ("text", "visual", "acoustic"):
            assert sum(row[m] for row in table) == pytest.approx(1.0) and 0 < summary["expert_entropy"][m] <= 1
        shares = json.loads((tmp_path / name / "interpret" / "modality_shares.json").read_text())
        assert len(shares) == len(AssembledData(dataset).split_rows("test"))
        assert all(sum(row[m] for m in ("text", "visual", "acoustic")) == pytest.approx(1.0) for row in shares)
        assert sum(c["n"] for c in summary["modality_share_by_class"].values()) == len(shares)
    if name == "gce":
        guides = json.loads((tmp_path / name / "interpret" / "guides.json").read_text())
        assert [row["epoch"] for row in guides] == list(range(1, saved["epochs_run"] + 1))
        assert set(summary["relation_weight"]) == {f"{g}>{s}" for g in ("text_visual", "text_acoustic", "visual_acoustic")
                                                   for s in ("text_visual", "text_acoustic", "visual_acoustic") if g != s}
    if name in ("text_only", "late_fusion"):
        assert sum(summary["input_weight_share"].values()) == pytest.approx(1.0)
    model, ckpt = load_checkpoint(tmp_path / name / "model.pt")
    assert ckpt["config"]["epoch"] == saved["best_epoch"]
    data = AssembledData(dataset, modalities=["text"] if name == "text_only" else None)
    rows = data.split_rows("test")
    pred = predict_rows(model, data, rows, torch.device("cpu"), 64, False)
    assert np.mean(np.abs(pred - data.labels[rows])) == pytest.approx(saved["test"]["mae"], abs=1e-5)

    from pipeline.training.interpret import explain
    from pipeline.predict import forward

    lines = explain(name, model, forward(model, ckpt, data.segment(rows[0])).get("extras", {}))  # what --explain prints
    expected = {"gexsent": ["modality shares: text ", "top experts (text): #", "top experts (acoustic): #"],
                "gce": ["graders: text ", "guide pair (relation filter's most trusted): "]}
    for start in expected.get(name, ["input weight shares: text "]):
        assert any(line.startswith(start) for line in lines), (start, lines)


def test_training_is_deterministic_on_cpu(dataset, tmp_path):
    train_model("gexsent", dataset, tmp_path / "a", FAST, {}, progress=False)
    train_model("gexsent", dataset, tmp_path / "b", FAST, {}, progress=False)
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    train_model("gexsent", dataset, tmp_path / "c", {**FAST, "seed": 1}, {}, progress=False)
    assert (tmp_path / "a" / "metrics.json").read_bytes() != (tmp_path / "c" / "metrics.json").read_bytes()


def test_nan_loss_stops_and_keeps_the_good_checkpoint(dataset, tmp_path, monkeypatch):
    real_build = train_mod.build_model
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        model = real_build(*args, **kwargs)
        forward = model.forward

        def forward_nan_later(batch):
            out = forward(batch)
            if model.training:
                calls["n"] += 1
                if calls["n"] > 5:  # 3 batches per epoch: epoch 2, batch 3
                    out = {**out, "pred": out["pred"] * float("nan")}
            return out
        model.forward = forward_nan_later
        return model

    monkeypatch.setattr(train_mod, "build_model", poisoned)
    with pytest.raises(NonFiniteLoss, match="epoch 2, batch 3") as stopped:
        train_model("text_only", dataset, tmp_path / "m", FAST, {}, progress=False)
    assert "non-finite loss (nan)" in str(stopped.value)
    assert f"{tmp_path / 'm' / 'model.pt'} holds this run's best checkpoint (epoch 1" in str(stopped.value)
    ckpt = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert ckpt["config"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "m" / "metrics.json").exists()


def test_classification_task(tmp_path):
    root = write_fake_features(tmp_path / "feat", n=60, task="classification")
    assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in MODS}, root / "dataset")
    result = train_model("gce", root / "dataset", tmp_path / "gce", FAST, {}, progress=False)
    assert set(result["test"]) == {"accuracy", "macro_f1", "weighted_f1"}
    assert (tmp_path / "gce" / "plots" / "confusion.png").exists()
    written = pd.read_csv(tmp_path / "gce" / "plots" / "test_predictions.csv")   # class names, rounded probabilities
    names = ["negative", "neutral", "positive"]
    assert set(written["label"]) <= set(names) and set(written["pred"]) <= set(names)
    probs = written[[f"p_{c}" for c in names]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=2e-4) and (probs.round(4) == probs).all()
    assert (written["pred"] == [names[i] for i in probs.argmax(1)]).all()


def test_transcript_only_dataset_trains_on_text(tmp_path, capsys):
    root = write_fake_features(tmp_path / "feat", n=40, dims={"text": 8})
    meta = assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in MODS}, root / "dataset")
    assert set(meta["skipped"]) == {"visual", "acoustic"}
    result = train_model("gce", root / "dataset", tmp_path / "gce", FAST, {}, progress=False)
    assert result["test"]["mae"] is not None
    assert "training on text only; GCE runs its unimodal path" in capsys.readouterr().out


def poison(monkeypatch, change):
    """Build models whose output or gradients `change(model, out, calls)` alters; returns the call counter."""
    real_build, calls = train_mod.build_model, {"n": 0}

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        forward = model.forward

        def poisoned(batch):
            calls["n"] += model.training
            return change(model, forward(batch), calls)
        model.forward = poisoned
        return model
    monkeypatch.setattr(train_mod, "build_model", build)
    return calls


def test_nan_before_any_checkpoint_names_dvc_checkout(dataset, tmp_path, monkeypatch):
    """Under `dvc repro` the stage's outputs are gone before it runs: the message says so, and names the
    command that restores the model dvc.lock recorded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train@text_only": {
        "outs": [{"path": "models/text_only/model.pt", "md5": "0" * 32, "size": 1}]}}}))
    poison(monkeypatch, lambda model, out, calls: {**out, "pred": out["pred"] * float("nan")} if model.training else out)
    with pytest.raises(NonFiniteLoss, match="non-finite loss") as stopped:
        train_model("text_only", dataset, "models/text_only", FAST, {}, progress=False)
    message = str(stopped.value)
    assert "No checkpoint is on disk: this run wrote none" in message
    assert "`dvc checkout models/text_only/model.pt` restores it" in message
    assert not (tmp_path / "models" / "text_only" / "model.pt").exists()


def test_an_infinite_gradient_with_a_finite_loss_is_named_as_such(dataset, tmp_path, monkeypatch):
    def blow_up_gradients(model, out, calls):
        if calls["n"] == 2:
            out["pred"].register_hook(lambda grad: grad * float("inf"))
        return out
    poison(monkeypatch, blow_up_gradients)
    with pytest.raises(NonFiniteLoss, match=r"non-finite gradient norm \((inf|nan)\) with a finite loss") as stopped:
        train_model("text_only", dataset, tmp_path / "m", FAST, {}, progress=False)
    assert "epoch 1, batch 2" in str(stopped.value) and "dvc.lock records no earlier" in str(stopped.value)


def test_validation_that_is_never_finite_fails_clearly(dataset, tmp_path, monkeypatch, capsys):
    from pipeline.errors import guarded
    from stages import train as stage

    poison(monkeypatch, lambda model, out, calls: out if model.training else {**out, "pred": out["pred"] * float("nan")})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {**FAST, "patience": 2}}))
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "dataset").symlink_to(dataset)
    assert guarded("train", stage.main, "text_only", "features/dataset", "models/text_only") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train: text_only: validation loss was never finite (2 epochs, epoch 1: nan)")
    assert not (tmp_path / "models" / "text_only" / "model.pt").exists()


def test_thread_count_is_a_param(dataset, tmp_path):
    """model.threads decides the CPU thread count, whatever the process had (CPU results depend on it)."""
    torch.set_num_threads(2)
    train_model("text_only", dataset, tmp_path / "a", {**FAST, "epochs": 1}, {}, progress=False)
    assert torch.get_num_threads() == 1  # the default
    train_model("text_only", dataset, tmp_path / "b", {**FAST, "epochs": 1, "threads": 2}, {}, progress=False)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- recipes
TINY_GEXSENT = {"variant": "reference", "d_model": 8, "n_heads": 2, "n_experts": 4, "lstm_dim": 8, "dropout": 0.0}
TINY_GCE = {"visual_d_model": 8, "acoustic_d_model": 8, "encoder_layers": 1, "encoder_heads": 2, "encoder_ff_dim": 16,
            "utterance_dim": 8, "pair_dim": 8, "fusion_dim": 16, "head_hidden": 16, "relation_dim": 8,
            "contrastive_dim": 8, "dropout": 0.0}


def test_published_recipes_are_the_published_codes(dataset):
    """The values of GExSENT-MOE's main.py / config.py and GCEforMSA's config.py, typed here from the sources."""
    cfg = train_mod.parse(train_mod.TrainParams, FAST)
    gexsent = train_mod.setup("gexsent", dataset, cfg, {**TINY_GEXSENT, "recipe": "published"})
    assert type(gexsent.optimizer) is torch.optim.AdamW and gexsent.loader.batch_size == 4
    assert gexsent.optimizer.param_groups[0]["lr"] == 1e-4 and gexsent.optimizer.defaults["weight_decay"] == 0.01
    plateau = gexsent.schedule.scheduler
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau) and (plateau.patience, plateau.factor) == (1, 0.4)
    assert (gexsent.recipe.epochs, gexsent.recipe.patience, gexsent.recipe.grad_clip, gexsent.recipe.loss) == (
        10, 0, 0.0, "sentiment3")
    assert gexsent.data.modalities == ["text", "visual"]  # the published model reads no audio

    gce = train_mod.setup("gce", dataset, cfg, {**TINY_GCE, "variant": "reference", "recipe": "published"})
    assert type(gce.optimizer) is torch.optim.Adam and gce.loader.batch_size == 128
    assert gce.optimizer.param_groups[0]["lr"] == 1e-4 and gce.optimizer.defaults["weight_decay"] == 1e-4
    assert (gce.recipe.lr_text, gce.recipe.epochs, gce.recipe.grad_clip, gce.recipe.plateau_patience) == (5e-5, 40, 1.0, 20)
    assert len(gce.clip_groups) == 1  # assumed as MMIM's solver: one norm over every parameter

    ours = train_mod.setup("gce", dataset, cfg, TINY_GCE)
    assert type(ours.optimizer) is torch.optim.AdamW and ours.loader.batch_size == 16 and ours.schedule.per_batch


def test_three_class_recipe_scores_a_regression_corpus_by_the_expected_value(dataset, tmp_path):
    """GEXSent's published loss on scores: 3 classes from the sign, the score the expected value over the classes'
    mean training labels (recomputed here from the labels and the saved logits)."""
    result = train_model("gexsent", dataset, tmp_path / "m", FAST, {**TINY_GEXSENT, "recipe": "published"}, progress=False)
    assert result["epochs_run"] == 10  # no early stopping
    model, ckpt = load_checkpoint(tmp_path / "m")
    data = AssembledData(dataset, modalities=["text", "visual"])
    train_labels, rows = data.labels[data.split_rows("train")], data.split_rows("test")
    centers = [train_labels[train_labels < 0].mean(), 0.0, train_labels[train_labels > 0].mean()]
    logits = predict_rows(model, data, rows, torch.device("cpu"), 64, False, output="class_logits")
    assert logits.shape == (len(rows), 3)
    expected = torch.softmax(torch.from_numpy(logits).double(), -1).numpy() @ np.array(centers)
    written = pd.read_csv(tmp_path / "m" / "plots" / "test_predictions.csv")
    np.testing.assert_allclose(written["pred"], expected, atol=1e-5)
    assert result["test"]["mae"] == pytest.approx(np.mean(np.abs(expected - data.labels[rows])), abs=1e-5)
    assert ckpt["config"]["recipe"]["loss"] == "sentiment3"


def test_clipping_apart_keeps_the_graders_out_of_the_predictors_step():
    """GCE's graders train on detached inputs: clipped apart (ours), the prediction path's clipped gradient is the
    same whatever the graders' loss weight; clipped in one norm (`all`), it is not."""
    from conftest import REPO  # noqa: F401  (tests run from the repository's test folder)
    from pipeline.models import build_model

    torch.manual_seed(0)
    batch = {m: torch.randn(12, 4, 6) for m in MODS}
    batch.update({f"{m}_mask": torch.ones(12, 4, dtype=torch.bool) for m in MODS}, label=torch.randn(12))
    grads = {}
    for how in ("branches", "all"):
        for weight in (1.0, 1000.0):
            torch.manual_seed(0)
            model = build_model("gce", {m: 6 for m in MODS}, "regression", 1, {**TINY_GCE, "grader_weight": weight}).train()
            out = model(batch)
            (train_mod.task_loss(out["pred"], batch["label"], "regression") + sum(out["aux"].values())).backward()
            train_mod.clip_gradients(train_mod._clip_groups(model, how), 0.1)
            detached = {id(p) for branch in model.detached_branches() for p in branch.parameters()}
            grads[how, weight] = [p.grad.clone() for p in model.parameters() if id(p) not in detached and p.grad is not None]
    for a, b in zip(grads["branches", 1.0], grads["branches", 1000.0]):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(grads["all", 1.0], grads["all", 1000.0]))


def test_a_batch_the_ranks_cannot_share_stops_with_one_line(dataset, tmp_path, monkeypatch, capsys):
    from pipeline.errors import ParamError, guarded
    from stages import train as stage

    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before any process group is joined
    with pytest.raises(ParamError, match=r"^gexsent\.recipe: published trains with a global batch of 4, which 3 ranks"):
        train_model("gexsent", dataset, tmp_path / "g", FAST, {**TINY_GEXSENT, "recipe": "published"}, progress=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": FAST}))
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "dataset").symlink_to(dataset)
    assert guarded("train", stage.main, "text_only", "features/dataset", "models/text_only") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train: model.batch_size: 16 is not allowed (a multiple of the 3 ranks: each rank takes an equal "
                   "share of the global batch)"]


@pytest.mark.parametrize("ratio,fires", [(1e-6, False), (10.0, True)])
def test_gce_records_when_its_components_acted_before_the_selected_epoch(dataset, tmp_path, ratio, fires):
    result = train_model("gce", dataset, tmp_path / "m", FAST, {**TINY_GCE, "grading_ratio": ratio}, progress=False)
    acted = json.loads((tmp_path / "m" / "interpret" / "summary.json").read_text())["acted"]
    steps = result["best_epoch"] * -(-len(AssembledData(dataset).split_rows("train")) // FAST["batch_size"])
    assert acted["selected_epoch"] == result["best_epoch"]
    for component in ("relation", "grading"):  # a guide teaches only where it is clearly better (ratio x error)
        assert acted[component] == ({"steps": steps, "of": steps, "first_step": 1, "first_epoch": 1} if fires else
                                    {"steps": 0, "of": steps, "first_step": None, "first_epoch": None})
    assert acted["graders"]["steps"] == acted["contrastive"]["steps"] == steps
    headline = json.loads((tmp_path / "m" / "interpret.json").read_text())
    assert headline["relation_steps_to_selection"] == acted["relation"]["steps"]


# --------------------------------------------------------------------------- nothing non-finite, nothing undefined

def _poison(root, modality: str, rows: list[int], value=np.nan) -> None:
    """Write `value` into the sequences of the given manifest rows of a feature table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / f"{modality}.parquet"
    table = pq.read_table(path)
    manifest = pd.read_parquet(root / "manifest.parquet")
    targets = set(manifest["id"].iloc[rows])
    seq = table.column("emb" if modality == "visual" else "feats").to_pylist()
    for i, id_ in enumerate(table.column("id").to_pylist()):
        if id_ in targets:
            seq[i][len(seq[i]) // 2] = value
    name = "emb" if modality == "visual" else "feats"
    table = table.set_column(table.column_names.index(name), name, pa.array(seq, pa.list_(pa.float32())))
    pq.write_table(table, path)


def test_segments_with_non_finite_features_are_rejected_with_their_reason(tmp_path, capsys, monkeypatch):
    from pipeline import schema
    from pipeline.errors import guarded
    from stages.assemble import main as assemble_main

    root = write_fake_features(tmp_path / "features", n=40)
    manifest = pd.read_parquet(root / "manifest.parquet")
    _poison(root, "acoustic", [0, 1, 35])                     # two train clips, one test clip
    _poison(root, "visual", [36], np.inf)
    assert schema.get("acoustic").sequence == "feats" and schema.get("visual").sequence == "emb"
    bad = set(manifest["id"].iloc[[0, 1, 35, 36]])
    meta = assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in MODS}, tmp_path / "dataset")
    assert {r["id"]: r["reason"] for r in meta["rejected"]} == {
        **{i: "acoustic features hold 1 NaN/inf values" for i in bad - {manifest["id"].iloc[36]}},
        manifest["id"].iloc[36]: "visual features hold 1 NaN/inf values"}
    data = AssembledData(tmp_path / "dataset")
    assert set(data.index["id"]) == set(manifest["id"]) - bad and meta["segments"] == 36
    assert all(np.isfinite(v).all() for v in data.norm.values())                 # statistics without them
    for m in MODS:
        assert np.isfinite(np.asarray(data.seqs[m].values, np.float32)).all()
    # or the stage stops, in one line naming them
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"assemble": {"non_finite": "stop"}}))
    monkeypatch.chdir(tmp_path)
    assert guarded("assemble", assemble_main, str(root / "manifest.parquet"), str(root), str(tmp_path / "d2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("assemble: 4 segment(s) have non-finite features (") and \
        all(i in err[0] for i in bad), err


@pytest.mark.parametrize("case", ["constant train labels", "an empty valid split"])
def test_assemble_stops_in_one_line_on_data_with_nothing_to_learn_or_select_on(tmp_path, case):
    from pipeline.errors import UserError

    root = write_fake_features(tmp_path / "features", n=40)
    manifest = pd.read_parquet(root / "manifest.parquet")
    if case == "constant train labels":
        manifest.loc[manifest["split"] == "train", "label"] = 0.1 + 0.2  # std 1e-17, not 0
        match = r"every train label is 0.3: nothing to learn"
    else:
        manifest = manifest[manifest["split"] != "valid"]
        match = r"the valid split has no segments \(train/valid/test: 20/0/10\)"
    import pyarrow as pa
    import pyarrow.parquet as pq
    meta = pq.read_schema(root / "manifest.parquet").metadata
    pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False).replace_schema_metadata(meta),
                   root / "manifest.parquet")
    with pytest.raises(UserError, match=match):
        assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in MODS}, tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists() and not (tmp_path / "dataset.tmp").exists()


def test_corr_of_labels_constant_up_to_rounding_is_null_with_one_warning(capsys, monkeypatch):
    from pipeline.training import metrics

    monkeypatch.setattr(metrics, "_warned", set())  # once per process: earlier tests may have warned already
    labels = np.array([0.1 + 0.2] * 5 + [0.3] * 5)  # equal as numbers, not as floats: std 5e-17
    assert np.std(labels) > 0
    assert regression_metrics(np.linspace(-1, 1, 10), labels)["corr"] is None
    assert regression_metrics(np.full(10, 0.5) + 1e-9 * np.arange(10), np.linspace(-1, 1, 10))["corr"] is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: corr is null: the labels are constant", "warning: corr is null: the predictions are constant"]
    assert regression_metrics(np.linspace(-1, 1, 10) ** 3, np.linspace(-1, 1, 10))["corr"] > 0.9


def test_metrics_files_are_strict_json_with_null_for_nan(tmp_path):
    from pipeline.training.metrics import write_json

    result = {"test": regression_metrics([np.nan, 0.1, 0.2], [0.0, 0.5, 1.0]), "valid": {"mae": float("inf")},
              "best_epoch": 3}
    write_json(tmp_path / "metrics.json", result)
    text = (tmp_path / "metrics.json").read_text()
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert loaded["test"]["mae"] is None and loaded["valid"]["mae"] is None and loaded["best_epoch"] == 3
    assert "NaN" not in text and "Infinity" not in text and list(tmp_path.iterdir()) == [tmp_path / "metrics.json"]
