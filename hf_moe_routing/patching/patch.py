"""Swap the routers of a transformers MoE model in place, and back.

``patch_model`` re-classes every MoE router *in place*: the router object stays where it is,
with its own parameters, buffers and hooks (so ``model.state_dict()`` of the base model, accelerate's
device/offload hooks and transformers' ``OutputRecorder`` keep working), and becomes an instance of a
subclass ``Routed<RouterClass>`` whose ``forward`` delegates to a routing layer stored as the
submodule ``router.routing`` and returns the decision in the router's own output format.
``unpatch_model`` removes the submodule and restores the class.

Patching an already patched model raises a ValueError unless ``replace=True`` (which unpatches first).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.context import RoutingContext, install_mask_hooks
from ..core.experts import SENTINEL_EXPERTS
from ..families import MoEBlock, MoEFamily, MoEModel, MoEShape, describe_model
from ..methods.base import RoutingConfig, RoutingLayer

#: Name of the routing submodule inside every patched router.
ROUTING_ATTR = "routing"
_STATE_ATTR = "_hf_moe_routing"


class RoutedRouter:
    """Mixin of patched routers: ``forward`` routes through ``self.routing`` and encodes the result."""

    _original_class: type[nn.Module]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Route ``hidden_states`` (the router's own input, e.g. ``(tokens, hidden)``) with the routing layer and
        return the router's own output format (the family's codec); the original forward inside
        :func:`original_routing`."""
        routing = getattr(self, ROUTING_ATTR)
        if routing.context.original_routers:
            return self._original_class.forward(self, hidden_states, *args, **kwargs)
        return routing.spec.encode(routing(self, hidden_states, *args))


_ROUTED_CLASSES: dict[type, type] = {}


def _routed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``Routed<cls>``: a subclass of the router class (so isinstance checks still match)."""
    if cls not in _ROUTED_CLASSES:
        _ROUTED_CLASSES[cls] = type(
            f"Routed{cls.__name__}", (RoutedRouter, cls), {"_original_class": cls, "__module__": __name__}
        )
    return _ROUTED_CLASSES[cls]


@dataclass
class PatchState:
    """What ``patch_model`` changed, kept on the model so ``unpatch_model`` can undo it."""

    config: RoutingConfig
    model: MoEModel
    context: RoutingContext
    hooks: list = field(default_factory=list)
    previous_experts_implementation: str | None = None
    ignored_keys: set[str] = field(default_factory=set)
    saved_old_forwards: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> MoEFamily:
        """The model's family (router location, scoring, output format)."""
        return self.model.family

    @property
    def blocks(self) -> tuple[MoEBlock, ...]:
        """The patched MoE blocks, in layer order."""
        return self.model.blocks

    @property
    def shape(self) -> MoEShape:
        """Experts, top-k and layers of the patched model."""
        return self.model.shape


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (``get_base_model()``), else ``model``.

    Patch state always lives on the unwrapped model, so patching a PEFT model and patching its base
    model are the same thing, and the routing survives ``merge_and_unload()``.
    """
    get_base = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if callable(get_base) else model


def get_patch_state(model: nn.Module) -> PatchState | None:
    """The patch state of ``model`` (or of the model a PEFT wrapper holds), or None if it is not patched."""
    return getattr(unwrap_model(model), _STATE_ATTR, None)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a PEFT wrapper holds) is patched."""
    return get_patch_state(model) is not None


def describe(model: nn.Module) -> MoEModel:
    """The :class:`~hf_moe_routing.families.MoEModel` of a patched model (kept) or an unpatched one (new)."""
    state = get_patch_state(model)
    return state.model if state is not None else describe_model(unwrap_model(model))


def routing_layers(model: nn.Module) -> dict[int, RoutingLayer]:
    """Decoder-layer index -> routing layer of a patched model (ValueError if it is not patched)."""
    state = _require_state(model)
    return {b.layer_index: getattr(b.router, ROUTING_ATTR) for b in state.blocks}


def routing_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Auxiliary loss the routing layers produced in the last forward (e.g. Loss-Controlled), or None.

    Add it to the training loss: ``loss = out.loss + routing_aux_loss(model)``. Reading it clears it.
    """
    return _require_state(model).context.pop_aux_loss()


@contextlib.contextmanager
def original_routing(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every router of ``model`` runs its original forward (the model's own Top-K).

    Nothing is unpatched or rebuilt: routing layers (and any reference to them) stay as they are,
    with their state; a variable-k routing's experts implementation is switched back meanwhile. An
    unpatched model is yielded unchanged.
    """
    state = get_patch_state(model)
    if state is None:
        yield model
        return
    base = unwrap_model(model)
    previous = state.context.original_routers
    swap = state.config.variable_k and state.previous_experts_implementation is not None
    state.context.original_routers = True
    if swap:
        _set_experts_implementation(base, state.previous_experts_implementation)
    try:
        yield model
    finally:
        state.context.original_routers = previous
        if swap:
            _set_experts_implementation(base, SENTINEL_EXPERTS)


def _require_state(model: nn.Module) -> PatchState:
    state = get_patch_state(model)
    if state is None:
        raise ValueError("This model is not patched: call hf_moe_routing.patch_model(model, config) first.")
    return state


def _execution_device(router: nn.Module, weight: torch.Tensor) -> torch.device:
    """Where the router computes: its weight's device, or accelerate's execution device if offloaded."""
    device = weight.device
    hook = getattr(router, "_hf_hook", None)
    if device.type == "meta" and hook is not None:
        execution = getattr(hook, "execution_device", None)
        if execution is None and hasattr(hook, "hooks"):  # SequentialHook
            execution = next((h.execution_device for h in hook.hooks if hasattr(h, "execution_device")), None)
        if execution is not None:
            return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    return device if device.type != "meta" else torch.device("cpu")


def patch_model(
    model: nn.Module,
    config: RoutingConfig,
    *,
    family: str | MoEFamily | None = None,
    replace: bool = False,
) -> nn.Module:
    """Replace the routing of every MoE block of ``model`` by the one ``config`` chooses.

    Args:
        model: a transformers MoE model (``*ForCausalLM``, the bare ``*Model``, or a PEFT wrapper).
        config: a routing config, e.g. ``TopKConfig()``, ``BIPConfig()``, ``AdaKConfig()``.
        family: force a model family by name (``"generic"`` detects the router kind) or instance.
        replace: if the model is already patched, unpatch it first instead of raising.

    Returns the same model, patched in place. Everything is checked before anything changes: on
    error the model is left as it was.

    Raises:
        TypeError: ``config`` is not a routing config, or a router cannot be reproduced exactly.
        ValueError: the model has no MoE block, is already patched, ``config`` does not fit it, or
            a router tensor the routing reads (weight, selection bias such as DeepSeek-V3's
            ``e_score_correction_bias``, ...) holds NaN or infinity (the message names it and the layer).
    """
    wrapper, model = model, unwrap_model(model)
    if not isinstance(config, RoutingConfig):
        raise TypeError(
            f"config must be a routing config such as TopKConfig(), BIPConfig() or AdaKConfig(), "
            f"got {type(config).__name__}."
        )
    state = get_patch_state(model)
    if state is not None and not replace:
        raise ValueError(
            f"This model is already patched with {state.config.routing_type!r} routing. Call "
            "hf_moe_routing.unpatch_model(model) first, or pass replace=True to swap the routing."
        )
    stray = [name for name, m in model.named_modules() if isinstance(m, RoutedRouter)]
    if state is None and stray:
        raise ValueError(f"{stray[0]} is already a patched router (patched through another model object).")

    described = state.model if state is not None and family is None else describe_model(model, family)
    config.validate_settings()  # a field may have been changed since construction
    config.validate(described)
    for block in described.blocks:  # the checkpoint's own routing state: NaN / inf refused before training
        block.spec.check_finite(block.router, block.router_name, block.layer_index)
    context = RoutingContext()
    layers = [config.create_layer(block, described, context) for block in described.blocks]
    if state is not None:
        unpatch_model(model)

    # Nothing has changed so far; from here on, mutate.
    state = PatchState(config, described, context)
    for block, layer in zip(described.blocks, layers, strict=True):
        router = block.router
        layer.to(_execution_device(router, block.spec.weight(router)))
        layer.train(router.training)  # new modules start in training mode; follow the model's (eval) mode
        router.__class__ = _routed_class(type(router))
        router.add_module(ROUTING_ATTR, layer)
        if hasattr(router, "_old_forward"):  # accelerate hook: it calls module._old_forward
            state.saved_old_forwards[block.name] = router._old_forward
            router._old_forward = types.MethodType(RoutedRouter.forward, router)
    state.hooks = install_mask_hooks(model, context)
    if config.variable_k:
        model_config = getattr(model, "config", None)
        state.previous_experts_implementation = getattr(model_config, "_experts_implementation", None)
        _set_experts_implementation(model, SENTINEL_EXPERTS)
    ignore = getattr(model, "_keys_to_ignore_on_save", None)
    if isinstance(ignore, set):
        state.ignored_keys = {k for k in model.state_dict() if f".{ROUTING_ATTR}." in k} - ignore
        ignore.update(state.ignored_keys)
    setattr(model, _STATE_ATTR, state)
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(_save_pretrained_with_warning, model)
    return wrapper


def _save_pretrained_with_warning(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` of a patched model: the base weights, and a warning that the routing is not in them."""
    import warnings

    state = get_patch_state(self)
    if state is not None:
        warnings.warn(
            f"save_pretrained writes the base model only: its {state.config.routing_type} routing is not saved. "
            "Save it beside the weights with hf_moe_routing.save_routing_adapter(model, save_directory); "
            "AutoRoutedModelForCausalLM.from_pretrained(save_directory) then loads both.",
            UserWarning,
            stacklevel=2,
        )
    return type(self).save_pretrained(self, *args, **kwargs)


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore the original routers (same objects, classes and experts implementation)."""
    wrapper, model = model, unwrap_model(model)
    state = _require_state(model)
    for block in state.blocks:
        router = block.router
        delattr(router, ROUTING_ATTR)
        router.__class__ = router._original_class
        if block.name in state.saved_old_forwards:
            router._old_forward = state.saved_old_forwards[block.name]
    for handle in state.hooks:
        handle.remove()
    if state.config.variable_k and state.previous_experts_implementation is not None:
        _set_experts_implementation(model, state.previous_experts_implementation)
    ignore = getattr(model, "_keys_to_ignore_on_save", None)
    if isinstance(ignore, set):
        ignore.difference_update(state.ignored_keys)
    delattr(model, _STATE_ATTR)
    if getattr(model.__dict__.get("save_pretrained"), "__func__", None) is _save_pretrained_with_warning:
        del model.__dict__["save_pretrained"]
    return wrapper


def _set_experts_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(name)
    else:  # a bare module tree: set it on every config we can reach
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_experts_implementation"):
                config._experts_implementation = name
