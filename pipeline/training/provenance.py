"""What every result records about where it came from: the content hashes of the manifest and of the
split (computed by `assemble` into the dataset's meta.json). The run itself records what it selected on
(`selection` in its metrics.json: for each choice — early stopping, the checkpoint, the probe's penalty —
the split it read, written by the code that reads it). The report (through `runs.recorded`) refuses to
compare results whose hashes differ and flags any selection but validation."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .metrics import write_json


def origin(dataset_dir: str | Path) -> dict:
    """{data: manifest and split hashes} for results made from this dataset."""
    meta = json.loads((Path(dataset_dir) / "meta.json").read_text())
    return {"data": meta.get("provenance")}


def stamp(metrics_path: str | Path, dataset_dir: str | Path) -> dict:
    """Add `data` to a run's metrics.json (beside the `selection` the run wrote); returns the result. Under
    torchrun only rank 0 wrote the file, and only rank 0 stamps it."""
    if os.environ.get("RANK", "0") != "0":
        return {}
    path = Path(metrics_path)
    result = json.loads(path.read_text())
    result.update(origin(dataset_dir))
    write_json(path, result)
    return result
