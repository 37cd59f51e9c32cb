"""Stage `check`: every params.yaml section checked before any other stage runs.

    python -m stages.check features/params.checked       (what `dvc repro check` runs)

Depends on all of params.yaml; every other stage depends on its output, so a bad value (from
`dvc exp run -S` or an edit) stops the run here, with one line and exit code 2, before DVC removes
any stage's outputs. The output's bytes are the same for every valid params.yaml: passing the check
re-runs nothing downstream.
"""
import argparse
import sys
from pathlib import Path

from pipeline import params
from pipeline.check import MARKER, validate
from pipeline.errors import ParamError, guarded

UNDO = ("-- no other stage ran, every output is as it was; fix params.yaml or restore the committed one with "
        "`git checkout params.yaml` (`dvc exp run --temp` or `--queue` keep a bad value out of the workspace)")


def main(out: str) -> int:
    try:
        sections = validate(params.load())
    except ParamError as err:
        raise ParamError(f"{err} {UNDO}") from None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(MARKER)
    print(f"check: {len(sections)} params sections valid")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("out", help="the file to write when every section is valid")
    args = cli.parse_args()
    sys.exit(guarded("check", main, args.out))
