"""Routing methods, one folder each (``config.py``, ``layer.py`` and the method's math)."""

from .base import ROUTING_METHODS, RoutingConfig, RoutingLayer, get_routing_class, register_routing
from .dynamic_skip import DynamicSkipConfig
from .top_p import TopPConfig
from .topk import TopKConfig

__all__ = [
    "ROUTING_METHODS",
    "RoutingConfig",
    "RoutingLayer",
    "TopKConfig",
    "TopPConfig",
    "DynamicSkipConfig",
    "get_routing_class",
    "register_routing",
]
