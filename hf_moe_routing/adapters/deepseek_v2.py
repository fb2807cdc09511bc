"""DeepSeek-V2: float32 logits, softmax, greedy or group-limited greedy top-k, routed scaling."""

from __future__ import annotations

import torch
from torch import nn

from .base import MoEAdapter


def limit_to_groups(
    choice: torch.Tensor, num_groups: int, topk_groups: int, group_score: str, fill: float
) -> torch.Tensor:
    """Keep only the experts of each token's ``topk_groups`` best expert groups.

    Experts are split into ``num_groups`` equal groups; a group scores the max of its choice
    scores (DeepSeek-V2) or the sum of its two largest (``group_score="top2"``, DeepSeek-V3).
    Experts outside the selected groups get ``fill``.
    """
    n, m = choice.shape
    grouped = choice.view(n, num_groups, m // num_groups)
    if group_score == "top2":
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, num_groups, m // num_groups).reshape(-1, m)
    return choice.masked_fill(~score_mask.bool(), fill)


class DeepseekV2Adapter(MoEAdapter):
    family = "deepseek_v2"
    model_types = ("deepseek_v2",)
    router_classes = ("DeepseekV2TopkRouter",)
    topk_sorted = False
    normalize = False
    cast_weights = False

    def logits(self, gate: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.view(-1, self.hidden_dim(gate))
        return nn.functional.linear(hidden.type(torch.float32), gate.weight.type(torch.float32))

    def limits_groups(self, gate: nn.Module) -> bool:
        return gate.topk_method == "group_limited_greedy" and gate.topk_group < gate.num_group

    def choice_scores(
        self,
        gate: nn.Module,
        scores: torch.Tensor,
        offset: torch.Tensor | None = None,
        *,
        limit_groups: bool = True,
    ) -> torch.Tensor:
        if offset is not None:
            scores = scores + offset
        if not limit_groups or gate.topk_method != "group_limited_greedy":
            return scores
        # The family masks with 0 (its softmax scores are positive, so the same experts win); -inf also
        # keeps excluded experts out when an offset makes scores negative, and marks them unreachable.
        return limit_to_groups(scores, gate.num_group, gate.topk_group, "max", float("-inf"))

    def scaling(self, gate: nn.Module) -> float:
        return gate.routed_scaling_factor
