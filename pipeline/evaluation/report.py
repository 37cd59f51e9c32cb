"""The evaluation report: every model over seeds, the linear probe, the ablations and the robustness
curves in one `reports/summary.md` (+ details.json with every number, summary.json for `dvc metrics`, PNGs).
The protocol, and how to read it: docs/evaluation.md.

* Every comparison is paired: the seeds both sides ran (a deterministic run, the probe, pairs with
  every seed of the other side) and the test segments both scored; the table says which seeds.
  Paired bootstrap over those segments and seeds (pipeline/evaluation/stats.py).
* Each table is one family of tests, Holm-corrected: the pairwise table, the ablation table, and
  per metric column of the models table the comparisons with that column's best. Raw and adjusted
  p are shown; verdicts and marks use the adjusted p (< report.alpha).
* Models x metrics: mean ± std over seeds (95% t-interval in details.json). Per column the best
  mean is bold; a † marks a model significantly worse than that best.
* Pairwise, on the primary metric (MAE, or weighted F1 for classification): difference, its 95%
  bootstrap interval, raw and Holm p, the per-seed sign test where two or more seeds pair up.
* Ablations: each against its full model on the seeds both ran; one that cannot change the model
  on this data was skipped by its stage (`skipped.json`) and is listed with the reason.
* Robustness: area under the metric-vs-rate curve (per unit of rate) and mean over levels, per protocol.
* Checks: every result must come from the same manifest and split (hashes each run recorded), every
  selection a run recorded (early stopping, checkpoint, the probe's penalty) must have read a
  non-empty validation split, and no video may sit in two splits; anything else is listed under
  "Flags" at the top. Comparisons resting on fewer than report.min_seeds seeds are marked ⚠.

Tables sit between `<!-- table: NAME -->` and `<!-- /table -->` markers, which is how
`python -m tools.readme_tables` finds them. No wall times or dates: the same runs give the same report.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import params
from . import runs
from .stats import LOWER_IS_BETTER, PRIMARY, batched_metrics, bootstrap_replicates, compare, decide, holm, sign_test, summarize
from ..params import between, ge, param, section

LABELS = {"mae": "MAE", "corr": "Corr", "acc2_has0": "Acc-2 has0", "acc2_non0": "Acc-2 non0", "f1_has0": "F1 has0",
          "f1_non0": "F1 non0", "acc2": "Acc-2", "acc3": "Acc-3", "f1": "F1", "acc5": "Acc-5", "acc7": "Acc-7",
          "accuracy": "Acc", "macro_f1": "Macro-F1", "weighted_f1": "Weighted-F1"}
PERCENT = {"acc2_has0", "acc2_non0", "f1_has0", "f1_non0", "acc2", "acc3", "f1", "acc5", "acc7", "accuracy", "macro_f1",
           "weighted_f1"}


@section("report")
@dataclass
class ReportParams:
    bootstrap: int = param(2000, ge(100), "paired bootstrap replicates (test segments and seeds resampled)")
    alpha: float = param(0.05, between(0, 1), "significance level of the marks and verdicts (on Holm-adjusted p)")
    min_seeds: int = param(3, ge(1), "seeds per side below which a comparison is marked ⚠ (docs/evaluation.md)")


def fmt(metric: str, value: float | None, std: float | None = None) -> str:
    """Accuracies and F1 in percent with one decimal, the rest with three decimals; ± std when given."""
    if value is None:
        return "–"
    scale, digits = (100, 1) if metric in PERCENT else (1, 3)
    text = f"{value * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def fmt_p(p: float | None) -> str:
    return "–" if p is None else f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


def fmt_seeds(seeds: list) -> str:
    """[0, 1, 2, 4] -> '0–2, 4'."""
    runs_of, out = [], []
    for s in sorted(seeds):
        if runs_of and s == runs_of[-1][-1] + 1:
            runs_of[-1].append(s)
        else:
            runs_of.append([s])
    for r in runs_of:
        out.append(str(r[0]) if len(r) == 1 else f"{r[0]}, {r[1]}" if len(r) == 2 else f"{r[0]}–{r[-1]}")
    return ", ".join(out)


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
    preds: np.ndarray          # (runs, N) scores or class ids in the report's id order; NaN: segment not scored

    def values(self, metric: str) -> list:
        return [r.metrics["test"].get(metric) for r in self.runs]

    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    @property
    def deterministic(self) -> bool:
        """One run with no seed (the linear probe): it pairs with every seed of the other side."""
        return len(self.runs) == 1 and self.runs[0].seed is None


def _aligned(run, ids, task: str, classes: list[str]) -> np.ndarray:
    column = run.predictions["pred"].reindex(ids)
    if task == "classification":
        column = column.map({c: i for i, c in enumerate(classes)})
    return column.to_numpy(float)


def groups_of(named_runs: dict[str, list]) -> tuple[dict[str, Group], np.ndarray, str, list[str]]:
    """(groups, labels, task, classes) with every run's predictions aligned on every test id any run scored."""
    first = next(iter(named_runs.values()))[0]
    task = "regression" if "mae" in first.metrics["test"] else "classification"
    classes = [c[2:] for c in first.predictions.columns if c.startswith("p_")]
    everyone = pd.concat([r.predictions["label"] for rs in named_runs.values() for r in rs])
    labels = everyone[~everyone.index.duplicated()]
    ids = list(labels.index)
    labels = labels.map({c: i for i, c in enumerate(classes)}).to_numpy() if task == "classification" else labels.to_numpy(float)
    groups = {name: Group(name, rs, np.stack([_aligned(r, ids, task, classes) for r in rs])) for name, rs in named_runs.items()}
    return groups, labels, task, classes


# --------------------------------------------------------------------------- paired comparisons

UNDEFINED = {"diff": None, "ci": None, "p": None, "significant": False, "better": None}


def paired_rows(a: Group, b: Group) -> tuple[list[int], list[int], list]:
    """(runs of a, runs of b, the seeds they stand for): the seeds both ran, in a's order; a deterministic
    side pairs its one run with every run of the other."""
    if a.deterministic or b.deterministic:
        other = b if a.deterministic else a
        return list(range(len(a.runs))), list(range(len(b.runs))), [s for s in other.seeds() if s is not None]
    common = [s for s in a.seeds() if s in b.seeds()]
    return [a.seeds().index(s) for s in common], [b.seeds().index(s) for s in common], common


def _per_run(preds: np.ndarray, labels: np.ndarray, metric_fn) -> dict:
    """{metric: (runs,) values, NaN where undefined} of each run's predictions."""
    return metric_fn(preds, np.broadcast_to(labels, preds.shape))


def paired(a: Group, b: Group, labels: np.ndarray, metric_fn, cfg: ReportParams) -> dict:
    """a - b on the seeds both ran and the segments both scored: {seeds, segments, n_a, n_b,
    values_a/values_b: per paired run, per metric, and per metric the `compare` result (raw p)}."""
    ra, rb, seeds = paired_rows(a, b)
    out = {"seeds": seeds, "segments": 0, "of": len(labels), "n_a": len(ra), "n_b": len(rb), "values_a": {}, "values_b": {},
           "metrics": {}}
    if not ra or not rb:
        return out
    pa, pb = a.preds[ra], b.preds[rb]
    scored = np.isfinite(pa).all(0) & np.isfinite(pb).all(0)
    pa, pb, y = pa[:, scored], pb[:, scored], labels[scored]
    out["segments"] = int(scored.sum())
    if not out["segments"]:
        return out
    va, vb = _per_run(pa, y, metric_fn), _per_run(pb, y, metric_fn)
    boot = bootstrap_replicates({"a": pa, "b": pb}, y, metric_fn, cfg.bootstrap)
    for m in va:
        out["values_a"][m] = [None if np.isnan(v) else float(v) for v in va[m]]
        out["values_b"][m] = [None if np.isnan(v) else float(v) for v in vb[m]]
        mean_a, mean_b = summarize(out["values_a"][m])["mean"], summarize(out["values_b"][m])["mean"]
        out["metrics"][m] = (compare(mean_a, mean_b, boot["a"][m], boot["b"][m], m, cfg.alpha)
                             if mean_a is not None and mean_b is not None else UNDEFINED)
    return out


def _flipped(c: dict) -> dict:
    """The comparison b - a from a - b."""
    swap = {"values_a": c["values_b"], "values_b": c["values_a"], "n_a": c["n_b"], "n_b": c["n_a"]}
    metrics = {m: {**r, "diff": None if r["diff"] is None else -r["diff"], "ci": r["ci"] and [-r["ci"][1], -r["ci"][0]],
                   "better": {"a": "b", "b": "a"}.get(r["better"])} for m, r in c["metrics"].items()}
    return {**c, **swap, "metrics": metrics}


class Comparisons:
    """Paired comparisons, each computed once whichever way round it is asked for."""

    def __init__(self, groups: dict[str, Group], labels: np.ndarray, metric_fn, cfg: ReportParams):
        self.groups, self.labels, self.metric_fn, self.cfg, self.done = groups, labels, metric_fn, cfg, {}
        self.order = {g: i for i, g in enumerate(groups)}

    def __call__(self, a: str, b: str) -> dict:
        key = (a, b) if self.order[a] <= self.order[b] else (b, a)
        if key not in self.done:
            self.done[key] = paired(self.groups[key[0]], self.groups[key[1]], self.labels, self.metric_fn, self.cfg)
        return self.done[key] if key == (a, b) else _flipped(self.done[key])


def result(c: dict, metric: str) -> dict:
    """A comparison's `compare` result for one metric (undefined without a common seed or segment)."""
    return c["metrics"].get(metric) or UNDEFINED


def corrected(results: list[dict], metric: str, alpha: float) -> list[dict]:
    """One family of `compare` results: each with p_holm, and significant / better decided on it."""
    adjusted = holm([r["p"] for r in results])
    return [{**r, "p_holm": q, **decide(r["diff"] or 0.0, q, metric, alpha)} for r, q in zip(results, adjusted)]


def few_seeds(c: dict, cfg: ReportParams) -> bool:
    """Whether the comparison rests on fewer than min_seeds paired seeds."""
    return len(c["seeds"]) < cfg.min_seeds


def seeds_cell(c: dict, cfg: ReportParams) -> str:
    if not c["segments"]:
        return "none in common"
    text = (fmt_seeds(c["seeds"]) if c["seeds"] else "–") + (" ⚠" if few_seeds(c, cfg) else "")
    return text + (f"; {c['segments']} of {c['of']} segments" if c["segments"] < c["of"] else "")


def _sign(c: dict, metric: str) -> dict | None:
    """Per-seed sign test of a against b on the paired runs (two or more seeds), or None."""
    va, vb = c["values_a"].get(metric), c["values_b"].get(metric)
    if not va or not vb or None in va or None in vb or max(len(va), len(vb)) < 2:
        return None
    if len(vb) == 1 or len(va) == len(vb):
        return sign_test(va, vb if len(vb) > 1 else vb[0], metric)
    result = sign_test(vb, va[0], metric)
    return {**result, "wins": result["losses"], "losses": result["wins"]}


# --------------------------------------------------------------------------- tables

def verdict(a: str, b: str, c: dict) -> str:
    if c["p"] is None:
        return "undefined"
    if c["better"] is None:
        return "no significant difference"
    return f"**{a if c['better'] == 'a' else b}** better"


def seeds_note(comparisons: list[dict], cfg: ReportParams) -> str:
    few = sum(few_seeds(c, cfg) for c in comparisons if c["segments"])
    if not few:
        return ""
    return (f" ⚠: {few} of {len(comparisons)} comparison{'s' * (len(comparisons) != 1)} rest{'s' * (few == 1)} on fewer "
            f"than {cfg.min_seeds} seeds: a verdict there can be one seed's luck (docs/evaluation.md, 'How many seeds').")


def model_table(groups: dict[str, Group], compared: Comparisons, metrics: list[str], cfg: ReportParams) -> tuple[str, dict]:
    """Models x metrics, mean ± std; the best mean bold; † = significantly worse than the best (Holm per column)."""
    stats = {g: {m: summarize(groups[g].values(m)) for m in metrics} for g in groups}
    rows = [[g, str(len(groups[g].runs))] for g in groups]
    for m in metrics:
        means = {g: stats[g][m]["mean"] for g in groups if stats[g][m]["mean"] is not None}
        best = (min if m in LOWER_IS_BETTER else max)(means, key=means.get) if means else None
        others = [g for g in means if g != best]
        pairs = {g: compared(g, best) for g in others}
        family = corrected([result(pairs[g], m) for g in others], m, cfg.alpha)
        for g, c in zip(others, family):
            stats[g][m]["vs_best"] = {"best": best, "seeds": pairs[g]["seeds"], "segments": pairs[g]["segments"], **c}
        for row, g in zip(rows, groups):
            s = stats[g][m]
            cell = fmt(m, s["mean"], s["std"])
            cell = f"**{cell}**" if g == best else cell + (" †" if s.get("vs_best", {}).get("better") == "b" else "")
            row.append(cell)
    note = (f"**Bold**: best mean per column. †: significantly worse than that best (paired bootstrap over test segments "
            f"and the seeds both ran, Holm-adjusted over the column's comparisons, p < {cfg.alpha}); no mark: not "
            f"distinguishable from the best on this test set. Accuracies and F1 in %.")
    return table("models", ["model", "seeds"] + [LABELS.get(m, m) for m in metrics], rows, note), stats


def pairwise_table(groups: dict[str, Group], compared: Comparisons, metric: str, cfg: ReportParams) -> tuple[str, list]:
    names = list(itertools.combinations(groups, 2))
    pairs = [compared(a, b) for a, b in names]
    family = corrected([result(c, metric) for c in pairs], metric, cfg.alpha)
    signs = [_sign(c, metric) for c in pairs]
    rows, records = [], []
    for (a, b), c, r, s in zip(names, pairs, family, signs):
        ci = "–" if r["ci"] is None else f"[{fmt(metric, r['ci'][0])}, {fmt(metric, r['ci'][1])}]"
        row = [f"{a} vs {b}", seeds_cell(c, cfg), fmt(metric, r["diff"]), ci, fmt_p(r["p"]), fmt_p(r["p_holm"])]
        if any(signs):
            row.append("–" if s is None else f"{s['wins']}/{s['losses']}/{s['ties']} (p = {s['p']:.3f})")
        rows.append(row + [verdict(a, b, r)])
        records.append({"a": a, "b": b, "seeds": c["seeds"], "segments": c["segments"], **r, "sign_test": s})
    header = ["pair", "seeds", f"Δ {LABELS.get(metric, metric)} (a − b)", "95% CI", "p", "p (Holm)"]
    header += ["seeds a won/lost/tied (sign test)"] if any(signs) else []
    note = (f"Paired on the seeds listed (the linear probe, deterministic, pairs with every seed) and the test segments "
            f"both scored. Verdict: Holm-adjusted p over the {len(rows)} pair{'s' * (len(rows) != 1)} < {cfg.alpha}; "
            f"the 95% CI is per pair."
            + seeds_note(pairs, cfg))
    return table("pairwise", header + ["verdict"], rows, note), records


def ablation_table(groups: dict[str, Group], ablations: dict, skipped: dict[str, str], compared: Comparisons, metric: str,
                   cfg: ReportParams) -> tuple[str, dict]:
    """Each ablation against its full model on the seeds both ran (Holm over the table); skipped ones listed."""
    names = [n for n, spec in ablations.items() if n in groups and spec.model in groups]
    pairs = [compared(n, ablations[n].model) for n in names]
    family = corrected([result(c, metric) for c in pairs], metric, cfg.alpha)
    rows, records = [], {}
    for name, c, r in zip(names, pairs, family):
        spec = ablations[name]
        mine, full = summarize(c["values_a"].get(metric, [])), summarize(c["values_b"].get(metric, []))
        ci = "–" if r["ci"] is None else f"[{fmt(metric, r['ci'][0])}, {fmt(metric, r['ci'][1])}]"
        effect = "n.s." if not r["significant"] else ("worse" if r["better"] == "b" else "better")
        rows.append([name, spec.model, "<br>".join(f"`{x}`" for x in spec.set) or "–", seeds_cell(c, cfg),
                     fmt(metric, mine["mean"], mine["std"]), fmt(metric, full["mean"], full["std"]), fmt(metric, r["diff"]),
                     ci, fmt_p(r["p"]), fmt_p(r["p_holm"]), effect])
        records[name] = {"model": spec.model, "set": spec.set, "seeds": c["seeds"], "segments": c["segments"],
                         metric: mine, "full": full, "vs_full": r}
    label = LABELS.get(metric, metric)
    header = ["ablation", "model", "overrides", "seeds", label, f"full model's {label}", "Δ vs full", "95% CI", "p",
              "p (Holm)", "effect"]
    note = (f"Both columns on the seeds listed, which both ran. Effect: Holm-adjusted p over the {len(rows)} "
            f"ablation{'s' * (len(rows) != 1)} < {cfg.alpha}." + seeds_note(pairs, cfg))
    note += "".join(f"\n\n- `{n}` skipped, not trained: {why}" for n, why in skipped.items())
    return table("ablations", header, rows, note), records


def _rate_note(rates: list | None) -> str:
    if not rates:
        return ""
    low, high = min(rates), max(rates)
    if high >= 1:
        return (f"AUC over drop rates {low:g}–{high:g}, r = 1 included (every step dropped: the modality gone); "
                f"LNLN's range stops at 0.9.")
    return f"AUC over drop rates {low:g}–{high:g} (LNLN's range; r = 1, the modality gone, not included)."


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
        kind = curve.split("-")[0]
        header.append(f"{curve} AUC" if kind in ("random", "block") else
                      f"{curve} mean (own protocol)" if kind == "noise" else f"{curve} mean")
    for g in models:  # the clean value over the seeds whose runs were corrupted
        seeds = record.get("train_seeds", {}).get(g)
        clean = summarize([r.metrics["test"].get(metric) for r in groups[g].runs if seeds is None or r.seed in seeds])
        row = [g, fmt(metric, clean["mean"], clean["std"])]
        for curve in curves:
            entry = record["models"][g][curve]
            s = entry.get(f"auc_{metric}") or entry[f"mean_{metric}"]
            row.append(fmt(metric, s["mean"], s["std"]))
        rows.append(row)
    out = table("robustness", header, rows, _rate_note(record.get("rates")))
    subsets = record["models"][models[0]].get("subsets", {}).get("levels")
    if subsets:
        out += "\n" + table("subsets", ["model"] + [f"without {lvl[1:].replace('-', ' + ')}" for lvl in subsets],
                            [[g] + [fmt(metric, record["models"][g]["subsets"]["levels"][lvl][metric]["mean"])
                                    for lvl in subsets] for g in models])
    return out


def selection_problems(where: str, selection: dict | None) -> list[str]:
    """What a run's selection record says that is not 'chosen on a non-empty validation split'."""
    if not selection:
        return [f"{where}: no selection recorded (which split chose its checkpoint is unknown: re-run it)"]
    out = []
    for choice, read in selection.items():
        if read.get("split") != "valid":
            out.append(f"{where}: {choice.replace('_', ' ')} selected on {read.get('split', 'an unrecorded split')}, "
                       f"not on the validation split")
        elif not read.get("segments"):
            out.append(f"{where}: {choice.replace('_', ' ')} selected on an empty validation split")
    return out


def flags(all_runs: list, robustness: dict | None) -> list[str]:
    """Leakage and selection problems, from what each run recorded: mixed data, a selection not made on
    validation, shared videos."""
    out, seen = [], {}
    for r in all_runs:
        where = f"{r.name}" + (f" seed {r.seed}" if r.seed is not None else "")
        data = r.record.get("data")
        if not data:
            out.append(f"{where}: no data hashes recorded ({r.path} predates them: re-run it)")
        else:
            seen.setdefault((data["manifest_sha256"], data["split_sha256"]), []).append(where)
            if data.get("shared_videos"):
                out.append(f"{where}: {data['shared_videos']} video(s) appear in two splits "
                           f"(assemble.allow_shared_videos: true): speaker leakage is possible")
        out += selection_problems(where, r.record.get("selection"))
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
    trained_ablations, skipped = runs.ablation_runs(raw, models_dir)
    named = {**base, runs.PROBE: [probe], **trained_ablations}
    groups, labels, task, classes = groups_of(named)
    metric = PRIMARY[task]
    metrics = [m for m in LABELS if m in named[compared_names[0]][0].metrics["test"]]
    family = "sims" if "acc3" in named[compared_names[0]][0].metrics["test"] else "mosi"  # CH-SIMS's metrics have Acc-3
    compared_pairs = Comparisons(groups, labels, batched_metrics(task, len(classes), family), cfg)
    compared = {g: groups[g] for g in compared_names}
    models_md, stats = model_table(compared, compared_pairs, metrics, cfg)
    pairs_md, pairs = pairwise_table(compared, compared_pairs, metric, cfg)
    ablations = params.read(raw, runs.EvaluateParams).ablations
    ablations_md, ablated = ablation_table(groups, ablations, skipped, compared_pairs, metric, cfg)
    ablations_md += never_acted(groups, ablations)
    robustness = json.loads(Path(robustness_path).read_text()) if Path(robustness_path).is_file() else None
    problems = flags([r for rs in named.values() for r in rs], robustness)
    data = next((r.record.get("data") for rs in named.values() for r in rs if r.record.get("data")), None) or {}
    context = {"root": params.lookup(raw, "data.root"), "task": task, "test": len(labels), "data": data,
               "seeds": runs.seeds(raw), "bootstrap": cfg.bootstrap, "alpha": cfg.alpha, "metric": metric,
               "spread": max(len(g.runs) for g in compared.values()) > 1}
    sections = {"models": models_md, "pairwise": pairs_md, "ablations": ablations_md if ablated or skipped else "",
                "robustness": robustness_tables(robustness, compared, metric) if robustness else ""}
    record = {"data": data, "task": task, "test_segments": len(labels), "seeds": context["seeds"], "flags": problems,
              "models": stats, "pairwise": {f"{p['a']} vs {p['b']}": p for p in pairs}, "ablations": ablated,
              "skipped_ablations": skipped}
    return render(context, sections, problems), record, compared


def render(ctx: dict, sections: dict, problems: list[str]) -> str:
    metric = LABELS.get(ctx["metric"], ctx["metric"])
    data = ctx["data"]
    out = ["# Evaluation report", "",
           f"Data `{ctx['root']}` ({ctx['task']}), {ctx['test']} test segments; manifest "
           f"`{str(data.get('manifest_sha256'))[:12]}`, split `{str(data.get('split_sha256'))[:12]}`. "
           f"Seeds {ctx['seeds']} (model.seed + evaluate.seeds); the linear probe is deterministic (one run). "
           f"Paired bootstrap: {ctx['bootstrap']} replicates over test segments and seeds; p Holm-adjusted per table, "
           f"alpha {ctx['alpha']} on the adjusted p.", "",
           "## Flags", ""]
    out += [f"- ⚠ {p}" for p in problems] or ["None: every result comes from the same manifest and split, every "
                                              "selection it recorded read the validation split, and no video is in two splits."]
    out += ["", "## Models (test split, mean ± std over seeds)", "", sections["models"]]
    if ctx["spread"]:
        out += [f"![per-seed {metric}](figures/seeds_{ctx['metric']}.png)", ""]
    out += [f"## Pairwise comparisons ({metric})", "", sections["pairwise"]]
    if sections["ablations"]:
        out += ["## Ablations (each against its full model, on the seeds both ran)", "", sections["ablations"]]
    if sections["robustness"]:
        out += ["## Robustness (test time, no retraining)", "",
                f"Test {metric} of each model on corrupted inputs, per curve `<protocol>-<modalities>`: `random` / `block` = "
                "per-step / one-block drop at the rates shown (LNLN / OpenVNA protocols; AUC: trapezoid area under the "
                "metric-vs-rate curve divided by the rate span, so a flat curve scores its clean value), `noise` = this "
                "project's own protocol, not a published one: Gaussian noise on the normalised features (mean over "
                "SNRs), `subsets` = whole modalities missing (mean over the subsets). Mean ± std over seeds; curves in "
                "`robustness/`.", "", sections["robustness"]]
    return "\n".join(out) + "\n"


def lean(record: dict) -> dict:
    """What `dvc metrics show` gets: per model each metric's mean and std; per ablation its difference, raw and Holm p."""
    metric = PRIMARY[record["task"]]
    return {"flags": len(record["flags"]),
            "models": {g: {f"{m}{suffix}": s[stat] for m, s in stats.items() for suffix, stat in (("", "mean"), ("_std", "std"))}
                       for g, stats in record["models"].items()},
            "ablations": {name: {f"{metric}_diff": a["vs_full"]["diff"], "p": a["vs_full"]["p"], "p_holm": a["vs_full"]["p_holm"]}
                          for name, a in record["ablations"].items()}}


def write(out_dir, markdown: str, record: dict, groups: dict[str, Group], metric: str) -> None:
    """summary.md, details.json (everything), summary.json (for `dvc metrics`), figures/ (the per-seed spread,
    when some model has more than one seed)."""
    from .figures import seed_spread

    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(markdown)
    (out / "details.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    (out / "summary.json").write_text(json.dumps(lean(record), indent=1, default=float) + "\n")
    if max(len(g.runs) for g in groups.values()) > 1:
        stats = record["models"]
        seed_spread({g: groups[g].values(metric) for g in groups}, {g: stats[g][metric]["ci"] for g in groups}, metric,
                    out / "figures" / f"seeds_{metric}.png", f"test {LABELS.get(metric, metric)} per seed (line: 95% CI)")
