"""Typed params: each params.yaml section parses into a dataclass, the only place its defaults live.

A section class sits in the module that reads it (`DataParams` in prepare.py, `VisualParams` in
features/visual.py, `GCEConfig` in models/gce.py, ...) and is declared with `@section("<dotted
name>")`; its fields use `param(default, check)`:

    @section("features.visual")
    @dataclass
    class VisualParams:
        fps: float = param(3.0, gt(0), "frames sampled per second of video")

`parse(VisualParams, raw, "features.visual")` rejects unknown keys, wrong types and values out of
range with a ParamError whose message is one line naming the key, the value and what is allowed;
stage entry points turn it into exit code 2 (`pipeline.errors`). `params.yaml` shows the same
values as the defaults (tests/test_params.py checks every section).

Bottom layer: imports only pipeline.errors.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any, Callable

from .errors import ParamError

SECTIONS: dict[str, type] = {}  # dotted section name -> its dataclass, filled by @section


def section(name: str):
    """Class decorator: register a dataclass as the parser of params.yaml section `name`."""
    def register(cls):
        cls.section_name = name
        SECTIONS[name] = cls
        return cls
    return register


# --------------------------------------------------------------------------- checks

class Check:
    """A value constraint: `ok(value)` and the words for what is allowed."""

    def __init__(self, ok: Callable[[Any], bool], allowed: str):
        self.ok, self.allowed = ok, allowed


def gt(bound) -> Check:
    return Check(lambda v: v > bound, f"> {bound}")


def ge(bound) -> Check:
    return Check(lambda v: v >= bound, f">= {bound}")


def between(lo, hi, *, hi_open: bool = False) -> Check:
    return Check(lambda v: lo <= v < hi if hi_open else lo <= v <= hi, f"in [{lo}, {hi}{')' if hi_open else ']'}")


def one_of(*choices) -> Check:
    return Check(lambda v: v in choices, " | ".join(map(str, choices)))


def matches(pattern: str, allowed: str) -> Check:
    return Check(lambda v: re.fullmatch(pattern, v) is not None, allowed)


DEVICE = matches(r"auto|cpu|cuda(:\d+)?", "auto | cpu | cuda | cuda:N")


def param(default, check: Check | None = None, doc: str = ""):
    """A dataclass field with a default (lists and dicts copied per instance) and a check."""
    metadata = {"check": check, "doc": doc}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- parsing

def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _coerce(value, kind, key: str):
    """value as `kind` (bool, int, float, str, list[...], dict[str, ...], a section dataclass)."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return parse(kind, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ParamError(f"{key}: {_show(value)} is not a list")
        (item,) = typing.get_args(kind)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(f"{key}: {_show(value)} is not a mapping")
        _, item = typing.get_args(kind)
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if kind is bool:
        if not isinstance(value, bool):
            raise ParamError(f"{key}: {_show(value)} is not allowed (true | false)")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{key}: {_show(value)} is not a whole number")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{key}: {_show(value)} is not a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ParamError(f"{key}: {_show(value)} is not a string")
        return value
    raise TypeError(f"{key}: unsupported param type {kind}")


def parse(cls, raw, prefix: str | None = None):
    """A section's raw mapping (None = all defaults) -> an instance of `cls`; ParamError on any bad key."""
    prefix = prefix or getattr(cls, "section_name", cls.__name__)
    if isinstance(raw, cls):
        return raw
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamError(f"{prefix}: expected a mapping of params, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ParamError(f"{prefix}.{unknown[0]}: unknown param (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, written in raw.items():
        key = f"{prefix}.{name}"
        value = _coerce(written, hints[name], key)
        check = fields[name].metadata.get("check")
        if check is not None:  # on the value, or on each item of a list or mapping; shown as written
            items = (((f"{key}[{i}]", v, v) for i, v in enumerate(value)) if isinstance(value, list) else
                     ((f"{key}.{k}", v, v) for k, v in value.items()) if isinstance(value, dict) else
                     [(key, value, written)])
            for where, v, shown in items:
                if not check.ok(v):
                    raise ParamError(f"{where}: {_show(shown)} is not allowed ({check.allowed})")
        values[name] = value
    try:
        return cls(**values)
    except ParamError as err:  # a cross-field check in __post_init__ names its own keys
        raise ParamError(f"{prefix}.{err}") from None


def fail(key: str, value, allowed: str) -> ParamError:
    """For __post_init__ checks: ParamError('<key>: <value> is not allowed (<allowed>)'); parse prefixes the section."""
    return ParamError(f"{key}: {_show(value)} is not allowed ({allowed})")


def as_dict(obj) -> dict:
    """A parsed section back to plain data (what stages record in their reports and checkpoints)."""
    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------- params.yaml

def load(path: str | os.PathLike = "params.yaml") -> dict:
    """params.yaml as plain data (stages run from the repository root, as DVC runs them)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: no params file here (stages run from the repository root)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ParamError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ParamError(f"{path}: expected a mapping of sections")
    return raw


def lookup(raw: dict, dotted: str):
    """The raw value at a dotted section name, or None."""
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def read(raw: dict, cls):
    """Parse the section `cls` is registered for out of the whole params mapping."""
    return parse(cls, lookup(raw, cls.section_name), cls.section_name)


def assign(raw: dict, assignment: str) -> None:
    """Apply 'a.b.c=value' (value parsed as YAML) to a raw params mapping, as `dvc exp run -S` does."""
    import yaml

    key, sep, value = assignment.partition("=")
    if not sep:
        raise ParamError(f"{assignment!r}: expected KEY=VALUE")
    node = raw
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)
