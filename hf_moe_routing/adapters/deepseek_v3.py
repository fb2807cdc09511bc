"""DeepSeek-V3: sigmoid scores, ``e_score_correction_bias`` for selection, group-limited top-k."""

from __future__ import annotations

import torch
from torch import nn

from .deepseek_v2 import DeepseekV2Adapter, limit_to_groups


class DeepseekV3Adapter(DeepseekV2Adapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3",)
    router_classes = ("DeepseekV3TopkRouter",)
    normalize = None  # read gate.norm_topk_prob
    norm_eps = 1e-20

    def scores(self, gate: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def limits_groups(self, gate: nn.Module) -> bool:
        return gate.topk_group < gate.num_group

    def choice_scores(
        self,
        gate: nn.Module,
        scores: torch.Tensor,
        offset: torch.Tensor | None = None,
        *,
        limit_groups: bool = True,
    ) -> torch.Tensor:
        choice = scores + gate.e_score_correction_bias
        if offset is not None:
            choice = choice + offset
        if not limit_groups:
            return choice
        return limit_to_groups(choice, gate.num_group, gate.topk_group, "top2", float("-inf"))
