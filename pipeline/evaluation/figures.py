"""PNG figures of the evaluation (the report and the robustness stage): per-seed spread of a metric per
model, and metric-vs-level robustness curves (one line per model; points for categorical levels)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def seed_spread(values: dict[str, list[float]], intervals: dict[str, list | None], metric: str, path: Path,
                title: str) -> None:
    """One row per model: each seed's value as a dot, the mean as a bar tick, the 95% interval as a line."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(names)))
    for y, name in enumerate(names):
        v = [x for x in values[name] if x is not None]
        ax.scatter(v, [y] * len(v), s=14, alpha=0.7)
        if v:
            ax.plot([np.mean(v)] * 2, [y - 0.25, y + 0.25], color="black", lw=1.5)
        if intervals.get(name):
            ax.plot(intervals[name], [y, y], color="grey", lw=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel=metric, title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def robustness_curve(points: dict[str, list[dict]], metric: str, xlabel: str, path: Path, title: str) -> None:
    """points[model] = [{level, <metric>: value}, ...] -> one line per model over numeric levels (rates, SNRs);
    over categories (missing-modality subsets) one point per model and category, side by side, no lines."""
    fig, ax = plt.subplots(figsize=(6, 4))
    categorical = any(isinstance(p["level"], str) for series in points.values() for p in series)
    width = 0.8 / max(len(points), 1)
    for k, (name, series) in enumerate(points.items()):
        levels = [p["level"] for p in series]
        values = [np.nan if p.get(metric) is None else p[metric] for p in series]
        if categorical:
            x = np.arange(len(levels)) - 0.4 + width * (k + 0.5)
            ax.plot(x, values, marker="o", ms=5, ls="none", label=name)
            ax.set_xticks(np.arange(len(levels)), levels, rotation=30, ha="right", fontsize=8)
        else:
            ax.plot(levels, values, marker="o", ms=3, label=name)
    if categorical:
        ax.grid(axis="y", alpha=0.3)
    ax.set(xlabel=xlabel, ylabel=metric, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
