"""Tiny models of the router kinds that ``hf_moe_routing.testing`` has no config for (shared by the
reliability tests): gpt-oss and GraniteMoE (softmax over the chosen logits), Llama 4 (sigmoid of
the chosen logits, dense scores), PhiMoE (SparseMixer), ERNIE 4.5 (softmax + bias, clamp), MiniMax-M2
(sigmoid + bias) and GLM-4.5 (sigmoid + bias, group-limited)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from hf_moe_routing.families import describe_model
from hf_moe_routing.testing import _COMMON, TINY_CONFIGS, spread_router_weights, tiny_model

_TWO = ["full_attention", "full_attention"]
EXTRA_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt_oss": dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16, layer_types=_TWO
    ),
    "granitemoe": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "llama4_text": dict(
        intermediate_size=32,
        intermediate_size_mlp=64,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        no_rope_layers=[1, 1],
        interleave_moe_layer_step=1,
        layer_types=_TWO,
    ),
    "phimoe": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "ernie4_5_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=32,
        moe_num_experts=8,
        moe_k=2,
        moe_layer_start_index=0,
        head_dim=16,
    ),
    "minimax_m2": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16),
    "glm4_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=32,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=1,
        first_k_dense_replace=0,
        n_group=4,
        topk_group=2,
        head_dim=16,
        routed_scaling_factor=2.5,
    ),
}

#: One family per router kind: softmax, sigmoid + bias (group-limited), softmax over the chosen
#: logits, sigmoid of the chosen logits.
KIND_FAMILIES = ("mixtral", "deepseek_v3", "gpt_oss", "llama4_text")
#: Families that renormalise the chosen weights (the 0/0 risk).
RENORMALISING = ("mixtral", "qwen3_moe", "deepseek_v3", "minimax", "glm4_moe", "minimax_m2", "ernie4_5_moe")


def make_model(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """A tiny random causal LM of ``family`` in eval mode, router weights spread (as ``tiny_model``)."""
    if family in TINY_CONFIGS:
        return tiny_model(family, seed=seed, dtype=dtype, **overrides)
    config = AutoConfig.for_model(family, **{**_COMMON, **EXTRA_CONFIGS[family], **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spread_router_weights(model)
    return model.eval()


def scale_router_weights(model: PreTrainedModel, factor: float) -> PreTrainedModel:
    """Multiply every router weight by ``factor`` (x100: softmax probabilities underflow to exactly 0)."""
    with torch.no_grad():
        for block in describe_model(model, verify=False).blocks:
            block.spec.weight(block.router).mul_(factor)
    return model
