"""Qwen2-MoE / Qwen1.5-MoE: softmax top-k, optional renormalisation, a gated shared expert."""

from .base import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    router_classes = ("Qwen2MoeTopKRouter",)
