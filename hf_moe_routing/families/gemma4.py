"""Gemma 4 (``gemma4_text``): the decoder layer holds the router and experts. The router RMS-normalises
its input (no learned weight) and multiplies it by ``scale * d**-0.5`` before its projection; float32
softmax, top-k, always renormalised, then each weight times a learned ``per_expert_scale``. It returns
the softmax scores (not the logits) first."""

from .base import MoEFamily
from .kinds import RouterKind


class Gemma4Family(MoEFamily):
    name = "gemma4_text"
    model_types = ("gemma4_text", "gemma4")
    router_classes = ("Gemma4TextRouter",)
    router_attrs = ("router",)
    weight_name = "proj.weight"
    input_norm_name = "norm"
    input_scale_names = ("scale", "scalar_root_size")
    expert_scale_name = "per_expert_scale"
    kind = RouterKind(
        input_norm=True,
        renormalize="always",
        expert_scale=True,
        weights_dtype="float32",
        codec="scores_triple",
    )
