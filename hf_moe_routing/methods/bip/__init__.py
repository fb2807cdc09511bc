"""BIP-Based Balancing: per-layer expert prices from block updates of an LP dual (arXiv 2502.15451)."""

from .config import BIPConfig
from .layer import BIPLayer
from .solver import expert_capacity, solve_duals

__all__ = ["BIPConfig", "BIPLayer", "expert_capacity", "solve_duals"]
