"""Evaluation metrics with the definitions of the MMSA / GCE evaluation code.

Regression metrics come in two families (`data.preset` picks one, pipeline/presets.py).

`mosi` (CMU-MOSI and CMU-MOSEI, labels in [-3, 3]):
    mae, corr                 mean absolute error, Pearson correlation
    acc2_has0, f1_has0        binary: label >= 0 vs < 0, zero counted as positive
    acc2_non0, f1_non0        binary: label > 0 vs < 0 on segments whose label is not 0
    acc5, acc7                predictions and labels clipped to [-2, 2] / [-3, 3], then rounded
                              (numpy's round-half-to-even, as MMSA does), exact-class accuracy

`sims` (CH-SIMS, labels in [-1, 1]; MMSA's `__eval_sims_regression`): predictions and labels are
first clipped to [-1, 1] (MAE and Corr too), then binned, a value v in class i when
edges[i] < v <= edges[i+1]:
    acc2, f1                  edges -1.01, 0, 1.01: 0 counts as negative
    acc3                      edges -1.01, -0.1, 0.1, 1.01
    acc5                      edges -1.01, -0.7, -0.1, 0.1, 0.7, 1.01
Binning compares in float32 as MMSA does (its tensors are float32): a prediction of 0.1
stored as float32 is neutral there, and would be positive if widened to float64 first.

F1 is scikit-learn's weighted F1. Metrics undefined on the given labels (Pearson with a
constant side, non0 metrics when every label is 0) are None, never a made-up number. "Constant"
allows for rounding: a side whose spread is below CONSTANT_TOL of its magnitude (labels stored
as 0.6 everywhere have a float std of 1e-16, not 0); a one-line warning says which side it was.
Non-finite predictions make every metric None (training stops on them itself). `write_json`
writes a metrics file as strict JSON: a NaN or infinity that reached it becomes null.

Classification: accuracy, macro_f1, weighted_f1, and the confusion matrix.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

# scikit-learn is imported where a metric needs it: `predict` names scores with this module and
# should not pay for importing it (~3 s)

CONSTANT_TOL = 1e-6   # a spread below this fraction of the values' magnitude (at least 1) counts as constant
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """One line on stderr, once per process per message (metrics are computed every epoch and in bootstraps)."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def is_constant(values: np.ndarray) -> bool:
    values = np.asarray(values, np.float64)
    return len(values) == 0 or np.ptp(values) <= CONSTANT_TOL * max(1.0, float(np.abs(values).max()))


def _pearson(pred: np.ndarray, true: np.ndarray) -> float | None:
    """Pearson's r, or None (with a warning) where it is undefined: fewer than 2 values, or a constant side."""
    side = "labels" if is_constant(true) else "predictions" if is_constant(pred) else None
    if len(pred) < 2 or side:
        warn_once(f"corr is null: the {side or 'values'} are constant" if side else "corr is null: fewer than 2 values")
        return None
    r = float(np.corrcoef(pred, true)[0, 1])
    return r if math.isfinite(r) else None


def finite(obj):
    """obj with every float NaN or infinity (in nested dicts and lists) replaced by None."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path: str | os.PathLike, result: dict) -> None:
    """A metrics file as strict JSON (`dvc metrics` and every JSON reader accept it: NaN -> null), through a
    temp file renamed into place; on failure (a full disk) the temp file goes and the error names `path`."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    text = json.dumps(finite(result), indent=2, allow_nan=False) + "\n"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno and err.filename in (None, tmp):
            raise type(err)(err.errno, err.strerror, path) from None
        raise


def _class_acc(pred: np.ndarray, true: np.ndarray, bound: float) -> float:
    return float(np.mean(np.round(np.clip(pred, -bound, bound)) == np.round(np.clip(true, -bound, bound))))


def _checked(pred, true, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=dtype).reshape(-1)
    true = np.asarray(true, dtype=dtype).reshape(-1)
    if len(pred) != len(true) or len(true) == 0:
        raise ValueError(f"need equally long, non-empty predictions and labels, got {len(pred)} and {len(true)}")
    return pred, true


def _not_finite(pred: np.ndarray, names) -> dict | None:
    """Every metric None when some predictions are NaN or infinite: no number is made up (training says why:
    a non-finite loss or validation score stops it)."""
    return dict.fromkeys(names) if not np.isfinite(pred).all() else None


def regression_metrics(pred, true, family: str = "mosi") -> dict[str, float | None]:
    """The metrics of `family` ("mosi" or "sims", see the module docstring)."""
    from sklearn.metrics import accuracy_score, f1_score

    if family == "sims":
        return sims_metrics(pred, true)
    if family != "mosi":
        raise ValueError(f"unknown metric family {family!r} (mosi | sims)")
    pred, true = _checked(pred, true)
    if (none := _not_finite(pred, MOSI_KEYS)) is not None:
        return none
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


MOSI_KEYS = ("mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7")
SIMS_KEYS = ("mae", "corr", "acc2", "acc3", "acc5", "f1")
SIMS_EDGES = {2: (-1.01, 0.0, 1.01), 3: (-1.01, -0.1, 0.1, 1.01), 5: (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01)}


def sims_bins(values, classes: int) -> np.ndarray:
    """Class index of each value (clipped to [-1, 1]): i where edges[i] < v <= edges[i+1], in float32."""
    values = np.clip(np.asarray(values, np.float32).reshape(-1), np.float32(-1), np.float32(1))
    edges = np.asarray(SIMS_EDGES[classes], np.float32)
    return np.searchsorted(edges, values, side="left") - 1  # v == edges[i] lands in class i - 1


def sims_metrics(pred, true) -> dict[str, float | None]:
    from sklearn.metrics import f1_score

    pred32, true32 = _checked(pred, true, np.float32)
    if (none := _not_finite(pred32, SIMS_KEYS)) is not None:
        return none
    clipped_pred = np.clip(pred32, -1, 1).astype(np.float64)
    clipped_true = np.clip(true32, -1, 1).astype(np.float64)
    out: dict[str, float | None] = {
        "mae": float(np.mean(np.abs(clipped_pred - clipped_true))),
        "corr": _pearson(clipped_pred, clipped_true),
    }
    for classes in (2, 3, 5):
        out[f"acc{classes}"] = float(np.mean(sims_bins(pred32, classes) == sims_bins(true32, classes)))
    out["f1"] = float(f1_score(sims_bins(true32, 2), sims_bins(pred32, 2), average="weighted", zero_division=0))
    return out


def classification_metrics(logits_or_pred, true, num_classes: int) -> tuple[dict[str, float], np.ndarray]:
    """(metrics, confusion matrix [true, pred]) from logits (N, C) or predicted class ids (N,)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

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
FIVE_CLASS_NAMES = ["negative", "weakly negative", "neutral", "weakly positive", "positive"]


def score_classes(values, family: str = "mosi") -> tuple[np.ndarray, list[str]]:
    """Scores -> (the family's finest class of each, the class names): MOSI's 7 or CH-SIMS's 5."""
    if family == "sims":
        return sims_bins(values, 5), FIVE_CLASS_NAMES
    return seven_class(values) + 3, SEVEN_CLASS_NAMES


def is_positive(score: float, family: str = "mosi") -> bool:
    """The family's binary reading: MOSI counts 0 as positive (has0), CH-SIMS as negative."""
    return bool(sims_bins([score], 2)[0] == 1) if family == "sims" else score >= 0
