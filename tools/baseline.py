"""Regenerate the committed baseline: what `dvc metrics diff` and `dvc exp show` compare every run with.

    make baseline                 (= python -m tools.baseline), then commit what it staged

The baseline is what a fresh clone of HEAD reproduces, so it is made in one: HEAD is cloned into a
temporary folder and `dvc repro --force` runs every stage there from nothing (a cold per-clip feature
cache; `--force`: no output is restored from DVC's cache, although the clone shares this checkout's
cache so that `dvc checkout` here gets the same models and figures afterwards). The versioned files (VERSIONED) are copied back and staged. It refuses
to run while params.yaml, dvc.yaml or code differ from HEAD: commit them first, then regenerate.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VERSIONED = ["dvc.lock", "metrics", "reports/summary.md", "reports/summary.json"]


def _git(*args, cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def uncommitted(root: Path) -> list[str]:
    """Tracked files that differ from HEAD, other than the baseline's own."""
    paths = _git("diff", "--name-only", "HEAD", cwd=root).splitlines()
    return [p for p in paths if not any(p == v or p.startswith(v + "/") for v in VERSIONED)]


def reproduce(root: Path, clone: Path, params: Path | None = None, *, force: bool = True,
              shared_cache: bool = True) -> float:
    """Clone HEAD into `clone` (with `params` as its params.yaml if given) and run `dvc repro` there from
    nothing, with the clone's own empty feature cache; returns the seconds it took."""
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", _git("rev-parse", "HEAD", cwd=root)], cwd=clone, check=True)
    if shared_cache:
        subprocess.run(["dvc", "config", "--local", "cache.dir", str(root / ".dvc" / "cache")], cwd=clone, check=True)
    if params is not None:
        shutil.copy2(params, clone / "params.yaml")
    env = {k: v for k, v in os.environ.items() if k != "MSA_CACHE_DIR"}
    env["PYTHONPATH"] = str(clone)
    started = time.time()
    subprocess.run(["dvc", "repro", *(["--force"] if force else [])], cwd=clone, env=env, check=True)
    return time.time() - started


def copy_back(src: Path, dst: Path) -> None:
    """A file or a folder from the clone, replacing what was there."""
    if dst.is_dir():
        shutil.rmtree(dst)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--keep", action="store_true", help="keep the temporary clone (its path is printed)")
    args = cli.parse_args(argv)
    root = Path(_git("rev-parse", "--show-toplevel", cwd=Path.cwd()))
    dirty = uncommitted(root)
    if dirty:
        print(f"baseline: commit first, the baseline is what HEAD reproduces; uncommitted: {', '.join(dirty)}",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="msa-baseline-"))
    clone = work / "repo"
    try:
        seconds = reproduce(root, clone)
    except subprocess.CalledProcessError as err:
        print(f"baseline: {' '.join(map(str, err.cmd))} failed (exit {err.returncode}); the clone is kept in {work}",
              file=sys.stderr)
        return 1
    print(f"baseline: `dvc repro` in a fresh clone of HEAD took {seconds:.0f} s")
    for path in VERSIONED:
        copy_back(clone / path, root / path)
    if args.keep:
        print(f"baseline: the clone is kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["dvc", "checkout", "--quiet"], cwd=root)  # this workspace's outputs = the new dvc.lock's
    subprocess.run(["git", "add", "--", *VERSIONED], cwd=root, check=True)
    print("baseline: staged " + ", ".join(VERSIONED) + "; against the last committed baseline:")
    subprocess.run(["dvc", "metrics", "diff", "HEAD"], cwd=root)
    print('baseline: now `git commit -m "Baseline: ..."`')
    return 0


if __name__ == "__main__":
    sys.exit(main())
