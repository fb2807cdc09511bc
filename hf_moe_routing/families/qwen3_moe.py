"""Qwen3-MoE: softmax top-k with ``norm_topk_prob``, no shared expert."""

from .base import MoEFamily
from .kinds import RouterKind


class Qwen3MoeFamily(MoEFamily):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    router_classes = ("Qwen3MoeTopKRouter",)
    kind = RouterKind(score="softmax", renormalize="attr", weights_dtype="logits")
