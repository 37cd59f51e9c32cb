"""What one run (an experiment) is, and the few numbers DVC compares across runs.

* `lean_metrics`: the DVC metrics the `report` stage writes into `metrics/`, one small JSON file per
  number, keyed by model (`metrics/mae.json` = {"gexsent": 0.80, "gce": 1.05, ...}). So `dvc metrics
  show` is a metrics x models table whatever the number of metrics, and `dvc metrics diff` lists one
  line per model and number. Per model (mean over seeds, the probe's single run): the preset's
  headline test metrics (MOSI: MAE, Corr, Acc-2 and F1 has0 / non0; CH-SIMS: MAE, Corr, Acc-2, F1;
  classification: accuracy, macro and weighted F1), the validation score the checkpoint was selected
  on (`valid_mae`, or `valid_loss` and the valid accuracy and F1 for classification), the std over
  seeds of the primary metric when there are several, and the robustness AUC of the primary metric per
  drop curve. Everything else (hashes, selection records, epochs, counts, every metric) stays in each
  run's metrics.json and the report's details.json.
* `changed_params`: the params of this run that differ from the committed baseline (HEAD's params.yaml).
* `run_section`: the report's "This run" section: those differences and each model's hyperparameters.

Imports our params and errors only (no torch), as the report does.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from .. import params

HEADLINE = {  # the test metrics each preset's papers report, in table order
    "mosi": ["mae", "corr", "acc2_has0", "acc2_non0", "f1_has0", "f1_non0"],
    "sims": ["mae", "corr", "acc2", "f1"],
    "classification": ["accuracy", "macro_f1", "weighted_f1"],
}
PRIMARY = {"mosi": "mae", "sims": "mae", "classification": "weighted_f1"}


def family(test_metrics: dict) -> str:
    """mosi | sims | classification, from the metric names a run wrote (CH-SIMS's have Acc-3)."""
    return "classification" if "accuracy" in test_metrics else "sims" if "acc3" in test_metrics else "mosi"


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 6) if values else None


def _std(values: list) -> float | None:
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return round((sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5, 6)


def valid_scores(metrics: dict) -> dict[str, float | None]:
    """The validation numbers a run's checkpoint was chosen by: {valid_mae} (regression) or {valid_loss,
    valid_accuracy, valid_macro_f1, valid_weighted_f1} (classification)."""
    valid = metrics.get("valid", {})
    if "alpha" in metrics:  # the linear probe: its penalty was chosen on this validation loss
        score = metrics["valid_loss"][str(metrics["alpha"])]
    else:
        score = metrics.get("valid_score")
    if family(metrics["test"]) == "classification":
        out = {"valid_loss": score}
        out.update({f"valid_{k}": valid.get(k) for k in HEADLINE["classification"]})
        return out
    return {"valid_mae": valid.get("mae") if score is None else score}


def lean_metrics(runs_by_model: dict[str, list], robustness: dict | None) -> dict[str, dict[str, float]]:
    """{file stem: {model: value}} for metrics/: see the module docstring. `runs_by_model`: model -> its runs
    (`runs.Run`, one per seed); `robustness`: the robustness stage's details.json, or None."""
    first = next(iter(runs_by_model.values()))[0].metrics["test"]
    kind = family(first)
    primary = PRIMARY[kind]
    table: dict[str, dict[str, float]] = {}

    def put(stem: str, model: str, value) -> None:
        if value is not None:  # an undefined number (one seed's std, Corr of a constant) is left out
            table.setdefault(stem, {})[model] = value

    for model, model_runs in runs_by_model.items():
        for metric in HEADLINE[kind]:
            put(metric, model, _mean([r.metrics["test"].get(metric) for r in model_runs]))
        put(f"{primary}_std", model, _std([r.metrics["test"].get(primary) for r in model_runs]))
        scores = [valid_scores(r.metrics) for r in model_runs]
        for key in scores[0]:
            put(key, model, _mean([s.get(key) for s in scores]))
    for model, curves in ((robustness or {}).get("models") or {}).items():
        for curve, entry in curves.items():
            if f"auc_{primary}" in entry:  # the drop-rate curves (random, block) have an area
                put(f"auc_{curve}", model, round(entry[f"auc_{primary}"]["mean"], 6))
    return table


def write_lean(out_dir: str | Path, table: dict[str, dict[str, float]]) -> None:
    """metrics/<stem>.json per number; files of numbers this run has not (e.g. a std at one seed) are absent."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.json"):
        stale.unlink()
    for stem, by_model in table.items():
        (out / f"{stem}.json").write_text(json.dumps(by_model, indent=1) + "\n")


# --------------------------------------------------------------------------- this run against the baseline

def committed_params(path: str = "params.yaml") -> tuple[dict | None, str]:
    """(HEAD's params.yaml, how it was found) or (None, why not): outside git, before the first commit."""
    try:
        shown = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"git is not available ({err.__class__.__name__})"
    if shown.returncode != 0:
        return None, "no committed params.yaml (not a git checkout, or nothing committed yet)"
    try:
        return yaml.safe_load(shown.stdout) or {}, "HEAD's params.yaml"
    except yaml.YAMLError:
        return None, "HEAD's params.yaml is not valid YAML"


def flatten(node, prefix: str = "") -> dict:
    """Nested params -> {"model.lr": 0.001, ...} (an empty mapping stays a value)."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def changed_params(raw: dict, baseline: dict) -> list[tuple[str, object, object]]:
    """[(dotted key, baseline value, this run's value)] for every leaf that differs (None: absent)."""
    now, then = flatten(raw), flatten(baseline)
    return [(k, then.get(k), now.get(k)) for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]


def _show(value) -> str:
    return "(absent)" if value is None else json.dumps(value) if isinstance(value, (list, dict, str, bool)) else str(value)


def run_section(raw: dict, baseline: tuple[dict | None, str], sections: list[str]) -> str:
    """The report's "This run" section: params that differ from the baseline, then the hyperparameters the
    models were trained with: `model` (shared), then each of `sections` (a model's own, `probe`)."""
    committed, source = baseline
    out = ["## This run", ""]
    if committed is None:
        out.append(f"Params compared with the committed baseline: not possible, {source}.")
    else:
        diff = changed_params(raw, committed)
        out.append(f"Params that differ from the committed baseline ({source}): "
                   + ("none." if not diff else f"{len(diff)}."))
        out += [f"- `{k}`: {_show(old)} → {_show(new)}" for k, old, new in diff]
    shared = params.lookup(raw, "model") or {}
    out += ["", "Hyperparameters (params.yaml as this run read it; ablation overrides are in their table):", "",
            "| section | values |", "|---|---|",
            "| `model` (every model) | " + ", ".join(f"{k} {_show(v)}" for k, v in shared.items()) + " |"]
    for name in sections:
        section = params.lookup(raw, name)
        if isinstance(section, dict):
            out.append(f"| `{name}` | " + ", ".join(f"{k} {_show(v)}" for k, v in section.items()) + " |")
    return "\n".join(out) + "\n"
