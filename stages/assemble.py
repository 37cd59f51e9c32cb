"""Stage `assemble`: join the modality features into one normalised training set.

    python -m stages.assemble           (what `dvc repro assemble` runs)

Reads features/manifest.parquet and features/{text,visual,acoustic}.parquet,
writes features/dataset/ (flat float16 arrays, train-split normalisation stats).
"""
import json
import sys

from pipeline.config import load_params
from pipeline.dataset import assemble


def main() -> int:
    params = load_params()
    data, cfg = params["data"], params["assemble"]
    meta = assemble("features/manifest.parquet",
                    {m: f"features/{m}.parquet" for m in ("text", "visual", "acoustic")},
                    "features/dataset", max_steps=cfg["max_steps"],
                    task=data.get("task", "regression"), classes=data.get("classes"))
    for m, info in meta["modalities"].items():
        print(f"assemble: {m:8s} dim {info['dim']:5d}, {info['present']} segments "
              f"({info['missing']} missing), mean length {info['mean_len']:.1f}")
    for m, why in meta["skipped"].items():
        print(f"assemble: {m:8s} skipped: {why}")
    print("assemble: splits " + json.dumps(meta["splits"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
