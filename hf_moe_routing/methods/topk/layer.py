"""Top-k routing through the router spec (the layer lives in :mod:`..base`: every method falls back to it)."""

from ..base import TopKLayer

__all__ = ["TopKLayer"]
