"""MiniMax-M2: sigmoid scores, a selection bias the block holds and passes to its router."""

from .base import MoEFamily
from .kinds import RouterKind


class MiniMaxM2Family(MoEFamily):
    name = "minimax_m2"
    model_types = ("minimax_m2",)
    router_classes = ("MiniMaxM2TopKRouter",)
    kind = RouterKind(
        logits="weight_dtype",
        score="sigmoid",
        selection_bias=True,
        sorted=False,
        renormalize="always",
        weights_dtype="float32",
    )
    router_args = ("e_score_correction_bias",)
