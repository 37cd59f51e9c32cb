"""Stage `check`: every params.yaml section checked before any other stage runs.

    python -m stages.check features/params.checked       (what `dvc repro check` runs)

Depends on all of params.yaml; every other stage depends on its output, so a bad value (from
`dvc exp run -S` or an edit) stops the run here, with one line and exit code 2, before DVC removes
any stage's outputs. The output's bytes are the same for every valid params.yaml: passing the check
re-runs nothing downstream.

DVC deletes a stage's outputs just before running it, so a bad value that only `train@gce` notices
would otherwise already have cost the previous `models/gce/`.

What is checked: every section a module declares (`@section`) parses (types, ranges, cross-field
rules: the same code the stages run), no key of params.yaml belongs to no section, every model of
`evaluate.models` exists, and every ablation's overrides give a valid `model` and model section.
"""
import argparse
import sys
from pathlib import Path

from pipeline import cache, params  # noqa: F401
from pipeline.data import prepare  # noqa: F401
from pipeline.errors import ParamError, guarded
from pipeline.evaluation import probe, report, robustness, runs  # noqa: F401
from pipeline.features import acoustic, compute, text, visual  # noqa: F401
from pipeline.models import MODELS
from pipeline.training import dataset, train  # noqa: F401
# ^ the modules that declare params sections: importing them registers every @section in params.SECTIONS

MARKER = "params.yaml: every section checked\n"  # the check's output; the same bytes whatever the params


def stray_keys(raw: dict, prefix: str = "") -> list[str]:
    """Keys of params.yaml that belong to no section (a typo such as `modle:` would otherwise be ignored)."""
    out = []
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if dotted in params.SECTIONS:
            continue
        if isinstance(value, dict) and any(name.startswith(dotted + ".") for name in params.SECTIONS):
            out += stray_keys(value, dotted + ".")
        else:
            out.append(dotted)
    return out


def validate(raw: dict) -> list[str]:
    """Parse every section of `raw` (the whole params.yaml) -> the section names; ParamError on the first problem."""
    stray = stray_keys(raw)
    if stray:
        known = sorted({name.split(".")[0] for name in params.SECTIONS})
        raise ParamError(f"{stray[0]}: unknown params section (known: {', '.join(known)})")
    for cls in params.SECTIONS.values():
        params.read(raw, cls)
    evaluate = params.read(raw, runs.EvaluateParams)
    for i, name in enumerate(evaluate.models):
        if name not in MODELS:
            raise ParamError(f"evaluate.models[{i}]: {name!r} is not allowed ({' | '.join(MODELS)})")
    for name, spec in evaluate.ablations.items():  # as stages/ablation.py applies them
        if spec.model not in MODELS:
            raise ParamError(f"evaluate.ablations.{name}.model: {spec.model!r} is not allowed ({' | '.join(MODELS)})")
        try:
            varied = runs.with_overrides(raw, spec.set)
            params.read(varied, train.TrainParams)
            params.parse(MODELS[spec.model].config_class, params.lookup(varied, spec.model), spec.model)
        except ParamError as err:
            raise ParamError(f"evaluate.ablations.{name} ({', '.join(spec.set)}): {err}") from None
    return list(params.SECTIONS)

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
