"""gpt-oss: top-k of the logits (with a router bias), weights a softmax over the chosen logits."""

from .base import MoEFamily
from .kinds import RouterKind


class GptOssFamily(MoEFamily):
    name = "gpt_oss"
    model_types = ("gpt_oss",)
    router_classes = ("GptOssTopKRouter",)
    router_attrs = ("router",)
    kind = RouterKind(score="softmax_topk", linear_bias=True, weights_dtype="logits")
    bias_name = "bias"
