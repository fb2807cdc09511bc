"""Top-p routing through the family adapter."""

from __future__ import annotations

import torch
from torch import nn

from ...adapters import MoEAdapter, MoEBlock
from ...context import RoutingContext
from ..base import RoutingLayer
from .routing import slot_mask, to_sentinel, top_p_counts


class TopPLayer(RoutingLayer):
    def __init__(
        self,
        adapter: MoEAdapter,
        block: MoEBlock,
        context: RoutingContext,
        p: float,
        max_k: int,
        normalize: bool | None,
    ) -> None:
        super().__init__(adapter, block, context)
        self.p = float(p)
        self.max_k = int(max_k)
        self.normalize = normalize

    def forward(self, gate: nn.Module, hidden_states: torch.Tensor):
        adapter = self.adapter
        logits = adapter.logits(gate, hidden_states)
        scores = adapter.scores(gate, logits)
        choice = adapter.choice_scores(gate, scores)
        ranked_choice, ranked = torch.topk(choice, self.max_k, dim=-1, sorted=True)
        probs = scores / scores.sum(dim=-1, keepdim=True)
        counts = top_p_counts(probs.gather(1, ranked), self.p, eligible=torch.isfinite(ranked_choice))
        valid = slot_mask(counts, self.max_k)
        index = to_sentinel(ranked, valid, scores.shape[-1])
        weights = adapter.weights(
            gate, scores, index, valid=valid, normalize=self.normalize, logits_dtype=logits.dtype
        )
        return logits, weights, index

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, max_k={self.max_k}"
