"""The runs an evaluation compares: each model at several seeds, ablations, the linear probe.

Layout (all written by DVC stages, read by `report`):

    models/<model>/                  train@<model>: the run at model.seed (every model train@ trained is reported)
    models/seeds/<model>/seed<k>/    seeds@<model>-<k>: the same model at seed k (evaluate.seeds)
    models/ablations/<name>/seed<k>/ ablation@<name>: one ablation at model.seed and every evaluate.seeds
                                     (or at its own `seeds`)
    models/linear_probe/             probe: ridge / logistic regression on pooled features

Each run folder holds metrics.json and plots/test_predictions.csv, and records where it came from:
`data` (the manifest and split hashes, stamped by `provenance.stamp`) and `selection` (for each choice
the run made on held-out data — early stopping, the checkpoint, the probe's penalty — the split it
read), which `recorded` alone reads. An ablation that cannot change its model on the dataset
(`variants.vacuous`) leaves `skipped.json` (its reason) instead of seed folders.

An ablation is data: a model and `dvc exp run -S`-style overrides of `model.*` or that model's
own section, e.g. {model: gce, set: ["gce.contrastive_weight=0"]} or {model: gexsent, set:
["model.modalities=[text, visual]"]}. Any switch a model section accepts works, so new switches
(`gce.ablate`, `gexsent.variant`, ...) need no code here.

Imports our params and errors only: the report reads runs without loading torch.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import params
from ..errors import UserError
from ..params import ge, param, section

PROBE = "linear_probe"
SKIPPED = "skipped.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass
class Ablation:
    model: str = param("gce", doc="the model trained without the component")
    set: list[str] = param([], doc="KEY=VALUE overrides as `dvc exp run -S` takes them, of model.* or <model>.*")
    seeds: list[int] = param([], ge(0), "the seeds to train it at (empty: model.seed and every evaluate.seeds); "
                                        "fewer for a costly variant, e.g. text fine-tuning on CPU")

    def __post_init__(self):
        for item in self.set:
            key = item.partition("=")[0]
            if "=" not in item or not key.startswith(("model.", f"{self.model}.")):
                raise params.fail("set", item, f"KEY=VALUE with KEY in model.* or {self.model}.*")


@section("evaluate")
@dataclass
class EvaluateParams:
    seeds: list[int] = param([], ge(0), "seeds trained per model besides model.seed (train@<model> is that one); "
                                        "the demo runs none, full-size corpora at least [1, 2] (3 seeds: "
                                        "docs/evaluation.md), the README's results [1, 2, 3, 4]")
    models: list[str] = param(["gexsent", "gce", "text_only", "late_fusion"],
                              doc="models trained at every seed (any other model train@ trained is reported at model.seed)")
    ablations: dict[str, Ablation] = param(
        {"gce-no-relation": Ablation("gce", ["gce.ablate=[relation]"]),
         "gexsent-no-experts": Ablation("gexsent", ["gexsent.ablate=[experts]"]),
         "gexsent-no-acoustic": Ablation("gexsent", ["model.modalities=[text, visual]"])},
        doc="name -> {model, set}: trained at model.seed and every seed, compared with the full model "
            "(the demo's three cheap ones; the references and the full list: docs/evaluation.md)")

    def __post_init__(self):
        for name in self.ablations:
            if not _NAME.fullmatch(name):
                raise params.fail(f"ablations.{name}", name, "a name of letters, digits and _ . + -")


def seeds(raw: dict) -> list[int]:
    """Every seed an evaluation trains: model.seed, then evaluate.seeds (duplicates dropped)."""
    base = params.lookup(raw, "model.seed")
    extra = params.read(raw, EvaluateParams).seeds
    return list(dict.fromkeys([0 if base is None else base] + extra))


def with_overrides(raw: dict, overrides: list[str], seed: int | None = None) -> dict:
    """A copy of the params with the overrides (and model.seed) applied, as `dvc exp run -S` would."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        params.assign(raw, item)
    if seed is not None:
        params.assign(raw, f"model.seed={seed}")
    return raw


# --------------------------------------------------------------------------- reading runs

@dataclass
class Run:
    """One trained run as the report sees it."""
    name: str            # model, ablation or probe name
    seed: int | None
    path: Path
    metrics: dict        # metrics.json
    predictions: pd.DataFrame  # plots/test_predictions.csv, indexed by id
    record: dict = field(default_factory=dict)   # `recorded(path)`: data hashes and selection


def recorded(path: str | Path) -> dict:
    """What a run recorded about its origin: {data: manifest and split hashes | None, selection: {choice:
    {split, criterion, segments}} | None}. The one reader of these records (they live in metrics.json)."""
    metrics = json.loads((Path(path) / "metrics.json").read_text())
    selection = metrics.get("selection")
    if selection and "split" in selection:  # the older single record: the checkpoint's split
        selection = {"checkpoint": selection}
    return {"data": metrics.get("data"), "selection": selection}


def read_run(path: str | Path, name: str, seed: int | None) -> Run:
    path = Path(path)
    for needed in (path / "metrics.json", path / "plots" / "test_predictions.csv"):
        if not needed.is_file():
            raise UserError(f"{needed} does not exist: run `dvc repro` (the stage writing {path})")
    return Run(name, seed, path, json.loads((path / "metrics.json").read_text()),
               pd.read_csv(path / "plots" / "test_predictions.csv").set_index("id"), recorded(path))


def base_run_dirs(raw: dict, models_dir: str | Path) -> dict[str, list[tuple[int, Path]]]:
    """model -> [(seed, folder)] for every model train@ trained (models/<m>, at model.seed), plus
    models/seeds/<m>/seed<k> for each of evaluate.seeds when the model is in evaluate.models."""
    cfg, all_seeds = params.read(raw, EvaluateParams), seeds(raw)
    trained = sorted(p.parent.name for p in Path(models_dir).glob("*/metrics.json") if p.parent.name != PROBE)  # not seeds/, ablations/
    names = [m for m in cfg.models if m in trained] + [m for m in trained if m not in cfg.models]
    missing = [m for m in cfg.models if m not in trained]
    if missing:
        unknown = [m for m in missing if m not in raw]  # every model has its params section (tests/test_contract.py)
        if unknown:
            raise UserError(f"evaluate.models: {', '.join(map(repr, unknown))} is not a model (params.yaml has no "
                            f"section of that name, as each model has); fix the list")
        raise UserError(f"no trained {', '.join(missing)} in {models_dir}: run `dvc repro` (train@<model>)")
    return {m: [(all_seeds[0], Path(models_dir) / m)] +
               ([(s, Path(models_dir) / "seeds" / m / f"seed{s}") for s in all_seeds[1:]] if m in cfg.models else [])
            for m in names}


def base_runs(raw: dict, models_dir: str | Path) -> dict[str, list[Run]]:
    """Every evaluated model at every seed."""
    return {model: [read_run(path, model, seed) for seed, path in dirs]
            for model, dirs in base_run_dirs(raw, models_dir).items()}


def ablation_seeds(raw: dict, ablation: Ablation) -> list[int]:
    return ablation.seeds or seeds(raw)


def ablation_runs(raw: dict, models_dir: str | Path) -> tuple[dict[str, list[Run]], dict[str, str]]:
    """({ablation: its runs}, {ablation skipped as vacuous on this data: the reason its stage gave})."""
    cfg = params.read(raw, EvaluateParams)
    trained, skipped = {}, {}
    for name, spec in cfg.ablations.items():
        folder = Path(models_dir) / "ablations" / name
        if (folder / SKIPPED).is_file():
            skipped[name] = json.loads((folder / SKIPPED).read_text())["reason"]
        else:
            trained[name] = [read_run(folder / f"seed{s}", name, s) for s in ablation_seeds(raw, spec)]
    return trained, skipped
