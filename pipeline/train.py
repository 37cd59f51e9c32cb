"""Train one model on the assembled set, pick the checkpoint on validation, test it once.

The loop: AdamW, gradient clipping, linear warmup then cosine decay, early stopping on
validation MAE (regression) or loss (classification), bf16 autocast on CUDA. The
checkpoint chosen on validation gives every test metric (no per-metric best epoch).
Deterministic on CPU: same params and seed give an identical metrics.json.

Runs as one process, or under `torchrun --nproc_per_node N` with DistributedDataParallel:
each rank gets a DistributedSampler shard of the global batch (model.batch_size is the
global batch size), gradients are averaged by DDP, and only rank 0 writes the checkpoint,
metrics, dvclive logs and plots. Every rank evaluates the full validation set, so all ranks
take the same early-stopping decision without talking.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import plots
from .dataset import AssembledData
from .metrics import SEVEN_CLASS_NAMES, classification_metrics, regression_metrics, seven_class
from .models import build_model


@dataclass
class TrainConfig:
    """params.yaml `model:` (shared by every model's training)."""
    lr: float = 1e-3               # AdamW learning rate of the fusion model
    lr_text: float = 5e-5          # learning rate of the text encoder when text_finetune is on
    text_finetune: bool = False    # train the text encoder from stored token ids (slow on CPU)
    batch_size: int = 32           # global batch size (split across DDP ranks)
    eval_batch_size: int = 256
    epochs: int = 40
    patience: int = 8              # early stopping: epochs without validation improvement
    weight_decay: float = 0.01
    warmup: float = 0.1            # fraction of all steps spent warming the learning rate up
    grad_clip: float = 1.0         # max gradient norm
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    modalities: list = field(default_factory=lambda: ["text", "visual", "acoustic"])
    launch: str = "python"         # how dvc.yaml starts training, e.g. "torchrun --nproc_per_node 4"

    @classmethod
    def from_params(cls, params: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"unknown model.* param(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**params)


class NonFiniteLoss(RuntimeError):
    """A NaN or infinite loss: training stops, the last good checkpoint stays on disk."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
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
        mask = batch["token_mask"]
        hidden = self.encoder(input_ids=batch["token_ids"], attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        batch = {**batch, "text": hidden, "text_mask": mask,
                 "text_pooled": (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)}
        return self.fusion(batch)


def _load_text_encoder(name: str) -> torch.nn.Module:
    """The same encoder (preset, folder or hub id) that produced the stored token ids."""
    from .encoders import load_text_encoder, resolve_text_encoder  # heavy: only when fine-tuning

    _, encoder = load_text_encoder(resolve_text_encoder(name), "cpu")
    return encoder


def task_loss(pred: torch.Tensor, label: torch.Tensor, task: str) -> torch.Tensor:
    return F.cross_entropy(pred.float(), label) if task == "classification" else F.l1_loss(pred.float(), label)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict_rows(model, data: AssembledData, rows: np.ndarray, device, batch_size: int, finetune: bool) -> np.ndarray:
    model.eval()
    outs = []
    for start in range(0, len(rows), batch_size):
        batch = _to(data.batch(rows[start:start + batch_size], with_token_ids=finetune), device)
        batch.pop("label")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outs.append(model(batch)["pred"].float().cpu())
    return torch.cat(outs).numpy() if outs else np.zeros(0)


def _select_score(task: str, pred: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(validation loss, the number early stopping minimises)."""
    if task == "classification":
        loss = float(F.cross_entropy(torch.from_numpy(pred), torch.from_numpy(labels.astype(np.int64))))
        return loss, loss
    mae = float(np.mean(np.abs(pred - labels)))
    return mae, mae


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _lr_lambda(total_steps: int, warmup: float):
    warm = max(1, int(total_steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def train_model(name: str, data_dir: str | Path, out_dir: str | Path, model_params: dict, arch_params: dict,
                text_encoder: str | None = None, progress: bool = True) -> dict:
    """Train `name` (a key of pipeline.models.MODELS); write model.pt, metrics.json, plots/ on rank 0."""
    cfg = TrainConfig.from_params(model_params)
    rank, local_rank, world = _dist_info()
    main = rank == 0
    device = resolve_device(cfg.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    out_dir = Path(out_dir)
    wanted = ["text"] if name == "text_only" else list(cfg.modalities)
    data = AssembledData(data_dir, modalities=wanted)
    log = print if main else (lambda *a, **k: None)
    if not data.modalities:
        raise ValueError(f"{name}: none of the modalities {wanted} has features in {data_dir}")
    dropped = sorted(set(wanted) - set(data.modalities))
    if dropped:
        log(f"{name}: no {', '.join(dropped)} features in this dataset ({data.meta.get('skipped')}); "
            f"training on {', '.join(data.modalities)} only" + ("; GCE runs its unimodal path" if name == "gce" and len(data.modalities) == 1 else ""))
    task = data.task
    num_classes = len(data.meta["classes"] or []) if task == "classification" else 1
    model = build_model(name, data.input_dims, task, num_classes, arch_params or {})
    if cfg.text_finetune:
        if "text" not in data.modalities:
            raise ValueError("model.text_finetune needs text features")
        text_encoder = text_encoder or data.meta["modalities"]["text"]["encoder"]["name"]
        model = TextFinetune(_load_text_encoder(text_encoder), model)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{name}: {n_params:,} parameters, modalities {data.modalities}, device {device}, world size {world}")

    train_rows, valid_rows, test_rows = (data.split_rows(s) for s in ("train", "valid", "test"))
    if len(train_rows) == 0 or len(valid_rows) == 0 or len(test_rows) == 0:
        raise ValueError(f"need train, valid and test segments, got {len(train_rows)}/{len(valid_rows)}/{len(test_rows)}")
    # One DistributedSampler in every mode (one replica when single-process): its seeded
    # permutation is interleaved across ranks, so the N ranks' batches of size B/N together
    # hold exactly the single process's batch of size B, and DDP's averaged gradient matches.
    per_rank = max(1, cfg.batch_size // world)
    sampler = DistributedSampler(range(len(train_rows)), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(range(len(train_rows)), batch_size=per_rank, sampler=sampler, drop_last=False,
                        collate_fn=lambda idx: data.batch(train_rows[idx], with_token_ids=cfg.text_finetune))

    text_params = list(model.encoder.parameters()) if cfg.text_finetune else []
    text_ids = {id(p) for p in text_params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in text_ids], "lr": cfg.lr}]
    if text_params:
        groups.append({"params": text_params, "lr": cfg.lr_text})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.epochs * len(loader), cfg.warmup))
    trainable = model
    if world > 1:
        trainable = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    live = None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "plots").mkdir(exist_ok=True)
        from dvclive import Live
        live = Live(dir=str(out_dir / "live"), dvcyaml=None, save_dvc_exp=False, report=None)

    checkpoint_path = out_dir / "model.pt"
    best = {"select": math.inf, "epoch": 0, "state": None}
    history: list[dict] = []
    started = time.time()
    for epoch in range(1, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        trainable.train()
        running, running_total, seen = 0.0, 0.0, 0
        bar = tqdm(loader, desc=f"{name} epoch {epoch}/{cfg.epochs}", leave=False, disable=not (progress and main))
        for step, batch in enumerate(bar, 1):
            batch = _to(batch, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = trainable(batch)
            main_loss = task_loss(out["pred"], batch["label"], task)
            loss = main_loss + sum(out.get("aux", {}).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # DDP has averaged the gradients: a non-finite norm is seen by every rank alike.
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                raise NonFiniteLoss(f"{name}: non-finite loss ({loss.item()}) at epoch {epoch}, batch {step}; "
                                    f"stopped, the last good checkpoint ({checkpoint_path}) is kept")
            optimizer.step()
            scheduler.step()
            running += main_loss.item() * len(batch["label"])
            running_total += loss.item() * len(batch["label"])
            seen += len(batch["label"])
            bar.set_postfix(loss=f"{running / seen:.4f}", total=f"{running_total / seen:.4f}")
        valid_pred = predict_rows(model, data, valid_rows, device, cfg.eval_batch_size, cfg.text_finetune)
        valid_loss, select = _select_score(task, valid_pred, data.labels[valid_rows])
        record = {"epoch": epoch, "train_loss": running / max(seen, 1), "train_total": running_total / max(seen, 1),
                  "valid_loss": valid_loss, "select": select}
        if task == "regression":
            record["valid_corr"] = regression_metrics(valid_pred, data.labels[valid_rows])["corr"] or 0.0
        history.append(record)
        improved = select < best["select"] - 1e-6
        if improved:
            best = {"select": select, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        if main:
            for key, value in record.items():
                if key not in ("epoch", "select"):
                    live.log_metric(key.replace("_", "/", 1), value)
            live.next_step()
            log(f"{name} epoch {epoch:3d}: train loss {record['train_loss']:.4f}, valid loss {valid_loss:.4f}"
                + (" *" if improved else ""))
            if improved:
                _save_atomic(_checkpoint(name, model, data, cfg, arch_params, text_encoder, epoch), checkpoint_path)
        if epoch - best["epoch"] >= cfg.patience:
            log(f"{name}: early stop after epoch {epoch} (best epoch {best['epoch']})")
            break

    model.load_state_dict(best["state"])
    test_pred = predict_rows(model, data, test_rows, device, cfg.eval_batch_size, cfg.text_finetune)
    valid_pred = predict_rows(model, data, valid_rows, device, cfg.eval_batch_size, cfg.text_finetune)
    result = _evaluate(task, test_pred, valid_pred, data, test_rows, valid_rows, num_classes)
    # metrics.json holds no wall time: same params and seed must give an identical file
    result.update(best_epoch=best["epoch"], epochs_run=len(history), params=n_params)
    log(f"{name}: trained {len(history)} epochs in {time.time() - started:.1f} s, best epoch {best['epoch']}")
    if main:
        live.end()
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        _write_plots(name, out_dir / "plots", history, task, test_pred, data, test_rows, result)
    if world > 1:
        dist.destroy_process_group()
    return result


def _evaluate(task, test_pred, valid_pred, data, test_rows, valid_rows, num_classes) -> dict:
    if task == "classification":
        test, _ = classification_metrics(test_pred, data.labels[test_rows], num_classes)
        valid, _ = classification_metrics(valid_pred, data.labels[valid_rows], num_classes)
    else:
        test = regression_metrics(test_pred, data.labels[test_rows])
        valid = regression_metrics(valid_pred, data.labels[valid_rows])
    rounded = lambda d: {k: (None if v is None else round(v, 6)) for k, v in d.items()}  # noqa: E731
    return {"test": rounded(test), "valid": rounded(valid)}


def _write_plots(name, plot_dir: Path, history, task, test_pred, data, test_rows, result) -> None:
    plots.loss_curves(history, plot_dir / "loss.png", f"{name}: training")
    labels = data.labels[test_rows]
    ids = data.index["id"].to_numpy()[test_rows]
    if task == "classification":
        names = data.meta["classes"]
        _, matrix = classification_metrics(test_pred, labels, len(names))
        pred_col = test_pred.argmax(1)
    else:
        names = SEVEN_CLASS_NAMES
        _, matrix = classification_metrics(seven_class(test_pred) + 3, seven_class(labels) + 3, 7)
        plots.scatter(test_pred, labels, plot_dir / "scatter.png", f"{name}: test MAE {result['test']['mae']:.3f}")
        pred_col = test_pred
    plots.confusion(matrix, names, plot_dir / "confusion.png", f"{name}: test")
    import pandas as pd
    pd.DataFrame({"id": ids, "label": labels, "pred": pred_col}).to_csv(plot_dir / "test_predictions.csv", index=False)


def _checkpoint(name, model, data: AssembledData, cfg: TrainConfig, arch_params, text_encoder, epoch) -> dict:
    """Everything needed to rebuild and feed the model; loads with torch.load(weights_only=True)."""
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": {"name": name, "input_dims": data.input_dims, "task": data.task,
                   "num_classes": len(data.meta["classes"] or []) if data.task == "classification" else 1,
                   "classes": data.meta["classes"], "arch": dict(arch_params or {}), "train": asdict(cfg),
                   "text_finetune": cfg.text_finetune, "text_encoder": text_encoder,
                   "feature_params": {m: data.meta["modalities"][m]["params"] for m in data.modalities},
                   "encoders": {m: data.meta["modalities"][m]["encoder"] for m in data.modalities},
                   "max_steps": data.meta.get("max_steps", {}),
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
    model = build_model(cfg["name"], cfg["input_dims"], cfg["task"], cfg["num_classes"], cfg["arch"])
    if cfg["text_finetune"]:
        model = TextFinetune(_load_text_encoder(cfg["text_encoder"]), model)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt
