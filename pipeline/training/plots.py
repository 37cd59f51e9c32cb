"""PNG plots written next to each model (DVC's HTML plots load vega from a CDN, so offline
users get these files instead): loss curves, predicted vs true, confusion matrix, and the panels of
what a model learned (`pipeline.training.interpret`)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or GPU boxes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curves(history: list[dict], path: Path, title: str) -> None:
    """history: one dict per epoch with train_loss (task loss), train_total (task + auxiliary
    losses) and valid_loss (task loss: MAE for regression). The task losses get their own panel; the
    total, on its own scale (auxiliary terms can dwarf the task loss), a second panel when it differs."""
    epochs = [h["epoch"] for h in history]
    auxiliary = any(abs(h["train_total"] - h["train_loss"]) > 1e-9 for h in history)
    fig, axes = plt.subplots(1, 2 if auxiliary else 1, figsize=(10 if auxiliary else 6, 4), squeeze=False)
    task, total = axes[0][0], axes[0][-1]
    task.plot(epochs, [h["train_loss"] for h in history], label="train task loss")
    task.plot(epochs, [h["valid_loss"] for h in history], label="valid task loss")
    if auxiliary:
        total.plot(epochs, [h["train_total"] for h in history], color="tab:red", label="train total (task + auxiliary)")
        total.plot(epochs, [h["train_loss"] for h in history], color="tab:blue", alpha=0.4, ls="--", label="train task loss")
        total.set(xlabel="epoch", ylabel="loss", title="training objective")
    best = min(history, key=lambda h: h["select"])
    for ax in axes[0]:
        ax.axvline(best["epoch"], color="grey", lw=0.8, ls=":", label=f"chosen epoch {best['epoch']}")
        ax.legend(fontsize=8)
    task.set(xlabel="epoch", ylabel="task loss", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scatter(pred: np.ndarray, true: np.ndarray, path: Path, title: str, label_range=(-3.0, 3.0)) -> None:
    """Predicted vs true scores over the corpus's label range (MOSI [-3, 3], CH-SIMS [-1, 1])."""
    lo, hi = label_range
    margin = 0.05 * (hi - lo)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(true, pred, s=8, alpha=0.5)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
    ax.set(xlim=(lo - margin, hi + margin), ylim=(lo - margin, hi + margin), xlabel="true score",
           ylabel="predicted score", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion(matrix: np.ndarray, names: list[str], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(names), 1.0 + 0.7 * len(names)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def panels(figure: list[tuple[str, str, dict]], path: Path, title: str) -> None:
    """One PNG of small panels, each (kind, title, data): 'lines' {series: values per epoch}, 'hist'
    {series: values in [0, 1]}, 'bars' {series: value per index}, 'stacked' {series: {category: value}},
    'bar' {category: value}. A panel with no data says so instead of staying blank."""
    fig, axes = plt.subplots(1, max(len(figure), 1), figsize=(4.2 * max(len(figure), 1), 3.4), squeeze=False)
    for ax, (kind, name, data) in zip(axes[0], figure):
        ax.set_title(name, fontsize=9)
        if not data or all(np.size(v) == 0 for v in data.values()):
            ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=ax.transAxes)
            continue
        if kind == "lines":
            for series, values in data.items():
                ax.plot(range(1, len(values) + 1), values, marker=".", label=series)
            ax.set_xlabel("epoch")
        elif kind == "hist":
            for series, values in data.items():
                ax.hist(values, bins=20, range=(0, 1), histtype="step", label=series)
            ax.set_xlabel("w")
        elif kind == "bars":
            width = 0.8 / len(data)
            for i, (series, values) in enumerate(data.items()):
                ax.bar(np.arange(len(values)) + i * width, values, width, label=series)
            ax.set_xlabel("expert")
        elif kind == "stacked":
            categories = list(next(iter(data.values())))
            bottom = np.zeros(len(categories))
            for series, values in data.items():
                heights = np.array([values[c] for c in categories])
                ax.bar(range(len(categories)), heights, bottom=bottom, label=series)
                bottom += heights
            ax.set_xticks(range(len(categories)), categories, rotation=45, ha="right", fontsize=7)
        else:  # bar
            ax.bar(range(len(data)), list(data.values()))
            ax.set_xticks(range(len(data)), list(data), fontsize=8)
        if kind != "bar":
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
