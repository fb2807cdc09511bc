"""Top-k routing through the router spec: the family's own routing, at its k or another one."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.context import RoutingContext
from ...families import MoEBlock, RouterOutput
from ..base import RoutingLayer
from ..routing import original_router_output


class TopKLayer(RoutingLayer):
    """``index = topk(choice, k)``, weights by the family's rules (``k = top_k`` or the model's own)."""

    display_name = "Top-K"

    def __init__(self, block: MoEBlock, context: RoutingContext, top_k: int | None) -> None:
        super().__init__(block, context)
        self.top_k = top_k

    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args: Any) -> RouterOutput:
        if self.top_k is None and self.training and self.spec.kind.score == "sparsemixer":
            return original_router_output(
                self.spec, router, hidden_states, router_args
            )  # samples in training
        return self.spec.route(router, hidden_states, self.top_k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k or 'model default'}"
