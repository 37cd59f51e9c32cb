"""Regenerate a committed result: the report of one corpus at full size, from its committed params.

    python -m tools.results demo          # results/demo/params.yaml -> results/demo/summary.{md,json}
    python -m tools.results mosi-text     # needs the corpus its params.yaml names (data.root)

then `python -m tools.readme_tables ...` (docs/results.md) copies the tables into the README and the docs.
Each `results/<name>/` holds the params.yaml the run used (the committed defaults plus its seeds,
ablations and data) and the report it wrote (summary.md, summary.json, figures/). The run is made in a
fresh clone of HEAD placed beside this checkout, so a relative `data.root` (e.g. ../shared/data/mosi-text)
means what it means here, with that params.yaml in place of the default one and its own cold feature
cache; `dvc repro` runs every stage and the report is copied back. Like `make baseline`, it refuses while code differs from HEAD.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from tools.baseline import _git, copy_back, reproduce, uncommitted

RESULTS = Path("results")
COPIED = ["reports/summary.md", "reports/summary.json", "reports/figures"]  # the report links its figures/


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("name", help="a folder of results/ holding the params.yaml of the run")
    cli.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = cli.parse_args(argv)
    root = Path(_git("rev-parse", "--show-toplevel", cwd=Path.cwd()))
    params = root / RESULTS / args.name / "params.yaml"
    if not params.is_file():
        names = sorted(p.parent.name for p in (root / RESULTS).glob("*/params.yaml"))
        print(f"results: no {params.relative_to(root)} (results with params: {', '.join(names) or 'none'})",
              file=sys.stderr)
        return 2
    dirty = [p for p in uncommitted(root) if not p.startswith(f"{RESULTS}/")]
    if dirty:
        print(f"results: commit first, a result is what HEAD makes; uncommitted: {', '.join(dirty)}", file=sys.stderr)
        return 2
    clone = root.parent / f".{root.name}-results-{args.name}"
    if clone.exists():
        shutil.rmtree(clone)
    try:
        seconds = reproduce(root, clone, params, force=False, shared_cache=False)
    except subprocess.CalledProcessError as err:
        print(f"results: {' '.join(map(str, err.cmd))} failed (exit {err.returncode}); the clone is kept in {clone}",
              file=sys.stderr)
        return 1
    print(f"results: `dvc repro` of {args.name} took {seconds / 60:.1f} min")
    for path in COPIED:
        copy_back(clone / path, params.parent / Path(path).name)
    if args.keep:
        print(f"results: the clone is kept in {clone}")
    else:
        shutil.rmtree(clone, ignore_errors=True)
    print(f"results: wrote {RESULTS}/{args.name}/summary.md, summary.json and figures/; now `python -m tools.readme_tables`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
