"""Every params.yaml section checked at once, before any stage runs (the `check` stage).

DVC deletes a stage's outputs just before running it, so a bad value that only `train@gce` notices
has already cost the previous `models/gce/`. `check` depends on the whole of params.yaml and every
other stage depends on its output, so DVC runs it first; a bad value stops `dvc repro` / `dvc exp
run` there, with one line, before any output is touched. The output's bytes never change, so a
passing check re-runs nothing downstream.

What is checked: every section a module declares (`@section`) parses (types, ranges, cross-field
rules: the same code the stages run), no key of params.yaml belongs to no section, every model of
`evaluate.models` exists, and every ablation's overrides give a valid `model` and model section.
"""
from __future__ import annotations

from . import params, runs

# The modules that declare sections: importing them registers every @section in params.SECTIONS.
from . import cache, compute, dataset, prepare, probe, report, robustness, train  # noqa: F401
from .errors import ParamError
from .features import acoustic, text, visual  # noqa: F401
from .models import MODELS

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
