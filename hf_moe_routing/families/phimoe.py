"""PhiMoE: SparseMixer routing (Liu et al. 2024, arXiv 2409.12136). At inference the top-2 experts
are the two best logits, each weighted by a softmax over the logits within ``2 eps`` (relative) of
it; in training the family samples experts, so Top-K routing defers to the family's own forward."""

from .base import MoEFamily
from .kinds import RouterKind


class PhimoeFamily(MoEFamily):
    name = "phimoe"
    model_types = ("phimoe",)
    router_classes = ("PhimoeTopKRouter",)
    router_attrs = ("router",)
    kind = RouterKind(score="sparsemixer", weights_dtype="logits")
