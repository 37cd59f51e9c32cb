"""Stage `acoustic`: features/manifest.parquet -> features/acoustic.parquet (+ features/acoustic.json).

    python -m stages.acoustic        (what `dvc repro acoustic` runs)

Reads params `features.acoustic`, `compute` (parallel clips) and `cache.dir`
(env MSA_CACHE_DIR overrides it). Per segment: frame-level descriptors of the
`extractor` (librosa MFCC + deltas, f0, voicing, energy, spectral shape; or
openSMILE eGeMAPS / ComParE), names in the metadata.
"""
import sys

from pipeline.features import acoustic
from pipeline.features.runner import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("acoustic", acoustic))
