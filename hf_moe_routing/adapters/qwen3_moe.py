"""Qwen3-MoE: softmax top-k with ``norm_topk_prob``, no shared expert."""

from .base import MoEAdapter


class Qwen3MoeAdapter(MoEAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    router_classes = ("Qwen3MoeTopKRouter",)
