"""Baselines in the same framework as the fusion models, so every run shows what fusion buys.

* ``TextOnly``: the text utterance vector (as GCE builds it) -> the shared MLP head.
* ``LateFusion``: each modality masked-mean-pooled and LayerNormed (zeros when
  missing, plus a presence flag per modality), concatenated -> MLP head.

Both return the same dict as the fusion models, with an empty ``aux``.

Example (parameter counts at the default sizes):

>>> from pipeline.models import build_model
>>> dims = {"text": 384, "visual": 1280, "acoustic": 45}
>>> print(sum(p.numel() for p in build_model("text_only", dims, "regression", 1, {}).parameters()))
49409
>>> print(sum(p.numel() for p in build_model("late_fusion", dims, "regression", 1, {}).parameters()))
222811
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..params import between, ge, one_of, param, section
from .blocks import MLPHead, config_from_dict, masked_mean, resolve_inputs, to_prediction, utterance_vector


@section("text_only")
@dataclass
class TextOnlyConfig:
    text_pool: str = param("mean", one_of("first", "mean"), "first ([CLS]) | mean, as in GCE")
    head_hidden: int = param(128, ge(1), "hidden size of the MLP head")
    dropout: float = param(0.1, between(0, 1, hi_open=True))


class TextOnly(nn.Module):
    """Text utterance vector -> MLP head. Other modalities in the batch are ignored."""

    config_class = TextOnlyConfig
    reads = ("text",)  # the modalities it uses (the others are never loaded for it)

    def __init__(self, input_dims: dict[str, int], task: str = "regression", num_classes: int = 1,
                 config: TextOnlyConfig | dict | None = None):
        super().__init__()
        self.config = config_from_dict(TextOnlyConfig, config)
        if "text" not in input_dims:
            raise ValueError(f"text_only needs a text modality; input_dims has {sorted(input_dims)}")
        _, out_dim = resolve_inputs(input_dims, task, num_classes)
        self.task = task
        self.head = MLPHead(input_dims["text"], self.config.head_hidden, out_dim, self.config.dropout)

    def input_shares(self) -> dict[str, float]:
        """Share of the head's first-layer weight norm per modality (`interpret`): text only."""
        return {"text": 1.0}

    def forward(self, batch: dict) -> dict:
        text = utterance_vector(batch, "text", self.config.text_pool)  # (B, D_text)
        return {"pred": to_prediction(self.head(text), self.task), "aux": {}}


@section("late_fusion")
@dataclass
class LateFusionConfig:
    head_hidden: int = param(128, ge(1), "hidden size of the MLP head")
    dropout: float = param(0.1, between(0, 1, hi_open=True))


class LateFusion(nn.Module):
    """Masked mean pool per modality -> LayerNorm -> concatenate (+ presence flags) -> MLP head."""

    config_class = LateFusionConfig

    def __init__(self, input_dims: dict[str, int], task: str = "regression", num_classes: int = 1,
                 config: LateFusionConfig | dict | None = None):
        super().__init__()
        self.config = config_from_dict(LateFusionConfig, config)
        self.modalities, out_dim = resolve_inputs(input_dims, task, num_classes)
        self.task = task
        # LayerNorm because raw feature scales differ wildly (CLIP vs MFCC vs F0 in Hz)
        self.norms = nn.ModuleDict({m: nn.LayerNorm(input_dims[m]) for m in self.modalities})
        in_dim = sum(input_dims[m] for m in self.modalities) + len(self.modalities)
        self.head = MLPHead(in_dim, self.config.head_hidden, out_dim, self.config.dropout)

    def input_shares(self) -> dict[str, float]:
        """Each modality's share of the head's first-layer weight norm (`interpret`). Its inputs are
        LayerNormed per modality, so a larger share means the head leans more on that modality."""
        weight = self.head.net[1].weight.detach()  # (hidden, sum of dims + flags)
        norms, start = {}, 0
        for m, norm in self.norms.items():
            size = norm.normalized_shape[0]
            norms[m] = float(weight[:, start:start + size].norm())
            start += size
        total = sum(norms.values()) or 1.0
        return {m: v / total for m, v in norms.items()}

    def forward(self, batch: dict) -> dict:
        pooled, flags = [], []
        for m in self.modalities:
            mask = batch[f"{m}_mask"]
            present = mask.any(dim=-1, keepdim=True)  # (B, 1)
            pooled.append(self.norms[m](masked_mean(batch[m], mask)) * present)  # zeros when missing
            flags.append(present.to(pooled[-1].dtype))
        features = torch.cat(pooled + flags, dim=-1)
        return {"pred": to_prediction(self.head(features), self.task), "aux": {}}
