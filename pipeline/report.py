"""The evaluation report: every model over seeds, the linear probe, the ablations and the robustness
curves in one `reports/summary.md` (+ details.json with every number, summary.json for `dvc metrics`, PNGs).

* Models x metrics: mean ± std over seeds (95% t-interval in details.json). Per metric column the
  best mean is bold; a † marks a model the paired bootstrap finds significantly worse than that best
  (p < report.alpha): no † means "not distinguishable from the best on this test set".
* Pairwise, on the primary metric (MAE, or weighted F1 for classification): the difference, its
  95% bootstrap interval and p, and the per-seed sign test; the verdict says whether it is real.
* Ablations: each against its full model, same seeds, same test.
* Robustness: area under the metric-vs-rate curve and mean over levels, per protocol.
* Checks: every result must come from the same manifest and split (hashes recorded by each run),
  have had its checkpoint selected on the validation split, and a split without shared videos;
  anything else is listed under "Flags" at the top.

Tables sit between `<!-- table: NAME -->` and `<!-- /table -->` markers, which is how
`python -m tools.readme_tables` finds them. No wall times or dates: the same runs give the same report.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import params, runs
from .errors import UserError
from .evaluation import LOWER_IS_BETTER, PRIMARY, batched_metrics, bootstrap_replicates, compare, sign_test, summarize
from .params import between, ge, param, section

LABELS = {"mae": "MAE", "corr": "Corr", "acc2_has0": "Acc-2 has0", "acc2_non0": "Acc-2 non0", "f1_has0": "F1 has0",
          "f1_non0": "F1 non0", "acc2": "Acc-2", "acc3": "Acc-3", "f1": "F1", "acc5": "Acc-5", "acc7": "Acc-7",
          "accuracy": "Acc", "macro_f1": "Macro-F1", "weighted_f1": "Weighted-F1"}
PERCENT = {"acc2_has0", "acc2_non0", "f1_has0", "f1_non0", "acc2", "acc3", "f1", "acc5", "acc7", "accuracy", "macro_f1",
           "weighted_f1"}


@section("report")
@dataclass
class ReportParams:
    bootstrap: int = param(2000, ge(100), "paired bootstrap replicates (test segments and seeds resampled)")
    alpha: float = param(0.05, between(0, 1), "significance level of the marks and verdicts")


def fmt(metric: str, value: float | None, std: float | None = None) -> str:
    """Accuracies and F1 in percent with one decimal, the rest with three decimals; ± std when given."""
    if value is None:
        return "–"
    scale, digits = (100, 1) if metric in PERCENT else (1, 3)
    text = f"{value * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def fmt_p(p: float | None, n_boot: int) -> str:
    """A bootstrap p-value: 0 means below the resolution 1 / replicates."""
    return "–" if p is None else f"< {1 / n_boot:.0e}" if p == 0 else f"{p:.3f}"


def table(name: str, header: list[str], rows: list[list[str]], note: str = "") -> str:
    """A markdown table (and its note) between the markers tools.readme_tables looks for."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return f"<!-- table: {name} -->\n" + "\n".join(lines) + (f"\n\n{note}" if note else "") + "\n<!-- /table -->\n"


# --------------------------------------------------------------------------- predictions

@dataclass
class Group:
    """The runs of one model (or ablation, or the probe): metrics per seed and aligned test predictions."""
    name: str
    runs: list
    preds: np.ndarray          # (seeds, N) scores or class ids, in the report's id order

    def values(self, metric: str) -> list:
        return [r.metrics["test"].get(metric) for r in self.runs]

    def seeds(self) -> list:
        return [r.seed for r in self.runs]


def _aligned(run, ids, task: str, classes: list[str]) -> np.ndarray:
    frame = run.predictions
    if set(frame.index) != set(ids):
        raise UserError(f"{run.path}: its test segments differ from the other runs' (re-run `dvc repro`)")
    column = frame.loc[ids, "pred"]
    return column.map({c: i for i, c in enumerate(classes)}).to_numpy() if task == "classification" else column.to_numpy(float)


def groups_of(named_runs: dict[str, list]) -> tuple[dict[str, Group], np.ndarray, str, list[str]]:
    """(groups, labels, task, classes) with every run's predictions aligned on the first run's test ids."""
    first = next(iter(named_runs.values()))[0]
    ids = list(first.predictions.index)
    task = "regression" if "mae" in first.metrics["test"] else "classification"
    classes = [c[2:] for c in first.predictions.columns if c.startswith("p_")]
    labels = first.predictions.loc[ids, "label"]
    labels = labels.map({c: i for i, c in enumerate(classes)}).to_numpy() if task == "classification" else labels.to_numpy(float)
    groups = {name: Group(name, rs, np.stack([_aligned(r, ids, task, classes) for r in rs])) for name, rs in named_runs.items()}
    return groups, labels, task, classes


# --------------------------------------------------------------------------- analyses

def _sign(a: Group, b: Group, metric: str) -> dict | None:
    """Per-seed sign test of a against b: paired by seed, or against b's single run (a deterministic baseline)."""
    va, vb = a.values(metric), b.values(metric)
    if None in va or None in vb:
        return None
    if len(vb) == 1 or a.seeds() == b.seeds():
        return sign_test(va, vb if len(vb) > 1 else vb[0], metric)
    if len(va) == 1:
        result = sign_test(vb, va[0], metric)
        return {**result, "wins": result["losses"], "losses": result["wins"]}
    return None


def verdict(a: str, b: str, c: dict, n_boot: int) -> str:
    if c["p"] is None:
        return "undefined"
    p = fmt_p(c["p"], n_boot)
    if c["better"] is None:
        return f"no significant difference (p {p if p.startswith('<') else '= ' + p})"
    return f"**{a if c['better'] == 'a' else b}** better (p {p if p.startswith('<') else '= ' + p})"


def model_table(groups: dict[str, Group], boot: dict, metrics: list[str], cfg: ReportParams) -> tuple[str, dict]:
    """Models x metrics, mean ± std; the best mean bold; † = significantly worse than the best."""
    stats = {g: {m: summarize(groups[g].values(m)) for m in metrics} for g in groups}
    rows = [[g] for g in groups]
    for m in metrics:
        means = {g: stats[g][m]["mean"] for g in groups if stats[g][m]["mean"] is not None}
        best = (min if m in LOWER_IS_BETTER else max)(means, key=means.get) if means else None
        for row, g in zip(rows, groups):
            s = stats[g][m]
            cell = fmt(m, s["mean"], s["std"])
            if g == best:
                cell = f"**{cell}**"
            elif best is not None and s["mean"] is not None:
                c = compare(s["mean"], means[best], boot[g][m], boot[best][m], m, cfg.alpha)
                stats[g][m]["vs_best"] = c
                cell += " †" if c["better"] == "b" else ""
            row.append(cell)
    seeds = {g: len(groups[g].runs) for g in groups}
    rows = [r[:1] + [str(seeds[r[0]])] + r[1:] for r in rows]
    note = (f"**Bold**: best mean per column. †: significantly worse than that best (paired bootstrap over test segments "
            f"and seeds, p < {cfg.alpha}); no mark: not distinguishable from the best on this test set. Accuracies and F1 in %.")
    return table("models", ["model", "seeds"] + [LABELS.get(m, m) for m in metrics], rows, note), stats


def pairwise_table(groups: dict[str, Group], boot: dict, metric: str, cfg: ReportParams) -> tuple[str, list]:
    rows, records = [], []
    for a, b in itertools.combinations(groups, 2):
        ma, mb = summarize(groups[a].values(metric))["mean"], summarize(groups[b].values(metric))["mean"]
        if ma is None or mb is None:
            continue
        c = compare(ma, mb, boot[a][metric], boot[b][metric], metric, cfg.alpha)
        s = _sign(groups[a], groups[b], metric)
        ci = "–" if c["ci"] is None else f"[{fmt(metric, c['ci'][0])}, {fmt(metric, c['ci'][1])}]"
        signs = "–" if s is None else f"{s['wins']}/{s['losses']}/{s['ties']} (p = {s['p']:.3f})"
        rows.append([f"{a} vs {b}", fmt(metric, c["diff"]), ci, signs, verdict(a, b, c, cfg.bootstrap)])
        records.append({"a": a, "b": b, **c, "sign_test": s})
    header = ["pair", f"Δ {LABELS.get(metric, metric)} (a − b)", "95% CI", "seeds a won/lost/tied (sign test)", "verdict"]
    return table("pairwise", header, rows), records


def ablation_table(groups: dict[str, Group], ablations: dict, boot: dict, metric: str, cfg: ReportParams) -> tuple[str, dict]:
    rows, records = [], {}
    for name, spec in ablations.items():
        if spec.model not in groups:
            continue
        s = summarize(groups[name].values(metric))
        full = summarize(groups[spec.model].values(metric))
        c = compare(s["mean"], full["mean"], boot[name][metric], boot[spec.model][metric], metric, cfg.alpha)
        ci = "–" if c["ci"] is None else f"[{fmt(metric, c['ci'][0])}, {fmt(metric, c['ci'][1])}]"
        effect = "n.s." if not c["significant"] else ("worse" if c["better"] == "b" else "better")
        rows.append([name, spec.model, "<br>".join(f"`{x}`" for x in spec.set) or "–", fmt(metric, s["mean"], s["std"]),
                     fmt(metric, c["diff"]), ci, fmt_p(c["p"], cfg.bootstrap), effect])
        records[name] = {"model": spec.model, "set": spec.set, metric: s, "vs_full": c}
    header = ["ablation", "model", "overrides", LABELS.get(metric, metric), "Δ vs full", "95% CI", "p", "effect"]
    return table("ablations", header, rows), records


def never_acted(groups: dict[str, Group], ablations: dict) -> str:
    """Notes for ablations whose removed component never acted in the full model's runs (same seeds) before
    their selected epoch (interpret/summary.json's `acted`): such an ablation can only measure seed noise."""
    import yaml

    idle_words = {"relation": "the relation loss never fired", "grading": "grading never chose a guide"}
    notes = []
    for name, spec in ablations.items():
        if spec.model not in groups or name not in groups:
            continue
        removed = [c for item in spec.set if item.startswith(f"{spec.model}.ablate=")
                   for c in yaml.safe_load(item.split("=", 1)[1]) or []]
        full_runs = [r for r in groups[spec.model].runs if r.seed in groups[name].seeds()]
        for component in removed:
            summaries = [r.path / "interpret" / "summary.json" for r in full_runs]
            records = [json.loads(f.read_text()).get("acted", {}).get(component) if f.is_file() else None for f in summaries]
            idle = [r.seed for r, rec in zip(full_runs, records) if rec is not None and rec["steps"] == 0]
            if idle:
                where = "in every run" if len(idle) == len(full_runs) else f"at seed {', '.join(map(str, idle))}"
                notes.append(f"- {name}: {idle_words.get(component, f'{component} never acted')} before the selected epoch "
                             f"in the full model ({spec.model}) {where}"
                             + (": this ablation measures seed noise." if len(idle) == len(full_runs) else "."))
    return "\n" + "\n".join(notes) + "\n" if notes else ""


def robustness_tables(record: dict, groups: dict[str, Group], metric: str) -> str:
    """Per model: clean value, AUC of the rate curves, mean over noise levels and over missing-modality subsets."""
    models = [g for g in groups if g in record.get("models", {})]
    if not models:
        return ""
    curves = list(record["models"][models[0]])
    header, rows = ["model", f"clean {LABELS.get(metric, metric)}"], []
    for curve in curves:
        header.append(f"{curve} {'AUC' if curve.startswith(('random', 'block')) else 'mean'}")
    for g in models:  # the clean value over the seeds whose runs were corrupted
        seeds = record.get("train_seeds", {}).get(g)
        clean = summarize([r.metrics["test"].get(metric) for r in groups[g].runs if seeds is None or r.seed in seeds])
        row = [g, fmt(metric, clean["mean"], clean["std"])]
        for curve in curves:
            entry = record["models"][g][curve]
            s = entry.get(f"auc_{metric}") or entry[f"mean_{metric}"]
            row.append(fmt(metric, s["mean"], s["std"]))
        rows.append(row)
    out = table("robustness", header, rows)
    subsets = record["models"][models[0]].get("subsets", {}).get("levels")
    if subsets:
        out += "\n" + table("subsets", ["model"] + [f"without {lvl[1:].replace('-', ' + ')}" for lvl in subsets],
                            [[g] + [fmt(metric, record["models"][g]["subsets"]["levels"][lvl][metric]["mean"])
                                    for lvl in subsets] for g in models])
    return out


def flags(all_runs: list, robustness: dict | None) -> list[str]:
    """Leakage and selection problems: mixed data, a checkpoint not selected on validation, shared videos."""
    out, seen = [], {}
    for r in all_runs:
        where = f"{r.name}" + (f" seed {r.seed}" if r.seed is not None else "")
        data, sel = r.metrics.get("data"), r.metrics.get("selection")
        if not data:
            out.append(f"{where}: no data hashes recorded ({r.path}/metrics.json predates them: re-run it)")
        else:
            seen.setdefault((data["manifest_sha256"], data["split_sha256"]), []).append(where)
            if data.get("shared_videos"):
                out.append(f"{where}: {data['shared_videos']} video(s) appear in two splits "
                           f"(assemble.allow_shared_videos: true): speaker leakage is possible")
        if not sel or sel.get("split") != "valid" or not sel.get("segments"):
            out.append(f"{where}: checkpoint selected on {(sel or {}).get('split', 'an unrecorded split')}"
                       f"{' (empty)' if sel and not sel.get('segments') else ''}, not on the validation split")
    if robustness and robustness.get("data") and seen and (robustness["data"]["manifest_sha256"],
                                                            robustness["data"]["split_sha256"]) not in seen:
        out.append("robustness: measured on other data than the runs (re-run `dvc repro robustness`)")
    if len(seen) > 1:
        out.append("results come from different data: " + "; ".join(
            f"manifest {m[:12]} split {s[:12]}: {', '.join(w)}" for (m, s), w in seen.items()))
    return sorted(set(out), key=out.index)


# --------------------------------------------------------------------------- the report

def build(raw: dict, models_dir, robustness_path, cfg: ReportParams) -> tuple[str, dict, dict]:
    """(summary.md text, summary.json record, groups) from every run the DAG produced."""
    base = runs.base_runs(raw, models_dir)
    compared_names = [*base, runs.PROBE]
    probe = runs.read_run(Path(models_dir) / runs.PROBE, runs.PROBE, None)
    named = {**base, runs.PROBE: [probe], **runs.ablation_runs(raw, models_dir)}
    groups, labels, task, classes = groups_of(named)
    metric = PRIMARY[task]
    metrics = [m for m in LABELS if m in named[compared_names[0]][0].metrics["test"]]
    family = "sims" if "acc3" in named[compared_names[0]][0].metrics["test"] else "mosi"  # CH-SIMS's metrics have Acc-3
    boot = bootstrap_replicates({g: groups[g].preds for g in groups}, labels, batched_metrics(task, len(classes), family),
                                cfg.bootstrap)
    compared = {g: groups[g] for g in compared_names}
    models_md, stats = model_table(compared, boot, metrics, cfg)
    pairs_md, pairs = pairwise_table(compared, boot, metric, cfg)
    ablations = params.read(raw, runs.EvaluateParams).ablations
    ablations_md, ablated = ablation_table(groups, ablations, boot, metric, cfg)
    ablations_md += never_acted(groups, ablations)
    robustness = json.loads(Path(robustness_path).read_text()) if Path(robustness_path).is_file() else None
    problems = flags([r for rs in named.values() for r in rs], robustness)
    data = next((r.metrics.get("data") for rs in named.values() for r in rs if r.metrics.get("data")), None) or {}
    context = {"root": params.lookup(raw, "data.root"), "task": task, "test": len(labels), "data": data,
               "seeds": runs.seeds(raw), "bootstrap": cfg.bootstrap, "alpha": cfg.alpha, "metric": metric}
    sections = {"models": models_md, "pairwise": pairs_md, "ablations": ablations_md if ablated else "",
                "robustness": robustness_tables(robustness, compared, metric) if robustness else ""}
    record = {"data": data, "task": task, "test_segments": len(labels), "seeds": context["seeds"], "flags": problems,
              "models": stats, "pairwise": {f"{p['a']} vs {p['b']}": p for p in pairs}, "ablations": ablated}
    return render(context, sections, problems), record, compared


def render(ctx: dict, sections: dict, problems: list[str]) -> str:
    metric = LABELS.get(ctx["metric"], ctx["metric"])
    data = ctx["data"]
    out = ["# Evaluation report", "",
           f"Data `{ctx['root']}` ({ctx['task']}), {ctx['test']} test segments; manifest "
           f"`{str(data.get('manifest_sha256'))[:12]}`, split `{str(data.get('split_sha256'))[:12]}`. "
           f"Seeds {ctx['seeds']} (model.seed + evaluate.seeds); the linear probe is deterministic (one run). "
           f"Paired bootstrap: {ctx['bootstrap']} replicates over test segments and seeds, alpha {ctx['alpha']}.", "",
           "## Flags", ""]
    out += [f"- ⚠ {p}" for p in problems] or ["None: every result comes from the same manifest and split, "
                                              "was selected on the validation split, and no video is in two splits."]
    out += ["", "## Models (test split, mean ± std over seeds)", "", sections["models"],
            f"![per-seed {metric}](figures/seeds_{ctx['metric']}.png)", "",
            f"## Pairwise comparisons ({metric})", "", sections["pairwise"]]
    if sections["ablations"]:
        out += ["## Ablations (each against its full model, same seeds)", "", sections["ablations"]]
    if sections["robustness"]:
        out += ["## Robustness (test time, no retraining)", "",
                f"Test {metric} of each model on corrupted inputs, per curve `<protocol>-<modalities>`: `random` / `block` = "
                "per-step / one-block drop at rates 0..1 (AUC: trapezoid area under the metric-vs-rate curve, OpenVNA's AIR), `noise` = "
                "Gaussian noise on the normalised features (mean over SNRs), `subsets` = whole modalities missing "
                "(mean over the subsets). Mean ± std over seeds; curves in `robustness/`.", "", sections["robustness"]]
    return "\n".join(out) + "\n"


def lean(record: dict) -> dict:
    """What `dvc metrics show` gets: per model each metric's mean and std; per ablation its difference and p."""
    metric = PRIMARY[record["task"]]
    return {"flags": len(record["flags"]),
            "models": {g: {f"{m}{suffix}": s[stat] for m, s in stats.items() for suffix, stat in (("", "mean"), ("_std", "std"))}
                       for g, stats in record["models"].items()},
            "ablations": {name: {f"{metric}_diff": a["vs_full"]["diff"], "p": a["vs_full"]["p"]}
                          for name, a in record["ablations"].items()}}


def write(out_dir, markdown: str, record: dict, groups: dict[str, Group], metric: str) -> None:
    """summary.md, details.json (everything), summary.json (for `dvc metrics`), figures/."""
    from .figures import seed_spread

    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(markdown)
    (out / "details.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    (out / "summary.json").write_text(json.dumps(lean(record), indent=1, default=float) + "\n")
    stats = record["models"]
    seed_spread({g: groups[g].values(metric) for g in groups}, {g: stats[g][metric]["ci"] for g in groups}, metric,
                out / "figures" / f"seeds_{metric}.png", f"test {LABELS.get(metric, metric)} per seed (line: 95% CI)")
