"""Stage `text`: features/manifest.parquet -> features/text.parquet (+ features/text.json).

    python -m stages.text features/manifest.parquet features/text.parquet     (what `dvc repro text` runs)

Reads params `features.text` and `cache.dir` (env MSA_CACHE_DIR overrides it).
Per segment: token ids, token-level hidden states, the masked-mean pooled vector.
Exit code 2 with one line for bad params, a missing manifest, or an encoder that
cannot be loaded offline.
"""
import sys

from pipeline.features import text
from pipeline.features.runner import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("text", text))
