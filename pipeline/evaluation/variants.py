"""Train a model under a seed and param overrides: what the `seeds` and `ablation` stages run.

The overrides are applied to the raw params exactly as `dvc exp run -S KEY=VALUE` would, then the
`model` section and the model's own section are parsed as `train@<model>` parses them, so an
unknown switch or a bad value stops the stage with the usual one-line error.

`vacuous` says when an ablation cannot change its model on the data at hand (GCE's pair components
on a text-only corpus, removing a modality the corpus lacks), so the stage skips it instead of
reporting seed noise as a result. It asks the data and the models rather than a list of known
switches, so a new switch needs no code here:

1. any `model.*` override but `model.modalities` changes training itself (learning rate, epochs,
   fine-tuning): never vacuous;
2. only the data can make an ablation vacuous: if the dataset has every modality the model would
   read (with and without the overrides), not vacuous;
3. the modalities the model reads of this dataset, with and without the overrides: if they differ,
   not vacuous;
4. both models built for this dataset: if their parameters (names and shapes) differ, not vacuous
   (conservative: a component that exists may act later in training); else the full model's
   weights are loaded into the ablated one and both take one training forward and backward pass on
   the same training batch with the same dropout draws: vacuous only when predictions, every loss
   term and every gradient agree.

Why both checks, and why step 2: comparing structure alone would call loss-only switches
(`gce.ablate=[grading]`, `gce.contrastive_weight=0`) vacuous on three modalities; comparing one
step's outputs alone calls `gce.relation_weight=0` vacuous on three modalities too, because GCE's
relation loss fires only once the graders separate the pairs, long after step one. With a modality
missing, the components that need it are absent for the whole run (GCE on text alone has no pair to
grade, relate or contrast), so one step shows what every step would.
"""
from __future__ import annotations

from pathlib import Path

from .. import params, schema
from . import runs
from ..errors import ParamError
from ..models import MODELS
from ..training.provenance import stamp
from ..training.train import TrainParams, train_model


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


def summary_line(result: dict) -> str:
    """The test split's primary metrics: MAE and Corr (regression), weighted-F1, macro-F1 and accuracy
    (classification)."""
    test = result["test"]
    names = (("mae", "MAE"), ("corr", "Corr")) if "mae" in test else \
        (("weighted_f1", "weighted-F1"), ("macro_f1", "macro-F1"), ("accuracy", "accuracy"))
    return "test " + ", ".join(f"{label} {'–' if test.get(k) is None else f'{test[k]:.4f}'}" for k, label in names)


def vacuous(raw: dict, model: str, overrides: list[str], dataset: str | Path, batch_size: int = 32) -> str | None:
    """Why the overrides cannot change `model` on this dataset (module docstring), or None when they can."""
    from ..training.dataset import AssembledData
    from ..models import modalities_read

    if any(o.startswith("model.") and not o.startswith("model.modalities=") for o in overrides):
        return None
    present = AssembledData(dataset).modalities
    configs = [params.read(r, TrainParams) for r in (raw, runs.with_overrides(raw, overrides))]
    asked = [modalities_read(model, cfg.modalities) for cfg in configs]
    reads = [[m for m in wanted if m in present] for wanted in asked]
    if set(asked[0] + asked[1]) <= set(present) or reads[0] != reads[1] or not reads[0]:
        return None
    if any(cfg.text_finetune for cfg in configs):  # the encoder itself trains: too costly to build here
        return None
    if not _same_model(raw, model, overrides, AssembledData(dataset, modalities=reads[0]), configs[0], batch_size):
        return None
    lacks = [m for m in schema.names() if m in asked[0] + asked[1] and m not in present]
    return (f"{model} reads {', '.join(reads[0])} here (the dataset has no {', '.join(lacks)}), and with "
            f"{', '.join(overrides)} it is the same model: same parameters, and the same predictions, losses and "
            f"gradients on a training batch")


def _same_model(raw: dict, model: str, overrides: list[str], data, cfg: TrainParams, batch_size: int) -> bool:
    """Whether `model` with and without the overrides has the same parameters and, given the same weights,
    the same predictions, loss terms and gradients on one training batch with the same dropout draws."""
    import torch

    from ..models import build_model
    from ..models.blocks import task_loss

    if cfg.threads:  # as training sets it (a busy machine's default thread count makes this step slow)
        torch.set_num_threads(cfg.threads)
    num_classes = len(data.meta["classes"] or []) if data.task == "classification" else 1
    built = []
    for r in (raw, runs.with_overrides(raw, overrides)):
        arch = params.as_dict(params.parse(MODELS[model].config_class, params.lookup(r, model), model))
        torch.manual_seed(cfg.seed)
        built.append(build_model(model, data.input_dims, data.task, num_classes, arch))
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in built]
    if shapes[0] != shapes[1]:
        return False
    built[1].load_state_dict(built[0].state_dict())
    batch = data.batch(data.split_rows("train")[:batch_size])
    seen = []
    for m in built:
        m.train()
        torch.manual_seed(0)  # the same dropout draws for both
        out = m(dict(batch))
        aux = out.get("aux", {})
        loss = task_loss(out["pred"], batch["label"], data.task) + sum(aux.values())
        m.zero_grad()
        loss.backward()
        seen.append((out["pred"].detach(), {k: v.item() for k, v in aux.items()},
                     {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
    (pred_a, aux_a, grad_a), (pred_b, aux_b, grad_b) = seen
    return (torch.equal(pred_a, pred_b) and aux_a == aux_b and grad_a.keys() == grad_b.keys()
            and all(torch.equal(grad_a[k], grad_b[k]) for k in grad_a))
