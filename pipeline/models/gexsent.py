"""GEXSent: gated experts for multimodal sentiment analysis.

Our version of "GEXSent: Gated Experts for Robust Sentiment Analysis Across
Modalities" (reference code: github.com/Subhanshusethi/GExSENT-MOE, read, not
copied). Per modality m present in ``input_dims``:

1. Projection: features (B, L_m, D_m) -> (B, L_m, d), with sinusoidal positions
   for visual and acoustic steps (the reference ran an LSTM over frames instead).
2. H-GMoE level 1: a token-level mixture of ``n_experts`` FFN experts with top-k
   routing and a Switch-style load-balancing loss (``blocks.MixtureOfExperts``).
3. H-GMoE level 2: a modality gate, softmax over the modalities present in each
   sample, weighing each modality's stream in the fused representation.
4. GAM: masked self-attention per modality; cross-modal gates (each modality
   attends over the others, residual + LayerNorm, one gate per token); gated
   attention with Q and K scaled by the gates (``blocks.GatedSelfAttention``).
5. Fusion: masked mean pool of each gated sequence, weighted by the modality
   gate (= a masked mean over the concatenated sequences with per-modality
   token weights), then an MLP head.

Differences from the reference, on purpose: padding masks are respected
everywhere; missing modalities are excluded per sample; any subset of the
registered modalities works; all sizes come from ``GEXSentConfig``.

The reference gate (``gate="softmax_mean"``) is the mean over E of a softmax
over E logits, which is exactly 1/E for every token: a constant that only
rescales Q and K. It is kept for parity; the default is a sigmoid gate.

Example (parameter count at the default sizes):

>>> import torch
>>> from pipeline.models import build_model
>>> model = build_model("gexsent", {"text": 384, "visual": 1280, "acoustic": 45}, "regression", 1, {})
>>> print(sum(p.numel() for p in model.parameters()))
714759
>>> batch = {m: torch.randn(2, 5, d) for m, d in {"text": 384, "visual": 1280, "acoustic": 45}.items()}
>>> batch.update({f"{m}_mask": torch.ones(2, 5, dtype=torch.bool) for m in ("text", "visual", "acoustic")})
>>> out = model(batch)
>>> out["pred"].shape, sorted(out["aux"])
(torch.Size([2]), ['balance'])
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import schema
from ..params import between, fail, ge, gt, one_of, param, section
from .blocks import (
    FeatureProjection,
    GatedSelfAttention,
    MixtureOfExperts,
    MLPHead,
    attendable,
    config_from_dict,
    masked_mean,
    resolve_inputs,
    to_prediction,
)


@section("gexsent")
@dataclass
class GEXSentConfig:
    d_model: int = param(64, ge(1), "width of every modality stream after projection")
    n_experts: int = param(10, ge(1), "experts per modality (reference: 10)")
    top_k: int = param(2, ge(1), "experts routed per token (reference: 2)")
    expert_hidden: int = param(128, ge(1), "hidden size of each expert FFN")
    routing: str = param("dispatch", one_of("dispatch", "einsum"), "same result; dispatch measured 2-6x faster on CPU")
    balance_weight: float = param(0.01, ge(0), "weight of the load-balancing loss (Switch Transformer uses 0.01)")
    n_heads: int = param(4, ge(1), "attention heads in self- and gated attention")
    cross_temperature: float = param(1.0, gt(0), "cross-modal attention: softmax(q.k / (sqrt(d) * temperature))")
    gate: str = param("sigmoid", one_of("sigmoid", "softmax_mean"), "softmax_mean is the reference: constant 1/n_gate_logits")
    n_gate_logits: int = param(10, ge(1), "softmax_mean only: logits the softmax runs over (reference: n_experts)")
    gate_bias: bool = param(True, doc="add log(gate) to key scores so a zero gate removes a token")
    positions: bool = param(True, doc="sinusoidal positions on the steps of unordered modalities (frames, audio)")
    head_hidden: int = param(64, ge(1), "hidden size of the MLP head")
    dropout: float = param(0.1, between(0, 1, hi_open=True), "dropout on projections, expert/attention outputs, head")
    attention_dropout: float = param(0.0, between(0, 1, hi_open=True), "on attention probabilities (~25% of a CPU step)")

    def __post_init__(self):
        if self.top_k > self.n_experts:
            raise fail("top_k", self.top_k, f"<= n_experts ({self.n_experts})")
        if self.d_model % self.n_heads:
            raise fail("n_heads", self.n_heads, f"a divisor of d_model ({self.d_model})")


class CrossModalGate(nn.Module):
    """One gate per token of a modality from attending over the other modalities' tokens.

    x (B, L, d) attends over context (B, Lc, d) (the others, concatenated), the
    result is added back and LayerNormed, and a small head turns each enhanced
    token into a gate in [0, 1]: (B, L, 1).
    """

    def __init__(self, d_model: int, temperature: float, gate: str, n_gate_logits: int):
        super().__init__()
        self.scale = 1.0 / (math.sqrt(d_model) * temperature)
        self.norm = nn.LayerNorm(d_model)
        self.gate = gate
        self.to_gate = nn.Linear(d_model, 1 if gate == "sigmoid" else n_gate_logits)

    def forward(self, x, context=None, context_mask=None):
        if context is not None:
            scores = (x @ context.transpose(1, 2)).float() * self.scale  # (B, L, Lc)
            scores = scores.masked_fill(~attendable(context_mask)[:, None, :], float("-inf"))
            attended = scores.softmax(dim=-1).to(context.dtype) @ context  # (B, L, d)
            # a sample whose other modalities are all missing gets no cross-modal context
            has_context = context_mask.any(dim=-1)[:, None, None]
            x = x + attended * has_context
        gate_logits = self.to_gate(self.norm(x))
        if self.gate == "sigmoid":
            return torch.sigmoid(gate_logits)
        return gate_logits.softmax(dim=-1).mean(dim=-1, keepdim=True)  # reference: always 1/n


class GEXSent(nn.Module):
    """H-GMoE + GAM fusion over any non-empty subset of the registered modalities."""

    config_class = GEXSentConfig

    def __init__(self, input_dims: dict[str, int], task: str = "regression", num_classes: int = 1,
                 config: GEXSentConfig | dict | None = None):
        super().__init__()
        self.config = cfg = config_from_dict(GEXSentConfig, config)
        self.modalities, out_dim = resolve_inputs(input_dims, task, num_classes)
        self.task = task
        d = cfg.d_model
        self.projections = nn.ModuleDict({
            m: FeatureProjection(input_dims[m], d, cfg.dropout, positions=cfg.positions and not schema.get(m).ordered)
            for m in self.modalities
        })
        self.experts = nn.ModuleDict({
            m: MixtureOfExperts(d, cfg.expert_hidden, cfg.n_experts, cfg.top_k, cfg.routing)
            for m in self.modalities
        })
        self.expert_norms = nn.ModuleDict({m: nn.LayerNorm(d) for m in self.modalities})
        self.modality_gate = nn.ModuleDict({m: nn.Linear(d, 1) for m in self.modalities})
        self.self_attention = nn.ModuleDict({
            m: GatedSelfAttention(d, cfg.n_heads, cfg.attention_dropout) for m in self.modalities
        })
        self.self_attention_norms = nn.ModuleDict({m: nn.LayerNorm(d) for m in self.modalities})
        self.cross_gates = nn.ModuleDict({
            m: CrossModalGate(d, cfg.cross_temperature, cfg.gate, cfg.n_gate_logits) for m in self.modalities
        })
        self.gated_attention = nn.ModuleDict({
            m: GatedSelfAttention(d, cfg.n_heads, cfg.attention_dropout, gate_bias=cfg.gate_bias) for m in self.modalities
        })
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = MLPHead(d, cfg.head_hidden, out_dim, cfg.dropout)

    def forward(self, batch: dict) -> dict:
        masks = {m: batch[f"{m}_mask"] for m in self.modalities}  # (B, L_m), True = real

        # H-GMoE level 1: token-level experts within each modality
        streams, balance, expert_load = {}, [], {}
        for m in self.modalities:
            x = self.projections[m](batch[m])  # (B, L_m, d)
            mixed, balance_m, expert_load[m] = self.experts[m](x, masks[m])
            streams[m] = self.expert_norms[m](x + self.dropout(mixed))
            if masks[m].any():  # a modality absent from the whole batch routes nothing
                balance.append(balance_m)

        # H-GMoE level 2: per-sample softmax over the modalities present
        gate_logits = torch.cat(
            [self.modality_gate[m](masked_mean(streams[m], masks[m])).float() for m in self.modalities], dim=-1
        )  # (B, M)
        present = torch.stack([masks[m].any(dim=-1) for m in self.modalities], dim=-1)  # (B, M)
        modality_weights = gate_logits.masked_fill(~attendable(present), float("-inf")).softmax(dim=-1)

        # GAM: self-attention, cross-modal gates, gated attention; then gated pooling
        fused, token_gates = 0.0, {}
        for i, m in enumerate(self.modalities):
            attended = self.self_attention[m](streams[m], masks[m])
            attended = self.self_attention_norms[m](streams[m] + self.dropout(attended))
            others = [o for o in self.modalities if o != m]
            context = torch.cat([streams[o] for o in others], dim=1) if others else None
            context_mask = torch.cat([masks[o] for o in others], dim=1) if others else None
            token_gates[m] = self.cross_gates[m](streams[m], context, context_mask)  # (B, L_m, 1)
            gated = self.gated_attention[m](attended, masks[m], token_gates[m])  # (B, L_m, d)
            fused = fused + modality_weights[:, i : i + 1].to(gated.dtype) * masked_mean(gated, masks[m])

        pred = to_prediction(self.head(fused), self.task)
        balance = torch.stack(balance).mean() if balance else fused.sum() * 0.0
        aux = {"balance": self.config.balance_weight * balance}
        extras = {
            "modality_weights": modality_weights.detach(),
            **{f"expert_load_{m}": load.detach() for m, load in expert_load.items()},
            **{f"token_gates_{m}": g.detach()[..., 0] for m, g in token_gates.items()},
        }
        return {"pred": pred, "aux": aux, "extras": extras}
