"""GCE: Grading-Inspired Complementary Enhancing for multimodal sentiment analysis.

Our version of Huang et al., "Grading-Inspired Complementary Enhancing for
Multimodal Sentiment Analysis", Information Fusion 2026 (reference code:
github.com/hka-7/GCEforMSA, ``src/model.py``; read, not copied; its training
loop is not published). The forward pass:

1. Utterance vectors. Text: the first ([CLS]-like) token state or the masked
   mean (``text_pool``), used as is or projected (``text_dim``). Visual and
   acoustic: a transformer encoder with a learnable global token whose output is
   the utterance vector. A missing modality gets a learned stand-in vector.
2. Pairs. For text-visual, text-acoustic, visual-acoustic: tanh-projected
   concatenation through a linear map (the reference's 1x1 convolution).
3. Prediction. Unimodal vectors concatenated -> ``fusion_dim``, pair vectors
   concatenated -> ``fusion_dim``, the two mixed by a linear map (1x1 conv)
   2 * fusion_dim -> fusion_dim, then an MLP head.

Auxiliary losses (already weighted; the trainer adds them to the task loss):

* ``graders``: predictor heads on *detached* unimodal and pair vectors, trained
  with the task loss. They measure each branch without steering the encoders.
  Training only (they need labels).
* ``relation``: task-aware grading + relation filtering, training only, three
  modalities only. Each pair grader's error picks a guide pair -- per batch (the
  reference: mean L1 error; the best pair guides pair s only if its error is
  below ``grading_ratio`` x s's error) or per sample (``grading="sample"``, ours).
  The student's cosine-similarity (Gram) matrix over the batch is pulled towards
  the detached guide's, row i weighted by w_i = sigmoid(alpha * W[z_guide; z_student]).
* ``contrastive``: symmetric InfoNCE between each modality pair's utterance
  vectors (projections to ``contrastive_dim``), in training and evaluation.

Fewer modalities: with two there is one pair, so no grading and no ``relation``
loss; with one there is no pair and no contrastive loss, and GCE reduces to its
unimodal path (utterance vector -> ``fusion_dim`` -> head, plus its grader).

Example (parameter count at the default, reference sizes):

>>> import torch
>>> from pipeline.models import build_model
>>> model = build_model("gce", {"text": 384, "visual": 1280, "acoustic": 45}, "regression", 1, {})
>>> print(sum(p.numel() for p in model.parameters()))
1624128
>>> batch = {m: torch.randn(4, 5, d) for m, d in {"text": 384, "visual": 1280, "acoustic": 45}.items()}
>>> batch.update({f"{m}_mask": torch.ones(4, 5, dtype=torch.bool) for m in ("text", "visual", "acoustic")})
>>> batch["label"] = torch.tensor([-2.0, -0.5, 0.5, 2.0])
>>> out = model(batch)
>>> out["pred"].shape, sorted(out["aux"])
(torch.Size([4]), ['contrastive', 'graders', 'relation'])
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import schema
from ..params import between, fail, ge, gt, one_of, param, section
from .blocks import (
    ContrastiveAlignment,
    GlobalTokenEncoder,
    MLPHead,
    config_from_dict,
    resolve_inputs,
    task_loss,
    to_prediction,
    utterance_vector,
)


@section("gce")
@dataclass
class GCEConfig:
    text_pool: str = param("mean", one_of("first", "mean"),
                           "first ([CLS], reference) | mean: frozen sentence encoders are trained for mean pooling")
    text_dim: int = param(0, ge(0), "0: text vector used as is (reference); > 0: Linear + tanh projection to this size")
    visual_d_model: int = param(24, ge(1), "visual encoder width (reference: 24)")
    acoustic_d_model: int = param(16, ge(1), "acoustic encoder width (reference: 16); also other sequence modalities")
    encoder_layers: int = param(3, ge(1), "transformer layers per encoder (reference: 3)")
    encoder_heads: int = param(4, ge(1), "attention heads per encoder (reference: 4)")
    encoder_ff_dim: int = param(0, ge(0), "encoder feed-forward size; 0: 4 x width (reference: 2048, ~5x the step time)")
    utterance_dim: int = param(64, ge(1), "visual/acoustic utterance vector size (reference: 64)")
    pair_dim: int = param(64, ge(1), "pair representation size (reference: 64)")
    fusion_dim: int = param(512, ge(1), "unimodal and pair summaries, and their mix (reference: 512)")
    head_hidden: int = param(128, ge(1), "hidden size of the head and the graders (reference d_prjh: 128)")
    dropout: float = param(0.1, between(0, 1, hi_open=True), "head/grader dropout and encoder dropout (reference: 0.1)")
    grading: str = param("batch", one_of("batch", "sample"), "batch (reference: one guide per batch) | sample")
    grading_ratio: float = param(0.7, gt(0), "guide g teaches pair s only where error_g < ratio * error_s")
    relation_dim: int = param(64, ge(1), "projection size inside the relation filter (reference gd_size: 64)")
    relation_alpha: float = param(0.125, gt(0), "w = sigmoid(alpha * W[z_g; z_s]) (reference: 1/8)")
    contrastive_dim: int = param(128, ge(1), "InfoNCE projection size (reference: 128)")
    contrastive_temperature: float = param(0.07, gt(0), "InfoNCE temperature (reference: 0.07)")
    learnable_temperature: bool = param(False, doc="learn the InfoNCE scale (CLIP-style, capped at 100)")
    grader_weight: float = param(1.0, ge(0), "weight of the graders' task losses")
    contrastive_weight: float = param(0.35, ge(0), "alpha in the reference config")
    relation_weight: float = param(0.25, ge(0), "beta in the reference config")

    def __post_init__(self):
        for m in ("visual", "acoustic"):
            if self.encoder_width(m) % self.encoder_heads:
                raise fail("encoder_heads", self.encoder_heads, f"a divisor of {m}_d_model ({self.encoder_width(m)})")

    def encoder_width(self, modality: str) -> int:
        """Width of a sequence modality's encoder: visual_d_model for visual, acoustic_d_model otherwise."""
        return self.visual_d_model if modality == "visual" else self.acoustic_d_model


def gram(x: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity matrix of a batch of vectors: (B, d) -> (B, B)."""
    x = F.normalize(x.float(), dim=-1)
    return x @ x.t()


def grade_pairs(errors: torch.Tensor, valid: torch.Tensor, ratio: float, per_sample: bool):
    """Task-aware grading: who guides whom, on which samples.

    errors (P, B): each pair grader's per-sample error; valid (P, B): the pair's
    two modalities are present. Per batch, a pair's error is its mean over valid
    samples and one guide serves the whole batch; per sample, each sample has its
    own guide. Returns guides (P, P, B) bool, True where pair g guides pair s on
    sample i (never g == s), and the errors used (P, B).
    """
    errors = errors.float().masked_fill(~valid, float("inf"))
    if not per_sample:
        batch_error = errors.masked_fill(~valid, 0.0).sum(1) / valid.sum(1).clamp_min(1)
        batch_error = batch_error.masked_fill(~valid.any(1), float("inf"))
        errors = batch_error[:, None].expand_as(errors)
    n_pairs = errors.shape[0]
    is_guide = F.one_hot(errors.argmin(dim=0), n_pairs).t().bool()  # (P, B)
    clearly_better = errors[:, None, :] < ratio * errors[None, :, :]  # (P_g, P_s, B)
    guides = is_guide[:, None, :] & clearly_better & valid[:, None, :] & valid[None, :, :]
    return guides, errors


class RelationFilter(nn.Module):
    """Weighted transfer of batch relations from a guide pair to a student pair.

    w_i = sigmoid(alpha * W[z_guide; z_student]) with z = projection of the
    L2-normalised representation; loss = sum_ij rows_i w_i cols_j (G_s - G_g)_ij^2 / n,
    G = cosine Gram matrices over the batch, the guide detached, n = number of
    valid samples (the batch size when nothing is missing).
    """

    def __init__(self, dim: int, relation_dim: int, alpha: float):
        super().__init__()
        self.project = nn.Linear(dim, relation_dim)
        self.score = nn.Linear(2 * relation_dim, 1)
        self.alpha = alpha

    def weights(self, guide: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """(B, d), (B, d) -> (B,) in (0, 1)."""
        z_guide = self.project(F.normalize(guide.float(), dim=-1))
        z_student = self.project(F.normalize(student.float(), dim=-1))
        return torch.sigmoid(self.alpha * self.score(torch.cat([z_guide, z_student], dim=-1)))[:, 0]

    def forward(self, guide, student, rows, cols):
        """rows (B,): samples this guide teaches; cols (B,): samples valid for both pairs."""
        guide = guide.detach()
        weights = self.weights(guide, student) * rows  # (B,)
        squared = (gram(student) - gram(guide)) ** 2  # (B, B)
        return (squared * weights[:, None] * cols[None, :]).sum() / cols.sum().clamp_min(1)


class PairFusion(nn.Module):
    """Pair representation: Linear([tanh(A a); tanh(B b)]), the reference's 1x1 convolution."""

    def __init__(self, dim_a: int, dim_b: int, out_dim: int):
        super().__init__()
        self.proj_a = nn.Linear(dim_a, dim_a)
        self.proj_b = nn.Linear(dim_b, dim_b)
        self.mix = nn.Linear(dim_a + dim_b, out_dim)

    def forward(self, a, b):
        return self.mix(torch.cat([torch.tanh(self.proj_a(a)), torch.tanh(self.proj_b(b))], dim=-1))


class GCE(nn.Module):
    """Graded pairwise fusion over any non-empty subset of the registered modalities."""

    config_class = GCEConfig

    def __init__(self, input_dims: dict[str, int], task: str = "regression", num_classes: int = 1,
                 config: GCEConfig | dict | None = None):
        super().__init__()
        self.config = cfg = config_from_dict(GCEConfig, config)
        self.modalities, out_dim = resolve_inputs(input_dims, task, num_classes)
        self.task = task

        # utterance encoders; dims[m] is the size of modality m's utterance vector
        # a modality with a pooled vector (text) takes its vector; the others get a global-token encoder
        self.encoders = nn.ModuleDict()
        dims = {}
        for m in self.modalities:
            if schema.get(m).pooled:
                dims[m] = cfg.text_dim or input_dims[m]
                self.encoders[m] = (
                    nn.Sequential(nn.Linear(input_dims[m], cfg.text_dim), nn.Tanh()) if cfg.text_dim else nn.Identity()
                )
            else:
                width = cfg.encoder_width(m)
                dims[m] = cfg.utterance_dim
                self.encoders[m] = GlobalTokenEncoder(
                    input_dims[m], width, cfg.encoder_heads, cfg.encoder_layers, cfg.encoder_ff_dim or 4 * width,
                    cfg.utterance_dim, cfg.dropout,
                )
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(dims[m])) for m in self.modalities})

        self.pairs = list(itertools.combinations(self.modalities, 2))  # [(text, visual), (text, acoustic), ...]
        self.pair_names = [f"{a}_{b}" for a, b in self.pairs]
        self.pair_fusion = nn.ModuleDict({
            name: PairFusion(dims[a], dims[b], cfg.pair_dim) for name, (a, b) in zip(self.pair_names, self.pairs)
        })
        self.contrastive = nn.ModuleDict({
            name: ContrastiveAlignment(dims[a], dims[b], cfg.contrastive_dim, cfg.contrastive_temperature,
                                       cfg.learnable_temperature)
            for name, (a, b) in zip(self.pair_names, self.pairs)
        })

        # graders: heads on detached branches, never feeding the prediction
        self.unimodal_graders = nn.ModuleDict({
            m: MLPHead(dims[m], cfg.head_hidden, out_dim, cfg.dropout) for m in self.modalities
        })
        self.pair_graders = nn.ModuleDict({
            name: MLPHead(cfg.pair_dim, cfg.head_hidden, out_dim, cfg.dropout) for name in self.pair_names
        })
        self.relation_filter = RelationFilter(cfg.pair_dim, cfg.relation_dim, cfg.relation_alpha) if len(self.pairs) > 1 else None

        # prediction
        self.unimodal_summary = nn.Linear(sum(dims.values()), cfg.fusion_dim)
        if self.pairs:
            self.pair_summary = nn.Linear(len(self.pairs) * cfg.pair_dim, cfg.fusion_dim)
            self.summary_mix = nn.Linear(2 * cfg.fusion_dim, cfg.fusion_dim)  # the reference's 1x1 convolution
        self.head = MLPHead(cfg.fusion_dim, cfg.head_hidden, out_dim, cfg.dropout)

    def forward(self, batch: dict) -> dict:
        cfg = self.config
        present = {m: batch[f"{m}_mask"].any(dim=-1) for m in self.modalities}  # (B,)

        # 1. utterance vectors, (B, dims[m]) each
        utterances = {}
        for m in self.modalities:
            if schema.get(m).pooled:
                vector = self.encoders[m](utterance_vector(batch, m, cfg.text_pool))
            else:
                vector = self.encoders[m](batch[m], batch[f"{m}_mask"])
            utterances[m] = torch.where(present[m][:, None], vector, self.missing[m].to(vector.dtype))

        # 2. pair representations, (B, pair_dim) each
        pair_reprs = {name: self.pair_fusion[name](utterances[a], utterances[b])
                      for name, (a, b) in zip(self.pair_names, self.pairs)}
        pair_valid = torch.stack([present[a] & present[b] for a, b in self.pairs]) if self.pairs else None  # (P, B)

        # 3. prediction from the unimodal and pair summaries
        fused = self.unimodal_summary(torch.cat([utterances[m] for m in self.modalities], dim=-1))  # (B, fusion_dim)
        if self.pairs:
            pair_summary = self.pair_summary(torch.cat([pair_reprs[n] for n in self.pair_names], dim=-1))
            fused = self.summary_mix(torch.cat([fused, pair_summary], dim=-1))
        pred = to_prediction(self.head(fused), self.task)

        aux, extras = {}, {}
        if self.pairs:
            contrastive = sum(self.contrastive[name](utterances[a], utterances[b], pair_valid[i])
                              for i, (name, (a, b)) in enumerate(zip(self.pair_names, self.pairs)))
            aux["contrastive"] = cfg.contrastive_weight * contrastive

        label = batch.get("label")
        if self.training and label is not None:
            # graders see detached inputs: their loss trains only themselves
            def grader_loss(grader, representation, valid):
                per_sample = task_loss(to_prediction(grader(representation.detach()), self.task), label, self.task,
                                       reduction="none")  # (B,)
                return per_sample, (per_sample * valid).sum() / valid.sum().clamp_min(1)

            losses = [grader_loss(self.unimodal_graders[m], utterances[m], present[m])[1] for m in self.modalities]
            pair_errors = []
            for i, name in enumerate(self.pair_names):
                per_sample, loss = grader_loss(self.pair_graders[name], pair_reprs[name], pair_valid[i])
                pair_errors.append(per_sample.detach())
                losses.append(loss)
            aux["graders"] = cfg.grader_weight * torch.stack(losses).sum()

            if self.relation_filter is not None:
                guides, errors = grade_pairs(torch.stack(pair_errors), pair_valid, cfg.grading_ratio,
                                             per_sample=cfg.grading == "sample")
                relation = fused.new_zeros((), dtype=torch.float32)
                for g, s in itertools.permutations(range(len(self.pairs)), 2):
                    if guides[g, s].any():
                        both_valid = (pair_valid[g] & pair_valid[s]).float()
                        relation = relation + self.relation_filter(
                            pair_reprs[self.pair_names[g]], pair_reprs[self.pair_names[s]],
                            rows=guides[g, s].float(), cols=both_valid,
                        )
                aux["relation"] = cfg.relation_weight * relation
                extras["pair_errors"] = errors.detach()  # (P, B); per batch, each row is constant
                extras["guides"] = guides.detach()  # (P, P, B)
        return {"pred": pred, "aux": aux, "extras": extras}
