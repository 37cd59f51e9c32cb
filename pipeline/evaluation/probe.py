"""The linear-probe baseline: ridge (regression) or logistic regression (classification) on the pooled
features of the available modalities, so every report shows whether the neural models earn their cost.

Features per segment, for each modality in `model.modalities` that the dataset has: the stored
pooled vector (text: the masked-mean token state) or the mean of the model-input steps
(visual, acoustic), zeros when the modality is missing, plus one presence flag per modality. All
inputs are already normalised with training-split statistics by `assemble`. The penalty is chosen on
the validation split (MAE, or log-loss for classification) and the probe refitted on train only:
the test split is touched once. Writes metrics.json and plots/test_predictions.csv in the same
format as a trained model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..training.dataset import AssembledData
from ..training.metrics import classification_metrics, regression_metrics, write_json
from ..params import gt, param, section

SELECT_SPLIT = "valid"  # the split the penalty is chosen on; metrics.json records it as `selection`


@section("probe")
@dataclass
class ProbeParams:
    alphas: list[float] = param([0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0], gt(0),
                                "ridge penalties tried (logistic regression: C = 1 / alpha); the best on validation is kept")


def pooled_features(data: AssembledData, rows: np.ndarray) -> np.ndarray:
    """(len(rows), sum of dims + n_modalities): per modality its pooled vector or mean step, then presence flags."""
    blocks, flags = [], []
    for m in data.modalities:
        lengths = data.seqs[m].lengths(rows)
        if m in data.pooled:
            vectors = np.asarray(data.pooled[m][rows], np.float32)
        else:
            vectors = np.stack([np.asarray(data.seqs[m][i], np.float32).mean(0) if n else
                                np.zeros(data.input_dims[m], np.float32) for i, n in zip(rows, lengths)])
        blocks.append(vectors * (lengths > 0)[:, None])
        flags.append((lengths > 0).astype(np.float32)[:, None])
    return np.concatenate(blocks + flags, axis=1)


def _fit(task: str, alpha: float, x: np.ndarray, y: np.ndarray):
    from sklearn.linear_model import LogisticRegression, Ridge

    if task == "classification":
        return LogisticRegression(C=1.0 / alpha, max_iter=2000).fit(x, y.astype(int))
    return Ridge(alpha=alpha).fit(x, y)


def _predict(task: str, model, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Scores, or (N, num_classes) log-probabilities (a class absent from train gets -30)."""
    if task != "classification":
        return model.predict(x)
    out = np.full((len(x), num_classes), -30.0)
    out[:, model.classes_] = model.predict_log_proba(x)
    return out


def _score(task: str, pred: np.ndarray, y: np.ndarray, num_classes: int, family: str) -> dict:
    if task == "classification":
        return classification_metrics(pred, y, num_classes)[0]
    return regression_metrics(pred, y, family)


def _select_loss(task: str, pred: np.ndarray, y: np.ndarray) -> float:
    if task == "classification":  # pred holds log-probabilities
        return float(-np.mean(pred[np.arange(len(y)), y.astype(int)]))
    return float(np.mean(np.abs(pred - y)))


def fit_probe(dataset_dir: str | Path, out_dir: str | Path, cfg: ProbeParams, modalities: list[str]) -> dict:
    """Fit on train, pick alpha on valid, test once; write metrics.json and plots/test_predictions.csv."""
    data = AssembledData(dataset_dir, modalities=modalities)
    rows = {s: data.split_rows(s) for s in ("train", "valid", "test")}
    x = {s: pooled_features(data, r) for s, r in rows.items()}
    y = {s: data.labels[r] for s, r in rows.items()}
    classes = data.meta.get("classes") or []
    fits = {a: _fit(data.task, a, x["train"], y["train"]) for a in cfg.alphas}
    losses = {a: _select_loss(data.task, _predict(data.task, f, x[SELECT_SPLIT], len(classes)), y[SELECT_SPLIT])
              for a, f in fits.items()}
    alpha = min(losses, key=losses.get)
    preds = {s: _predict(data.task, fits[alpha], x[s], len(classes)) for s in ("valid", "test")}
    family = data.conventions["metrics"]  # the preset's regression metrics (MOSI's or CH-SIMS's)
    result = {s: {k: None if v is None else round(v, 6) for k, v in _score(data.task, preds[s], y[s], len(classes),
                                                                           family).items()}
              for s in ("test", "valid")}
    result.update(alpha=alpha, valid_loss={str(a): round(v, 6) for a, v in losses.items()},
                  modalities=data.modalities, features=int(x["train"].shape[1]),
                  selection={"penalty": {"split": SELECT_SPLIT, "segments": len(rows[SELECT_SPLIT]),
                                         "criterion": "log-loss" if data.task == "classification" else "mae"}})
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    ids, labels = data.index["id"].to_numpy()[rows["test"]], y["test"]
    if data.task == "classification":
        table = {"id": ids, "label": [classes[int(v)] for v in labels], "pred": [classes[int(i)] for i in preds["test"].argmax(1)]}
        table.update({f"p_{c}": np.exp(preds["test"][:, i]).round(4) for i, c in enumerate(classes)})
    else:
        table = {"id": ids, "label": labels, "pred": preds["test"]}
    pd.DataFrame(table).to_csv(out / "plots" / "test_predictions.csv", index=False)
    return result
