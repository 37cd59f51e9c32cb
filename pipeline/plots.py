"""PNG plots written next to each model (DVC's HTML plots load vega from a CDN, so offline
users get these files instead): loss curves, predicted vs true, confusion matrix."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or GPU boxes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curves(history: list[dict], path: Path, title: str) -> None:
    """history: one dict per epoch with train_loss (task loss), train_total (task + auxiliary
    losses) and valid_loss (task loss: MAE for regression)."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train task loss")
    ax.plot(epochs, [h["valid_loss"] for h in history], label="valid task loss")
    if any(abs(h["train_total"] - h["train_loss"]) > 1e-9 for h in history):
        ax.plot(epochs, [h["train_total"] for h in history], "--", alpha=0.6, label="train total (with auxiliary)")
    best = min(history, key=lambda h: h["select"])
    ax.axvline(best["epoch"], color="grey", lw=0.8, ls=":", label=f"chosen epoch {best['epoch']}")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.legend()
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
