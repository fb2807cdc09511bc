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
        #: while not None, forwards route with every eligible expert up to ``max_k`` and append the
        #: (n_real, max_k) probabilities in rank order (0 where not eligible) for per-layer calibration
        self.calibration: list[torch.Tensor] | None = None

    def set_p(self, p: float) -> None:
        """Set this layer's threshold ``p`` in (0, 1] (per-layer top-p, e.g. from ``calibrate_to_budget``)."""
        if not 0.0 < float(p) <= 1.0:
            raise ValueError(f"p={p!r} must be in (0, 1].")
        self.p = float(p)

    @property
    def output_slots(self) -> int:
        return self.max_k

    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args: Any) -> RouterOutput:
        ranking = rank_experts(self.spec, router, hidden_states, self.max_k)
        probs = renormalize(ranking.scores)  # a token whose sigmoid scores all underflow: 0, not NaN
        # probabilities and eligibility in rank order (rank 0 first)
        by_rank = torch.empty_like(ranking.index).scatter_(1, ranking.rank, ranking.index)
        eligible = torch.empty_like(ranking.selectable).scatter_(1, ranking.rank, ranking.selectable)
        ordered = probs.gather(1, by_rank)
        p = self.p
        if self.calibration is not None:
            mask = self.context.mask_for(ordered.shape[0])
            kept = ordered.detach().float().masked_fill(~eligible, 0.0)
            self.calibration.append((kept if mask is None else kept[mask.to(kept.device)]).cpu())
            p = 1.0
        counts = top_p_counts(ordered, p, eligible=eligible)
        keep = ranking.rank < counts.unsqueeze(-1)
        return keep_slots(
            self.spec, ranking, keep, renormalize=self.normalize, hidden_dtype=hidden_states.dtype
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, max_k={self.max_k}"
