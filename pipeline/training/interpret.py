"""What a trained model learned, written next to its metrics, and explained for one clip.

Per run (rank 0, after the checkpoint chosen on validation is reloaded) `write` puts in the model folder:

* ``interpret.json``: a few headline numbers (`dvc metrics show`),
* ``interpret/``: ``summary.json`` (the details: per pair, per class), JSON tables (`dvc plots`, declared
  in dvc.yaml) and one PNG.

GEXSent: expert utilisation per modality (fraction of routings per expert and its entropy, on the
test split and per training epoch), modality-gate shares per test sample and their mean per label
class (the reference variant has no gate: its shares are the token counts its pooled mean weighs).
GCE: which components acted before the selected epoch, and when (`acted`: the steps where grading
chose a guide, where the relation loss fired, where the contrastive, grader and filter losses were
non-zero: an ablation of a component that never acted there can only measure seed noise); per training
epoch, the samples each pair guided, how often the relation loss fired, each pair
grader's error and the relation filter's w (mean and spread across samples); on the test split, the
distribution of w per (guide, student) pair, its correlation with the measured advantage of the guide
(error_student - error_guide), and which pair's grader is best per sample.
Baselines: each modality's share of the first layer's weight norm (their inputs are LayerNormed or
normalised, so the shares compare).

Statistics come from the models' ``extras``: ``extras["stats"]`` holds per-batch sums (added up per
epoch by the trainer, `add_stats`) and per-step flags (keys ``step_*``, kept in order), the other
entries are per-sample tensors (`combine`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from . import plots
from .metrics import score_classes

PER_SAMPLE = ("modality_weights", "relation_weights", "expert_weight_", "grader_preds")


def fusion_of(model):
    """The fusion model inside its wrappers (text fine-tuning, 3-class scoring): each keeps it as `.fusion`."""
    while hasattr(model, "fusion"):
        model = model.fusion
    return model


def add_stats(total: dict, stats: dict | None) -> None:
    """Add one batch's ``extras["stats"]`` (tensors of sums) into `total`, in float64 on the CPU; per-step
    flags (``step_*``) are appended instead, one entry per step."""
    for key, value in (stats or {}).items():
        value = value.detach().double().cpu()
        if key not in total:
            total[key] = value
        elif key.startswith("step_"):
            total[key] = torch.cat([total[key], value])
        else:
            total[key] = total[key] + value


def combine(extras: list[dict]) -> dict:
    """Per-batch extras -> per-sample arrays concatenated over batches (grader predictions flattened to
    'grader_preds/<branch>') and 'stats' summed."""
    out, stats = {}, {}
    for batch in extras:
        add_stats(stats, batch.get("stats"))
        flat = {}
        for key, value in batch.items():
            if isinstance(value, dict) and key != "stats":
                flat.update({f"{key}/{k}": v for k, v in value.items()})
            elif key.startswith(PER_SAMPLE):
                flat[key] = value
        for key, value in flat.items():
            out.setdefault(key, []).append(value.detach().float().cpu().numpy())
    combined = {k: np.concatenate(v) for k, v in out.items()}
    combined["stats"] = {k: v.numpy() for k, v in stats.items()}
    return combined


def write(name: str, model, out_dir: Path, epoch_stats: list[dict], extras: dict, labels: np.ndarray,
          ids: np.ndarray, classes: list[str] | None, family: str = "mosi", selected_epoch: int | None = None) -> dict:
    """interpret.json + interpret/ for model `name` (a bare fusion model) -> the summary written. Regression
    labels are grouped by the metric family's finest classes (MOSI's 7, CH-SIMS's 5); `selected_epoch`
    (default: the last) bounds which training steps count as having shaped the checkpoint."""
    folder = Path(out_dir) / "interpret"
    folder.mkdir(parents=True, exist_ok=True)
    epochs = [{k: np.asarray(v) for k, v in s.items()} for s in epoch_stats]
    if name == "gce":
        summary, tables, figure = _gce(model, epochs, extras, labels, ids, classes)
        summary["acted"] = acted(epochs, selected_epoch or len(epochs))
    elif name == "gexsent":
        summary, tables, figure = _gexsent(model, epochs, extras, labels, ids, classes, family)
    else:
        shares = model.input_shares()
        summary = {"input_weight_share": shares}
        tables = {"input_shares": [{"modality": m, "share": v} for m, v in shares.items()]}
        figure = [("bar", "first-layer weight share per modality", shares)]
    for table, rows in {**tables, "summary": summary}.items():
        (folder / f"{table}.json").write_text(json.dumps(_finite(rows), indent=1) + "\n")
    headline = _finite(headlines(summary))
    (Path(out_dir) / "interpret.json").write_text(json.dumps(headline, indent=2) + "\n")
    plots.panels(figure, folder / f"{name}.png", f"{name}: what it learned")
    return summary


def headlines(summary: dict) -> dict:
    """The few numbers `dvc metrics show` lists next to the test metrics (the rest is in interpret/summary.json)."""
    out = {k: summary[k] for k in ("expert_entropy", "modality_share", "relation_fired_batches") if k in summary}
    if "relation" in summary.get("acted", {}):  # the rest of `acted` is in summary.json
        out["relation_steps_to_selection"] = summary["acted"]["relation"]["steps"]
    if "input_weight_share" in summary:
        out["input_share"] = summary["input_weight_share"]
    weights = list(summary.get("relation_weight", {}).values())
    if weights:  # means over the (guide, student) pairs
        out["w_mean"] = float(np.mean([w["mean"] for w in weights]))
        out["w_std"] = float(np.mean([w["std"] for w in weights]))
        corr = [w["corr_with_advantage"] for w in weights if w.get("corr_with_advantage") is not None]
        out["w_corr_advantage"] = float(np.mean(corr)) if corr else None
    return out


# --------------------------------------------------------------------------- GCE

def acted(epochs: list[dict], selected_epoch: int) -> dict:
    """Per component with per-step flags (``step_<component>``), over the training steps up to the end of the
    selected epoch: on how many it acted, of how many, and the first (global step, 1-based, and its epoch);
    a component with no flags (ablated, or with one modality nothing to grade) is not listed."""
    record = {"selected_epoch": selected_epoch}
    kept = epochs[:selected_epoch]
    for key in sorted({k for st in kept for k in st if k.startswith("step_")}):
        flags = [np.asarray(st.get(key, []), bool).reshape(-1) for st in kept]
        steps = np.concatenate(flags) if flags else np.zeros(0, bool)
        first = int(np.argmax(steps)) + 1 if steps.any() else None
        first_epoch = next((e for e, f in enumerate(flags, 1) if f.any()), None)
        record[key[len("step_"):]] = {"steps": int(steps.sum()), "of": int(len(steps)), "first_step": first,
                                      "first_epoch": first_epoch}
    return record


def _gce(model, epochs, extras, labels, ids, classes):
    pairs = list(model.pair_names)
    ordered = [f"{pairs[g]}>{pairs[s]}" for g, s in model.ordered_pairs]
    summary = {"variant": model.config.variant, "ablate": list(model.config.ablate), "pairs": pairs}
    guides, errors, weights = [], [], []
    for epoch, st in enumerate(epochs, 1):
        if "guided" in st:
            guides.append({"epoch": epoch, **{p: float(st["guided"][i].sum()) for i, p in enumerate(pairs)},
                           "relation_batches": float(st["relation_batches"] / max(st["batches"], 1))})
        if "pair_error_sum" in st:
            mean = st["pair_error_sum"] / np.maximum(st["pair_error_count"], 1)
            errors.append({"epoch": epoch, **dict(zip(pairs, mean.tolist()))})
        if "weight_sum" in st:
            mean, std = _mean_std(st["weight_sum"], st["weight_sq_sum"], st["weight_count"])
            weights.append({"epoch": epoch, **dict(zip(ordered, mean)), **{f"{o} std": v for o, v in zip(ordered, std)}})
    tables = {"guides": guides, "grader_errors": errors, "relation_weights": weights}
    if guides:
        summary["relation_fired_batches"] = float(np.mean([g["relation_batches"] for g in guides]))
        summary["guided_samples_last_epoch"] = {p: guides[-1][p] for p in pairs}

    grader = {k.split("/", 1)[1]: v for k, v in extras.items() if k.startswith("grader_preds/")}
    test_errors = {k: _per_sample_error(v, labels) for k, v in grader.items()}
    if test_errors:
        summary["test_grader_error"] = {k: float(np.mean(v)) for k, v in test_errors.items()}
    if pairs and all(p in test_errors for p in pairs):
        best = np.stack([test_errors[p] for p in pairs]).argmin(0)
        summary["test_best_pair_share"] = {p: float(np.mean(best == i)) for i, p in enumerate(pairs)}

    w = extras.get("relation_weights")
    figure = [("lines", "samples guided per epoch (as guide)", {p: [g[p] for g in guides] for p in pairs}),
              ("lines", "pair grader error per epoch (train)", {p: [e[p] for e in errors] for p in pairs})]
    if w is not None and len(w):
        summary["relation_weight"] = {}
        tables["relation_weights_test"] = [{"id": str(i), **dict(zip(ordered, row.tolist()))} for i, row in zip(ids, w)]
        for q, (o, (g, s)) in enumerate(zip(ordered, model.ordered_pairs)):
            stats = {"mean": float(w[:, q].mean()), "std": float(w[:, q].std()),
                     "p10": float(np.quantile(w[:, q], 0.1)), "p90": float(np.quantile(w[:, q], 0.9))}
            if pairs[g] in test_errors and pairs[s] in test_errors:
                stats["corr_with_advantage"] = _corr(w[:, q], test_errors[pairs[s]] - test_errors[pairs[g]])
            summary["relation_weight"][o] = stats
        figure.append(("hist", "relation filter w per (guide>student), test", {o: w[:, q] for q, o in enumerate(ordered)}))
    figure.append(("lines", "relation filter w per epoch (mean, train)", {o: [r[o] for r in weights] for o in ordered}))
    return summary, tables, figure


def _per_sample_error(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """|pred - label| for scores; cross-entropy for (N, C) logits."""
    if pred.ndim == 2:
        logp = torch.log_softmax(torch.from_numpy(pred).double(), -1).numpy()
        return -logp[np.arange(len(labels)), labels.astype(int)]
    return np.abs(pred - labels)


# --------------------------------------------------------------------------- GEXSent

def _gexsent(model, epochs, extras, labels, ids, classes, family):
    mods = list(model.modalities)
    summary = {"variant": model.config.variant, "ablate": list(model.config.ablate)}
    routed = {m: extras["stats"][f"expert_routed_{m}"] for m in mods if f"expert_routed_{m}" in extras["stats"]}
    tables, figure = {}, []
    if routed:
        fractions = {m: r / max(r.sum(), 1) for m, r in routed.items()}
        summary["expert_entropy"] = {m: _entropy(f) for m, f in fractions.items()}  # 1 = uniform use
        summary["expert_max_fraction"] = {m: float(f.max()) for m, f in fractions.items()}
        tables["expert_utilisation"] = [{"expert": e, **{m: float(f[e]) for m, f in fractions.items()}}
                                        for e in range(model.config.n_experts)]
        tables["expert_entropy"] = [{"epoch": i, **{m: _entropy(st[f"expert_routed_{m}"]) for m in routed}}
                                    for i, st in enumerate(epochs, 1)]
        figure.append(("bars", "fraction of routings per expert (test)", fractions))
        figure.append(("lines", "expert entropy per epoch (train; 1 = uniform)",
                       {m: [r[m] for r in tables["expert_entropy"]] for m in routed}))
    shares = extras["modality_weights"]  # (N, M)
    if classes:
        names = [classes[int(v)] for v in labels]
    else:
        bins, classes = score_classes(labels, family)
        names = [classes[int(b)] for b in bins]
    tables["modality_shares"] = [{"id": str(i), "label": float(v), "class": c, **dict(zip(mods, row.tolist()))}
                                 for i, v, c, row in zip(ids, labels, names, shares)]
    by_class = {}
    for c in classes:
        chosen = np.asarray(names) == c
        if chosen.any():
            by_class[c] = {"n": int(chosen.sum()), **{m: float(shares[chosen, j].mean()) for j, m in enumerate(mods)}}
    tables["shares_by_class"] = [{"class": c, **v} for c, v in by_class.items()]
    summary["modality_share"] = {m: float(shares[:, j].mean()) for j, m in enumerate(mods)}
    summary["modality_share_by_class"] = by_class
    figure.append(("stacked", "modality share, mean per label class (test)",
                   {m: {c: v[m] for c, v in by_class.items()} for m in mods}))
    return summary, tables, figure


# --------------------------------------------------------------------------- one clip

def explain(name: str, model, extras: dict) -> list[str]:
    """Lines for `predict --explain`, after its occlusion (which says what moves the score): the model's
    internals for one clip (extras of a batch of one), each labelled for what it is. GEXSent: modality
    shares and top experts per modality (shares of weight, not effects on the score); GCE: the graders
    and the relation filter (training-only: the score never reads them); baselines: the first layer's
    weight share per modality (fixed by training, the same for every clip)."""
    model = fusion_of(model)
    if name == "gexsent":
        reference = getattr(model.config, "variant", None) == "reference"
        shares = extras["modality_weights"][0]
        what = ("each modality's share of the tokens its one mean pools (the reference has no modality gate)"
                if reference else "the gate's softmax weight on each modality's summary in the fused vector")
        lines = ["internals (shares of weight and routing, not effects on the score):",
                 "modality shares: " + ", ".join(f"{m} {v:.2f}" for m, v in zip(model.modalities, shares.tolist()))
                 + f"  ({what}; they sum to 1)"]
        for m in model.modalities:
            weight = extras.get(f"expert_weight_{m}")
            if weight is not None and weight[0].sum() > 0:
                share = weight[0] / weight[0].sum()
                top = share.argsort(descending=True)[:2].tolist()
                lines.append(f"top experts ({m}): " + ", ".join(f"#{e} {share[e]:.2f}" for e in top))
                experts = len(share)
        if len(lines) > 2:
            lines.append(f"(top experts: an expert's number, of {experts} counted from 0, and its share of the routing "
                         f"weight of this clip's steps in that modality)")
        return lines
    if name == "gce":
        grader = extras.get("grader_preds", {})
        lines = ["internals (training-only: the graders and the relation filter do not change the score):"]
        if grader:
            lines.append("graders: " + ", ".join(f"{k} {_show(v[0])}" for k, v in grader.items())
                         + "  (each branch's own prediction; in training, graded against the label to choose guide "
                           "pairs)")
        w = extras.get("relation_weights")
        if w is not None:
            names = [f"{model.pair_names[g]} -> {model.pair_names[s]}" for g, s in model.ordered_pairs]
            order = w[0].argsort(descending=True).tolist()
            lines.append(f"guide pair (relation filter's most trusted): {names[order[0]]} (w {w[0, order[0]]:.2f}); "
                         + ", ".join(f"{names[q]} {w[0, q]:.2f}" for q in order[1:])
                         + "  (w weighs each guide -> student transfer in the training loss)")
        return lines if len(lines) > 1 else ["GCE on one modality: no pairs, no grading to show"]
    return ["internals (a property of the trained model, the same for every clip):",
            "input weight shares: " + ", ".join(f"{m} {v:.2f}" for m, v in model.input_shares().items())
            + "  (each modality's share of the first layer's weight norm)"]


# --------------------------------------------------------------------------- helpers

def _show(value) -> str:
    value = value.float()
    return f"{value.item():+.2f}" if value.numel() == 1 else "[" + " ".join(f"{v:.2f}" for v in value.softmax(-1)) + "]"


def _mean_std(total, squares, count):
    count = np.maximum(count, 1)
    mean = total / count
    return mean.tolist(), np.sqrt(np.maximum(squares / count - mean ** 2, 0)).tolist()


def _entropy(counts) -> float:
    """Entropy of a routing distribution divided by log(E): 1 = every expert used equally, 0 = one expert."""
    p = np.asarray(counts, np.float64)
    p = p / max(p.sum(), 1e-12)
    nonzero = p[p > 0]
    return float(-(nonzero * np.log(nonzero)).sum() / math.log(len(p))) if len(p) > 1 else 0.0


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _finite(value):
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
