"""Patching: put a routing method into a model's routers (in place, reversibly), and fit its state."""

from .fitting import fit_routing, unfitted_layers, warn_if_unfitted
from .patch import (
    ROUTING_ATTR,
    PatchState,
    RoutedRouter,
    describe,
    get_patch_state,
    is_patched,
    original_routing,
    patch_model,
    routing_aux_loss,
    routing_layers,
    unpatch_model,
    unwrap_model,
)

__all__ = [
    "ROUTING_ATTR",
    "PatchState",
    "RoutedRouter",
    "describe",
    "fit_routing",
    "get_patch_state",
    "is_patched",
    "original_routing",
    "patch_model",
    "routing_aux_loss",
    "routing_layers",
    "unpatch_model",
    "unfitted_layers",
    "unwrap_model",
    "warn_if_unfitted",
]
