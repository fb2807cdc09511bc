"""Top-k routing config: the model's own routing, or a fixed k for every token."""

from __future__ import annotations

from dataclasses import dataclass

from ...adapters import MoEAdapter, MoEBlock, MoEShape
from ...context import RoutingContext
from ..base import RoutingConfig, register_routing
from .layer import TopKLayer


@register_routing
@dataclass
class TopKConfig(RoutingConfig):
    """Static top-k routing.

    ``TopKConfig()`` reproduces the model's router bit for bit; ``TopKConfig(top_k=k)`` gives
    every token k experts, selected and weighted by the family's own rules (a static-k baseline).
    """

    routing_type = "topk"
    top_k: int | None = None

    def validate(self, shape: MoEShape) -> None:
        if self.top_k is not None and not 1 <= self.top_k <= shape.num_experts:
            raise ValueError(
                f"TopKConfig(top_k={self.top_k}) is outside 1..{shape.num_experts}: the model has "
                f"{shape.num_experts} routed experts per layer. Pick a k in that range (or None for the model's own)."
            )

    def create_layer(
        self, adapter: MoEAdapter, block: MoEBlock, shape: MoEShape, context: RoutingContext
    ) -> TopKLayer:
        return TopKLayer(adapter, block, context, self.top_k)
