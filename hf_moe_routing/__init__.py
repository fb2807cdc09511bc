"""hf-moe-routing: better routers for existing Mixture-of-Experts checkpoints.

>>> from hf_moe_routing import patch_model, unpatch_model, TopKConfig
>>> patch_model(model, TopKConfig())   # identical routing, now pluggable
"""

from . import (
    experts,  # noqa: F401  (registers the sentinel-safe experts implementation)
    integrations,  # noqa: F401  (registers --model hf-moe-routing with lm-eval, if installed)
)
from .adapters import ADAPTERS, MoEAdapter, MoEShape, get_adapter, register_adapter
from .evaluation import FlopsBreakdown, RoutingStats, flops_per_token
from .evaluation.evaluate import compare_speed, evaluate_routing, measure_speed
from .hub import AutoRoutedModelForCausalLM, load_routing_adapter, push_to_hub, save_routing_adapter
from .methods import (
    ROUTING_METHODS,
    AdaKConfig,
    BIPConfig,
    DynamicSkipConfig,
    LossControlledConfig,
    LossFreeConfig,
    RoutingConfig,
    RoutingLayer,
    TopKConfig,
    TopPConfig,
    register_routing,
)
from .patching import (
    get_patch_state,
    is_patched,
    patch_model,
    routing_aux_loss,
    routing_layers,
    unpatch_model,
)
from .training.adak_trainer import AdaKTrainer, AdaKTrainingConfig

__version__ = "0.1.0"

__all__ = [
    "compare_speed",
    "evaluate_routing",
    "measure_speed",
    "AdaKConfig",
    "AdaKTrainer",
    "AdaKTrainingConfig",
    "FlopsBreakdown",
    "RoutingStats",
    "flops_per_token",
    "BIPConfig",
    "LossControlledConfig",
    "LossFreeConfig",
    "ADAPTERS",
    "AutoRoutedModelForCausalLM",
    "load_routing_adapter",
    "push_to_hub",
    "save_routing_adapter",
    "ROUTING_METHODS",
    "MoEAdapter",
    "MoEShape",
    "RoutingConfig",
    "RoutingLayer",
    "TopKConfig",
    "TopPConfig",
    "DynamicSkipConfig",
    "get_adapter",
    "get_patch_state",
    "is_patched",
    "patch_model",
    "register_adapter",
    "register_routing",
    "routing_aux_loss",
    "routing_layers",
    "unpatch_model",
]
