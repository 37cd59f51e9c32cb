"""PNG figures of the evaluation (the report and the robustness stage): per-seed spread of a metric per
model, and metric-vs-level robustness curves, one line per model."""
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
    """points[model] = [{level, <metric>: value}, ...] -> one line per model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, series in points.items():
        levels = [p["level"] for p in series]
        values = [np.nan if p.get(metric) is None else p[metric] for p in series]
        x = np.arange(len(levels)) if isinstance(levels[0], str) else levels
        ax.plot(x, values, marker="o", ms=3, label=name)
        if isinstance(levels[0], str):
            ax.set_xticks(x, levels, rotation=30, ha="right", fontsize=8)
    ax.set(xlabel=xlabel, ylabel=metric, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
