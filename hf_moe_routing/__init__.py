"""hf-moe-routing: better routers for existing Mixture-of-Experts checkpoints.

>>> from hf_moe_routing import patch_model, unpatch_model, TopKConfig
>>> patch_model(model, TopKConfig())   # identical routing, now pluggable

Public names are imported lazily (PEP 562), so ``import hf_moe_routing`` and ``hf-moe-routing
--help`` do not load torch and transformers until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.version import __version__

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # families (family adapters in earlier versions: the old names stay as aliases)
    "FAMILIES": "families",
    "MoEFamily": "families",
    "MoEModel": "families",
    "MoEShape": "families",
    "RouterKind": "families",
    "RouterSpec": "families",
    "UnsupportedFamilyError": "families",
    "describe_model": "families",
    "get_family": "families",
    "register_family": "families",
    "ADAPTERS": "families.compat",
    "MoEAdapter": "families.compat",
    "get_adapter": "families.compat",
    "register_adapter": "families.compat",
    # routing methods
    "ROUTING_METHODS": "methods",
    "RoutingConfig": "methods",
    "RoutingLayer": "methods",
    "register_routing": "methods",
    "TopKConfig": "methods",
    "TopPConfig": "methods",
    "DynamicSkipConfig": "methods",
    "BIPConfig": "methods",
    "LossFreeConfig": "methods",
    "LossControlledConfig": "methods",
    "AdaKConfig": "methods",
    # patching
    "patch_model": "patching",
    "unpatch_model": "patching",
    "is_patched": "patching",
    "get_patch_state": "patching",
    "routing_layers": "patching",
    "routing_aux_loss": "patching",
    "original_routing": "patching",
    "fit_routing": "patching.fitting",
    # evaluation
    "RoutingStats": "evaluation",
    "FlopsBreakdown": "evaluation",
    "flops_per_token": "evaluation",
    "evaluate_routing": "evaluation.evaluate",
    "measure_speed": "evaluation.speed",
    "compare_speed": "evaluation.speed",
    # hub
    "AutoRoutedModelForCausalLM": "hub",
    "load_routing_adapter": "hub",
    "save_routing_adapter": "hub",
    "push_to_hub": "hub",
    "export_checkpoint": "hub.files_export",
    "NotExportableError": "methods.base",
    # training
    "AdaKTrainer": "training.adak",
    "AdaKTrainingConfig": "training.adak",
}

__all__ = sorted(_EXPORTS)

from . import integrations  # noqa: E402,F401  (registers --model hf-moe-routing with lm-eval, lazily and cheaply)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_moe_routing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # static analysers see the real names
    from .evaluation import FlopsBreakdown, RoutingStats, flops_per_token
    from .evaluation.evaluate import evaluate_routing
    from .evaluation.speed import compare_speed, measure_speed
    from .families import (
        FAMILIES,
        MoEFamily,
        MoEModel,
        MoEShape,
        RouterKind,
        RouterSpec,
        UnsupportedFamilyError,
        describe_model,
        get_family,
        register_family,
    )
    from .families.compat import ADAPTERS, MoEAdapter, get_adapter, register_adapter
    from .hub import AutoRoutedModelForCausalLM, load_routing_adapter, push_to_hub, save_routing_adapter
    from .hub.files_export import export_checkpoint
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
    from .methods.base import NotExportableError
    from .patching import (
        get_patch_state,
        is_patched,
        original_routing,
        patch_model,
        routing_aux_loss,
        routing_layers,
        unpatch_model,
    )
    from .patching.fitting import fit_routing
    from .training.adak import AdaKTrainer, AdaKTrainingConfig
