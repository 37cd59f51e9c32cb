"""Choose among experiments on the validation split, never on test.

    dvc exp run --queue -S 'model.lr=1e-4,3e-4,1e-3' -S 'model.batch_size=16,32'   # a grid, queued
    dvc queue start -j 1                                                             # run it
    python -m tools.select                          # rank by validation, name the winner, then its test scores
    python -m tools.select --models gce gexsent late_fusion --average-over model.seed
    python -m tools.select --where 'evaluate.seeds=[1, 2]' --where model.batch_size=16   # one sweep of several

Reads `dvc exp show --json` (HEAD and its experiments; `--rev COMMIT` for experiments queued on an
earlier commit, `--from FILE` for a saved output).
Each experiment's score is its validation score (`metrics/valid_mae.json`, or `valid_loss` for
classification: what checkpoint selection minimised, mean over the report's seeds) averaged over
`--models` (default: every trained model, not the linear probe). Experiments that differ only in the
params of `--average-over` (e.g. a grid over `model.seed`) are one candidate, scored by their mean.
`--where KEY=VALUE` keeps the experiments with that param value (one sweep among several; HEAD
itself when it matches). The ranking table holds no test number, and shows the params that vary
among the candidates; only after the winner is named are its test metrics shown.
Writes the ranking as markdown and CSV (`--out`, default reports/selection.md and .csv).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from pipeline.evaluation.experiment import flatten

LOWER_IS_BETTER = ("valid_mae", "valid_loss")
PROBE = "linear_probe"


def _row(name: str, data: dict | None) -> dict:
    """{name, params (flat, params.yaml), metrics: {stem: {model: value}}} of one exp show entry."""
    data = data or {}
    params = flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    metrics = {}
    for path, entry in (data.get("metrics") or {}).items():
        if path.startswith("metrics/") and isinstance((entry or {}).get("data"), dict):
            metrics[Path(path).stem] = entry["data"]
    return {"name": name, "params": params, "metrics": metrics}


def candidates(shown: list[dict]) -> list[dict]:
    """Every committed baseline and finished experiment of `dvc exp show --json` (not the workspace, not a
    queued, running or failed one), baseline first."""
    rows = []
    for commit in shown:
        if commit.get("rev") == "workspace":
            continue
        rows.append({**_row(commit.get("name") or commit["rev"][:7], commit.get("data")), "baseline": True})
        for exp in commit.get("experiments") or []:
            if ((exp.get("executor") or {}).get("state") or "success") != "success":
                continue  # queued or running: DVC shows the baseline's numbers there; failed: none
            rev = (exp.get("revs") or [{}])[0]
            rows.append({**_row(rev.get("name") or exp.get("name") or rev.get("rev", "?")[:7], rev.get("data")),
                         "baseline": False})
    return rows


def criterion(rows: list[dict]) -> str:
    for key in LOWER_IS_BETTER:
        if any(key in r["metrics"] for r in rows):
            return key
    raise SystemExit("select: no experiment has metrics/valid_mae.json or valid_loss.json (run `dvc exp run` first)")


def rank(rows: list[dict], models: list[str] | None, average_over: list[str]) -> tuple[list[dict], str, list[str]]:
    """(candidates sorted by validation score, best first; the criterion; the models averaged). A candidate
    groups the rows whose params agree outside `average_over`; its score is the mean over rows and models."""
    key = criterion(rows)
    if not models:
        models = sorted({m for r in rows for m in r["metrics"].get(key, {}) if m != PROBE})
    groups: dict[tuple, dict] = {}
    for r in rows:
        values = r["metrics"].get(key, {})
        if not all(isinstance(values.get(m), (int, float)) for m in models):
            continue  # a failed or partial experiment is no candidate
        fixed = tuple(sorted((k, json.dumps(v)) for k, v in r["params"].items()
                             if not any(k == a or k.startswith(a + ".") for a in average_over)))
        group = groups.setdefault(fixed, {"rows": [], "params": r["params"]})
        group["rows"].append(r)
    ranked = []
    for group in groups.values():
        per_model = {m: sum(r["metrics"][key][m] for r in group["rows"]) / len(group["rows"]) for m in models}
        ranked.append({**group, "per_model": per_model, "score": sum(per_model.values()) / len(models),
                       "name": ", ".join(r["name"] for r in group["rows"])})
    ranked.sort(key=lambda c: c["score"])
    return ranked, key, models


def where(rows: list[dict], conditions: list[str]) -> list[dict]:
    """The rows whose params match every KEY=VALUE (VALUE read as YAML, as `dvc exp run -S` reads it)."""
    import yaml

    wanted = []
    for condition in conditions:
        key, sep, value = condition.partition("=")
        if not sep:
            raise SystemExit(f"select: --where {condition!r}: expected KEY=VALUE")
        wanted.append((key, yaml.safe_load(value)))
    return [r for r in rows if all(r["params"].get(k) == v for k, v in wanted)]


def varying(ranked: list[dict], skip: list[str]) -> list[str]:
    """The params whose value is not the same for every candidate (what the sweep changed)."""
    keys = sorted({k for c in ranked for k in c["params"]})
    return [k for k in keys if len({json.dumps(c["params"].get(k)) for c in ranked}) > 1
            and not any(k == a or k.startswith(a + ".") for a in skip)]


def _shown(params: dict, keys: list[str]) -> str:
    return " ".join(f"{k}={json.dumps(params.get(k))}" for k in keys) or "(the same params)"


def tables(ranked: list[dict], key: str, models: list[str], keys: list[str]) -> tuple[list, list]:
    header = ["rank", "experiment", "params", f"{key} (mean)"] + [f"{key} {m}" for m in models]
    rows = [[str(i), c["name"], _shown(c["params"], keys), f"{c['score']:.4f}"]
            + [f"{c['per_model'][m]:.4f}" for m in models] for i, c in enumerate(ranked, 1)]
    return header, rows


def markdown(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def test_scores(winner: dict) -> tuple[list, list]:
    """The winner's test metrics (mean over its rows), one row per model: shown after the choice, never used by it."""
    stems = [s for s in winner["rows"][0]["metrics"] if not s.startswith(("valid_", "auc_")) and not s.endswith("_std")]
    models = sorted({m for s in stems for m in winner["rows"][0]["metrics"][s]})
    rows = []
    for m in models:
        cells = []
        for s in stems:
            values = [r["metrics"].get(s, {}).get(m) for r in winner["rows"]]
            values = [v for v in values if isinstance(v, (int, float))]
            cells.append(f"{sum(values) / len(values):.4f}" if values else "–")
        rows.append([m] + cells)
    return ["model"] + [f"test {s}" for s in stems], rows


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--models", nargs="+", help="models whose validation scores are averaged (default: all but the probe)")
    cli.add_argument("--average-over", nargs="*", default=[], metavar="PARAM",
                     help="params that do not define a candidate (e.g. model.seed): its runs are averaged")
    cli.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                     help="only experiments with this param value (repeatable)")
    cli.add_argument("--rev", help="the commit the experiments were run on (default: HEAD)")
    cli.add_argument("--from", dest="source", help="a saved `dvc exp show --json` (default: run it here)")
    cli.add_argument("--out", default="reports/selection", help="writes <out>.md and <out>.csv (default: %(default)s)")
    args = cli.parse_args(argv)
    if args.source:
        shown = json.loads(Path(args.source).read_text())
    else:
        done = subprocess.run(["dvc", "exp", "show", "--json", *(["--rev", args.rev] if args.rev else [])],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"select: `dvc exp show --json` failed: {done.stderr.strip().splitlines()[-1:]}")
        shown = json.loads(done.stdout)
    rows = where(candidates(shown), args.where)
    if not rows:
        raise SystemExit(f"select: no experiment matches {' and '.join(args.where)}")
    ranked, key, models = rank(rows, args.models, args.average_over)
    if not ranked:
        raise SystemExit(f"select: no experiment has {key} for {', '.join(models)}")
    keys = varying(ranked, args.average_over)
    header, body = tables(ranked, key, models, keys)
    winner = ranked[0]
    test_header, test_body = test_scores(winner)
    text = (f"Ranked by validation alone: {key}, mean over {', '.join(models)}"
            + (f" and over {', '.join(args.average_over)}" if args.average_over else "") + " (lower is better).\n\n"
            + markdown(header, body)
            + f"\nWinner: **{winner['name']}** ({_shown(winner['params'], keys)}), "
              f"{key} {winner['score']:.4f}.\n\nIts test scores (shown after the choice, not used by it):\n\n"
            + markdown(test_header, test_body))
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([header] + body)
    print(f"select: wrote {out.with_suffix('.md')} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
