"""Reading params.yaml: one section per stage, plain dicts, nothing clever."""
from __future__ import annotations

import os
from pathlib import Path

import yaml


def load_params(path: str | os.PathLike = "params.yaml") -> dict:
    """Load params.yaml (stages run from the repository root, as DVC runs them)."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def cache_dir(params: dict) -> Path:
    """Per-clip feature cache; the MSA_CACHE_DIR environment variable wins over params."""
    return Path(os.environ.get("MSA_CACHE_DIR") or params.get("cache", {}).get("dir", ".cache/features"))
