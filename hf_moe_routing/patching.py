"""Swap the routers of a transformers MoE model in place, and back.

``patch_model`` re-classes every MoE router *in place*: the router object stays where it is,
with its own parameters, buffers and hooks (so ``model.state_dict()`` of the base model, accelerate's
device/offload hooks and transformers' ``OutputRecorder`` keep working), and becomes an instance of a
subclass ``Routed<RouterClass>`` whose ``forward`` delegates to a routing layer stored as the
submodule ``gate.routing``. ``unpatch_model`` removes the submodule and restores the class.

Patching an already patched model raises a ValueError unless ``replace=True`` (which unpatches first).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import MoEAdapter, MoEBlock, MoEShape, get_adapter
from .context import RoutingContext, install_mask_hooks
from .experts import SENTINEL_EXPERTS
from .methods.base import RoutingConfig, RoutingLayer

#: Name of the routing submodule inside every patched router.
ROUTING_ATTR = "routing"
_STATE_ATTR = "_hf_moe_routing"


class RoutedGate:
    """Mixin of patched routers: ``forward`` delegates to ``self.routing``."""

    _original_class: type[nn.Module]

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return getattr(self, ROUTING_ATTR)(self, hidden_states)


_ROUTED_CLASSES: dict[type, type] = {}


def _routed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``Routed<cls>``: a subclass of the router class (so isinstance checks still match)."""
    if cls not in _ROUTED_CLASSES:
        _ROUTED_CLASSES[cls] = type(
            f"Routed{cls.__name__}", (RoutedGate, cls), {"_original_class": cls, "__module__": __name__}
        )
    return _ROUTED_CLASSES[cls]


@dataclass
class PatchState:
    """What ``patch_model`` changed, kept on the model so ``unpatch_model`` can undo it."""

    config: RoutingConfig
    adapter: MoEAdapter
    shape: MoEShape
    blocks: list[MoEBlock]
    context: RoutingContext
    hooks: list = field(default_factory=list)
    previous_experts_implementation: str | None = None
    ignored_keys: set[str] = field(default_factory=set)
    saved_old_forwards: dict[str, Any] = field(default_factory=dict)


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
    return get_patch_state(model) is not None


def routing_layers(model: nn.Module) -> dict[int, RoutingLayer]:
    """Decoder-layer index -> routing layer of a patched model."""
    state = _require_state(model)
    return {b.layer_index: getattr(b.gate, ROUTING_ATTR) for b in state.blocks}


def routing_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Auxiliary loss the routing layers produced in the last forward (e.g. Loss-Controlled), or None.

    Add it to the training loss: ``loss = out.loss + routing_aux_loss(model)``. Reading it clears it.
    """
    return _require_state(model).context.pop_aux_loss()


def _require_state(model: nn.Module) -> PatchState:
    state = get_patch_state(model)
    if state is None:
        raise ValueError("This model is not patched: call hf_moe_routing.patch_model(model, config) first.")
    return state


def _execution_device(gate: nn.Module) -> torch.device:
    """Where the router computes: its weight's device, or accelerate's execution device if offloaded."""
    device = gate.weight.device
    hook = getattr(gate, "_hf_hook", None)
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
    adapter: str | MoEAdapter | None = None,
    replace: bool = False,
) -> nn.Module:
    """Replace the router of every MoE block of ``model`` by the routing ``config`` chooses.

    Args:
        model: a transformers MoE model (``*ForCausalLM`` or the bare ``*Model``).
        config: a routing config, e.g. ``TopKConfig()``, ``BIPConfig()``, ``AdaKConfig()``.
        adapter: force a family adapter by name (``"generic"`` for the probing adapter) or instance.
        replace: if the model is already patched, unpatch it first instead of raising.

    Returns the same model, patched in place. Everything is checked before anything changes: on
    error the model is left as it was. A PEFT model is patched through the model it wraps.
    """
    wrapper, model = model, unwrap_model(model)
    if not isinstance(config, RoutingConfig):
        raise TypeError(
            f"config must be a routing config such as TopKConfig(), BIPConfig() or AdaKConfig(), "
            f"got {type(config).__name__}."
        )
    state = get_patch_state(model)
    if state is not None:
        if not replace:
            raise ValueError(
                f"This model is already patched with {state.config.routing_type!r} routing. Call "
                "hf_moe_routing.unpatch_model(model) first, or pass replace=True to swap the routing."
            )
        unpatch_model(model)
    stray = [name for name, m in model.named_modules() if isinstance(m, RoutedGate)]
    if stray:
        raise ValueError(f"{stray[0]} is already a patched router (patched through another model object).")

    family_adapter, blocks = get_adapter(model, adapter)
    shape = family_adapter.shape(model, blocks)
    config.validate(shape)
    context = RoutingContext()
    layers = [config.create_layer(family_adapter, block, shape, context) for block in blocks]

    # Nothing has changed so far; from here on, mutate.
    state = PatchState(config, family_adapter, shape, blocks, context)
    for block, layer in zip(blocks, layers, strict=True):
        gate = block.gate
        layer.to(_execution_device(gate))
        layer.train(gate.training)  # new modules start in training mode; follow the model's (eval) mode
        gate.__class__ = _routed_class(type(gate))
        gate.add_module(ROUTING_ATTR, layer)
        if hasattr(gate, "_old_forward"):  # accelerate hook: it calls module._old_forward
            state.saved_old_forwards[block.name] = gate._old_forward
            gate._old_forward = types.MethodType(RoutedGate.forward, gate)
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
    return wrapper


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore the original routers (same objects, classes and experts implementation)."""
    wrapper, model = model, unwrap_model(model)
    state = _require_state(model)
    for block in state.blocks:
        gate = block.gate
        delattr(gate, ROUTING_ATTR)
        gate.__class__ = gate._original_class
        if block.name in state.saved_old_forwards:
            gate._old_forward = state.saved_old_forwards[block.name]
    for handle in state.hooks:
        handle.remove()
    if state.config.variable_k and state.previous_experts_implementation is not None:
        _set_experts_implementation(model, state.previous_experts_implementation)
    ignore = getattr(model, "_keys_to_ignore_on_save", None)
    if isinstance(ignore, set):
        ignore.difference_update(state.ignored_keys)
    delattr(model, _STATE_ATTR)
    return wrapper


def _set_experts_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(name)
    else:  # a bare module tree: set it on every config we can reach
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_experts_implementation"):
                config._experts_implementation = name
