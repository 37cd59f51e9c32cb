"""Multimodal sentiment analysis pipeline: features, fusion models, DVC stages."""
from . import _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"
