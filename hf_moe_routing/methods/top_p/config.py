"""Top-p routing config."""

from __future__ import annotations

from dataclasses import dataclass

from ...adapters import MoEAdapter, MoEBlock, MoEShape
from ...context import RoutingContext
from ..base import RoutingConfig, register_routing
from .layer import TopPLayer


@register_routing
@dataclass
class TopPConfig(RoutingConfig):
    """Top-p (nucleus) routing of Huang et al. 2024: each token takes the fewest experts whose
    routing probabilities sum to at least ``p``.

    Args:
        p: probability-mass threshold in (0, 1]. Higher p activates more experts.
        max_k: cap on experts per token (None = all routed experts). It also sets the slot count.
        normalize: renormalise the kept weights over the chosen experts (None = the family's own rule).
    """

    routing_type = "top_p"
    variable_k = True
    p: float = 0.5
    max_k: int | None = None
    normalize: bool | None = None

    def validate(self, shape: MoEShape) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0.0 < self.p <= 1.0:
            raise ValueError(
                f"TopPConfig(p={self.p!r}): p is a probability-mass threshold and must be in (0, 1], "
                "e.g. 0.4 (fewer experts) ... 0.9 (more experts)."
            )
        if self.max_k is not None and not 1 <= self.max_k <= shape.num_experts:
            raise ValueError(
                f"TopPConfig(max_k={self.max_k}) is outside 1..{shape.num_experts}: the model has "
                f"{shape.num_experts} routed experts per layer. Pick a cap in that range or None (no cap)."
            )

    def create_layer(
        self, adapter: MoEAdapter, block: MoEBlock, shape: MoEShape, context: RoutingContext
    ) -> TopPLayer:
        return TopPLayer(adapter, block, context, self.p, self.max_k or shape.num_experts, self.normalize)
