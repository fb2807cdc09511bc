"""Routing methods, one folder each (``config.py``, ``layer.py`` and the method's math)."""

from .adak import AdaKConfig
from .base import ROUTING_METHODS, RoutingConfig, RoutingLayer, get_routing_class, register_routing
from .bip import BIPConfig
from .dynamic_skip import DynamicSkipConfig
from .loss_controlled import LossControlledConfig
from .loss_free import LossFreeConfig
from .top_p import TopPConfig
from .topk import TopKConfig

__all__ = [
    "BIPConfig",
    "LossControlledConfig",
    "LossFreeConfig",
    "AdaKConfig",
    "ROUTING_METHODS",
    "RoutingConfig",
    "RoutingLayer",
    "TopKConfig",
    "TopPConfig",
    "DynamicSkipConfig",
    "get_routing_class",
    "register_routing",
]
