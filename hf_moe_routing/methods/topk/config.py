"""Top-k routing config: the model's own routing, or a fixed k for every token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ...core.config import check_range
from ...core.context import RoutingContext
from ...families import MoEBlock, MoEModel, RouterSpec
from ..base import RoutingConfig
from ..routing import selectable_experts
from .layer import TopKLayer


@dataclass
class TopKConfig(RoutingConfig):
    """Static top-k routing.

    ``TopKConfig()`` reproduces the model's router bit for bit; ``TopKConfig(top_k=k)`` gives
    every token k experts, selected and weighted by the family's own rules (a static-k baseline).

    Args:
        top_k: experts per token, in ``1..num_experts`` and at most the experts a token can choose
            from on group-limited routers (DeepSeek, GLM-4.5); None = the model's own top-k.
    """

    routing_type: ClassVar[str] = "topk"
    display_name: ClassVar[str] = "top-k"
    top_k: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("TopKConfig", "top_k", self.top_k, low=1, hint="None = the model's own top-k.")

    def validate(self, model: MoEModel) -> None:
        self.check_k("top_k", self.top_k, model)

    def create_layer(self, block: MoEBlock, model: MoEModel, context: RoutingContext) -> TopKLayer:
        return TopKLayer(block, context, self.top_k)

    @classmethod
    def example_settings(cls, spec: RouterSpec) -> dict[str, Sequence[Any]]:
        return {"top_k": (None, 1, selectable_experts(spec))}

    @classmethod
    def bad_settings(cls) -> Sequence[tuple[str, Any, type[Exception], str]]:
        return [
            ("top_k", 2.5, TypeError, "integer"),
            ("top_k", True, TypeError, "integer"),
            ("top_k", "2", TypeError, "integer"),
            ("top_k", 0, ValueError, r"top_k=0\) must lie in \[1"),
        ]
