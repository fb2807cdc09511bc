"""Llama 4: top-k of the logits, each chosen expert weighted by ``sigmoid(logit)``; the router
returns dense ``(scores (n, m), logits)`` and the block scales the experts' inputs by the scores."""

from .base import MoEFamily
from .kinds import RouterKind


class Llama4Family(MoEFamily):
    name = "llama4"
    model_types = ("llama4_text", "llama4")
    router_classes = ("Llama4Router",)
    router_attrs = ("router",)
    kind = RouterKind(score="sigmoid_topk", codec="dense_scores", weights_dtype="logits")
