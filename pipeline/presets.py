"""Dataset conventions as data: label range, metric family and split names per corpus.

`data.preset` picks one; `prepare` records the result in the manifest, `assemble` copies it
into the dataset's meta.json, training evaluates and plots with it and stores it in the
checkpoint, and `predict` clips and names its scores with it. Nothing downstream hard-codes
[-3, 3] or the MOSI metrics.

    preset   labels     metrics (pipeline.training.metrics)                 standard split sizes
    mosi     [-3, 3]    mosi: Acc-2 has0/non0, F1, Acc-5, Acc-7    1284 / 229 / 686
    mosei    [-3, 3]    mosi                                       16326 / 1871 / 4659
    sims     [-1, 1]    sims: Acc-2 (0 negative), Acc-3, Acc-5     1368 / 456 / 457
    custom   data.custom.label_range, .metrics, .splits

Split sizes: MMSA's README states none; its config (`src/MMSA/config/config_regression.json`)
states the train sizes (1284, 16326, 1368), the valid/test sizes are those of the standard
releases (CMU SDK folds, CH-SIMS paper). A pickle whose splits differ is imported and the
difference reported, never refused. SHA-256: MMSA's README publishes the sums of its five
feature pickles (below); the MulT/CMU `*_data_noalign.pkl` files have no published sums.

Bottom layer: imports pipeline.params only.
"""
from __future__ import annotations

from dataclasses import dataclass

from .params import fail, one_of, param

SPLITS = ("train", "valid", "test")
METRIC_FAMILIES = ("mosi", "sims")


@dataclass(frozen=True)
class Preset:
    label_range: tuple[float, float]
    metrics: str                          # a family of pipeline.training.metrics
    splits: dict[str, str]                # our split -> the corpus's name for it
    split_sizes: dict[str, int] | None    # the standard release's sizes, checked on import


_SAME_NAMES = {s: s for s in SPLITS}
PRESETS = {
    "mosi": Preset((-3.0, 3.0), "mosi", _SAME_NAMES, {"train": 1284, "valid": 229, "test": 686}),
    "mosei": Preset((-3.0, 3.0), "mosi", _SAME_NAMES, {"train": 16326, "valid": 1871, "test": 4659}),
    "sims": Preset((-1.0, 1.0), "sims", _SAME_NAMES, {"train": 1368, "valid": 456, "test": 457}),
}

# SHA-256 sums published in MMSA's README ("SHA-256 for feature files") -> the file they name
PUBLISHED_SHA256 = {
    "78e0f8b5ef8ff71558e7307848fc1fa929ecb078203f565ab22b9daab2e02524": "MOSI/Processed/unaligned_50.pkl",
    "d3994fd25681f9c7ad6e9c6596a6fe9b4beb85ff7d478ba978b124139002e5f9": "MOSI/Processed/aligned_50.pkl",
    "ad8b23d50557045e7d47959ce6c5b955d8d983f2979c7d9b7b9226f6dd6fec1f": "MOSEI/Processed/unaligned_50.pkl",
    "45eccfb748a87c80ecab9bfac29582e7b1466bf6605ff29d3b338a75120bf791": "MOSEI/Processed/aligned_50.pkl",
    "c9e20c13ec0454d98bb9c1e520e490c75146bfa2dfeeea78d84de047dbdd442f": "SIMS/Processed/unaligned_39.pkl",
}


@dataclass(frozen=True)
class CustomPreset:
    """params `data.custom`: the conventions of a corpus that is none of the presets."""
    label_range: list[float] = param([-3.0, 3.0], doc="[low, high]: labels outside are rejected, scores clipped")
    metrics: str = param("mosi", one_of(*METRIC_FAMILIES), "metric family (pipeline/training/metrics.py)")
    splits: dict[str, str] = param(dict(_SAME_NAMES), doc="train/valid/test -> the corpus's name for each")

    def __post_init__(self):
        if len(self.label_range) != 2 or not self.label_range[0] < self.label_range[1]:
            raise fail("label_range", self.label_range, "[low, high] with low < high")
        if set(self.splits) != set(SPLITS):
            raise fail("splits", self.splits, "one name for each of train, valid, test")

    def preset(self) -> Preset:
        return Preset(tuple(self.label_range), self.metrics, dict(self.splits), None)


def conventions(preset: str = "mosi", custom: CustomPreset | None = None) -> dict:
    """What the manifest, the dataset and the checkpoint record: plain data."""
    p = (custom or CustomPreset()).preset() if preset == "custom" else PRESETS[preset]
    return {"preset": preset, "label_range": [float(v) for v in p.label_range], "metrics": p.metrics,
            "splits": dict(p.splits)}


DEFAULT = conventions("mosi")  # datasets and checkpoints made before presets existed used these
