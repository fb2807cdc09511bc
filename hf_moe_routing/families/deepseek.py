"""DeepSeek-V2 (softmax, greedy or group-limited by the max score) and DeepSeek-V3 (sigmoid, a
selection bias ``e_score_correction_bias``, group-limited by the sum of the top two scores);
float32 logits, unsorted top-k, routed scaling factor."""

from .base import MoEFamily
from .kinds import RouterKind


class DeepseekV2Family(MoEFamily):
    name = "deepseek_v2"
    model_types = ("deepseek_v2",)
    router_classes = ("DeepseekV2TopkRouter",)
    kind = RouterKind(
        logits="float32",
        score="softmax",
        group_score="max",
        sorted=False,
        scaling=True,
        weights_dtype="float32",
    )

    def groups(self, router, block, config):
        if getattr(router, "topk_method", "greedy") != "group_limited_greedy":
            return None, None
        return super().groups(router, block, config)


class DeepseekV3Family(MoEFamily):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)
    router_classes = ("DeepseekV3TopkRouter",)
    kind = RouterKind(
        logits="float32",
        score="sigmoid",
        selection_bias=True,
        group_score="top2",
        sorted=False,
        renormalize="attr",
        norm="eps",
        scaling=True,
        weights_dtype="float32",
    )
    norm_value = 1e-20
