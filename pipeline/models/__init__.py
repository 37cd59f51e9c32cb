"""Sentiment models: GEXSent, GCE and two baselines, all with one interface.

``build_model(name, input_dims, task, num_classes, config)`` returns an
``nn.Module`` whose ``forward(batch)`` takes padded modality features with masks,
as ``dataset.collate`` builds them from the registry (``batch[m]`` (B, L_m, D_m),
``batch[f"{m}_mask"]`` (B, L_m) bool, True = real; ``batch[f"{m}_pooled"]`` for
modalities with a pooled vector; ``batch["label"]`` in training) and returns
``{"pred", "aux", "extras"?}``:
``pred`` is a (B,) score for regression or (B, C) logits for classification,
``aux`` holds already-weighted auxiliary losses to add to the task loss, ``extras`` what the model
saw (gates, routings, grading; ``extras["stats"]``: per-batch sums the trainer adds up per epoch).
A config with ``variant`` may pick another class through the model class's ``variants`` mapping.
A model class may set ``reads`` (a tuple of modalities, or a function of its config giving one) when it
uses only some, and ``published_recipe`` (how the published code trains it: `pipeline.training.train.Recipe`).
"""
from __future__ import annotations

from torch import nn

from ..params import parse
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
    cls, config = model_class(name, config)
    return cls(dict(input_dims), task, num_classes, config)


def model_class(name: str, config: dict | None) -> tuple[type, object]:
    """(the class that builds model `name` under this params section, the parsed section)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    cls = MODELS[name]
    config = parse(cls.config_class, config or {}, name)
    # a model whose variants are separate classes (GEXSent's reference) names them in `variants`
    return getattr(cls, "variants", {}).get(getattr(config, "variant", None), cls), config


def modalities_read(name: str, available, config: dict | None = None) -> list[str]:
    """The modalities model `name` (under its params section `config`) uses out of those available, in order."""
    cls, config = model_class(name, config)
    reads = getattr(cls, "reads", None)
    reads = reads(config) if callable(reads) else reads
    return [m for m in available if reads is None or m in reads]


__all__ = ["MODELS", "build_model", "model_class", "modalities_read", "GEXSent", "GCE", "TextOnly", "LateFusion"]
