"""Statistics over runs: mean ± std and a 95% confidence interval across seeds, paired comparisons
of models on the same test segments, and the area under a robustness curve.

* `summarize(values)`: mean, sample std (ddof 1) and the Student-t 95% interval of the mean over
  seeds, `mean ± t(0.975, n-1) * std / sqrt(n)`; std and interval are None for a single value.
* `sign_test(a, b)`: per-seed wins of a over b (ties dropped), exact two-sided binomial p-value.
  With 5 seeds the smallest possible p is 2/32 = 0.0625: it says "a won every seed", it cannot
  reach 0.05 alone — the paired bootstrap is the test the report's marks use.
* `bootstrap_replicates` + `compare`: a paired bootstrap over test predictions. Each replicate
  draws the test segments with replacement (the same draw for every model: the pairing) and, per
  model, its seeds with replacement; a model's replicate value is its metric averaged over the
  drawn seeds. The difference of two models' replicate values gives a percentile 95% interval and
  a two-sided p-value `2 * min(k(d <= 0) + 1, k(d >= 0) + 1) / (B + 1)` over B replicates (the
  add-one estimate: never 0, so a correction can multiply it), so both test-set sampling and
  seed-to-seed variance are in it. One seed (or a deterministic baseline) reduces it to the plain
  paired bootstrap over segments. The caller passes only the seeds both models ran and the
  segments both scored (pipeline/evaluation/report.py pairs them).
* `holm(p)`: Holm-Bonferroni adjusted p-values of one family of tests (a table): reject where the
  adjusted p < alpha, and the chance of any false "better" in the family stays below alpha
  whatever the dependence between the tests.
* `auc(levels, values)`: trapezoid area under a metric-vs-rate curve divided by the span of the
  rates, so a curve that stays at its clean value c scores c whatever the rates (0..0.9 by default).

Bottom layer: numpy and the standard library only.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

LOWER_IS_BETTER = {"mae", "loss"}
PRIMARY = {"regression": "mae", "classification": "weighted_f1"}  # the metric pairwise tests and plots use


def better(metric: str, a: float, b: float) -> bool:
    """Whether value a of `metric` is strictly better than b."""
    return a < b if metric in LOWER_IS_BETTER else a > b


def _t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t  # scipy comes with scikit-learn

    return float(t.ppf(p, dof))


def summarize(values, confidence: float = 0.95) -> dict:
    """{mean, std, n, ci: [low, high]} of per-seed values (None entries are skipped)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "ci": None}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "std": None, "n": 1, "ci": None}
    std = float(x.std(ddof=1))
    half = _t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci": [mean - half, mean + half]}


def sign_test(a, b, metric: str) -> dict:
    """Per-seed wins of a over b on `metric` (b may hold one value, compared with every a), exact two-sided p."""
    a = np.asarray(a, np.float64)
    b = np.broadcast_to(np.asarray(b, np.float64), a.shape)
    wins = int(sum(better(metric, x, y) for x, y in zip(a, b)))
    losses = int(sum(better(metric, y, x) for x, y in zip(a, b)))
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n if n else 1.0
    return {"wins": wins, "losses": losses, "ties": len(a) - n, "p": min(1.0, 2 * tail)}


def bootstrap_replicates(preds: dict[str, np.ndarray], labels: np.ndarray,
                         metric: Callable[[np.ndarray, np.ndarray], dict], n_boot: int, seed: int = 0) -> dict:
    """Per model, (n_boot,) replicate values of every metric: {model: {metric: array}}.

    preds[model] is (seeds, N): one row of test predictions (scores or class ids) per seed, on the same N
    test segments. metric(pred, true) takes (n_boot, N) arrays and returns {name: (n_boot,) array}, NaN
    where undefined (`batched_metrics`)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    rows = rng.integers(0, len(labels), (n_boot, len(labels)))  # shared by every model: the pairing
    out = {}
    for model, p in preds.items():
        p = np.asarray(p)
        per_seed = [metric(p[s][rows], labels[rows]) for s in range(len(p))]
        drawn = rng.integers(0, len(p), (n_boot, len(p)))     # each model's seeds, with replacement
        out[model] = {k: np.take_along_axis(np.stack([d[k] for d in per_seed], 1), drawn, 1).mean(1)
                      for k in per_seed[0]}
    return out


def _weighted_binary_f1(true: np.ndarray, pred: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Row-wise scikit-learn weighted F1 of boolean labels (zero_division=0), counting only `valid` entries."""
    total, score = valid.sum(1), 0.0
    for cls in (True, False):
        t, p = (true == cls) & valid, (pred == cls) & valid
        tp, support, predicted = (t & p).sum(1), t.sum(1), p.sum(1)
        f1 = np.where(support + predicted > 0, 2 * tp / np.maximum(support + predicted, 1), 0.0)
        score = score + f1 * support
    return np.where(total > 0, score / np.maximum(total, 1), np.nan)


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    den = np.sqrt((a ** 2).sum(1) * (b ** 2).sum(1))
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), np.nan)


def batched_metrics(task: str, num_classes: int = 0, family: str = "mosi") -> Callable[[np.ndarray, np.ndarray], dict]:
    """metrics.py's definitions (regression: the preset's metric family, mosi or sims), row-wise over
    (n_boot, N) arrays (tests check they agree), so a bootstrap of thousands of replicates takes
    seconds rather than minutes."""
    def regression(pred, true):
        non0 = true != 0
        out = {"mae": np.abs(pred - true).mean(1), "corr": _rowwise_pearson(pred, true),
               "acc2_has0": ((pred >= 0) == (true >= 0)).mean(1),
               "f1_has0": _weighted_binary_f1(true >= 0, pred >= 0, np.ones_like(non0)),
               "acc2_non0": np.where(non0.any(1), (((pred > 0) == (true > 0)) & non0).sum(1) / np.maximum(non0.sum(1), 1), np.nan),
               "f1_non0": _weighted_binary_f1(true > 0, pred > 0, non0)}
        for name, bound in (("acc5", 2.0), ("acc7", 3.0)):
            out[name] = (np.round(np.clip(pred, -bound, bound)) == np.round(np.clip(true, -bound, bound))).mean(1)
        return out

    def sims(pred, true):
        from ..training.metrics import sims_bins

        def bins(x, classes):
            return sims_bins(x, classes).reshape(x.shape)

        # as metrics.sims_metrics: float32 values (MMSA's), clipped to [-1, 1], then float64 sums
        p, t = (np.clip(np.asarray(x, np.float32), -1, 1).astype(np.float64) for x in (pred, true))
        out = {"mae": np.abs(p - t).mean(1), "corr": _rowwise_pearson(p, t)}
        for classes in (2, 3, 5):
            out[f"acc{classes}"] = (bins(pred, classes) == bins(true, classes)).mean(1)
        out["f1"] = _weighted_binary_f1(bins(true, 2) == 1, bins(pred, 2) == 1, np.ones(true.shape, bool))
        return out

    def classification(pred, true):
        f1, support = [], []
        for c in range(num_classes):
            t, p = true == c, pred == c
            tp, n_true, n_pred = (t & p).sum(1), t.sum(1), p.sum(1)
            f1.append(np.where(n_true + n_pred > 0, 2 * tp / np.maximum(n_true + n_pred, 1), 0.0))
            support.append(n_true)
        f1, support = np.stack(f1, 1), np.stack(support, 1)
        return {"accuracy": (pred == true).mean(1), "macro_f1": f1.mean(1),
                "weighted_f1": (f1 * support).sum(1) / np.maximum(support.sum(1), 1)}

    return classification if task == "classification" else sims if family == "sims" else regression


def compare(observed_a: float, observed_b: float, boot_a: np.ndarray, boot_b: np.ndarray, metric: str,
            alpha: float = 0.05) -> dict:
    """Paired difference a - b: observed value, 95% percentile interval, two-sided p, and which is better."""
    d = np.asarray(boot_a) - np.asarray(boot_b)
    d = d[np.isfinite(d)]
    diff = observed_a - observed_b
    if len(d) == 0:
        return {"diff": diff, "ci": None, "p": None, "significant": False, "better": None}
    tail = min(int(np.sum(d <= 0)), int(np.sum(d >= 0)))
    p = min(1.0, 2 * (tail + 1) / (len(d) + 1))
    low, high = np.percentile(d, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"diff": diff, "ci": [float(low), float(high)], "p": p, **decide(diff, p, metric, alpha)}


def decide(diff: float, p: float | None, metric: str, alpha: float) -> dict:
    """{significant, better: 'a' | 'b' | None} for a difference a - b of `metric` tested at p."""
    winner = None
    if p is not None and p < alpha and diff != 0:
        winner = "a" if better(metric, diff, 0.0) else "b"
    return {"significant": winner is not None, "better": winner}


def holm(pvalues: list) -> list:
    """Holm-Bonferroni adjusted p-values, in the given order; None (an undefined test) stays None and
    is not counted in the family. Sorted ascending, the i-th of m gets max over j <= i of (m - j + 1) p_j."""
    defined = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out, running = list(pvalues), 0.0
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (len(defined) - rank) * p))
        out[i] = running
    return out


def auc(levels, values) -> float | None:
    """Trapezoid area under values(levels) divided by the span of the levels (a flat curve scores its value);
    None if any value is undefined."""
    if any(v is None for v in values) or len(values) < 2:
        return None
    x, y = np.asarray(levels, np.float64), np.asarray(values, np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / (x.max() - x.min()))
