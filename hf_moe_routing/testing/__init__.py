"""Helpers for tests, examples and benchmarks: tiny random models of every MoE family of the
installed transformers (no download), the catalog of those families, and test-only routings."""

from __future__ import annotations

from .catalog import CatalogEntry, catalog_entry, causal_lm_class, moe_families
from .checkpoint import tiny_checkpoint
from .routings import DropSlotsConfig, OffsetConfig, OffsetLayer, logits, randomize_offsets
from .tiny import (
    _COMMON,
    FAMILY_OVERRIDES,
    GENERIC_FAMILIES,
    REQUIRED_FAMILIES,
    TINY_CONFIGS,
    spread_router_weights,
    tiny_config,
    tiny_model,
)

__all__ = [
    "FAMILY_OVERRIDES",
    "GENERIC_FAMILIES",
    "REQUIRED_FAMILIES",
    "TINY_CONFIGS",
    "_COMMON",
    "CatalogEntry",
    "DropSlotsConfig",
    "OffsetConfig",
    "OffsetLayer",
    "catalog_entry",
    "causal_lm_class",
    "logits",
    "moe_families",
    "randomize_offsets",
    "spread_router_weights",
    "tiny_checkpoint",
    "tiny_config",
    "tiny_model",
]
