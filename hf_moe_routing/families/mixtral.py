"""Mixtral: softmax over the logits, top-k always renormalised, float32 weights."""

from .base import MoEFamily
from .kinds import RouterKind


class MixtralFamily(MoEFamily):
    name = "mixtral"
    model_types = ("mixtral",)
    router_classes = ("MixtralTopKRouter",)
    kind = RouterKind(score="softmax", renormalize="always", weights_dtype="float32")
