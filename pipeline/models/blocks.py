"""Small building blocks shared by the models in this package.

Everything here works on padded batches: a feature tensor ``x`` of shape
(B, L, D) comes with a boolean ``mask`` of shape (B, L), True on real tokens or
frames. A sample that lacks a modality has an all-False mask row; every block
must give finite outputs for it and must not let padded positions leak into any
real output.

Nothing here calls ``.cuda()`` or ``.squeeze()``: devices follow the inputs and
batch size 1 is an ordinary batch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import schema
from ..params import parse

TASKS = ("regression", "classification")


# ----------------------------------------------------------------------------
# Configuration and inputs
# ----------------------------------------------------------------------------
def config_from_dict(config_class, config, name: str | None = None):
    """A model's params.yaml section (a dict, or already the config) -> its config dataclass; unknown keys,
    wrong types and out-of-range values raise ParamError naming the key."""
    return parse(config_class, config, name or getattr(config_class, "section_name", config_class.__name__))


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def resolve_inputs(input_dims: dict[str, int], task: str, num_classes: int) -> tuple[tuple[str, ...], int]:
    """Validate the model inputs; return the modalities present (registry order) and the output size."""
    registered = schema.names()
    unknown = sorted(set(input_dims) - set(registered))
    if unknown:
        raise ValueError(f"unknown modality {unknown}; registered: {list(registered)}")
    modalities = tuple(m for m in registered if m in input_dims)
    if not modalities:
        raise ValueError("input_dims must name at least one modality")
    for m in modalities:
        if int(input_dims[m]) < 1:
            raise ValueError(f"input_dims[{m!r}] must be a positive feature size, got {input_dims[m]}")
    check_choice("task", task, TASKS)
    if task == "classification" and num_classes < 2:
        raise ValueError(f"classification needs num_classes >= 2, got {num_classes}")
    out_dim = 1 if task == "regression" else int(num_classes)
    return modalities, out_dim


def to_prediction(logits: torch.Tensor, task: str) -> torch.Tensor:
    """(B, 1) -> (B,) score for regression; (B, C) logits unchanged for classification."""
    return logits[..., 0] if task == "regression" else logits


def task_loss(pred: torch.Tensor, label: torch.Tensor, task: str, reduction: str = "mean") -> torch.Tensor:
    """The task loss the trainer uses too: L1 for regression, cross-entropy for classification."""
    if task == "regression":
        return F.l1_loss(pred.float(), label.float(), reduction=reduction)
    return F.cross_entropy(pred.float(), label.long(), reduction=reduction)


# ----------------------------------------------------------------------------
# A 3-class sentiment model on a regression corpus (GEXSent's published recipe)
# ----------------------------------------------------------------------------
SENTIMENT_CLASSES = ("negative", "neutral", "positive")


def sentiment_class(score: torch.Tensor) -> torch.Tensor:
    """Scores -> 0 negative, 1 neutral (exactly 0), 2 positive: the sign, as the published polarity -1 / 0 / 1."""
    return (torch.sign(score.float()) + 1).long()


def class_centers(labels) -> list[float]:
    """Each sentiment class's mean training label: negative, 0, positive. A class with no training label
    gets the mean absolute nonzero label (1 without any) with its sign."""
    labels = torch.as_tensor(labels, dtype=torch.float64).reshape(-1)
    nonzero = labels[labels != 0]
    spread = float(nonzero.abs().mean()) if len(nonzero) else 1.0
    negative, positive = labels[labels < 0], labels[labels > 0]
    return [float(negative.mean()) if len(negative) else -spread, 0.0,
            float(positive.mean()) if len(positive) else spread]


class ClassScore(nn.Module):
    """A 3-class sentiment classifier scored on a regression corpus.

    The wrapped model (built for classification, 3 classes) sees labels as classes (`sentiment_class`);
    its logits stay in ``out["class_logits"]`` for the loss, and ``out["pred"]`` is the expected score
    sum_c p_c * centers_c, centers = each class's mean training label (a buffer: checkpoints keep them).
    """

    def __init__(self, model: nn.Module, centers):
        super().__init__()
        self.fusion = model
        self.register_buffer("centers", torch.tensor(centers, dtype=torch.float32))

    def forward(self, batch: dict) -> dict:
        if "label" in batch:
            batch = {**batch, "label": sentiment_class(batch["label"])}
        out = self.fusion(batch)
        logits = out["pred"]
        return {**out, "pred": logits.float().softmax(-1) @ self.centers, "class_logits": logits}


# ----------------------------------------------------------------------------
# The global batch under DDP
# ----------------------------------------------------------------------------
class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the gradient of its own rows, summed over ranks.

    Every rank computes the same batch-level loss L from the gathered rows, so rank k's gradient for
    rank r's rows is dL/dx_r; the sum over ranks is W * dL/dx_r, and DDP's averaging divides by W
    again: each parameter ends with exactly the single-process gradient. An all_reduce of the full
    gradient (not reduce_scatter) works on every backend, gloo included; the tensors are small.
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def distributed() -> bool:
    """True inside a torchrun process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_batch(x: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """This rank's rows (B_r, ...) -> every rank's rows concatenated in rank order (sum_r B_r, ...).

    Batch-level terms (InfoNCE, Gram matrices, grading, load balance) computed on the result are
    the same on every rank and equal the single-process term over the global batch; gradients flow
    back to each rank's own rows (`_GatherRows`). Unchanged in a single process or when not enabled
    (evaluation: each rank then scores whole batches of its own). Every rank must have the same
    number of rows, which the trainer's DistributedSampler guarantees.
    """
    if not (enabled and distributed()):
        return x
    if x.dtype == torch.bool:  # gloo gathers no bool
        return _GatherRows.apply(x.to(torch.uint8)).bool()
    return _GatherRows.apply(x)


# ----------------------------------------------------------------------------
# Pooling, heads, projections
# ----------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real positions: (B, L, D), (B, L) -> (B, D); zeros for an all-padding row."""
    # masked_fill rather than a multiply: padding may hold anything, even NaN
    x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
    count = mask.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)
    return x.sum(dim=1) / count


def utterance_vector(batch: dict, modality: str, pool: str) -> torch.Tensor:
    """One vector per utterance from a modality's steps: the first ([CLS]-like) state, or the masked mean
    (the stored pooled vector when the modality has one, as text does)."""
    keys = schema.get(modality).batch_keys()
    if pool == "first":
        return batch[keys["sequence"]][:, 0]
    if batch.get(keys.get("pooled", "")) is not None:
        return batch[keys["pooled"]]
    return masked_mean(batch[keys["sequence"]], batch[keys["mask"]])


class MLPHead(nn.Module):
    """Dropout -> Linear -> GELU -> Dropout -> Linear: the prediction head used by every model."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FeatureProjection(nn.Module):
    """Linear -> LayerNorm -> Dropout from a modality's feature size to the model width.

    With ``positions=True`` sinusoidal positions are added: frame and audio-step
    features carry no order of their own (text token states already do).
    """

    def __init__(self, in_dim: int, d_model: int, dropout: float = 0.0, positions: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_dim, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.positions = positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if self.positions:
            x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device).to(x.dtype)
        return self.dropout(self.norm(x))


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """The fixed sine/cosine position table of "Attention is all you need": (length, dim)."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


# ----------------------------------------------------------------------------
# Token-level mixture of experts
# ----------------------------------------------------------------------------
def route_top_k(router_logits: torch.Tensor, top_k: int):
    """Top-k routing: (T, E) logits -> probs (T, E), weights (T, k) summing to 1, experts (T, k).

    The softmax runs in float32 (it is the balance loss's input too); the weights
    are the chosen experts' probabilities renormalised over the k chosen.
    """
    probs = router_logits.float().softmax(dim=-1)
    top_probs, top_experts = probs.topk(top_k, dim=-1)
    top_weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return probs, top_weights, top_experts


class RoutingStats(NamedTuple):
    """What a batch's routing says about the experts; sums, so the batches of several ranks add up."""
    prob_sum: torch.Tensor    # (E,) router probabilities summed over tokens (carries the gradient)
    routed: torch.Tensor      # (E,) routings per expert (k per token)
    tokens: torch.Tensor      # () routed tokens
    top_k: int

    def balance_loss(self) -> torch.Tensor:
        """Switch-Transformer balance loss: E * sum_e (fraction of routings to e) * (mean router probability of e).

        Equals 1 when routing is uniform and grows to E / k when every token goes to the same k experts.
        """
        tokens = self.tokens.clamp_min(1)
        return self.prob_sum.numel() * ((self.routed / (tokens * self.top_k)) * (self.prob_sum / tokens)).sum()

    def gathered(self, enabled: bool = True) -> "RoutingStats":
        """The same sums over the global batch (every rank's tokens) under DDP, in one all-gather; unchanged otherwise."""
        n = self.prob_sum.numel()
        row = torch.cat([self.prob_sum.float(), self.routed.float(), self.tokens.float().reshape(1)])
        total = global_batch(row[None], enabled).sum(0)
        return RoutingStats(total[:n], total[n:2 * n], total[2 * n], self.top_k)


def load_balance_loss(probs: torch.Tensor, top_experts: torch.Tensor) -> torch.Tensor:
    """Balance loss of (T, E) router probabilities and (T, k) chosen experts (see RoutingStats)."""
    return routing_stats(probs, top_experts).balance_loss()


def routing_stats(probs: torch.Tensor, top_experts: torch.Tensor) -> RoutingStats:
    n_tokens, n_experts = probs.shape
    routed = torch.bincount(top_experts.reshape(-1), minlength=n_experts).float()
    return RoutingStats(probs.float().sum(0), routed, probs.new_tensor(float(n_tokens)), top_experts.shape[-1])


class MixtureOfExperts(nn.Module):
    """Token-level mixture of small FFN experts with top-k routing and a load-balancing loss.

    The experts' weights live in stacked tensors, (E, d, h) and (E, h, d), so the
    two routing implementations share parameters and give the same result:

    * ``routing="dispatch"``: the routed (token, expert) pairs are sorted by expert
      into a padded (E, capacity, d) buffer and all experts run in one batched
      matmul. Work grows with k, not E; capacity is the busiest expert's load, so
      no token is ever dropped (and skewed routing costs more).
    * ``routing="einsum"``: every expert runs on every token in one einsum and the
      outputs are combined with the (mostly zero) gate weights. E/k times the
      FLOPs, but no sorting or indexing.

    ``python -m tools.bench_moe`` times both at our sizes.
    Only real tokens (mask True) are routed; padded positions come out as zeros.
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, top_k: int, routing: str = "dispatch"):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        check_choice("routing", routing, ("dispatch", "einsum"))
        self.n_experts, self.top_k, self.routing = n_experts, top_k, routing
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.b_in = nn.Parameter(torch.empty(n_experts, d_hidden))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        self.b_out = nn.Parameter(torch.empty(n_experts, d_model))
        # the same uniform(+-1/sqrt(fan_in)) initialisation nn.Linear uses, per expert
        for weight, bias, fan_in in ((self.w_in, self.b_in, d_model), (self.w_out, self.b_out, d_hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        """x (B, L, d), mask (B, L) -> output (B, L, d), RoutingStats, routing weight per sample and expert (B, E)."""
        tokens = x[mask]  # (T, d), real tokens only
        probs, weights, experts = route_top_k(self.router(tokens), self.top_k)
        if self.routing == "dispatch":
            mixed = self._dispatch(tokens, weights, experts)
        else:
            mixed = self._all_experts(tokens, weights, experts)
        out = torch.zeros(x.shape, dtype=mixed.dtype, device=x.device)
        out[mask] = mixed
        return out, routing_stats(probs, experts), per_sample_routing(weights, experts, mask, self.n_experts)

    def _expert_ffn(self, inputs: torch.Tensor) -> torch.Tensor:
        """All experts at once on per-expert inputs: (E, N, d) -> (E, N, d)."""
        hidden = F.gelu(torch.baddbmm(self.b_in.unsqueeze(1), inputs, self.w_in))  # (E, N, h)
        return torch.baddbmm(self.b_out.unsqueeze(1), hidden, self.w_out)

    def _dispatch(self, tokens, weights, experts):
        n_tokens, d_model = tokens.shape
        flat_expert = experts.reshape(-1)  # (T*k,) the expert of each routing
        order = flat_expert.argsort(stable=True)
        sorted_expert = flat_expert[order]
        source_token = torch.div(order, self.top_k, rounding_mode="floor")  # token of each sorted routing
        per_expert = torch.bincount(flat_expert, minlength=self.n_experts)
        capacity = int(per_expert.max()) if n_tokens else 0  # one host sync; no token is dropped
        first_slot = per_expert.cumsum(0) - per_expert
        slot = torch.arange(flat_expert.numel(), device=tokens.device) - first_slot[sorted_expert]

        buffer = tokens.new_zeros(self.n_experts, capacity, d_model)  # (E, C, d)
        buffer[sorted_expert, slot] = tokens[source_token]
        routed_out = self._expert_ffn(buffer)[sorted_expert, slot]  # (T*k, d)
        routed_out = routed_out * weights.reshape(-1)[order].unsqueeze(-1).to(routed_out.dtype)
        out = routed_out.new_zeros(n_tokens, d_model)
        return out.index_add(0, source_token, routed_out)

    def _all_experts(self, tokens, weights, experts):
        hidden = F.gelu(torch.einsum("td,edh->teh", tokens, self.w_in) + self.b_in)  # (T, E, h)
        expert_out = torch.einsum("teh,ehd->ted", hidden, self.w_out) + self.b_out  # (T, E, d)
        combine = torch.zeros(experts.shape[0], self.n_experts, device=tokens.device, dtype=weights.dtype)
        combine = combine.scatter(1, experts, weights)  # (T, E): the k renormalised weights, zeros elsewhere
        return torch.einsum("te,ted->td", combine.to(expert_out.dtype), expert_out)


def per_sample_routing(weights: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Routing weights (T, k) of experts (T, k) for the real tokens of mask (B, L) -> (B, E): each sample's
    weight per expert summed over its tokens (what `--explain` ranks a clip's top experts by)."""
    sample = mask.nonzero()[:, 0]  # (T,) the sample of each real token, in x[mask] order
    out = torch.zeros(mask.shape[0], n_experts, device=weights.device)
    return out.index_put_((sample[:, None].expand_as(experts), experts), weights.detach().float(), accumulate=True)


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------
def attendable(mask: torch.Tensor) -> torch.Tensor:
    """Key mask with all-padding rows opened up, so softmax never sees only -inf (NaN).

    Those rows belong to a missing modality; their outputs are masked out later.
    """
    return mask | ~mask.any(dim=-1, keepdim=True)


class GatedSelfAttention(nn.Module):
    """Multi-head self-attention over a padded sequence, optionally gated per token (GAM).

    Without gates it is plain masked self-attention. With gates g (B, L, 1) in
    [0, 1], Q and K are multiplied by g before the scaled dot product, as in the
    GEXSent reference. That alone cannot silence a token: a zero gate makes its
    scores 0, not -inf, so it still takes attention mass. With ``gate_bias`` (the
    default) log g is also added to each key's score, which makes a zero gate an
    exact mask and a gate of 1 a no-op.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, gate_bias: bool = True, out_proj: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.dropout, self.gate_bias = n_heads, dropout, gate_bias
        self.qkv = nn.Linear(d_model, 3 * d_model)
        # the GEXSent reference's gated block returns softmax(QK/sqrt(d)) V with no output projection
        self.out_proj = nn.Linear(d_model, d_model) if out_proj else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, d_model = x.shape
        query, key, value = self.qkv(x).chunk(3, dim=-1)  # each (B, L, d)
        if gates is not None:
            query, key = query * gates, key * gates

        # additive score bias (B, 1, 1, L): -inf on padded keys, log g on gated keys
        bias = torch.zeros(batch, 1, 1, length, device=x.device)
        bias = bias.masked_fill(~attendable(mask)[:, None, None, :], float("-inf"))
        if gates is not None and self.gate_bias:
            bias = bias + gates.float().clamp_min(1e-30).log().reshape(batch, 1, 1, length)

        def heads(t):  # (B, L, d) -> (B, H, L, d/H)
            return t.reshape(batch, length, self.n_heads, -1).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(query), heads(key), heads(value),
            attn_mask=bias.to(query.dtype),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, d_model))


class GlobalTokenEncoder(nn.Module):
    """Transformer encoder with a learnable global token; its output is the utterance vector.

    (B, L, D_in), mask (B, L) -> (B, out_dim). The global token is never padding,
    so a sample with no frames still gets a (learned, input-independent) vector.
    """

    def __init__(self, input_dim: int, d_model: int, n_heads: int, n_layers: int, ff_dim: int,
                 out_dim: int, dropout: float = 0.1, token_std: float = 0.02):
        super().__init__()
        self.input_proj = nn.Linear(input_dim, d_model)
        self.global_token = nn.Parameter(torch.randn(1, 1, d_model) * token_std)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, ff_dim, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.out_proj = nn.Linear(d_model, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        frames = self.input_proj(x)
        sequence = torch.cat([self.global_token.expand(batch, -1, -1).to(frames.dtype), frames], dim=1)
        is_real = torch.cat([mask.new_ones(batch, 1), mask], dim=1)  # (B, 1 + L)
        states = self.encoder(sequence, src_key_padding_mask=~is_real)
        return self.out_proj(states[:, 0])


# ----------------------------------------------------------------------------
# Contrastive alignment
# ----------------------------------------------------------------------------
def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP loss) between row-aligned (N, d) embeddings; sample i of a matches i of b."""
    return symmetric_cross_entropy(logit_scale * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).t())


def symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(N, N) similarity logits whose diagonal holds the matching pairs -> mean of both directions' cross-entropy."""
    if logits.shape[0] < 2:  # nothing to contrast against
        return logits.sum() * 0.0
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


class ContrastiveAlignment(nn.Module):
    """Projects two modalities' utterance vectors to a shared space and scores them with InfoNCE.

    ``reference=True`` is GCE's published ``Clip`` module: a is projected then L2-normalised, b is
    normalised then projected (and not normalised again), and the logits are scaled by log(1/T)
    (2.66 at T = 0.07) instead of CLIP's 1/T (14.3). Otherwise both sides are projected and
    normalised and the scale is 1/T, optionally learnt (capped at 100, as CLIP does).
    """

    def __init__(self, dim_a: int, dim_b: int, proj_dim: int, temperature: float, learnable_temperature: bool,
                 reference: bool = False):
        super().__init__()
        self.proj_a = nn.Linear(dim_a, proj_dim)
        self.proj_b = nn.Linear(dim_b, proj_dim)
        self.reference = reference
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature and not reference:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self, a: torch.Tensor, b: torch.Tensor, both_present: torch.Tensor) -> torch.Tensor:
        """a (B, d_a), b (B, d_b), both_present (B,) -> loss over the samples that have both."""
        a, b = a[both_present].float(), b[both_present].float()
        if self.reference:
            a = F.normalize(self.proj_a(a), dim=-1)
            b = self.proj_b(F.normalize(b, dim=-1))
            return symmetric_cross_entropy(self.log_scale * a @ b.t())
        scale = self.log_scale.clamp(max=math.log(100.0)).exp()  # CLIP's cap on the learnable scale
        return info_nce(self.proj_a(a), self.proj_b(b), scale)
