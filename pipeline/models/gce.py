"""GCE: Grading-Inspired Complementary Enhancing for multimodal sentiment analysis.

Huang et al., "Grading-Inspired Complementary Enhancing for Multimodal Sentiment Analysis",
Information Fusion 2026; reference code github.com/hka-7/GCEforMSA (``src/model.py``,
``src/modules/encoders.py``, ``src/config.py``; read, not copied; its training loop, ``solver.py``,
is not published). ``gce.variant: reference`` builds the published architecture and losses at
their published widths, ``improved`` (the default) ours; every row below is one switch between the
two. ``gce.recipe: published`` trains either with config.py's optimizer, learning rates, batch,
epochs, schedule and clipping (``PUBLISHED_RECIPE``: what the unpublished loop would decide is
assumed as MMIM's solver, whose config GCE's follows, and marked so), ``ours`` (the default) with
the ``model`` params. docs/models.md has the measurements.

| component | reference code | improved (ours) | why |
|---|---|---|---|
| inputs | fine-tuned BERT-base (768-d [CLS]), FACET visual and COVAREP acoustic sequences (MOSI: 20-d and 5-d) | the pipeline's features: a frozen text encoder's states (fine-tuned only with ``model.text_finetune``), visual and acoustic sequences | frozen features make the DAG cheap; fine-tuning is one switch |
| widths | visual encoder 24, acoustic 16, 3 layers, 4 heads, FF 2048; utterance 64, pairs 64, summaries 512, heads d_prjh 128, filter gd_size 64 | the same widths in both variants (``gce`` section), but FF (see below) | |
| recipe | Adam 1e-4 (BERT 5e-5), weight decay 1e-4, batch 128, 40 epochs, ``--when 20``, clip 1.0, L1 on MOSI (config.py); the schedule behind ``when``, early stopping and what is clipped are in the unpublished loop | ``recipe: published`` takes config.py's values, the rest assumed: ReduceLROnPlateau(patience 20, factor 0.5) on the validation loss, no early stopping, one clipping norm over every parameter; ``ours``: AdamW 1e-3, batch 16, warmup + cosine, patience 8, clip 1.0 per branch | |
| loss weights | config.py: alpha 0.35 ("weight for loss1"), beta 0.25 ("weight for loss2"); the graders' weight is in the unpublished loop | ``contrastive_weight`` 0.35 and ``relation_weight`` 0.25 (which loss each weighs is a guess), ``grader_weight`` 1.0 (a guess) | the loop that combines the losses is not public |
| gradient clipping | (unpublished loop) | the prediction path and the detached branches (graders, improved filter) clipped apart (``recipe: ours``) | one norm over every parameter lets the graders' gradients shrink the predictor's step |
| text vector | ``enc_word[:, 0]``, the [CLS] state of a fine-tuned BERT | masked mean of the token states (``text_pool: auto`` picks per variant) | frozen sentence encoders (MiniLM) are trained for mean pooling, not [CLS] |
| visual / acoustic encoder | ``GlobalTokenTransformerEncoder``: 3 layers, 4 heads, FF 2048, global token ~ N(0, 1) | FF 4 x width, global token ~ N(0, 0.02^2) (``encoder_ff_dim: 0`` picks per variant) | FF 2048 on a 16-24 wide stream is ~5x the step time; a unit-variance token swamps a 16-wide stream at init |
| heads and graders | ``SubNet``: Linear+tanh, Linear+tanh, then 5 linear maps with no activation (128-64-32-16-8-1) | ``MLPHead``: Linear-GELU-Linear | five stacked linear maps are one linear map, worse conditioned |
| contrastive | ``Clip``: a projected then normalised, b normalised then projected, logits x log(1/0.07) = 2.66 | both projected and normalised, logits x 1/0.07 = 14.3 (CLIP) | the reference's b side is not unit length and its scale is the log of CLIP's |
| grading | mean L1 error per pair grader on the batch; the best pair guides pair s if err_g < 0.7 err_s | same (``grading: batch``); ``sample`` gives each sample its own guide | |
| relation filter | one w = sigmoid(W_e[W z_g; W z_s] / 8) shared by all pairs, trained only by the relation loss it multiplies | one per (guide, student), with a hidden layer, trained to predict where the guide is clearly better (``RelationFilter``) | the reference's w can only shrink: a global scale, not a filter |
| missing modality | not handled | learned stand-in vector; pairs, grading and losses masked per sample | real corpora have clips without audio or video |
| several GPUs | one GPU | InfoNCE, Gram matrices, grading and the graders' losses over the global batch (``global_batch``); the graders run on each rank's rows (their dropout is per rank) and their predictions are gathered | N ranks x B/N = one process x B |

Both variants keep padding masks everywhere (the reference pads with zeros and masks its encoders too).

The forward pass:

1. Utterance vectors. Text: its first or mean state (``text_pool``), used as is or projected
   (``text_dim``); visual and acoustic: a transformer encoder whose learnable global token's output
   is the utterance vector. A missing modality gets a learned stand-in vector.
2. Pairs. For text-visual, text-acoustic, visual-acoustic: Linear([tanh(A a); tanh(B b)]) (the
   reference's 1x1 convolution).
3. Prediction. Unimodal vectors concatenated -> ``fusion_dim``, pair vectors concatenated ->
   ``fusion_dim``, the two mixed by a linear map (1x1 conv) 2 * fusion_dim -> fusion_dim, then the head.

Auxiliary losses (already weighted; the trainer adds them to the task loss), over the global batch:

* ``graders``: prediction heads on *detached* unimodal and pair vectors, trained with the task
  loss; they measure each branch without steering the encoders (``detached_branches``: the trainer
  clips their gradients apart, else one clipping norm would let them shrink the predictor's step).
  Training only (they need labels).
* ``relation``: task-aware grading + relation filtering, training only, three modalities or more.
  The graders' errors pick, per batch (or per sample), a guide pair for each student pair; the
  student's cosine-similarity (Gram) matrix over the batch is pulled towards the detached guide's,
  row i weighted by the relation filter's w_i. ``relation_filter`` (improved only) is the filter's
  own loss.
* ``contrastive``: symmetric InfoNCE between each modality pair's utterance vectors.

Ablations (``gce.ablate``, a list; each removes one component, in either variant):

* ``grading``: no guide selection: every pair teaches every other pair on every sample where both
  are present (the filter's w still weighs the rows).
* ``relation``: no relation loss and no relation filter.
* ``contrastive``: no InfoNCE loss (the projections are not built).
* ``graders``: no grader heads and no grader loss. Grading and the improved filter read the
  graders' errors, so the relation transfer runs ungraded, with w = 1 (improved) or the
  reference's self-trained w (reference).

Fewer modalities: with two there is one pair, so no grading and no ``relation`` loss; with one there
is no pair and no contrastive loss, and GCE reduces to its unimodal path (utterance vector ->
``fusion_dim`` -> head, plus its grader).

Example (parameter count at the default, improved sizes):

>>> import torch
>>> from pipeline.models import build_model
>>> model = build_model("gce", {"text": 384, "visual": 1280, "acoustic": 45}, "regression", 1, {})
>>> print(sum(p.numel() for p in model.parameters()))
1694725
>>> batch = {m: torch.randn(4, 5, d) for m, d in {"text": 384, "visual": 1280, "acoustic": 45}.items()}
>>> batch.update({f"{m}_mask": torch.ones(4, 5, dtype=torch.bool) for m in ("text", "visual", "acoustic")})
>>> batch["label"] = torch.tensor([-2.0, -0.5, 0.5, 2.0])
>>> out = model(batch)
>>> out["pred"].shape, sorted(out["aux"])
(torch.Size([4]), ['contrastive', 'graders', 'relation', 'relation_filter'])
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
    global_batch,
    resolve_inputs,
    task_loss,
    to_prediction,
    utterance_vector,
)

VARIANTS = ("reference", "improved")
ABLATIONS = ("grading", "relation", "contrastive", "graders")
# params only one variant has a place for: (that variant, the default every other variant must keep)
VARIANT_ONLY = {"text_dim": ("improved", 0), "learnable_temperature": ("improved", False),
                "relation_alpha": ("reference", 0.125)}

# How the published code trains (src/config.py; its solver, the training loop, is not published): what
# `gce.recipe: published` runs. Each entry names its source; "assumed" where the code gives no value.
# config.py's defaults follow MMIM's (Han et al. 2021), whose solver is public: the assumptions take its choices.
PUBLISHED_RECIPE = {
    "optimizer": ("adam", "config.py: --optim Adam (weight decay as Adam's L2 penalty)"),
    "lr": (1e-4, "config.py: --lr_main 1e-4"),
    "lr_text": (5e-5, "config.py: --lr_bert 5e-5 (BERT is fine-tuned there; here with model.text_finetune)"),
    "weight_decay": (1e-4, "config.py: --weight_decay_main 1e-4 (--weight_decay_bert 1e-4 too)"),
    "batch_size": (128, "config.py: --batch_size 128"),
    "epochs": (40, "config.py: --num_epochs 40"),
    "patience": (0, "assumed: config.py has no early-stopping patience: all 40 epochs run"),
    "schedule": ("plateau", "assumed: config.py's --when 20 'when to decay learning rate'; MMIM's solver reads it "
                            "as ReduceLROnPlateau(patience=when) on the validation loss"),
    "plateau_patience": (20, "config.py: --when 20"),
    "plateau_factor": (0.5, "assumed: MMIM's solver (factor=0.5)"),
    "grad_clip": (1.0, "config.py: --clip 1.0"),
    "clip_groups": ("all", "assumed: MMIM's solver clips model.parameters() in one norm"),
    "loss": ("task", "config.py: L1Loss for mosi (its mosei path falls back to MSELoss); L1 on every corpus here"),
}


@section("gce")
@dataclass
class GCEConfig:
    variant: str = param("improved", one_of(*VARIANTS),
                         "reference (the published model) | improved (ours); the table atop pipeline/models/gce.py")
    recipe: str = param("ours", one_of("ours", "published"),
                        "ours: model.* (AdamW, warmup + cosine) | published: config.py's (PUBLISHED_RECIPE; partly assumed)")
    ablate: list[str] = param([], one_of(*ABLATIONS), "components switched off: grading | relation | contrastive | graders")
    text_pool: str = param("auto", one_of("auto", "first", "mean"), "auto: first ([CLS]) for reference, mean for improved")
    text_dim: int = param(0, ge(0), "0: text vector used as is (reference); > 0: Linear + tanh projection to this size")
    visual_d_model: int = param(24, ge(1), "visual encoder width (reference: 24)")
    acoustic_d_model: int = param(16, ge(1), "acoustic encoder width (reference: 16); also other sequence modalities")
    encoder_layers: int = param(3, ge(1), "transformer layers per encoder (reference: 3)")
    encoder_heads: int = param(4, ge(1), "attention heads per encoder (reference: 4)")
    encoder_ff_dim: int = param(0, ge(0), "encoder feed-forward size; 0: 2048 for reference, 4 x width for improved")
    utterance_dim: int = param(64, ge(1), "visual/acoustic utterance vector size (reference: 64)")
    pair_dim: int = param(64, ge(1), "pair representation size (reference: 64)")
    fusion_dim: int = param(512, ge(1), "unimodal and pair summaries, and their mix (reference: 512)")
    head_hidden: int = param(128, ge(1), "hidden size of the head and the graders (reference d_prjh: 128)")
    dropout: float = param(0.1, between(0, 1, hi_open=True), "head/grader dropout and encoder dropout (reference: 0.1)")
    grading: str = param("batch", one_of("batch", "sample"), "batch (reference: one guide per batch) | sample")
    grading_ratio: float = param(0.7, gt(0), "guide g teaches pair s only where error_g < ratio * error_s")
    relation_dim: int = param(64, ge(1), "projection size inside the relation filter (reference gd_size: 64)")
    relation_alpha: float = param(0.125, gt(0), "reference only: w = sigmoid(alpha * score), 1/8 (improved: alpha 1)")
    contrastive_dim: int = param(128, ge(1), "InfoNCE projection size (reference: 128)")
    contrastive_temperature: float = param(0.07, gt(0), "InfoNCE temperature; reference logits x log(1/T), improved x 1/T")
    learnable_temperature: bool = param(False, doc="improved only: learn the InfoNCE scale (CLIP-style, capped at 100)")
    grader_weight: float = param(1.0, ge(0), "weight of the graders' task losses (and of the improved filter's loss); "
                                             "a guess: the published training loop is not public")
    contrastive_weight: float = param(0.35, ge(0), "alpha 0.35 in the published config ('weight for loss1'); that it "
                                                   "weighs the contrastive loss is a guess")
    relation_weight: float = param(0.25, ge(0), "beta 0.25 in the published config ('weight for loss2'); that it "
                                                "weighs the relation loss is a guess")

    def __post_init__(self):
        for m in ("visual", "acoustic"):
            if self.encoder_width(m) % self.encoder_heads:
                raise fail("encoder_heads", self.encoder_heads, f"a divisor of {m}_d_model ({self.encoder_width(m)})")
        for key, (variant, default) in VARIANT_ONLY.items():
            if self.variant != variant and getattr(self, key) != default:
                raise fail(key, getattr(self, key), f"{str(default).lower()} with variant {self.variant}: {variant} only")

    @property
    def reference(self) -> bool:
        return self.variant == "reference"

    def encoder_width(self, modality: str) -> int:
        """Width of a sequence modality's encoder: visual_d_model for visual, acoustic_d_model otherwise."""
        return self.visual_d_model if modality == "visual" else self.acoustic_d_model

    def pool(self) -> str:
        return {"auto": "first" if self.reference else "mean"}.get(self.text_pool, self.text_pool)

    def ff_dim(self, modality: str) -> int:
        return self.encoder_ff_dim or (2048 if self.reference else 4 * self.encoder_width(modality))


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


def relation_loss(guide: torch.Tensor, student: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor) -> torch.Tensor:
    """sum_ij rows_i w_i cols_j (G_s - G_g)_ij^2 / n: the student's batch relations pulled towards the
    detached guide's. G = cosine Gram matrices over the batch; rows (B,): samples the guide teaches;
    cols (B,): samples valid for both pairs; n = their count (the batch size when nothing is missing)."""
    squared = (gram(student) - gram(guide.detach())) ** 2  # (B, B)
    return (squared * (weights * rows)[:, None] * cols[None, :]).sum() / cols.sum().clamp_min(1)


class RelationFilter(nn.Module):
    """w_i = sigmoid(alpha * score([W z_guide; W z_student])); reference: z L2-normalised, score linear.

    Diagnosis of the reference filter. Its w multiplies a non-negative loss, sum_i w_i d_i with d_i the
    Gram-row discrepancy, and nothing else trains it: dL/dw_i = d_i >= 0, so gradient descent lowers
    every w_i, fastest where the student is farthest from the guide -- the opposite of "enhance
    complementary relations". With alpha = 1/8 compressing the score, the result is a global scale,
    not a per-sample filter: on the demo it stays near its initial 0.5 and hardly varies across clips
    (``python -m tools.variants relation``: w_mean, w_std).

    Design (improved). A filter needs a signal about *which samples* the guide knows better than the
    student, and the graders already measure it: their per-sample errors. The filter is trained, by
    binary cross-entropy over every sample and every ordered pair, to predict the per-sample form of the
    grading rule, target_i = [error_g,i < grading_ratio * error_s,i] -- so w_i estimates P(the guide is
    clearly better than the student on sample i | z_g, z_s). Redundant relations (both pairs equally
    good: target 0) are suppressed, complementary ones (the guide clearly better: target 1) are kept.
    Its inputs are detached and the relation loss uses w detached: like the graders it never steers the
    encoders, and the relation loss can no longer shrink it. Three changes of form make the target
    learnable: one filter
    per (guide, student) pair, because the six pairs' representations live in different spaces; a hidden
    GELU layer, because complementarity depends on how strongly a modality speaks, not in which direction
    (an even function, which a linear score cannot express); raw rather than L2-normalised inputs, which
    would discard that strength, and no 1/8 on the score, which slows cross-entropy learning 64-fold.
    Considered and rejected: using the measured advantage directly as w (exact on training batches, but
    it needs labels, so nothing is left to apply or explain at test time), and normalising the
    reference's w across the batch (it spreads w, but from no signal about which samples are complementary).

    ``python -m tools.variants relation`` measures both filters (spread of w across samples, correlation
    with the complementarity known by construction, relation loss on/off over seeds); docs/models.md
    "GCE's relation filter, measured".
    """

    def __init__(self, dim: int, relation_dim: int, alpha: float, hidden: bool = False):
        super().__init__()
        self.project = nn.Linear(dim, relation_dim)
        self.score = (nn.Sequential(nn.Linear(2 * relation_dim, relation_dim), nn.GELU(), nn.Linear(relation_dim, 1))
                      if hidden else nn.Linear(2 * relation_dim, 1))
        self.alpha, self.normalise = alpha, not hidden

    def logits(self, guide: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """(B, d), (B, d) -> (B,) scores; w = sigmoid(scores)."""
        guide, student = guide.float(), student.float()
        if self.normalise:
            guide, student = F.normalize(guide, dim=-1), F.normalize(student, dim=-1)
        return self.alpha * self.score(torch.cat([self.project(guide), self.project(student)], dim=-1))[:, 0]

    def weights(self, guide: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """(B, d), (B, d) -> (B,) in (0, 1)."""
        return torch.sigmoid(self.logits(guide, student))


class ReferenceHead(nn.Module):
    """The reference's ``SubNet``: Dropout, Linear+tanh, Linear+tanh, then Linear maps h -> 64 -> 32 -> 16 -> 8 -> out
    with no activation in between (its forward also computes an unused ``fusion`` output, left out here)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.first = nn.Linear(in_dim, hidden_dim)
        self.second = nn.Linear(hidden_dim, hidden_dim)
        sizes = [hidden_dim, 64, 32, 16, 8, out_dim]
        self.chain = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chain(torch.tanh(self.second(torch.tanh(self.first(self.drop(x))))))


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
    published_recipe = PUBLISHED_RECIPE

    def __init__(self, input_dims: dict[str, int], task: str = "regression", num_classes: int = 1,
                 config: GCEConfig | dict | None = None):
        super().__init__()
        self.config = cfg = config_from_dict(GCEConfig, config)
        self.modalities, out_dim = resolve_inputs(input_dims, task, num_classes)
        self.task = task
        Head = ReferenceHead if cfg.reference else MLPHead

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
                dims[m] = cfg.utterance_dim
                self.encoders[m] = GlobalTokenEncoder(
                    input_dims[m], cfg.encoder_width(m), cfg.encoder_heads, cfg.encoder_layers, cfg.ff_dim(m),
                    cfg.utterance_dim, cfg.dropout, token_std=1.0 if cfg.reference else 0.02,
                )
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(dims[m])) for m in self.modalities})

        self.pairs = list(itertools.combinations(self.modalities, 2))  # [(text, visual), (text, acoustic), ...]
        self.pair_names = [f"{a}_{b}" for a, b in self.pairs]
        self.pair_fusion = nn.ModuleDict({
            name: PairFusion(dims[a], dims[b], cfg.pair_dim) for name, (a, b) in zip(self.pair_names, self.pairs)
        })
        self.contrastive = nn.ModuleDict() if "contrastive" in cfg.ablate else nn.ModuleDict({
            name: ContrastiveAlignment(dims[a], dims[b], cfg.contrastive_dim, cfg.contrastive_temperature,
                                       cfg.learnable_temperature, reference=cfg.reference)
            for name, (a, b) in zip(self.pair_names, self.pairs)
        })

        # graders: heads on detached branches, never feeding the prediction
        graders = "graders" not in cfg.ablate
        self.unimodal_graders = nn.ModuleDict({
            m: Head(dims[m], cfg.head_hidden, out_dim, cfg.dropout) for m in self.modalities if graders
        })
        self.pair_graders = nn.ModuleDict({
            name: Head(cfg.pair_dim, cfg.head_hidden, out_dim, cfg.dropout) for name in self.pair_names if graders
        })
        self.ordered_pairs = list(itertools.permutations(range(len(self.pairs)), 2))  # (guide, student)
        self.relation = len(self.pairs) > 1 and "relation" not in cfg.ablate
        # the improved filter learns from the graders' errors; without graders it has nothing to learn from (w = 1)
        has_filter = self.relation and (cfg.reference or graders)
        # relation_filters[q] weighs ordered pair q. The reference shares one filter between all of them;
        # ours has one per (guide, student), with a hidden layer and no 1/8 on the score (RelationFilter)
        if not has_filter:
            self.relation_filters = None
        elif cfg.reference:
            shared = RelationFilter(cfg.pair_dim, cfg.relation_dim, cfg.relation_alpha)
            self.relation_filters = nn.ModuleList([shared] * len(self.ordered_pairs))
        else:
            self.relation_filters = nn.ModuleList([RelationFilter(cfg.pair_dim, cfg.relation_dim, 1.0, hidden=True)
                                                   for _ in self.ordered_pairs])

        # prediction
        self.unimodal_summary = nn.Linear(sum(dims.values()), cfg.fusion_dim)
        if self.pairs:
            self.pair_summary = nn.Linear(len(self.pairs) * cfg.pair_dim, cfg.fusion_dim)
            self.summary_mix = nn.Linear(2 * cfg.fusion_dim, cfg.fusion_dim)  # the reference's 1x1 convolution
        self.head = Head(cfg.fusion_dim, cfg.head_hidden, out_dim, cfg.dropout)

    def forward(self, batch: dict) -> dict:
        cfg = self.config
        present = {m: batch[f"{m}_mask"].any(dim=-1) for m in self.modalities}  # (B,)

        # 1. utterance vectors, (B, dims[m]) each
        utterances = {}
        for m in self.modalities:
            if schema.get(m).pooled:
                vector = self.encoders[m](utterance_vector(batch, m, cfg.pool()))
            else:
                vector = self.encoders[m](batch[m], batch[f"{m}_mask"])
            utterances[m] = torch.where(present[m][:, None], vector, self.missing[m].to(vector.dtype))

        # 2. pair representations, (B, pair_dim) each
        pair_reprs = {name: self.pair_fusion[name](utterances[a], utterances[b])
                      for name, (a, b) in zip(self.pair_names, self.pairs)}

        # 3. prediction from the unimodal and pair summaries
        fused = self.unimodal_summary(torch.cat([utterances[m] for m in self.modalities], dim=-1))  # (B, fusion_dim)
        if self.pairs:
            pair_summary = self.pair_summary(torch.cat([pair_reprs[n] for n in self.pair_names], dim=-1))
            fused = self.summary_mix(torch.cat([fused, pair_summary], dim=-1))
        pred = to_prediction(self.head(fused), self.task)
        # the graders on this rank's rows: their dropout draws this rank's masks, and what is gathered below is
        # computed alike by every rank (a rank-dependent guide would give the ranks different graphs)
        predictions = self.grader_predictions(utterances, pair_reprs)

        # batch-level terms over every rank's rows (identity in one process and in evaluation)
        def rows(t):
            return global_batch(t, self.training)
        utterances = {m: rows(u) for m, u in utterances.items()}
        pair_reprs = {n: rows(r) for n, r in pair_reprs.items()}
        present = {m: rows(p) for m, p in present.items()}
        predictions = {k: rows(v) for k, v in predictions.items()}
        label = batch.get("label")
        label = rows(label) if label is not None else None
        aux, extras = self.auxiliary_losses(utterances, pair_reprs, present, label, predictions)
        return {"pred": pred, "aux": aux, "extras": extras}

    def detached_branches(self) -> list[nn.Module]:
        """The modules trained on detached inputs only, which never steer the encoders: the graders, and the
        improved relation filter (the reference's takes the relation loss's gradient into the student).
        The trainer clips their gradients apart from the prediction path's."""
        detached_filter = self.relation_filters is not None and not self.config.reference
        return [self.unimodal_graders, self.pair_graders] + ([self.relation_filters] if detached_filter else [])

    # ------------------------------------------------------------------ auxiliary losses
    def auxiliary_losses(self, utterances, pair_reprs, present, label, predictions):
        """The weighted auxiliary losses and what they saw (extras), from the (global) batch's vectors and
        grader predictions."""
        cfg = self.config
        aux, extras = {}, {}
        pair_valid = torch.stack([present[a] & present[b] for a, b in self.pairs]) if self.pairs else None  # (P, B)
        if self.contrastive:
            aux["contrastive"] = cfg.contrastive_weight * sum(
                self.contrastive[name](utterances[a], utterances[b], pair_valid[i])
                for i, (name, (a, b)) in enumerate(zip(self.pair_names, self.pairs)))

        pair_errors = None
        if predictions:
            extras["grader_preds"] = {k: v.detach() for k, v in predictions.items()}
            if self.training and label is not None:
                validity = {**present, **{n: pair_valid[i] for i, n in enumerate(self.pair_names)}}
                errors = {k: task_loss(p, label, self.task, reduction="none") for k, p in predictions.items()}
                losses = [(e * validity[k]).sum() / validity[k].sum().clamp_min(1) for k, e in errors.items()]
                aux["graders"] = cfg.grader_weight * torch.stack(losses).sum()
                pair_errors = torch.stack([errors[n].detach() for n in self.pair_names]) if self.pairs else None

        if self.relation:
            weights, filter_loss = self.relation_weights(pair_reprs, pair_valid, pair_errors)
            extras["relation_weights"] = torch.stack([w.detach() for w in weights], dim=-1)  # (B, ordered pairs)
            if filter_loss is not None:
                aux["relation_filter"] = cfg.grader_weight * filter_loss
            if self.training and label is not None:
                aux["relation"], extras["stats"] = self.relation_transfer(pair_reprs, pair_valid, pair_errors, weights)
                extras["guides"] = extras["stats"].pop("guides_per_sample")
        if self.training and label is not None:  # which of the other components acted on this batch
            acted = {"contrastive": aux.get("contrastive"), "graders": aux.get("graders"),
                     "relation_filter": aux.get("relation_filter")}
            extras.setdefault("stats", {}).update(
                {f"step_{k}": (v.detach() > 0).float().reshape(1) for k, v in acted.items() if v is not None})
        return aux, extras

    def grader_predictions(self, utterances, pair_reprs) -> dict[str, torch.Tensor]:
        """Each grader's prediction from its detached branch: {modality or pair name: (B,) or (B, C)}; {} without graders."""
        predictions = {m: to_prediction(g(utterances[m].detach()), self.task) for m, g in self.unimodal_graders.items()}
        predictions.update({n: to_prediction(g(pair_reprs[n].detach()), self.task) for n, g in self.pair_graders.items()})
        return predictions

    def relation_weights(self, pair_reprs, pair_valid, pair_errors):
        """The filter's w for each ordered (guide, student) pair, [(B,)], and the improved filter's own loss.

        Reference: w carries the relation loss's gradient into the filter (and the student). Improved: the
        filter sees detached inputs and learns target = [error_g < ratio * error_s] by cross-entropy on the
        samples valid for both pairs; w is used detached."""
        reprs = [pair_reprs[n] for n in self.pair_names]
        filters = self.relation_filters
        if filters is None:  # improved without graders: unweighted transfer
            return [reprs[0].new_ones(reprs[0].shape[0]) for _ in self.ordered_pairs], None
        if self.config.reference:
            return [f.weights(reprs[g].detach(), reprs[s]) for f, (g, s) in zip(filters, self.ordered_pairs)], None
        logits = [f.logits(reprs[g].detach(), reprs[s].detach()) for f, (g, s) in zip(filters, self.ordered_pairs)]
        filter_loss = None
        if self.training and pair_errors is not None:
            terms = []
            for (g, s), logit in zip(self.ordered_pairs, logits):
                both = (pair_valid[g] & pair_valid[s]).float()
                target = (pair_errors[g] < self.config.grading_ratio * pair_errors[s]).float()
                per_sample = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
                terms.append((per_sample * both).sum() / both.sum().clamp_min(1))
            filter_loss = torch.stack(terms).mean()
        return [torch.sigmoid(logit).detach() for logit in logits], filter_loss

    def relation_transfer(self, pair_reprs, pair_valid, pair_errors, weights):
        """The relation loss (unweighted) and per-batch statistics the trainer sums per epoch."""
        cfg = self.config
        n_pairs = len(self.pairs)
        graded = pair_errors is not None and "grading" not in cfg.ablate
        if graded:
            guides, errors = grade_pairs(pair_errors, pair_valid, cfg.grading_ratio, per_sample=cfg.grading == "sample")
        else:  # ungraded: every pair teaches every other pair where both are present
            guides = pair_valid[:, None, :] & pair_valid[None, :, :] & ~torch.eye(n_pairs, dtype=torch.bool,
                                                                                device=pair_valid.device)[..., None]
        relation = pair_valid.new_zeros((), dtype=torch.float32)
        for (g, s), w in zip(self.ordered_pairs, weights):
            if guides[g, s].any():
                relation = relation + relation_loss(pair_reprs[self.pair_names[g]], pair_reprs[self.pair_names[s]], w,
                                                    rows=guides[g, s].float(), cols=(pair_valid[g] & pair_valid[s]).float())
        both = torch.stack([(pair_valid[g] & pair_valid[s]).float() for g, s in self.ordered_pairs])  # (Q, B)
        w = torch.stack([w.detach().float() for w in weights])  # (Q, B)
        fired = guides.any().float()
        stats = {
            "guides_per_sample": guides.detach(),
            "guided": guides.sum(-1).float(),  # (P, P) samples taught, guide x student
            "relation_batches": fired, "batches": torch.ones(()),
            # per step (the trainer keeps their order): the relation loss fired; grading chose a guide that teaches
            "step_relation": fired.reshape(1),
            **({"step_grading": fired.reshape(1)} if graded else {}),
            "weight_sum": (w * both).sum(-1), "weight_sq_sum": (w.square() * both).sum(-1), "weight_count": both.sum(-1),
        }
        if pair_errors is not None:
            stats["pair_error_sum"] = (pair_errors * pair_valid).sum(-1)
            stats["pair_error_count"] = pair_valid.sum(-1).float()
        return cfg.relation_weight * relation, stats
