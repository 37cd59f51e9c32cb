"""Train one model on the assembled set, pick the checkpoint on validation, test it once.

The loop follows a `Recipe`: optimizer, learning rates, batch, epochs, schedule, clipping and loss.
`ours` (the `model` params): AdamW, linear warmup then cosine decay, early stopping on validation
MAE (regression) or loss (classification), the prediction path's gradient norm clipped apart
from the detached branches' (`clip_gradients`).
`<model>.recipe: published` trains GEXSent and GCE as their published code does (the model file's
PUBLISHED_RECIPE, each value with its source or marked assumed; docs/models.md). bf16 autocast
on CUDA. The checkpoint chosen on validation gives every test metric (no per-metric best epoch).
Deterministic on CPU: same params and seed give an identical metrics.json.

Runs as one process, or under `torchrun --nproc_per_node N` with DistributedDataParallel:
each rank gets a DistributedSampler shard of the global batch (model.batch_size is the
global batch size), gradients are averaged by DDP, and the models compute their batch-level
terms (InfoNCE, Gram matrices, grading, load balance) over the global batch
(`blocks.global_batch`), so N ranks x B/N train like one process x B. Each rank draws its own
dropout masks (rank r > 0 from a stream seeded by (seed, r)); a global batch that the ranks cannot
split evenly stops the run. DDP looks for parameters
a step left unused (GCE's relation filter when no pair qualifies as a guide, a fine-tuned
encoder's pooler). Rank 0 alone evaluates, decides early stopping and broadcasts the decision,
and writes the checkpoint, metrics, dvclive logs, plots and what the model learned
(`pipeline.training.interpret`).

`train_model` reads top to bottom: `setup` (process group, seeds, data, model), `fit` (the
epoch loop, keeping the best state), then `evaluate` and `write_outputs` on rank 0.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import interpret, plots
from .. import schema
from .dataset import AssembledData
from ..errors import ParamError, UserError
from .metrics import classification_metrics, regression_metrics, score_classes, write_json
from ..models import MODELS, build_model, modalities_read
from ..models.blocks import ClassScore, class_centers, sentiment_class, task_loss
from ..params import DEVICE, Check, as_dict, between, fail, ge, gt, param, parse, section

# The split every selection reads (early stopping, the checkpoint); metrics.json records it as `selection`
SELECT_SPLIT = "valid"

# `python` or `torchrun` with plain flags: never a shell snippet (dvc.yaml runs this string; spaces
# only between the words, since a newline would start a second command)
_LAUNCH = re.compile(r"(python3?|torchrun( +--[a-z][a-z0-9_-]*(=[\w.:/-]+| +[\w.:/-]+)?)*)")


@section("model")
@dataclass
class TrainParams:
    lr: float = param(0.001, gt(0), "AdamW learning rate of the fusion model")
    lr_text: float = param(0.00005, gt(0), "learning rate of the text encoder when text_finetune is on")
    text_finetune: bool = param(False, doc="fine-tune the text encoder from stored token ids (slow on CPU)")
    batch_size: int = param(32, ge(1), "global batch size (split across torchrun ranks); chosen on validation, see params.yaml")
    eval_batch_size: int = param(256, ge(1))
    epochs: int = param(40, ge(1))
    patience: int = param(8, ge(1), "early stopping: epochs without validation improvement")
    weight_decay: float = param(0.01, ge(0))
    warmup: float = param(0.1, between(0, 1), "fraction of steps with a rising learning rate, then cosine decay")
    grad_clip: float = param(1.0, gt(0), "max gradient norm")
    seed: int = param(0, ge(0))
    device: str = param("auto", DEVICE, "auto | cpu | cuda (bf16 autocast on cuda)")
    modalities: list[str] = param(["text", "visual", "acoustic"], doc="which features the fusion models use")
    launch: str = param("python", Check(lambda v: _LAUNCH.fullmatch(v.strip()) is not None,
                                        "python, or torchrun with --flags, e.g. 'torchrun --nproc_per_node 4'"),
                        "how dvc.yaml starts training")
    threads: int = param(1, ge(0), "CPU threads per process (torch intra-op), fixed so CPU results do not depend on "
                                   "the machine's core count; 0 = torch's default (machine-dependent)")

    def __post_init__(self):
        unknown = [m for m in self.modalities if m not in schema.REGISTRY]
        if unknown or not self.modalities:
            raise fail("modalities", self.modalities, f"a non-empty list of {', '.join(schema.names())}")


class TrainingFailed(RuntimeError):
    """Training stopped without a usable result; the message says why and what is on disk."""


class NonFiniteLoss(TrainingFailed):
    """A NaN or infinite loss or gradient norm: training stops before the step is applied."""


class NoCheckpoint(TrainingFailed):
    """Validation never gave a finite score, so no checkpoint was chosen."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("model.device is cuda but torch sees no GPU; use auto or cpu")
    return torch.device(name)


def _dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class TextFinetune(torch.nn.Module):
    """A Hugging Face text encoder in front of a fusion model: token ids -> token states."""

    def __init__(self, encoder: torch.nn.Module, fusion: torch.nn.Module):
        super().__init__()
        self.encoder, self.fusion = encoder, fusion

    def forward(self, batch: dict) -> dict:
        keys = schema.get("text").batch_keys()
        mask = batch[keys["token_mask"]]
        hidden = self.encoder(input_ids=batch[keys["token_ids"]], attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        batch = {**batch, keys["sequence"]: hidden, keys["mask"]: mask,
                 keys["pooled"]: (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)}
        return self.fusion(batch)


def _load_text_encoder(name: str) -> torch.nn.Module:
    """The same encoder (preset, folder or hub id) that produced the stored token ids."""
    from ..features.encoders import load_text_encoder, resolve_text_encoder  # heavy: only when fine-tuning

    _, encoder = load_text_encoder(resolve_text_encoder(name), "cpu")
    return encoder


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict_rows(model, data: AssembledData, rows: np.ndarray, device, batch_size: int, finetune: bool,
                 with_extras: bool = False, output: str = "pred"):
    """The model's outputs (eval mode) for these rows: (N,) scores or (N, C) logits (`output`: another key of
    the model's output); with_extras, also what the model saw (`interpret.combine`: per-sample extras
    concatenated, stats summed)."""
    model.eval()
    outs, extras = [], []
    for start in range(0, len(rows), batch_size):
        batch = _to(data.batch(rows[start:start + batch_size], with_token_ids=finetune), device)
        batch.pop("label")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(batch)
        outs.append(out[output].float().cpu())
        if with_extras:
            extras.append(out.get("extras", {}))
    pred = torch.cat(outs).numpy() if outs else np.zeros(0)
    return (pred, interpret.combine(extras)) if with_extras else pred


def _select_score(task: str, pred: np.ndarray, labels: np.ndarray) -> float:
    """The validation number early stopping minimises: MAE, or cross-entropy for classification."""
    if task == "classification":
        return float(F.cross_entropy(torch.from_numpy(pred), torch.from_numpy(labels.astype(np.int64))))
    return float(np.mean(np.abs(pred - labels)))


def _save_atomic(obj, path: Path) -> None:
    """torch.save through a temp file renamed into place; on failure (a full disk) the temp file goes and the
    error names `path` (torch's zip writer reports a failed write as its own RuntimeError: the OSError inside)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = err
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is not None and cause.errno and cause.filename in (None, str(tmp)):
            raise type(cause)(cause.errno, cause.strerror, str(path)) from None
        raise


def _lr_lambda(total_steps: int, warmup: float):
    warm = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


# --------------------------------------------------------------------------- the recipe

@dataclass(frozen=True)
class Recipe:
    """How a model is trained: `ours` from the `model` params, `published` from the model file's
    PUBLISHED_RECIPE (values it does not give stay ours; docs/models.md lists each and its source)."""
    name: str
    optimizer: str         # a key of OPTIMIZERS
    lr: float
    lr_text: float         # the fine-tuned text encoder's learning rate (model.text_finetune)
    weight_decay: float
    batch_size: int        # global, split across ranks
    epochs: int
    patience: int          # early stopping: epochs without a better validation score; 0 = never stop early
    schedule: str          # a key of SCHEDULES
    warmup: float          # warmup_cosine: the fraction of steps warming up
    plateau_patience: int  # plateau: epochs without a better validation score before the rate drops
    plateau_factor: float  # plateau: the drop
    grad_clip: float       # max gradient norm; 0 = no clipping
    clip_groups: str       # branches: prediction path and detached branches clipped apart | all: one norm
    loss: str              # a key of LOSSES


def recipe_of(name: str, arch: dict, cfg: TrainParams) -> Recipe:
    """The recipe `<name>.recipe` picks (baselines have no switch: ours)."""
    ours = Recipe("ours", "adamw", cfg.lr, cfg.lr_text, cfg.weight_decay, cfg.batch_size, cfg.epochs, cfg.patience,
                  "warmup_cosine", cfg.warmup, 0, 1.0, cfg.grad_clip, "branches", "task")
    if arch.get("recipe", "ours") == "ours":
        return ours
    published = {key: value for key, (value, _source) in MODELS[name].published_recipe.items() if value is not None}
    return dataclasses.replace(ours, name="published", **published)


class Schedule:
    """A recipe's learning-rate schedule, stepped where it is defined: after every batch, or after every
    validation on the selection score (every rank gets rank 0's score)."""

    def __init__(self, scheduler, per_batch: bool):
        self.scheduler, self.per_batch = scheduler, per_batch

    def after_batch(self) -> None:
        if self.per_batch:
            self.scheduler.step()

    def after_validation(self, score: float) -> None:
        if not self.per_batch:
            self.scheduler.step(score)


OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}  # Adam's weight decay is an L2 penalty
SCHEDULES = {  # name -> (optimizer, recipe, total steps) -> Schedule
    "warmup_cosine": lambda opt, r, steps: Schedule(torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, r.warmup)), True),
    "plateau": lambda opt, r, steps: Schedule(torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", patience=r.plateau_patience, factor=r.plateau_factor), False),
}


@dataclass(frozen=True)
class Loss:
    """A recipe's task loss: `train(out, label, task)` per batch, and `select(run, valid_pred)`, the validation
    score that early stopping, the checkpoint choice and a plateau schedule minimise."""
    train: object
    select: object


def _three_class_loss(out: dict, label: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy of the 3 sentiment classes (ClassScore's logits) against the scores' classes."""
    return F.cross_entropy(out["class_logits"].float(), sentiment_class(label))


def _valid_three_class_loss(run: "Run", valid_pred: np.ndarray) -> float:
    """The same on the validation split: what the published recipe selects on and steps its plateau with."""
    logits = predict_rows(run.model, run.data, run.rows[SELECT_SPLIT], run.device, run.cfg.eval_batch_size,
                          run.cfg.text_finetune, output="class_logits")
    classes = sentiment_class(torch.from_numpy(run.data.labels[run.rows[SELECT_SPLIT]]))
    return float(F.cross_entropy(torch.from_numpy(logits), classes))


LOSSES = {
    # the task's own loss: L1 on scores, cross-entropy on classes; selection on validation MAE or cross-entropy
    "task": Loss(lambda out, label, task: task_loss(out["pred"], label, task),
                 lambda run, pred: _select_score(run.data.task, pred, run.data.labels[run.rows[SELECT_SPLIT]])),
    # a regression corpus as 3 sentiment classes (sign of the score); the score is the expected value (ClassScore)
    "sentiment3": Loss(_three_class_loss, _valid_three_class_loss),
}


def _for_task(recipe: Recipe, task: str) -> Recipe:
    """A classification corpus trains on its own classes: the 3-class loss is then the task loss."""
    return dataclasses.replace(recipe, loss="task") if recipe.loss == "sentiment3" and task != "regression" else recipe


def _model_for(name: str, input_dims: dict, task: str, num_classes: int, arch: dict, loss: str,
               train_labels: np.ndarray | None = None) -> torch.nn.Module:
    """build_model, or under the 3-class loss on scores the model as a 3-class classifier inside ClassScore
    (class centers from the training labels; a checkpoint restores them)."""
    if loss != "sentiment3":
        return build_model(name, input_dims, task, num_classes, arch)
    centers = class_centers(train_labels) if train_labels is not None else [-1.0, 0.0, 1.0]
    return ClassScore(build_model(name, input_dims, "classification", 3, arch), centers)


def _clip_groups(model: torch.nn.Module, how: str) -> list[list[torch.nn.Parameter]]:
    """Parameters clipped together. `branches`: the prediction path, then the branches trained on detached
    inputs (a model's `detached_branches()`: GCE's graders and relation filter), so their gradients never
    scale the predictor's step. `all`: one norm over every parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    branches = getattr(interpret.fusion_of(model), "detached_branches", list)() if how == "branches" else []
    detached = {id(p) for branch in branches for p in branch.parameters()}
    groups = [[p for p in params if id(p) not in detached], [p for p in params if id(p) in detached]]
    return [g for g in groups if g]


def clip_gradients(groups: list[list[torch.nn.Parameter]], max_norm: float) -> torch.Tensor:
    """Clip each group's gradient norm to max_norm (0: none) -> the norm over all groups, before clipping."""
    norms = [torch.nn.utils.clip_grad_norm_(group, max_norm or math.inf) for group in groups]
    return torch.stack(norms).norm()


def _check_batch(recipe: Recipe, name: str, world: int) -> None:
    """Every rank takes batch_size / world rows: a batch the ranks cannot split evenly stops here (one line)."""
    if recipe.batch_size % world == 0:
        return
    if recipe.name == "ours":
        raise ParamError(f"model.batch_size: {recipe.batch_size} is not allowed (a multiple of the {world} ranks: "
                         f"each rank takes an equal share of the global batch)")
    raise ParamError(f"{name}.recipe: {recipe.name} trains with a global batch of {recipe.batch_size}, which {world} "
                     f"ranks cannot share equally: run on a divisor of {recipe.batch_size} ranks")


def _seed_rank_stream(seed: int, rank: int) -> None:
    """Rank r > 0 draws dropout masks from its own stream, seeded from (seed, r): without it every rank
    would repeat rank 0's masks. Rank 0 keeps the seed's stream, so one process trains as before."""
    if rank:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


# --------------------------------------------------------------------------- the steps of a run

@dataclass
class Run:
    """Everything one training run holds between its steps."""
    name: str
    cfg: TrainParams
    arch: dict
    device: torch.device
    rank: int
    world: int
    data: AssembledData
    model: torch.nn.Module            # the bare model (checkpoints, evaluation)
    trainable: torch.nn.Module        # the model, or its DDP wrapper (training steps)
    recipe: Recipe
    sampler: DistributedSampler
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    clip_groups: list                 # parameter groups whose gradient norms are clipped apart
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # split -> dataset rows
    text_encoder: str | None = None
    saved: dict = field(default_factory=dict)  # rank 0: epoch and score of the checkpoint this run wrote last
    owns_group: bool = False  # this run started the process group, and ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def num_classes(self) -> int:
        return len(self.data.meta["classes"] or []) if self.data.task == "classification" else 1

    def log(self, message: str) -> None:
        if self.main:
            print(message, flush=True)

    def predict(self, split: str) -> np.ndarray:
        return predict_rows(self.model, self.data, self.rows[split], self.device, self.cfg.eval_batch_size,
                            self.cfg.text_finetune)


def _init_process(cfg: TrainParams) -> tuple[torch.device, int, int, bool]:
    """Device, rank, world size and whether this run started the process group (it joins one under
    torchrun, unless its caller already did: a job training several models keeps one group); seeds."""
    rank, local_rank, world = _dist_info()
    device = resolve_device(cfg.device)
    owns_group = world > 1 and not dist.is_initialized()
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if owns_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:  # CPU results depend on the thread count (reduction order): fix it
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device, rank, world, owns_group


def _build_model(name: str, data: AssembledData, cfg: TrainParams, arch: dict, recipe: Recipe,
                 train_rows: np.ndarray) -> tuple[torch.nn.Module, str | None]:
    num_classes = len(data.meta["classes"] or []) if data.task == "classification" else 1
    model = _model_for(name, data.input_dims, data.task, num_classes, arch, recipe.loss, data.labels[train_rows])
    text_encoder = None
    if cfg.text_finetune:
        if "text" not in data.modalities:
            raise ValueError("model.text_finetune needs text features")
        text_encoder = data.meta["modalities"]["text"]["encoder"]["name"]
        model = TextFinetune(_load_text_encoder(text_encoder), model)
    return model, text_encoder


def setup(name: str, data_dir: str | Path, cfg: TrainParams, arch: dict) -> Run:
    """Process group, seeds, the data this model reads, the model, its recipe's optimiser and schedule, the batches."""
    recipe = recipe_of(name, arch, cfg)
    _check_batch(recipe, name, _dist_info()[2])  # before joining the group: every rank stops with the same line
    device, rank, world, owns_group = _init_process(cfg)
    wanted = modalities_read(name, cfg.modalities, arch)
    data = AssembledData(data_dir, modalities=wanted)
    if not data.modalities:
        raise UserError(f"{name} reads {' and '.join(wanted)}, which {data_dir} holds no features of (it has "
                        f"{', '.join(data.meta['modalities']) or 'none'}): train another model on this corpus")
    recipe = _for_task(recipe, data.task)
    rows = {s: data.split_rows(s) for s in ("train", "valid", "test")}
    if not all(len(r) for r in rows.values()):
        raise ValueError("need train, valid and test segments, got " + "/".join(str(len(r)) for r in rows.values()))
    model, text_encoder = _build_model(name, data, cfg, arch, recipe, rows["train"])
    model.to(device)
    # One DistributedSampler in every mode (one replica when single-process): its seeded
    # permutation is interleaved across ranks, so the N ranks' batches of size B/N together
    # hold exactly the single process's batch of size B, and DDP's averaged gradient matches.
    sampler = DistributedSampler(range(len(rows["train"])), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(range(len(rows["train"])), batch_size=recipe.batch_size // world, sampler=sampler,
                        collate_fn=lambda idx: data.batch(rows["train"][idx], with_token_ids=cfg.text_finetune))
    text_params = {id(p) for p in model.encoder.parameters()} if cfg.text_finetune else set()
    groups = [{"params": [p for p in model.parameters() if id(p) not in text_params], "lr": recipe.lr}]
    if text_params:
        groups.append({"params": list(model.encoder.parameters()), "lr": recipe.lr_text})
    optimizer = OPTIMIZERS[recipe.optimizer](groups, weight_decay=recipe.weight_decay)
    schedule = SCHEDULES[recipe.schedule](optimizer, recipe, recipe.epochs * len(loader))
    trainable = model
    if world > 1:  # a step may leave parameters unused (module docstring): DDP must look for them
        trainable = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    _seed_rank_stream(cfg.seed, rank)
    run = Run(name, cfg, arch, device, rank, world, data, model, trainable, recipe, sampler, loader, optimizer, schedule,
              _clip_groups(model, recipe.clip_groups), rows, text_encoder, owns_group=owns_group)
    dropped = sorted(set(wanted) - set(data.modalities))
    if dropped:
        run.log(f"{name}: no {', '.join(dropped)} features in this dataset ({data.meta.get('skipped')}); training on "
                f"{', '.join(data.modalities)} only" + ("; GCE runs its unimodal path" if name == "gce" and len(data.modalities) == 1 else ""))
    run.log(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, modalities {data.modalities}, "
            f"device {device}, world size {world}")
    if recipe.name != "ours":
        run.log(f"{name}: recipe {recipe.name} ({', '.join(f'{k} {v}' for k, v in as_dict(recipe).items() if k != 'name')}); "
                f"model.lr, batch_size, epochs, patience, weight_decay, warmup and grad_clip are not used")
    return run


def _global_sum(run: Run, values: torch.Tensor) -> torch.Tensor:
    """Sums over all ranks (one all_reduce); a NaN on any rank reaches every rank."""
    if run.world > 1:
        values = values.to(run.device)
        dist.all_reduce(values)
    return values.cpu()


def _from_main(run: Run, *values: float) -> list[float]:
    """Rank 0's values on every rank: a decision is taken once and followed everywhere."""
    if run.world == 1:
        return list(values)
    flags = torch.tensor(values, dtype=torch.float64, device=run.device)
    dist.broadcast(flags, 0)
    return flags.tolist()


def train_epoch(run: Run, epoch: int, progress: bool, checkpoint_path: Path) -> dict:
    """One pass over the training batches -> {train_loss (task), train_total (task + auxiliary), stats},
    the losses over the global batch, stats the models' per-batch sums (`extras["stats"]`) added up."""
    run.sampler.set_epoch(epoch)
    run.trainable.train()
    sums, stats = torch.zeros(3, dtype=torch.float64), {}  # task loss x n, total loss x n, n
    show = progress and run.main and sys.stderr.isatty()  # piped logs get the per-epoch line only
    bar = tqdm(run.loader, desc=f"{run.name} epoch {epoch}/{run.recipe.epochs}", leave=False, disable=not show)
    for step, batch in enumerate(bar, 1):
        batch = _to(batch, run.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.type == "cuda"):
            out = run.trainable(batch)
        main_loss = LOSSES[run.recipe.loss].train(out, batch["label"], run.data.task)
        loss = main_loss + sum(out.get("aux", {}).values())
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # DDP has averaged the gradients, and the losses are summed over ranks: every rank sees the same
        grad_norm = clip_gradients(run.clip_groups, run.recipe.grad_clip)
        n = len(batch["label"])
        step_sums = _global_sum(run, torch.tensor([main_loss.item() * n, loss.item() * n, n], dtype=torch.float64))
        if not (torch.isfinite(step_sums).all() and torch.isfinite(grad_norm)):
            raise _non_finite(run, epoch, step, float(step_sums[1] / step_sums[2]), float(grad_norm), checkpoint_path)
        run.optimizer.step()
        run.schedule.after_batch()
        sums += step_sums
        interpret.add_stats(stats, out.get("extras", {}).get("stats"))
        bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", total=f"{sums[1] / sums[2]:.4f}")
    seen = max(float(sums[2]), 1.0)
    return {"train_loss": float(sums[0]) / seen, "train_total": float(sums[1]) / seen, "stats": stats}


def fit(run: Run, out_dir: Path, progress: bool) -> tuple[list[dict], dict]:
    """Epochs until the recipe's `epochs`, or `patience` without improvement. Rank 0 evaluates, keeps the best
    state in memory, saves it as model.pt whenever it improves, and decides when to stop; every rank follows
    (and steps a per-validation schedule on rank 0's score).
    Returns (history, best); raises NoCheckpoint when validation was never finite."""
    live = None
    if run.main:
        (out_dir / "plots").mkdir(parents=True, exist_ok=True)
        from dvclive import Live
        live = Live(dir=str(out_dir / "live"), dvcyaml=None, save_dvc_exp=False, report=None)
    checkpoint_path = out_dir / "model.pt"
    best = {"select": math.inf, "epoch": 0, "state": None}
    history: list[dict] = []
    for epoch in range(1, run.recipe.epochs + 1):
        record = {"epoch": epoch, **train_epoch(run, epoch, progress, checkpoint_path)}
        history.append(record)
        stop = False
        if run.main:
            valid_pred = run.predict(SELECT_SPLIT)
            valid_labels = run.data.labels[run.rows[SELECT_SPLIT]]
            record["valid_loss"] = record["select"] = LOSSES[run.recipe.loss].select(run, valid_pred)
            if run.data.task == "regression":
                record["valid_corr"] = regression_metrics(valid_pred, valid_labels)["corr"] or 0.0
            improved = record["select"] < best["select"] - 1e-6  # a NaN score never improves
            if improved:
                best = {"select": record["select"], "epoch": epoch, "state": copy.deepcopy(run.model.state_dict())}
                _save_atomic(checkpoint(run, epoch), checkpoint_path)
                run.saved = {"epoch": epoch, "select": record["select"]}
            for key, value in record.items():
                if key not in ("epoch", "select", "stats"):
                    live.log_metric(key.replace("_", "/", 1), value)
            live.next_step()
            run.log(f"{run.name} epoch {epoch:3d}/{run.recipe.epochs}: train loss {record['train_loss']:.4f}, "
                    f"valid loss {record['valid_loss']:.4f}" + (" *" if improved else ""))
            stop = bool(run.recipe.patience) and epoch - best["epoch"] >= run.recipe.patience
            if stop:
                run.log(f"{run.name}: early stop after epoch {epoch} (best epoch {best['epoch']})")
        stop, score = _from_main(run, float(stop), record.get("select", math.nan))
        run.schedule.after_validation(score)
        if stop:
            break
    if live is not None:
        live.end()
    (best_epoch,) = _from_main(run, float(best["epoch"]))
    if not best_epoch:
        first = history[0].get("select", math.nan)
        raise NoCheckpoint(f"{run.name}: validation loss was never finite ({len(history)} epochs, epoch 1: {first}): "
                           f"the model's validation predictions are NaN or infinite, so no checkpoint was chosen and "
                           f"none was written. {_on_disk(checkpoint_path, run.saved)}")
    return history, best


def _non_finite(run: Run, epoch: int, step: int, loss: float, grad_norm: float, path: Path) -> NonFiniteLoss:
    what = (f"non-finite loss ({loss:.4g})" if not math.isfinite(loss)
            else f"non-finite gradient norm ({grad_norm:.4g}) with a finite loss ({loss:.4g})")
    return NonFiniteLoss(f"{run.name}: {what} at epoch {epoch}, batch {step}; stopped before applying the step. "
                         + _on_disk(path, run.saved))


def _on_disk(path: Path, saved: dict) -> str:
    """What a failed run leaves at `path`, truthfully, and the one command that restores the last committed model.
    (`dvc repro` deletes a stage's outputs before running it, and records nothing when the stage fails.)"""
    if saved:
        here = (f"{path} holds this run's best checkpoint (epoch {saved['epoch']}, valid loss {saved['select']:.4f}); "
                f"DVC does not record it and the next `dvc repro` deletes it. metrics.json was not written.")
    elif path.exists():
        here = f"{path} is from an earlier run: this one wrote no checkpoint."
    else:
        here = f"No checkpoint is on disk: this run wrote none, and dvc repro removed the previous {path} before it ran."
    recorded = _recorded_in_dvc_lock(path)
    if recorded:
        return f"{here} The last committed model is in DVC's cache: `dvc checkout {recorded}` restores it."
    return f"{here} dvc.lock records no earlier {path}, so DVC has none to restore."


def _recorded_in_dvc_lock(path: Path) -> str | None:
    """`path` as dvc.lock (in the working directory, where DVC runs stages) names it among a stage's outputs."""
    import yaml

    lock = Path("dvc.lock")
    if not lock.is_file():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return None
    wanted = Path(path).resolve()
    for stage in stages.values():
        for out in stage.get("outs", []):
            if (Path(out.get("path", "")).resolve() == wanted) and out.get("md5"):
                return out["path"]
    return None


def evaluate(run: Run) -> tuple[dict, dict[str, np.ndarray]]:
    """Metrics of the current model on valid and test -> (result, predictions per split)."""
    preds = {split: run.predict(split) for split in ("test", "valid")}
    result = {}
    for split, pred in preds.items():
        labels = run.data.labels[run.rows[split]]
        if run.data.task == "classification":
            metrics, _ = classification_metrics(pred, labels, run.num_classes)
        else:
            metrics = regression_metrics(pred, labels, run.data.conventions["metrics"])
        result[split] = {k: (None if v is None else round(v, 6)) for k, v in metrics.items()}
    return result, preds


def train_model(name: str, data_dir: str | Path, out_dir: str | Path, cfg: TrainParams | dict, arch: dict | None = None,
                progress: bool = True) -> dict:
    """Train `name` (a key of pipeline.models.MODELS); rank 0 writes model.pt, metrics.json, plots/ and
    what the model learned (interpret.json, interpret/); every rank returns the test result."""
    cfg = parse(TrainParams, cfg, "model")
    out_dir = Path(out_dir)
    started = time.time()
    run = setup(name, data_dir, cfg, dict(arch or {}))
    try:
        history, best = fit(run, out_dir, progress)
        result = None
        if run.main:
            run.model.load_state_dict(best["state"])
            result, preds = evaluate(run)
            # metrics.json holds no wall time: same params and seed must give an identical file
            result.update(best_epoch=best["epoch"], epochs_run=len(history),
                          valid_score=round(best["select"], 6),  # what selection minimised: valid MAE, or loss
                          params=sum(p.numel() for p in run.model.parameters()))
            criterion = ("3-class cross-entropy" if run.recipe.loss == "sentiment3"
                         else "loss" if run.data.task == "classification" else "mae")
            read = {"split": SELECT_SPLIT, "criterion": criterion,
                    "segments": len(run.rows[SELECT_SPLIT])}
            result["selection"] = {"early_stopping": read, "checkpoint": read}
            if run.recipe.schedule == "plateau":  # the learning rate also followed the selection score
                result["selection"]["lr_schedule"] = read
            run.log(f"{name}: trained {len(history)} epochs in {time.time() - started:.1f} s, best epoch {best['epoch']}")
            write_outputs(run, out_dir, history, result, preds["test"])
            write_interpretation(run, out_dir, history, best["epoch"])
        if run.world > 1:
            shared = [result]
            dist.broadcast_object_list(shared, src=0)
            result = shared[0]
    finally:
        if run.owns_group:
            dist.destroy_process_group()
    return result


def write_interpretation(run: Run, out_dir: Path, history: list[dict], selected_epoch: int) -> None:
    """interpret.json and interpret/ (JSON tables + PNG): what the model saw during training (per epoch, and
    which components acted before the selected epoch) and on the test split (per sample), as
    `pipeline.training.interpret` reads it for this model."""
    rows = run.rows["test"]
    _, extras = predict_rows(run.model, run.data, rows, run.device, run.cfg.eval_batch_size, run.cfg.text_finetune,
                             with_extras=True)
    classes = run.data.meta["classes"] if run.data.task == "classification" else None
    interpret.write(run.name, interpret.fusion_of(run.model), out_dir, [h["stats"] for h in history], extras,
                    run.data.labels[rows], run.data.index["id"].to_numpy()[rows], classes, run.data.conventions["metrics"],
                    selected_epoch)


# --------------------------------------------------------------------------- outputs

def write_outputs(run: Run, out_dir: Path, history: list[dict], result: dict, test_pred: np.ndarray) -> None:
    """metrics.json, the PNG plots and test_predictions.csv (ids, labels and predictions, by name for classes)."""
    import pandas as pd

    write_json(out_dir / "metrics.json", result)
    plot_dir = out_dir / "plots"
    plots.loss_curves(history, plot_dir / "loss.png", f"{run.name}: training")
    rows = run.rows["test"]
    labels, ids = run.data.labels[rows], run.data.index["id"].to_numpy()[rows]
    if run.data.task == "classification":
        names = run.data.meta["classes"]
        _, matrix = classification_metrics(test_pred, labels, len(names))
        probs = torch.softmax(torch.from_numpy(test_pred).float(), -1).numpy()
        table = {"id": ids, "label": [names[int(v)] for v in labels], "pred": [names[int(i)] for i in test_pred.argmax(1)]}
        table.update({f"p_{c}": probs[:, i].round(4) for i, c in enumerate(names)})
    else:  # the corpus's finest score classes (MOSI: 7, CH-SIMS: 5) and its label range
        family, label_range = run.data.conventions["metrics"], run.data.conventions["label_range"]
        (pred_classes, names), (true_classes, _) = score_classes(test_pred, family), score_classes(labels, family)
        _, matrix = classification_metrics(pred_classes, true_classes, len(names))
        plots.scatter(test_pred, labels, plot_dir / "scatter.png", f"{run.name}: test MAE {result['test']['mae']:.3f}",
                      label_range)
        table = {"id": ids, "label": labels, "pred": test_pred}
    plots.confusion(matrix, names, plot_dir / "confusion.png", f"{run.name}: test")
    pd.DataFrame(table).to_csv(plot_dir / "test_predictions.csv", index=False)


def checkpoint(run: Run, epoch: int) -> dict:
    """Everything needed to rebuild and feed the model; loads with torch.load(weights_only=True).

    `encoders` holds each feature stage's encoder id *and* revision (weights hash or hub commit),
    `feature_params` the stage params, `norm` the training statistics: predict re-extracts a clip
    with exactly these and refuses an encoder that now resolves to other weights."""
    data = run.data
    return {
        "state_dict": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "config": {"name": run.name, "input_dims": data.input_dims, "task": data.task, "num_classes": run.num_classes,
                   "classes": data.meta["classes"], "arch": dict(run.arch), "train": as_dict(run.cfg),
                   "recipe": as_dict(run.recipe),
                   "text_finetune": run.cfg.text_finetune, "text_encoder": run.text_encoder,
                   "feature_params": {m: data.meta["modalities"][m]["params"] for m in data.modalities},
                   "encoders": {m: data.meta["modalities"][m]["encoder"] for m in data.modalities},
                   "max_steps": data.meta.get("max_steps", {}), "conventions": data.conventions,
                   "epoch": epoch},
        "norm": {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in data.norm.items()},
    }


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained model from model.pt -> (model in eval mode, checkpoint dict)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    ckpt = torch.load(path, map_location=device, weights_only=True)
    cfg = ckpt["config"]
    loss = cfg.get("recipe", {}).get("loss", "task")  # checkpoints from before recipes: the task loss
    model = _model_for(cfg["name"], cfg["input_dims"], cfg["task"], cfg["num_classes"], cfg["arch"], loss)
    if cfg["text_finetune"]:
        model = TextFinetune(_load_text_encoder(cfg["text_encoder"]), model)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt
