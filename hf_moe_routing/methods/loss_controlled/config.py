"""Loss-Controlled (auxiliary-loss) balancing routing config."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ...core.config import check_range
from ...core.context import RoutingContext
from ...families import MoEBlock, MoEModel, RouterSpec
from ..base import Requirement, RoutingConfig
from .layer import LossControlledLayer


@dataclass
class LossControlledConfig(RoutingConfig):
    """The auxiliary load-balancing loss (Switch Transformer, Mixtral) as a routing config.

    Routing is the model's own (bit-identical); in training mode each MoE layer records
    ``coefficient * L_aux`` (see :func:`~.loss.load_balancing_loss`, padding excluded), and
    ``hf_moe_routing.routing_aux_loss(model)`` returns their sum after the forward, to be added to
    the LM loss: ``loss = out.loss + routing_aux_loss(model)``.

    Args:
        coefficient: alpha, finite and >= 0 (default 0.01).
        per_sequence: balance each sequence of the batch separately (DeepSeek-V3's sequence-wise
            loss) instead of the whole batch.
    """

    routing_type: ClassVar[str] = "loss_controlled"
    requires: ClassVar[Requirement] = "router_training"

    coefficient: float = 0.01
    per_sequence: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("LossControlledConfig", "coefficient", self.coefficient, low=0.0, hint="Default 0.01.")

    def create_layer(self, block: MoEBlock, model: MoEModel, context: RoutingContext) -> LossControlledLayer:
        return LossControlledLayer(
            block, context, coefficient=self.coefficient, per_sequence=self.per_sequence
        )

    @classmethod
    def example_settings(cls, spec: RouterSpec) -> dict[str, Sequence[Any]]:
        return {"coefficient": (0.0, 0.01, 1.0)}

    @classmethod
    def bad_settings(cls) -> Sequence[tuple[str, Any, type[Exception], str]]:
        return [
            ("coefficient", math.nan, ValueError, "finite"),
            ("coefficient", math.inf, ValueError, "finite"),
            ("coefficient", -0.01, ValueError, "must lie in"),
            ("per_sequence", "false", TypeError, "true or false"),
        ]
