"""Top-p routing layer: the family's ranking, the shortest prefix whose probability mass reaches p."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.context import RoutingContext
from ...core.ops import renormalize
from ...families import MoEBlock, RouterOutput
from ..base import RoutingLayer
from ..routing import keep_slots, rank_experts
from .routing import top_p_counts


class TopPLayer(RoutingLayer):
    """Keeps each token's best experts until their probabilities ``P = s / sum(s)`` reach ``p``.

    A token whose scores are all 0 (sigmoid scores that all underflow) has no mass to reach ``p``: it
    keeps every eligible expert up to ``max_k``, each of weight 0 (never 0/0).
    """

    display_name = "top-p"

    def __init__(
        self, block: MoEBlock, context: RoutingContext, p: float, max_k: int, normalize: bool | None
    ) -> None:
        super().__init__(block, context)
        self.p = float(p)
        self.max_k = int(max_k)
        self.normalize = normalize

    @property
    def output_slots(self) -> int:
        return self.max_k

    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args: Any) -> RouterOutput:
        ranking = rank_experts(self.spec, router, hidden_states, self.max_k)
        probs = renormalize(ranking.scores)  # a token whose sigmoid scores all underflow: 0, not NaN
        # probabilities and eligibility in rank order (rank 0 first)
        by_rank = torch.empty_like(ranking.index).scatter_(1, ranking.rank, ranking.index)
        eligible = torch.empty_like(ranking.selectable).scatter_(1, ranking.rank, ranking.selectable)
        counts = top_p_counts(probs.gather(1, by_rank), self.p, eligible=eligible)
        keep = ranking.rank < counts.unsqueeze(-1)
        return keep_slots(
            self.spec, ranking, keep, renormalize=self.normalize, hidden_dtype=hidden_states.dtype
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, max_k={self.max_k}"
