"""Stage `visual`: features/manifest.parquet -> features/visual.parquet (+ features/visual.json).

    python -m stages.visual          (what `dvc repro visual` runs)

Reads params `features.visual`, `compute` (parallel decoding) and `cache.dir`
(env MSA_CACHE_DIR overrides it). Per segment: frame embeddings sampled at
features.visual.fps, their timestamps and face-found flags. Exit code 2 with one
line for bad params, a missing manifest, or an encoder that cannot be loaded offline.
"""
import sys

from pipeline.features import visual
from pipeline.features.runner import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("visual", visual))
