"""Granite MoE (GraniteMoE, -Shared, -Hybrid / Granite 4): float32 logits, top-k of the logits,
weights a softmax over the chosen logits cast to the hidden states' dtype."""

from .base import MoEFamily
from .kinds import RouterKind


class GraniteMoeFamily(MoEFamily):
    name = "granitemoe"
    model_types = ("granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa")
    router_classes = (
        "GraniteMoeTopKRouter",
        "GraniteMoeSharedTopKRouter",
        "GraniteMoeHybridTopKRouter",
        "GraniteMoeSWATopKRouter",
    )
    router_attrs = ("router",)
    kind = RouterKind(logits="then_float32", score="softmax_topk", weights_dtype="hidden")
