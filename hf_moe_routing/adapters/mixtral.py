"""Mixtral: softmax over float32 logits, top-k always renormalised, float32 weights."""

from .base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    router_classes = ("MixtralTopKRouter",)
    normalize = True
    cast_weights = False
