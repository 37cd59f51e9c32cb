"""Train a model under a seed and param overrides: what the `seeds` and `ablation` stages run.

The overrides are applied to the raw params exactly as `dvc exp run -S KEY=VALUE` would, then the
`model` section and the model's own section are parsed as `train@<model>` parses them, so an
unknown switch or a bad value stops the stage with the usual one-line error.
"""
from __future__ import annotations

from pathlib import Path

from . import params, runs
from .errors import ParamError
from .models import MODELS
from .provenance import stamp
from .train import TrainParams, train_model


def train_variant(raw: dict, model: str, dataset: str | Path, out: str | Path, overrides=(), seed: int | None = None,
                  where: str = "evaluate.models") -> dict:
    """Train `model` with the overrides (and seed) on the dataset into `out`; returns its stamped metrics."""
    if model not in MODELS:
        raise ParamError(f"{where}: {model!r} is not allowed ({' | '.join(MODELS)})")
    raw = runs.with_overrides(raw, list(overrides), seed)
    cfg = params.read(raw, TrainParams)
    arch = params.parse(MODELS[model].config_class, params.lookup(raw, model), model)
    train_model(model, dataset, out, cfg, params.as_dict(arch), progress=False)
    return stamp(Path(out) / "metrics.json", dataset)
