"""ERNIE 4.5 MoE: float32 softmax with autocast disabled, a selection bias in ``gate.moe_statics``,
weights renormalised by ``max(sum, norm_min)`` and cast to the hidden states' dtype."""

from .base import MoEFamily
from .kinds import RouterKind


class Ernie45MoeFamily(MoEFamily):
    name = "ernie4_5_moe"
    model_types = ("ernie4_5_moe",)
    router_classes = ("Ernie4_5_MoeTopKRouter",)
    kind = RouterKind(
        logits="float32",
        autocast=False,
        score="softmax",
        selection_bias=True,
        renormalize="always",
        norm="clamp",
        weights_dtype="hidden",
    )
