"""Families and tiny models shared by the reliability tests (``hf_moe_routing.testing`` builds every family)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from hf_moe_routing.families import describe_model
from hf_moe_routing.testing import tiny_model

#: One family per router kind: softmax, sigmoid + bias (group-limited), softmax over the chosen
#: logits, sigmoid of the chosen logits.
KIND_FAMILIES = ("mixtral", "deepseek_v3", "gpt_oss", "llama4_text")
#: Families that renormalise the chosen weights (the 0/0 risk).
RENORMALISING = ("mixtral", "qwen3_moe", "deepseek_v3", "minimax", "glm4_moe", "minimax_m2", "ernie4_5_moe")


def make_model(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """A tiny random causal LM of ``family`` in eval mode, router weights spread (``testing.tiny_model``)."""
    return tiny_model(family, seed=seed, dtype=dtype, **overrides)


def scale_router_weights(model: PreTrainedModel, factor: float) -> PreTrainedModel:
    """Multiply every router weight by ``factor`` (x100: softmax probabilities underflow to exactly 0)."""
    with torch.no_grad():
        for block in describe_model(model, verify=False).blocks:
            block.spec.weight(block.router).mul_(factor)
    return model
