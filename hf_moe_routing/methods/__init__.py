"""Routing methods, one folder each: ``config.py`` (a strict JSON dataclass, registered by name),
``layer.py`` (the per-block :class:`RoutingLayer`) and the method's math in a pure module.
Imports run one way: ``config -> layer -> math``; methods share only ``base.py``, ``routing.py``
and ``kept_gain.py`` (learned weight gains over the kept experts)."""

from .adak import AdaKConfig
from .base import (
    ROUTING_METHODS,
    ExportedRouting,
    NotExportableError,
    RoutingConfig,
    RoutingLayer,
    get_routing_class,
    register_routing,
)
from .bip import BIPConfig
from .dynamic_skip import DynamicSkipConfig
from .loss_controlled import LossControlledConfig
from .loss_free import LossFreeConfig
from .replay import ReplayConfig, RoutedExperts
from .top_p import TopPConfig
from .topk import TopKConfig

__all__ = [
    "ROUTING_METHODS",
    "AdaKConfig",
    "BIPConfig",
    "DynamicSkipConfig",
    "ExportedRouting",
    "LossControlledConfig",
    "LossFreeConfig",
    "ReplayConfig",
    "NotExportableError",
    "RoutingConfig",
    "RoutedExperts",
    "RoutingLayer",
    "TopKConfig",
    "TopPConfig",
    "get_routing_class",
    "register_routing",
]
