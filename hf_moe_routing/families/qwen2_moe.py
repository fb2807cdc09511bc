"""Qwen2-MoE / Qwen1.5-MoE: softmax top-k, optional renormalisation, a sigmoid-gated shared expert."""

from .base import MoEFamily
from .kinds import RouterKind


class Qwen2MoeFamily(MoEFamily):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    router_classes = ("Qwen2MoeTopKRouter",)
    kind = RouterKind(score="softmax", renormalize="attr", weights_dtype="logits")
