"""Evaluation metrics with the definitions of the MMSA / GCE evaluation code.

Regression (MOSI convention, labels in [-3, 3]):
    mae, corr                 mean absolute error, Pearson correlation
    acc2_has0, f1_has0        binary: label >= 0 vs < 0, zero counted as positive
    acc2_non0, f1_non0        binary: label > 0 vs < 0 on segments whose label is not 0
    acc5, acc7                predictions and labels clipped to [-2, 2] / [-3, 3], then rounded
                              (numpy's round-half-to-even, as MMSA does), exact-class accuracy
F1 is scikit-learn's weighted F1. Metrics undefined on the given labels (Pearson with a
constant side, non0 metrics when every label is 0) are None, never a made-up number.

Classification: accuracy, macro_f1, weighted_f1, and the confusion matrix.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _class_acc(pred: np.ndarray, true: np.ndarray, bound: float) -> float:
    return float(np.mean(np.round(np.clip(pred, -bound, bound)) == np.round(np.clip(true, -bound, bound))))


def regression_metrics(pred, true) -> dict[str, float | None]:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    if len(pred) != len(true) or len(true) == 0:
        raise ValueError(f"need equally long, non-empty predictions and labels, got {len(pred)} and {len(true)}")
    out: dict[str, float | None] = {
        "mae": float(np.mean(np.abs(pred - true))),
        "corr": _pearson(pred, true),
        "acc2_has0": float(accuracy_score(true >= 0, pred >= 0)),
        "f1_has0": float(f1_score(true >= 0, pred >= 0, average="weighted", zero_division=0)),
    }
    non0 = true != 0
    if non0.any():
        out["acc2_non0"] = float(accuracy_score(true[non0] > 0, pred[non0] > 0))
        out["f1_non0"] = float(f1_score(true[non0] > 0, pred[non0] > 0, average="weighted", zero_division=0))
    else:
        out["acc2_non0"] = out["f1_non0"] = None
    out["acc5"] = _class_acc(pred, true, 2.0)
    out["acc7"] = _class_acc(pred, true, 3.0)
    return out


def classification_metrics(logits_or_pred, true, num_classes: int) -> tuple[dict[str, float], np.ndarray]:
    """(metrics, confusion matrix [true, pred]) from logits (N, C) or predicted class ids (N,)."""
    pred = np.asarray(logits_or_pred)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    true = np.asarray(true).astype(int).reshape(-1)
    labels = list(range(num_classes))
    metrics = {
        "accuracy": float(accuracy_score(true, pred)),
        "macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(true, pred, labels=labels, average="weighted", zero_division=0)),
    }
    return metrics, confusion_matrix(true, pred, labels=labels)


def seven_class(values) -> np.ndarray:
    """Scores -> the 7 MOSI classes -3..3 (clip, then round as acc7 does)."""
    return np.round(np.clip(np.asarray(values, dtype=np.float64), -3, 3)).astype(int)


SEVEN_CLASS_NAMES = ["strongly negative", "negative", "weakly negative", "neutral",
                     "weakly positive", "positive", "strongly positive"]
