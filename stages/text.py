"""Stage `text`: features/manifest.parquet -> features/text.parquet (+ features/text.json).

    python -m stages.text            (what `dvc repro text` runs)

Reads params `features.text` and `cache.dir` (env MSA_CACHE_DIR overrides it).
Per segment: token ids, token-level hidden states, first-token and mean pooled
vectors. Exit code 2 with one line when the encoder cannot be loaded offline.
"""
import sys

from pipeline.features import text
from pipeline.features.runner import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("text", text.run))
