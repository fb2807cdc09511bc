"""Loss-Free balancing routing config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...adapters import MoEAdapter, MoEBlock, MoEShape
from ...context import RoutingContext
from ..base import RoutingConfig, register_routing
from .layer import LossFreeLayer


@register_routing
@dataclass
class LossFreeConfig(RoutingConfig):
    """Auxiliary-loss-free balancing (Wang et al., arXiv 2408.15664), the DeepSeek-V3 method.

    Each token takes its top-k experts by ``s + b``; the weights use the original scores. After
    each training batch, ``b_j <- b_j + u * sign(mean load - load_j)`` (loads over real tokens, summed
    over ranks under torch.distributed). For DeepSeek-V3 models b *is* the router's own
    ``e_score_correction_bias`` (updated in place and stored in the routing adapter); other
    families get a float32 buffer ``bias`` per layer. Causal: a batch is routed before its update.

    Args:
        update_rate: u (default 1e-3, the paper's value).
        update_in_eval: also update b in eval mode (default False).
        sync_global: sum loads over ranks under torch.distributed so every rank keeps the same b.
    """

    routing_type: ClassVar[str] = "loss_free"

    update_rate: float = 1e-3
    update_in_eval: bool = False
    sync_global: bool = True

    def __post_init__(self) -> None:
        if not self.update_rate > 0:
            raise ValueError(f"LossFreeConfig(update_rate={self.update_rate}) must be > 0 (default 1e-3).")

    def create_layer(
        self, adapter: MoEAdapter, block: MoEBlock, shape: MoEShape, context: RoutingContext
    ) -> LossFreeLayer:
        return LossFreeLayer(adapter, block, context, self)
