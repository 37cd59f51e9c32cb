"""GEXSent: gated experts for multimodal sentiment analysis.

"GEXSent: Gated Experts for Robust Sentiment Analysis Across Modalities"; reference code
github.com/Subhanshusethi/GExSENT-MOE (``model.py``, ``main.py``, ``config.py``, ``Dataset.py``;
read, not copied). ``gexsent.variant: reference`` builds the published architecture at its
published size and inputs (``ReferenceGEXSent``), ``improved`` (the default) ours (``GEXSent``);
``gexsent.recipe: published`` trains either as ``main.py`` does (``PUBLISHED_RECIPE``, each value
with its source), ``ours`` (the default) with the ``model`` params. Most of ours fixes real bugs of
the reference. docs/models.md has the measurements.

| component | reference code | here, variant reference | improved (ours) | why |
|---|---|---|---|---|
| inputs | text: frozen ModernBERT-base token states (24 tokens); image: FACET facial features (35-d) per frame, zero-padded to 370 frames (``Dataset.py``; the README says CLIP); no audio | text and visual, as the pipeline extracts them; no audio unless ``reference_acoustic: true`` adds a stream built like the visual one | every modality present | the published model has no acoustic stream; one is added only on request, labelled |
| widths | d 512, 8 heads; ``LSTMVIS`` 35 -> 2 x LSTM(128) -> Linear 768; experts 768 -> 512 (text: 768 -> 512); head 512 -> 3 | the same (``d_model: 0`` -> 512, ``n_heads: 0`` -> 8, ``lstm_dim`` 768, LSTM hidden 128); the head 512 -> 1, or -> 3 under recipe published | d 64, 4 heads, FFN experts hidden 128, MLP head 64 | 8.7 M parameters on the demo's dims (text 384, visual 1280) against 0.5-0.7 M; 80 demo clips |
| frame / audio steps | ``LSTMVIS``: 2-layer LSTM (hidden 128) -> Linear -> dropout 0.1 | the same | Linear + LayerNorm + sinusoidal positions (``positions``) | the LSTM is sequential (slow on long sequences) and the positions carry the order |
| text steps | frozen ModernBERT token states fed to the experts as they are | the same | Linear + LayerNorm to ``d_model`` | every modality enters the experts at the same width |
| experts | ``ExpertsText/Image``: 10 *linear* experts, softmax router, top-2 weights *not* renormalised, no balance loss | the same | 10 FFN experts (``expert_hidden``), top-k weights renormalised, Switch balance loss, residual + LayerNorm | linear experts mixed linearly are one linear map per routing; unbalanced routers collapse |
| H-GMoE level 2 | none: the modalities' tokens are concatenated and mean-pooled | the same | a per-sample softmax gate over the modalities present (``modality_gate``) | the paper's hierarchy; a modality's weight should not be its token count |
| self-attention | one ``nn.MultiheadAttention`` shared by all modalities, no mask, no residual | the same, masked | one per modality, masked, residual + LayerNorm | padding must not be attended to |
| cross-modal attention scale | logits q.k / 0.1 (x 10 on 512-wide unnormalised vectors: a near one-hot softmax) | the same | q.k / (sqrt(d) x ``cross_temperature``) | the scaled dot product of attention; with the reference's constant gate the scale changes nothing there |
| cross-modal gate | softmax over E logits, then the *mean* over E: exactly 1/E for every token | the same | sigmoid gate per token, with log(gate) added to the key scores (``gate_bias``) | the reference gate is a constant: it only rescales Q and K |
| more than two modalities | text and image: each attends over the other | each attends over the others, concatenated | the same | identical for two |
| gated attention | one shared single-head block, Q and K x gate, no output projection | the same, masked | one per modality, multi-head, masked | |
| pooling and head | unmasked mean over the concatenated sequences -> Linear | masked mean | masked mean per modality, weighted by the modality gate -> MLP head | padding counted in the mean changes the output with the batch |
| dropout | 0.1 after the LSTM encoder only (config.py's ``dropout`` 0.50108 is unused) | ``dropout`` (0.1) there only | ``dropout`` on projections, expert and attention outputs, head | |
| task and selection | 3-class cross-entropy; its "test" set is its validation split (a random 80/20 split, ``preprocess.py``) | regression (L1) or classification; recipe published: 3 classes from the score's sign, the score their expected value (``blocks.ClassScore``); test split never used for selection | the same as reference | MOSI is a regression benchmark |
| recipe | AdamW 1e-4, weight decay 0.01, batch 4, 10 epochs, no early stopping, ReduceLROnPlateau(patience 1, factor 0.4) on the validation loss, no clipping (``main.py``, ``config.py``) | ``recipe: published`` (``PUBLISHED_RECIPE``); ``ours`` by default | ``recipe: ours``: AdamW 1e-3, batch 16, 40 epochs, patience 8, warmup 10% + cosine, clip 1.0 (the ``model`` params) | |
| seed | none set | ``model.seed`` | ``model.seed`` | |

Both variants keep padding masks (the reference masks nothing; a model that reads padding gives
results that depend on the other clips in the batch, and differ between 1 and N ranks).

Per modality m in ``input_dims`` (improved):

1. Projection: features (B, L_m, D_m) -> (B, L_m, d), with sinusoidal positions on unordered steps.
2. H-GMoE level 1: token-level mixture of ``n_experts`` FFN experts, top-k routing, balance loss
   (``blocks.MixtureOfExperts``; its statistics are summed over the global batch under DDP).
3. H-GMoE level 2: a modality gate, softmax over the modalities present in each sample.
4. GAM: masked self-attention per modality; cross-modal gates (each modality attends over the
   others, residual + LayerNorm, one gate per token); gated attention (``blocks.GatedSelfAttention``).
5. Fusion: masked mean of each gated sequence, weighted by the modality gate, then an MLP head.

Ablations (``gexsent.ablate``, a list):

* ``experts``: a dense FFN (hidden ``top_k * expert_hidden``, the active size of the routed experts)
  replaces the mixture of experts; no balance loss. In the reference variant: one linear map.
* ``modality_gate``: every present modality weighs the same (improved only: the reference has none).
* ``gated_attention``: no cross-modal gates and no gated attention: the self-attention output is pooled.

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

The reference at its published size on the demo's dims reads text and visual only:

>>> reference = build_model("gexsent", {"text": 384, "visual": 1280, "acoustic": 130}, "classification", 3,
...                         {"variant": "reference"})
>>> reference.modalities, sum(p.numel() for p in reference.parameters())
(('text', 'visual'), 8725547)
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
    RoutingStats,
    attendable,
    config_from_dict,
    masked_mean,
    per_sample_routing,
    resolve_inputs,
    route_top_k,
    routing_stats,
    to_prediction,
)

VARIANTS = ("reference", "improved")
ABLATIONS = ("experts", "modality_gate", "gated_attention")
# params one variant alone has a place for: key -> that variant (every other variant keeps the default)
VARIANT_ONLY = {"expert_hidden": "improved", "routing": "improved", "balance_weight": "improved",
                "cross_temperature": "improved", "gate_bias": "improved", "positions": "improved",
                "head_hidden": "improved", "lstm_dim": "reference", "reference_acoustic": "reference"}
IMPROVED_ONLY = tuple(k for k, v in VARIANT_ONLY.items() if v == "improved")
# the published model's widths (model.py: MOEModel); `d_model: 0` / `n_heads: 0` pick them for variant reference
PUBLISHED_WIDTH, PUBLISHED_HEADS, PUBLISHED_LSTM_HIDDEN = 512, 8, 128

# How the published code trains (main.py, config.py): what `gexsent.recipe: published` runs.
# Every entry names where it comes from; "assumed" where the published code gives no value.
PUBLISHED_RECIPE = {
    "optimizer": ("adamw", "main.py: torch.optim.AdamW"),
    "lr": (1e-4, "main.py: AdamW(lr=1e-4) (config.py's learning_rate 1e-3 is unused)"),
    "weight_decay": (0.01, "main.py: AdamW(weight_decay=0.01) (config.py's 1e-3 is unused)"),
    "batch_size": (4, "config.py: batch_size = 4"),
    "epochs": (10, "config.py: epochs = 10"),
    "patience": (0, "main.py: no early stopping (0): all epochs run"),
    "schedule": ("plateau", "main.py: ReduceLROnPlateau(mode='min') stepped once per epoch on the validation loss"),
    "plateau_patience": (1, "config.py: patience = 1"),
    "plateau_factor": (0.4, "config.py: factor = 0.4"),
    "grad_clip": (0.0, "main.py: no gradient clipping"),
    "loss": ("sentiment3", "main.py: CrossEntropyLoss over 3 classes (Dataset.py: polarity -1/0/1 -> 0/1/2); "
                           "on a regression corpus: assumed (docs/models.md)"),
    "lr_text": (None, "assumed: ModernBERT is frozen in the published code (model.py: TextEncoder); "
                      "model.lr_text applies only with model.text_finetune"),
}


@section("gexsent")
@dataclass
class GEXSentConfig:
    variant: str = param("improved", one_of(*VARIANTS),
                         "reference (the published model) | improved (ours); the table atop pipeline/models/gexsent.py")
    recipe: str = param("ours", one_of("ours", "published"),
                        "ours: model.* (AdamW, warmup + cosine, L1) | published: main.py's (PUBLISHED_RECIPE)")
    ablate: list[str] = param([], one_of(*ABLATIONS), "components switched off: experts | modality_gate | gated_attention")
    d_model: int = param(0, ge(0), "width of every modality stream; 0: 512 for reference (published), 64 for improved")
    n_experts: int = param(10, ge(1), "experts per modality (reference: 10)")
    top_k: int = param(2, ge(1), "experts routed per token (reference: 2)")
    expert_hidden: int = param(128, ge(1), "improved: hidden size of each expert FFN")
    routing: str = param("dispatch", one_of("dispatch", "einsum"),
                         "improved: same result; dispatch measured 2-6x faster on CPU")
    balance_weight: float = param(0.01, ge(0), "improved: weight of the load-balancing loss (Switch Transformer uses 0.01)")
    n_heads: int = param(0, ge(0), "self-attention heads (and gated attention, improved); 0: 8 for reference, 4 for improved")
    cross_temperature: float = param(1.0, gt(0), "improved: cross-modal attention softmax(q.k / (sqrt(d) * temperature))")
    gate_bias: bool = param(True, doc="improved: add log(gate) to key scores so a zero gate removes a token")
    positions: bool = param(True, doc="improved: sinusoidal positions on the steps of unordered modalities (frames, audio)")
    head_hidden: int = param(64, ge(1), "improved: hidden size of the MLP head")
    lstm_dim: int = param(768, ge(1), "reference: output width of the frame LSTM encoder (published: 768)")
    reference_acoustic: bool = param(False, doc="reference: add an acoustic stream (LSTM encoder + linear experts, "
                                                "as the visual one); the published model has none")
    dropout: float = param(0.1, between(0, 1, hi_open=True), "dropout on projections, expert/attention outputs, head")
    attention_dropout: float = param(0.0, between(0, 1, hi_open=True), "on attention probabilities (~25% of a CPU step)")

    def __post_init__(self):
        if self.top_k > self.n_experts:
            raise fail("top_k", self.top_k, f"<= n_experts ({self.n_experts})")
        if self.width() % self.heads():
            raise fail("n_heads", self.heads(), f"a divisor of d_model ({self.width()})")
        defaults = GEXSentConfig.__dataclass_fields__
        for key, variant in VARIANT_ONLY.items():
            if self.variant != variant and getattr(self, key) != defaults[key].default:
                default = defaults[key].default
                raise fail(key, getattr(self, key), f"{str(default).lower()} with variant {self.variant}: {variant} only")
        if self.variant == "reference" and "modality_gate" in self.ablate:
            raise fail("ablate", self.ablate, "experts | gated_attention with variant reference: it has no modality gate")

    @property
    def reference(self) -> bool:
        return self.variant == "reference"

    def width(self) -> int:
        return self.d_model or (PUBLISHED_WIDTH if self.reference else 64)

    def heads(self) -> int:
        return self.n_heads or (PUBLISHED_HEADS if self.reference else 4)


class CrossModalGate(nn.Module):
    """One gate per token of a modality from attending over the other modalities' tokens.

    x (B, L, d) attends over context (B, Lc, d) (the others, concatenated) with softmax(x c^T * scale),
    the result is added back and LayerNormed, and a small head turns each enhanced token into a gate
    in [0, 1]: (B, L, 1). ``gate="sigmoid"``: one logit per token. ``gate="softmax_mean"`` (the
    reference): the mean over n_logits of a softmax over n_logits, which is exactly 1/n_logits.
    """

    def __init__(self, d_model: int, scale: float, gate: str = "sigmoid", n_logits: int = 1):
        super().__init__()
        self.scale, self.gate = scale, gate
        self.norm = nn.LayerNorm(d_model)
        self.to_gate = nn.Linear(d_model, 1 if gate == "sigmoid" else n_logits)

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


def cross_context(streams: dict, masks: dict, m: str):
    """The other modalities' tokens concatenated, and their mask; (None, None) when m is alone."""
    others = [o for o in streams if o != m]
    if not others:
        return None, None
    return torch.cat([streams[o] for o in others], dim=1), torch.cat([masks[o] for o in others], dim=1)


def routing_extras(stats: dict[str, RoutingStats], per_sample: dict[str, torch.Tensor]) -> dict:
    """What the trainer and `--explain` read about the experts: routings per expert (summed per epoch)
    and each sample's routing weight per expert."""
    return {
        "stats": {f"expert_routed_{m}": s.routed.detach() for m, s in stats.items()},
        **{f"expert_weight_{m}": w for m, w in per_sample.items()},
    }


class GEXSent(nn.Module):
    """H-GMoE + GAM fusion over any non-empty subset of the registered modalities (variant improved)."""

    config_class = GEXSentConfig

    def __init__(self, input_dims: dict[str, int], task: str = "regression", num_classes: int = 1,
                 config: GEXSentConfig | dict | None = None):
        super().__init__()
        self.config = cfg = config_from_dict(GEXSentConfig, config)
        self.modalities, out_dim = resolve_inputs(input_dims, task, num_classes)
        self.task = task
        d = cfg.width()
        self.projections = nn.ModuleDict({
            m: FeatureProjection(input_dims[m], d, cfg.dropout, positions=cfg.positions and not schema.get(m).ordered)
            for m in self.modalities
        })
        if "experts" in cfg.ablate:  # a dense FFN as wide as the k routed experts together
            hidden = cfg.top_k * cfg.expert_hidden
            self.experts = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                                          for m in self.modalities})
        else:
            self.experts = nn.ModuleDict({
                m: MixtureOfExperts(d, cfg.expert_hidden, cfg.n_experts, cfg.top_k, cfg.routing) for m in self.modalities
            })
        self.expert_norms = nn.ModuleDict({m: nn.LayerNorm(d) for m in self.modalities})
        self.modality_gate = nn.ModuleDict(
            {} if "modality_gate" in cfg.ablate else {m: nn.Linear(d, 1) for m in self.modalities})
        self.self_attention = nn.ModuleDict({
            m: GatedSelfAttention(d, cfg.heads(), cfg.attention_dropout) for m in self.modalities
        })
        self.self_attention_norms = nn.ModuleDict({m: nn.LayerNorm(d) for m in self.modalities})
        gam = "gated_attention" not in cfg.ablate
        scale = 1.0 / (math.sqrt(d) * cfg.cross_temperature)
        self.cross_gates = nn.ModuleDict({m: CrossModalGate(d, scale) for m in self.modalities if gam})
        self.gated_attention = nn.ModuleDict({
            m: GatedSelfAttention(d, cfg.heads(), cfg.attention_dropout, gate_bias=cfg.gate_bias)
            for m in self.modalities if gam
        })
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = MLPHead(d, cfg.head_hidden, out_dim, cfg.dropout)

    def forward(self, batch: dict) -> dict:
        masks = {m: batch[f"{m}_mask"] for m in self.modalities}  # (B, L_m), True = real

        # H-GMoE level 1: token-level experts within each modality
        streams, stats, per_sample = {}, {}, {}
        for m in self.modalities:
            x = self.projections[m](batch[m])  # (B, L_m, d)
            if isinstance(self.experts[m], MixtureOfExperts):
                mixed, stats[m], per_sample[m] = self.experts[m](x, masks[m])
            else:
                mixed = self.experts[m](x) * masks[m][..., None]
            streams[m] = self.expert_norms[m](x + self.dropout(mixed))

        # H-GMoE level 2: per-sample softmax over the modalities present (uniform when ablated)
        present = torch.stack([masks[m].any(dim=-1) for m in self.modalities], dim=-1)  # (B, M)
        gate_logits = torch.cat(
            [self.modality_gate[m](masked_mean(streams[m], masks[m])).float() for m in self.modality_gate], dim=-1
        ) if self.modality_gate else torch.zeros(present.shape, device=present.device)  # (B, M)
        modality_weights = gate_logits.masked_fill(~attendable(present), float("-inf")).softmax(dim=-1)

        # GAM: self-attention, cross-modal gates, gated attention; then gated pooling
        fused, token_gates = 0.0, {}
        for i, m in enumerate(self.modalities):
            attended = self.self_attention[m](streams[m], masks[m])
            attended = self.self_attention_norms[m](streams[m] + self.dropout(attended))
            if self.cross_gates:
                token_gates[m] = self.cross_gates[m](streams[m], *cross_context(streams, masks, m))  # (B, L_m, 1)
                attended = self.gated_attention[m](attended, masks[m], token_gates[m])  # (B, L_m, d)
            fused = fused + modality_weights[:, i : i + 1].to(attended.dtype) * masked_mean(attended, masks[m])

        pred = to_prediction(self.head(fused), self.task)
        aux, extras = {}, {"modality_weights": modality_weights.detach(),
                           **{f"token_gates_{m}": g.detach()[..., 0] for m, g in token_gates.items()}}
        if stats:
            # the balance loss over the global batch's tokens; modalities absent from it route nothing
            stats = {m: s.gathered(self.training) for m, s in stats.items()}
            routed = [s.balance_loss() for s in stats.values() if s.tokens > 0]
            balance = torch.stack(routed).mean() if routed else fused.sum() * 0.0
            aux["balance"] = self.config.balance_weight * balance
            extras.update(routing_extras(stats, per_sample))
        return {"pred": pred, "aux": aux, "extras": extras}


class LinearExperts(nn.Module):
    """The reference's ``ExpertsText`` / ``ExpertsImage``: E linear experts (D_in -> d) and a softmax router;
    each token takes its top-k experts weighted by their raw (not renormalised) probabilities.

    As in the reference every expert runs on every token and the top-k outputs are gathered; only real
    tokens are routed (padding comes out as zeros). No balance loss is trained; its statistics are kept.
    """

    def __init__(self, in_dim: int, out_dim: int, n_experts: int, top_k: int):
        super().__init__()
        self.n_experts, self.top_k, self.out_dim = n_experts, top_k, out_dim
        self.router = nn.Linear(in_dim, n_experts)
        self.experts = nn.Linear(in_dim, n_experts * out_dim)  # the E experts' weights side by side

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        tokens = x[mask]  # (T, D_in)
        probs, _, experts = route_top_k(self.router(tokens), self.top_k)
        weights = probs.gather(-1, experts)  # (T, k): the raw top-k probabilities
        outputs = self.experts(tokens).reshape(tokens.shape[0], self.n_experts, self.out_dim)  # (T, E, d)
        chosen = outputs.gather(1, experts[..., None].expand(-1, -1, outputs.shape[-1]))  # (T, k, d)
        mixed = (weights[..., None].to(chosen.dtype) * chosen).sum(1)
        out = torch.zeros(*mask.shape, mixed.shape[-1], dtype=mixed.dtype, device=x.device)
        out[mask] = mixed
        return out, routing_stats(probs, experts), per_sample_routing(weights, experts, mask, self.n_experts)


class LSTMEncoder(nn.Module):
    """The reference's ``LSTMVIS``: 2-layer LSTM (hidden 128) over the steps -> Linear -> dropout 0.1.
    Right padding never reaches a real step's output (the LSTM runs forward only)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = PUBLISHED_LSTM_HIDDEN, dropout: float = 0.1):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, out_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out(self.lstm(x)[0]))


class ReferenceGEXSent(nn.Module):
    """The published GEXSent (``MOEModel``) at its published size and inputs, with masks.

    Text token states -> linear top-2 experts (D_text -> 512); frames -> LSTM encoder (hidden 128,
    out 768) -> linear top-2 experts (768 -> 512); each stream through the one shared 8-head
    self-attention, then the one shared gated attention with the constant softmax-mean gate; one
    mean over all real tokens of all streams and a linear head. Its effective modality weights are
    the token shares, which the extras report as ``modality_weights``. It reads text and visual
    only; ``reference_acoustic: true`` adds an acoustic stream built like the visual one, which the
    published model does not have.
    """

    config_class = GEXSentConfig

    @staticmethod
    def reads(config: GEXSentConfig) -> tuple[str, ...]:
        """The published model's inputs: text and frames (and the acoustic stream when switched on)."""
        return ("text", "visual", "acoustic") if config.reference_acoustic else ("text", "visual")

    def __init__(self, input_dims: dict[str, int], task: str = "regression", num_classes: int = 1,
                 config: GEXSentConfig | dict | None = None):
        super().__init__()
        self.config = cfg = config_from_dict(GEXSentConfig, config)
        input_dims = {m: n for m, n in input_dims.items() if m in self.reads(cfg)}
        self.modalities, out_dim = resolve_inputs(input_dims, task, num_classes)
        self.task = task
        d = cfg.width()
        self.encoders = nn.ModuleDict({m: LSTMEncoder(input_dims[m], cfg.lstm_dim, dropout=cfg.dropout)
                                       for m in self.modalities if not schema.get(m).ordered})
        width = {m: cfg.lstm_dim if m in self.encoders else input_dims[m] for m in self.modalities}
        self.experts = nn.ModuleDict({
            m: nn.Linear(width[m], d) if "experts" in cfg.ablate else LinearExperts(width[m], d, cfg.n_experts, cfg.top_k)
            for m in self.modalities
        })
        self.self_attention = GatedSelfAttention(d, cfg.heads(), cfg.attention_dropout)  # shared, as published
        gam = "gated_attention" not in cfg.ablate
        # the reference's cross-attention logits are q.k / 0.1 (x 10, not 1/sqrt(d)); the softmax-mean gate
        # discards them anyway
        self.cross_gates = nn.ModuleDict({m: CrossModalGate(d, 10.0, "softmax_mean", cfg.n_experts)
                                          for m in self.modalities if gam})
        self.gated_attention = GatedSelfAttention(d, 1, cfg.attention_dropout, gate_bias=False, out_proj=False) if gam else None
        self.head = nn.Linear(d, out_dim)

    def forward(self, batch: dict) -> dict:
        masks = {m: batch[f"{m}_mask"] for m in self.modalities}
        streams, stats, per_sample = {}, {}, {}
        for m in self.modalities:
            x = self.encoders[m](batch[m]) if m in self.encoders else batch[m]
            if isinstance(self.experts[m], LinearExperts):
                streams[m], stats[m], per_sample[m] = self.experts[m](x, masks[m])
            else:
                streams[m] = self.experts[m](x) * masks[m][..., None]

        outputs, token_gates = {}, {}
        for m in self.modalities:
            outputs[m] = self.self_attention(streams[m], masks[m])  # no residual, as published
            if self.gated_attention is not None:
                token_gates[m] = self.cross_gates[m](streams[m], *cross_context(streams, masks, m))
                outputs[m] = self.gated_attention(outputs[m], masks[m], token_gates[m])

        # one mean over every real token of every modality
        tokens = torch.cat([outputs[m] for m in self.modalities], dim=1)
        mask = torch.cat([masks[m] for m in self.modalities], dim=1)
        pred = to_prediction(self.head(masked_mean(tokens, mask)), self.task)
        counts = torch.stack([masks[m].sum(-1) for m in self.modalities], dim=-1).float()  # (B, M)
        extras = {"modality_weights": counts / counts.sum(-1, keepdim=True).clamp_min(1),
                  **{f"token_gates_{m}": g.detach()[..., 0] for m, g in token_gates.items()}}
        if stats:
            extras.update(routing_extras({m: s.gathered(self.training) for m, s in stats.items()}, per_sample))
        return {"pred": pred, "aux": {}, "extras": extras}


GEXSent.variants = {"reference": ReferenceGEXSent}
GEXSent.published_recipe = PUBLISHED_RECIPE
