"""Reference vs improved, measured over seeds: GCE's relation filter, and both models' variants.

    python -m tools.variants relation --seeds 0 1 2 3 4   # the filter on the demo and on a complementarity corpus
    python -m tools.variants compare --seeds 0 1 2 3 4    # GCE and GEXSent, reference vs improved, on the demo
    python -m tools.variants compare --variants reference # the reference rows only: published size and recipe

Both train in-process with `train_model` and the params' defaults (model.threads 1), the demo from
`features/dataset` (run `dvc repro assemble` first), and print Markdown tables of mean ± std over seeds.
`compare` trains the reference variant with the published recipe (`<model>.recipe: published`;
`--reference-recipe ours` for ours) and the improved one with ours, and reports each run's parameter
count and wall seconds per epoch too.
--out writes every run as JSON; --md writes the tables between `<!-- table: NAME -->` markers, which
`python -m tools.readme_tables variants-relation relation.md --into docs/models.md` (or variants-compare) copies into docs/models.md;
--runs re-renders the tables from a saved --out file without training.

`relation` trains GCE, each variant with the relation loss on and off (`gce.ablate: [relation]`), on two
corpora whose complementarity is known:

* the demo: a label is clip(1.5 (s_text + s_face + s_voice)), the components in raw/demo/components.csv;
* a feature-level corpus made here (`complementarity_corpus`): in each clip one modality carries a strong
  component (|c| in [1, 1.5]) and the other two weak ones (|c| <= 0.15); label = c_text + c_visual +
  c_acoustic; every step of a modality is its component along a fixed direction plus unit noise.

A modality pair lacks one modality; for the relation (guide pair g -> student pair s) the truth on a clip
is how much more the student lacks than the guide: |c of the modality s lacks| - |c of the modality g
lacks|. With the checkpoint chosen on validation, in eval mode, over every clip, it reports the filter's
w: its mean, its spread across clips (std per ordered pair, averaged over the six) and its Pearson
correlation with the truth (averaged over the six); and test MAE and correlation with relation on and off.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

COMPONENT_OF = {"text": "s_text", "visual": "s_face", "acoustic": "s_voice"}  # demo: modality -> hidden component


def complementarity_corpus(root: Path, n: int = 600, seed: int = 0) -> tuple[Path, np.ndarray]:
    """Assembled dataset of n clips (60/20/20 split) whose strong modality varies per clip -> (folder,
    components (n, 3) in registry order text, visual, acoustic)."""
    from pipeline.training.dataset import assemble
    from tools.bench import write_synthetic_features

    rng = np.random.default_rng(seed)
    strong = rng.integers(0, 3, n)
    size = np.where(np.arange(3)[None, :] == strong[:, None], rng.uniform(1.0, 1.5, (n, 3)), rng.uniform(0, 0.15, (n, 3)))
    components = size * rng.choice([-1.0, 1.0], (n, 3))
    mods = ("text", "visual", "acoustic")
    write_synthetic_features(root, n, int(0.6 * n), int(0.2 * n), dims={"text": 16, "visual": 12, "acoustic": 10},
                             steps={"text": 8, "visual": 8, "acoustic": 12}, seed=seed,
                             labels=np.clip(components.sum(1), -3, 3).round(2),
                             signal={m: components[:, i] for i, m in enumerate(mods)})
    assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in mods}, root / "dataset")
    return root / "dataset", components


def demo_components(data) -> np.ndarray:
    """(N, 3) hidden components of the demo's assembled rows, in registry order."""
    table = pd.read_csv("raw/demo/components.csv", dtype={"clip_id": str})
    table.index = table["video_id"] + "/" + table["clip_id"]
    return table.loc[data.index["id"], [COMPONENT_OF[m] for m in ("text", "visual", "acoustic")]].to_numpy()


def filter_vs_truth(model_dir: Path, data, components: np.ndarray) -> dict:
    """The trained relation filter's w on every clip against the truth (module docstring)."""
    import torch

    from pipeline.training.train import load_checkpoint, predict_rows

    model, _ = load_checkpoint(model_dir / "model.pt")
    rows = np.arange(len(data.index))
    _, extras = predict_rows(model, data, rows, torch.device("cpu"), 256, False, with_extras=True)
    w = extras["relation_weights"]  # (N, 6)
    order = list(model.modalities)
    lacks = [next(i for i, m in enumerate(order) if m not in pair) for pair in model.pairs]  # per pair
    corr = []
    for q, (g, s) in enumerate(model.ordered_pairs):
        truth = np.abs(components[:, lacks[s]]) - np.abs(components[:, lacks[g]])
        corr.append(np.corrcoef(w[:, q], truth)[0, 1] if w[:, q].std() > 0 else 0.0)
    return {"w_mean": float(w.mean()), "w_std": float(w.std(0).mean()), "w_corr": float(np.mean(corr))}


def train(name: str, data_dir: Path, out: Path, seed: int, arch: dict) -> dict:
    """One quiet training run -> its test metrics, size and wall seconds per epoch."""
    from pipeline.training.train import train_model

    started = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train_model(name, data_dir, out, {"seed": seed}, arch, progress=False)
    return {"mae": result["test"]["mae"], "corr": result["test"]["corr"], "best_epoch": result["best_epoch"],
            "params": result["params"], "s_per_epoch": (time.time() - started) / result["epochs_run"]}


def relation(args, work: Path) -> list[dict]:
    from pipeline.training.dataset import AssembledData

    corpora = {"demo": (Path("features/dataset"), None)}
    corpora["complementarity"] = complementarity_corpus(work / "complementarity")
    runs = []
    for corpus, (data_dir, components) in corpora.items():
        data = AssembledData(data_dir)
        components = demo_components(data) if components is None else components
        for variant in ("reference", "improved"):
            for relation_on in (True, False):
                for seed in args.seeds:
                    out = work / f"{corpus}-{variant}-{relation_on}-{seed}"
                    arch = {"variant": variant, "ablate": [] if relation_on else ["relation"]}
                    run = {"corpus": corpus, "variant": variant, "relation": relation_on, "seed": seed,
                           **train("gce", data_dir, out, seed, arch)}
                    if relation_on:
                        run.update(filter_vs_truth(out, data, components))
                    print(json.dumps(run), file=sys.stderr, flush=True)
                    runs.append(run)
    return runs


def compare(args, work: Path) -> list[dict]:
    runs = []
    for name in args.models:
        for variant in args.variants:
            recipe = args.reference_recipe if variant == "reference" else "ours"
            for seed in args.seeds:
                arch = {"variant": variant, "recipe": recipe}
                run = {"model": name, "variant": variant, "recipe": recipe, "seed": seed,
                       **train(name, Path("features/dataset"), work / f"{name}-{variant}-{seed}", seed, arch)}
                print(json.dumps(run), file=sys.stderr, flush=True)
                runs.append(run)
    return runs


def _cell(metric: str, values: pd.Series) -> str:
    if metric == "params":  # the same at every seed
        return f"{int(values.iloc[0]):,}"
    digits = 1 if metric == "s_per_epoch" else 3
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def table(runs: list[dict], keys: list[str], metrics: list[str]) -> str:
    """Markdown: one row per combination of `keys`, mean ± std over seeds of each metric."""
    frame = pd.DataFrame(runs)
    lines = ["| " + " | ".join(keys + metrics + ["seeds"]) + " |", "|" + "---|" * (len(keys) + len(metrics) + 1)]
    for group, rows in frame.groupby(keys, sort=False):
        group = group if isinstance(group, tuple) else (group,)
        cells = [_cell(m, rows[m]) if rows[m].notna().all() else "—" for m in metrics]
        lines.append("| " + " | ".join([str(g) for g in group] + cells + [str(len(rows))]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(prog="python -m tools.variants", description=__doc__.split("\n\n")[0])
    cli.add_argument("study", choices=("relation", "compare"))
    cli.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    cli.add_argument("--models", nargs="+", default=["gce", "gexsent"], choices=["gce", "gexsent"],
                     help="compare only")
    cli.add_argument("--variants", nargs="+", default=["reference", "improved"], choices=["reference", "improved"],
                     help="compare only")
    cli.add_argument("--reference-recipe", default="published", choices=["published", "ours"],
                     help="compare only: the recipe the reference variant trains with")
    cli.add_argument("--out", help="write every run as JSON here")
    cli.add_argument("--md", help="write the tables with table markers here (tools.readme_tables reads it)")
    cli.add_argument("--runs", help="a saved --out file: render its tables, train nothing")
    args = cli.parse_args(argv)
    if args.runs:
        return render(args, json.loads(Path(args.runs).read_text()))
    if not Path("features/dataset/meta.json").is_file():
        print("variants: no features/dataset here: run `dvc repro assemble` first (from the repository root)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        runs = relation(args, Path(tmp)) if args.study == "relation" else compare(args, Path(tmp))
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1) + "\n")
    return render(args, runs)


def render(args, runs: list[dict]) -> int:
    """Print the study's tables; with --md also write them between the markers tools.readme_tables reads."""
    if args.study == "relation":
        tables = {"metrics": table(runs, ["corpus", "variant", "relation"], ["mae", "corr"]),
                  "filter": table([r for r in runs if r["relation"]], ["corpus", "variant"], ["w_mean", "w_std", "w_corr"])}
    else:
        tables = {"metrics": table(runs, ["model", "variant", "recipe"], ["mae", "corr", "best_epoch", "params",
                                                                         "s_per_epoch"])}
    print("\n\n".join(tables.values()))
    if args.md:
        seeds = sorted({r["seed"] for r in runs})
        Path(args.md).write_text(f"Data from `python -m tools.variants {args.study}`, seeds {', '.join(map(str, seeds))}; "
                                 "mean ± std (sample std) over seeds.\n\n" +
                                 "".join(f"<!-- table: {name} -->\n{body}\n<!-- /table -->\n\n" for name, body in tables.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
