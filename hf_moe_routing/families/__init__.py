"""Model families: where a model's MoE blocks and routers are, and how each router routes.

One small module per family that needs its own knowledge (``families/<model_type>.py``, a
subclass of :class:`MoEFamily` with a :class:`RouterKind`); any other transformers MoE family is
served by :class:`GenericFamily`, which detects its router kind by probing. A built-in family is
one line in :data:`_BUILTIN` below (the module is imported when a model of that type is described;
see ``core/registry.py`` for the one way to register, and for third parties). :func:`describe_model`
returns everything the layers above need.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import nn

from ..core.registry import Registry
from .base import (
    MoEBlock,
    MoEFamily,
    MoEShape,
    UnsupportedFamilyError,
    keep_fp32_pattern,
    model_type_of,
    peft_base_layer,
    text_config,
)
from .generic import GenericFamily
from .kinds import RouterKind
from .spec import RouterOutput, RouterSpec, TensorSlot, refuse_non_finite

#: Built-in family modules, by ``config.model_type`` (imported on first use): the only list of them.
_BUILTIN = {
    "mixtral": "mixtral:MixtralFamily",
    "qwen2_moe": "qwen2_moe:Qwen2MoeFamily",
    "qwen3_moe": "qwen3_moe:Qwen3MoeFamily",
    "deepseek_v2": "deepseek:DeepseekV2Family",
    "deepseek_v3": "deepseek:DeepseekV3Family",
    "gpt_oss": "gpt_oss:GptOssFamily",
    "llama4_text": "llama4:Llama4Family",
    "llama4": "llama4:Llama4Family",
    "granitemoe": "granitemoe:GraniteMoeFamily",
    "granitemoeshared": "granitemoe:GraniteMoeFamily",
    "granitemoehybrid": "granitemoe:GraniteMoeFamily",
    "granitemoe_swa": "granitemoe:GraniteMoeFamily",
    "ernie4_5_moe": "ernie4_5_moe:Ernie45MoeFamily",
    "minimax_m2": "minimax_m2:MiniMaxM2Family",
    "phimoe": "phimoe:PhimoeFamily",
    "gemma4_text": "gemma4:Gemma4Family",
    "gemma4": "gemma4:Gemma4Family",
    # refused, with the reason (families/refused.py)
    "deepseek_v4": "refused:DeepseekV4Family",
    "doge": "refused:DogeFamily",
    "jetmoe": "refused:JetMoeFamily",
    "zaya": "refused:ZayaFamily",
    "dbrx": "refused:DbrxFamily",
    "inkling_text": "refused:InklingFamily",
}

#: ``model_type`` -> family class (register yours with :func:`register_family` or an entry point).
FAMILIES: Registry[type[MoEFamily]] = Registry(
    "model family",
    MoEFamily,
    {name: f"{__name__}.{path}" for name, path in _BUILTIN.items()},
    entry_point_group="hf_moe_routing.families",
)


def register_family(cls: type[MoEFamily]) -> type[MoEFamily]:
    """Class decorator for third-party families: serve the ``config.model_type`` values in
    ``cls.model_types`` with ``cls`` (built-ins are listed in :data:`_BUILTIN` instead).

    Raises ValueError if one of them is already served by another family, TypeError if ``cls`` is
    not a :class:`MoEFamily` subclass.
    """
    for model_type in cls.model_types:
        FAMILIES.register(model_type, cls)
    return cls


def get_family(model: nn.Module, family: str | MoEFamily | None = None) -> MoEFamily:
    """The family of ``model``: a registered one by its model type, else the generic detector.

    ``family`` forces one: a model type, ``"generic"``, or an instance.
    """
    if isinstance(family, MoEFamily):
        return family
    model_type = model_type_of(model)
    name = family or model_type
    if name == "generic" or (family is None and model_type not in FAMILIES):
        return GenericFamily(model_type)
    return FAMILIES[name]()


@dataclass(frozen=True)
class MoEModel:
    """A model described once: its family, MoE blocks (with verified router specs) and shape."""

    family: MoEFamily
    blocks: tuple[MoEBlock, ...]
    shape: MoEShape

    @property
    def spec(self) -> RouterSpec:
        """The router spec of the first MoE block (all blocks share num_experts and top_k)."""
        return self.blocks[0].spec


def describe_model(
    model: nn.Module, family: str | MoEFamily | None = None, *, verify: bool = True
) -> MoEModel:
    """Find and check every MoE block of ``model``.

    Args:
        model: a transformers model (``*ForCausalLM``, the bare ``*Model``, or its PEFT wrapper's base).
        family: force a family (model type, ``"generic"`` or an instance).
        verify: check every router against its spec bit for bit (see ``families/verify.py``).

    Raises:
        ValueError: the model has no MoE block, or (``verify``) a router tensor the routing reads
            holds NaN or infinity (:meth:`RouterSpec.check_finite`).
        TypeError: it has MoE blocks, but a router cannot be reproduced exactly (the message says
            which router, and why).
    """
    chosen = get_family(model, family)
    if chosen.refusal:
        raise UnsupportedFamilyError(
            f"Cannot patch {type(model).__name__} (model_type={model_type_of(model)!r}): {chosen.refusal}. "
            "hf-moe-routing reproduces learned top-k routers only. Run `hf-moe-routing families` for the "
            "support table.",
            model_type_of(model),
            chosen.refusal,
        )
    chosen.keep_fp32 = keep_fp32_pattern(model)
    config = text_config(model)
    found = chosen.find_blocks(model)
    if not found:
        _raise_no_blocks(model, chosen)
    blocks = []
    try:
        for name, layer_index, module, attr in found:
            router = peft_base_layer(getattr(module, attr))
            chosen.check_router(f"{name}.{attr}", router)
            try:
                spec = chosen.spec(name, module, attr, config)
            except TypeError:
                if verify:  # a probe fails on NaN / inf weights: name the tensor, not an unsupported router
                    tensors = chain(router.named_parameters(), router.named_buffers())
                    refuse_non_finite({f"{name}.{attr}.{n}": t for n, t in tensors}, layer_index)
                raise
            block = MoEBlock(name, layer_index, module, attr, spec)
            if verify:  # a NaN / inf in the checkpoint's router tensors is named, not a failed verification
                block.spec.check_finite(block.router, block.router_name, layer_index)
                chosen.verify(block.spec, block)
            blocks.append(block)
    except TypeError as error:
        raise UnsupportedFamilyError(
            f"Cannot patch {type(model).__name__} (model_type={model_type_of(model)!r}, family "
            f"{chosen.name!r}): {error}. Run `hf-moe-routing families` for the support table.",
            model_type_of(model),
            str(error),
        ) from None
    return MoEModel(chosen, tuple(blocks), _shape(model, chosen, blocks, config))


def _shape(model: nn.Module, family: MoEFamily, blocks: list[MoEBlock], config: Any) -> MoEShape:
    first = blocks[0]
    return MoEShape(
        family=family.name,
        num_hidden_layers=int(getattr(config, "num_hidden_layers", None) or len(blocks)),
        moe_layers=tuple(b.layer_index for b in blocks),
        hidden_size=first.spec.hidden_size,
        num_experts=first.spec.num_experts,
        top_k=first.spec.top_k,
        expert_intermediate_size=_expert_intermediate_size(first.experts, first.spec.hidden_size),
        shared_intermediate_size=family.shared_intermediate_size(first.block),
    )


def _expert_intermediate_size(experts: nn.Module, hidden_size: int) -> int:
    """One routed expert's FFN width: the experts module's own attribute, else read off ``down_proj``
    ((E, hidden, inter) or (E, inter, hidden); gpt-oss, Llama 4 name no attribute). 0 if unknown."""
    for name in ("intermediate_dim", "intermediate_size", "expert_dim"):
        value = getattr(experts, name, None)
        if isinstance(value, int) and value > 0:
            return value
    down = getattr(experts, "down_proj", None)
    weight = getattr(down, "weight", down)
    if isinstance(weight, torch.Tensor) and weight.dim() == 3:
        others = [d for d in weight.shape[1:] if d != hidden_size]
        return int(others[0]) if others else hidden_size
    return 0


def _raise_no_blocks(model: nn.Module, family: MoEFamily) -> None:
    model_type = model_type_of(model)
    moe_like = next(
        (
            (n, type(m).__name__)
            for n, m in model.named_modules()
            if isinstance(getattr(m, "experts", None), nn.Module)
        ),
        None,
    )
    if moe_like is not None:
        reason = (
            f"its MoE block {moe_like[0]} ({moe_like[1]}) has no learned top-k router that hf-moe-routing can "
            "find (an attribute `gate`/`router` holding an (experts, hidden) weight, directly or in its one "
            "linear layer)"
        )
        raise UnsupportedFamilyError(
            f"{type(model).__name__} (model_type={model_type!r}) is a Mixture-of-Experts model, but {reason}. "
            "Run `hf-moe-routing families` for the support table.",
            model_type,
            reason,
        )
    raise ValueError(
        f"{type(model).__name__} (model_type={model_type!r}) has no Mixture-of-Experts block: hf-moe-routing "
        "patches MoE models only. Run `hf-moe-routing families` for the supported families."
    )


__all__ = [
    "FAMILIES",
    "GenericFamily",
    "MoEBlock",
    "MoEFamily",
    "MoEModel",
    "MoEShape",
    "RouterKind",
    "RouterOutput",
    "RouterSpec",
    "TensorSlot",
    "UnsupportedFamilyError",
    "describe_model",
    "get_family",
    "model_type_of",
    "peft_base_layer",
    "register_family",
    "text_config",
]
