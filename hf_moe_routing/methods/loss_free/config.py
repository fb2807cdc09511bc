"""Loss-Free balancing routing config."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ...core.config import check_range
from ...core.context import RoutingContext
from ...families import MoEBlock, MoEModel, RouterSpec
from ..base import Requirement, RoutingConfig
from .layer import LossFreeLayer


@dataclass
class LossFreeConfig(RoutingConfig):
    """Auxiliary-loss-free balancing (Wang et al., arXiv 2408.15664), the DeepSeek-V3 method.

    Each token takes its top-k experts by ``c + b``; the weights use the original scores. After
    each training (or fitting) batch, ``b_j <- b_j + u * sign(mean load - load_j)`` (loads over real
    tokens, summed over ranks under torch.distributed). Families with their own selection bias
    (DeepSeek-V3, GLM-4.5, MiniMax-M2, ERNIE 4.5, ...) have that bias updated, through a float32
    master copy; the others get a float32 buffer ``bias`` per layer. Causal: a batch is routed
    before its update.

    Args:
        update_rate: u, finite and in (0, 1] (default 1e-3, the paper's value).
        update_in_eval: also update b in eval mode (default False).
        sync_global: sum loads over ranks under torch.distributed so every rank keeps the same b.
    """

    routing_type: ClassVar[str] = "loss_free"
    requires: ClassVar[Requirement] = "fitting"

    update_rate: float = 1e-3
    update_in_eval: bool = False
    sync_global: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(
            "LossFreeConfig",
            "update_rate",
            self.update_rate,
            low=0.0,
            low_open=True,
            high=1.0,
            hint="The paper uses 1e-3.",
        )

    def create_layer(self, block: MoEBlock, model: MoEModel, context: RoutingContext) -> LossFreeLayer:
        return LossFreeLayer(
            block,
            context,
            update_rate=self.update_rate,
            update_in_eval=self.update_in_eval,
            sync_global=self.sync_global,
        )

    @classmethod
    def example_settings(cls, spec: RouterSpec) -> dict[str, Sequence[Any]]:
        # 1.0: the bias outweighs the scores
        return {"update_rate": (1e-3, 0.1, 1.0), "update_in_eval": (False, True)}

    @classmethod
    def bad_settings(cls) -> Sequence[tuple[str, Any, type[Exception], str]]:
        return [
            ("update_rate", math.nan, ValueError, "finite"),
            ("update_rate", math.inf, ValueError, "finite"),
            ("update_rate", 0.0, ValueError, "must lie in"),
            ("update_rate", 2.0, ValueError, "must lie in"),
            ("update_in_eval", "false", TypeError, "true or false"),
            ("sync_global", "true", TypeError, "true or false"),
        ]
