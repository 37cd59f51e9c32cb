"""`python -m pipeline.predict CLIP ... --model models/gce`: the command line of pipeline/predict/__init__.py."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
