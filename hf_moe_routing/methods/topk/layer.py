"""Top-k routing through the family adapter."""

from __future__ import annotations

import torch
from torch import nn

from ...adapters import MoEAdapter, MoEBlock
from ...context import RoutingContext
from ..base import RoutingLayer


class TopKLayer(RoutingLayer):
    def __init__(
        self, adapter: MoEAdapter, block: MoEBlock, context: RoutingContext, top_k: int | None
    ) -> None:
        super().__init__(adapter, block, context)
        self.top_k = top_k

    def forward(self, gate: nn.Module, hidden_states: torch.Tensor):
        if self.top_k is None:
            return self.adapter.route(gate, hidden_states)
        logits = self.adapter.logits(gate, hidden_states)
        scores = self.adapter.scores(gate, logits)
        index = self.adapter.topk(gate, self.adapter.choice_scores(gate, scores), self.top_k)
        return logits, self.adapter.weights(gate, scores, index, logits_dtype=logits.dtype), index

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k or 'model default'}"
