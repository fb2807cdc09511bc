"""Measuring routing: statistics collected during forwards and analytic FLOPs."""

from .flops import FlopsBreakdown, flops_per_token
from .stats import BatchStats, RoutingStats, expert_loads, max_violation

__all__ = ["BatchStats", "FlopsBreakdown", "RoutingStats", "expert_loads", "flops_per_token", "max_violation"]
