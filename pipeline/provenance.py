"""What every result records about where it came from: the content hashes of the manifest and of the
split (computed by `assemble` into the dataset's meta.json) and the split its checkpoint was selected on.
The report refuses to compare results whose hashes differ and flags any selection but validation."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .metrics import write_json


def selection(dataset_dir: str | Path) -> dict:
    """{data: manifest and split hashes, selection: split, criterion, segments} for results made from this dataset."""
    meta = json.loads((Path(dataset_dir) / "meta.json").read_text())
    return {"data": meta.get("provenance"),
            "selection": {"split": "valid", "criterion": "loss" if meta["task"] == "classification" else "mae",
                          "segments": int(meta["splits"].get("valid", 0))}}


def stamp(metrics_path: str | Path, dataset_dir: str | Path) -> dict:
    """Add `data` and `selection` to a run's metrics.json; returns the result. Under torchrun only rank 0
    wrote the file, and only rank 0 stamps it."""
    if os.environ.get("RANK", "0") != "0":
        return {}
    path = Path(metrics_path)
    result = json.loads(path.read_text())
    result.update(selection(dataset_dir))
    write_json(path, result)
    return result
