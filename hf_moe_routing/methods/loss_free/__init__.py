"""Loss-Free balancing: a per-expert selection bias nudged towards even loads (arXiv 2408.15664)."""

from .config import LossFreeConfig
from .layer import LossFreeLayer

__all__ = ["LossFreeConfig", "LossFreeLayer"]
