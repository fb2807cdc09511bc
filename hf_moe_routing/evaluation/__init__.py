"""Measuring routing: statistics collected during forwards and analytic FLOPs."""

from .stats import BatchStats, RoutingStats, expert_loads, max_violation

__all__ = ["BatchStats", "RoutingStats", "expert_loads", "max_violation"]
