"""What hf-moe-routing sees in a MoE model: family, router kind, MoE layers, experts, parameters, FLOPs."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..families import model_type_of
from ..patching import describe
from .flops import flops_per_token


def moe_summary(model: nn.Module, seq_len: int = 2048, causal: bool = True) -> dict[str, Any]:
    """The MoE facts of ``model`` as a JSON-serialisable dict.

    Keys: ``model_class``, ``model_type``, ``family``, ``family_class``, ``router_kind``,
    ``num_hidden_layers``, ``moe_layers``, ``num_experts``, ``top_k``, ``hidden_size``,
    ``expert_intermediate_size``, ``shared_experts`` (attribute name or None),
    ``shared_intermediate_size``, ``shared_expert_gate``, ``router_class``, ``router_attr``,
    ``num_parameters``, ``num_active_parameters`` (per token), ``renormalizes_top_k``,
    ``routed_scaling_factor``, ``experts_implementation``, ``seq_len``, ``causal_attention_flops``,
    ``flops_per_token`` (a :class:`~.flops.FlopsBreakdown` dict).

    Raises:
        ValueError: the model has no MoE block. TypeError: a router cannot be reproduced exactly.
    """
    described = describe(model)
    family, shape, first = described.family, described.shape, described.blocks[0]
    shared = [attr for attr in family.shared_expert_attrs if getattr(first.block, attr, None) is not None]
    config = getattr(model, "config", None)
    total = sum(p.numel() for p in model.parameters())
    routed = [sum(p.numel() for p in b.experts.parameters()) for b in described.blocks]
    inactive = sum(
        n * (1 - b.spec.top_k / b.spec.num_experts) for n, b in zip(routed, described.blocks, strict=True)
    )
    router_class = getattr(type(first.router), "_original_class", type(first.router))
    return {
        "model_class": type(model).__name__,
        "model_type": model_type_of(model),
        "family": family.name,
        "family_class": type(family).__name__,
        "router_kind": first.spec.kind.describe(),
        "num_hidden_layers": shape.num_hidden_layers,
        "moe_layers": list(shape.moe_layers),
        "num_experts": shape.num_experts,
        "top_k": shape.top_k,
        "hidden_size": shape.hidden_size,
        "expert_intermediate_size": shape.expert_intermediate_size,
        "shared_experts": shared[0] if shared else None,
        "shared_intermediate_size": shape.shared_intermediate_size,
        "shared_expert_gate": getattr(first.block, "shared_expert_gate", None) is not None,
        "router_class": router_class.__name__,
        "router_attr": first.router_attr,
        "num_parameters": total,
        "num_active_parameters": round(total - inactive),
        "renormalizes_top_k": first.spec.renorm or first.spec.kind.score == "softmax_topk",
        "routed_scaling_factor": first.spec.scaling,
        "experts_implementation": getattr(config, "_experts_implementation", None),
        "seq_len": seq_len,
        "causal_attention_flops": causal,
        "flops_per_token": flops_per_token(model, seq_len, causal=causal).to_dict(),
    }
