"""Measuring routing: statistics collected during forwards, analytic FLOPs, evaluation and speed."""

from ..core.ops import max_vio, tokens_per_expert
from .flops import FlopsBreakdown, flops_per_token
from .stats import BatchStats, RoutingStats

__all__ = ["BatchStats", "FlopsBreakdown", "RoutingStats", "flops_per_token", "max_vio", "tokens_per_expert"]
