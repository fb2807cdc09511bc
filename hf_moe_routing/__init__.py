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
    # families
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
    "ReplayConfig": "methods",
    "RoutedExperts": "methods",
    # patching
    "patch_model": "patching",
    "unpatch_model": "patching",
    "is_patched": "patching",
    "get_patch_state": "patching",
    "routing_layers": "patching",
    "routing_aux_loss": "patching",
    "original_routing": "patching",
    "fit_routing": "patching.fitting",
    "fit_kept_weight_gains": "methods.kept_gain",
    # routing replay (RL)
    "record_routing": "patching.replay",
    "replay_routing": "patching.replay",
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

#: names of earlier versions (families were called "adapters"): importable, with a FutureWarning that
#: names the replacement (CHANGELOG.md). ``get_adapter(model)`` returned ``(family, blocks)``.
_RENAMED: dict[str, str] = {
    "ADAPTERS": "FAMILIES",
    "MoEAdapter": "MoEFamily",
    "register_adapter": "register_family",
    "get_adapter": "describe_model",
}


def _get_adapter(model: Any, adapter: Any = None) -> tuple[Any, list[Any]]:
    """``(family, blocks)`` of ``model``: what ``describe_model(model)`` returns, as a pair."""
    described = __getattr__("describe_model")(model, adapter)
    return described.family, list(described.blocks)


from . import integrations  # noqa: E402,F401  (registers --model hf-moe-routing with lm-eval, lazily and cheaply)


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        import warnings

        warnings.warn(
            f"hf_moe_routing.{name} is renamed: use hf_moe_routing.{_RENAMED[name]} (see CHANGELOG.md).",
            FutureWarning,
            stacklevel=2,
        )
        return _get_adapter if name == "get_adapter" else __getattr__(_RENAMED[name])
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
    from .hub import AutoRoutedModelForCausalLM, load_routing_adapter, push_to_hub, save_routing_adapter
    from .hub.files_export import export_checkpoint
    from .methods import (
        ROUTING_METHODS,
        AdaKConfig,
        BIPConfig,
        DynamicSkipConfig,
        LossControlledConfig,
        LossFreeConfig,
        ReplayConfig,
        RoutedExperts,
        RoutingConfig,
        RoutingLayer,
        TopKConfig,
        TopPConfig,
        register_routing,
    )
    from .methods.base import NotExportableError
    from .methods.kept_gain import fit_kept_weight_gains
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
    from .patching.replay import record_routing, replay_routing
    from .training.adak import AdaKTrainer, AdaKTrainingConfig
