"""Sentiment models: GEXSent, GCE and two baselines, all with one interface.

``build_model(name, input_dims, task, num_classes, config)`` returns an
``nn.Module`` whose ``forward(batch)`` takes padded modality features with masks
(``batch[m]`` (B, L_m, D_m), ``batch[f"{m}_mask"]`` (B, L_m) bool, True = real;
``batch["label"]`` in training) and returns ``{"pred", "aux", "extras"?}``:
``pred`` is a (B,) score for regression or (B, C) logits for classification,
``aux`` holds already-weighted auxiliary losses to add to the task loss.
"""
from __future__ import annotations

from torch import nn

from .baselines import LateFusion, TextOnly
from .gce import GCE
from .gexsent import GEXSent

MODELS = {
    "gexsent": GEXSent,
    "gce": GCE,
    "text_only": TextOnly,
    "late_fusion": LateFusion,
}


def build_model(name: str, input_dims: dict[str, int], task: str, num_classes: int, config: dict | None) -> nn.Module:
    """Build model ``name`` for the modalities in ``input_dims``; ``config`` is its params.yaml section."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](dict(input_dims), task, num_classes, config or {})


__all__ = ["MODELS", "build_model", "GEXSent", "GCE", "TextOnly", "LateFusion"]
