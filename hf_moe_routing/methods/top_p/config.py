"""Top-p routing config."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ...core.config import check_range
from ...core.context import RoutingContext
from ...families import MoEBlock, MoEModel, RouterSpec
from ..base import RoutingConfig
from .layer import TopPLayer


@dataclass
class TopPConfig(RoutingConfig):
    """Top-p (nucleus) routing of Huang et al. 2024: each token takes the fewest experts whose
    routing probabilities sum to at least ``p``.

    Args:
        p: probability-mass threshold in (0, 1]. Higher p activates more experts; ``p = 1`` takes
            every expert up to ``max_k`` (with ``max_k = top_k``: exactly the model's routing).
        max_k: cap on experts per token in ``1..num_experts`` (None = all routed experts). It also
            sets the slot count.
        normalize: renormalise the kept weights over the chosen experts (None = the family's own rule).
            ``False`` is refused for routers whose weights are a softmax over the chosen logits
            (gpt-oss, GraniteMoE): they are renormalised by construction.
    """

    routing_type: ClassVar[str] = "top_p"
    variable_k: ClassVar[bool] = True
    p: float = 0.5
    max_k: int | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(
            "TopPConfig",
            "p",
            self.p,
            low=0.0,
            low_open=True,
            high=1.0,
            hint="p is a probability-mass threshold, e.g. 0.4 (fewer experts) ... 0.9 (more experts).",
        )
        check_range("TopPConfig", "max_k", self.max_k, low=1)

    def validate(self, model: MoEModel) -> None:
        self.check_k(
            "max_k", self.max_k, model, selectable=False
        )  # extra slots beyond the groups stay unused
        if self.normalize is False and model.spec.kind.score == "softmax_topk":
            raise ValueError(
                f"TopPConfig(normalize=False) has no effect on {model.shape.family} routers: their weights are a "
                "softmax over the chosen experts' logits, renormalised over the kept experts by construction. "
                "Use normalize=None (or True)."
            )

    def create_layer(self, block: MoEBlock, model: MoEModel, context: RoutingContext) -> TopPLayer:
        return TopPLayer(block, context, self.p, self.max_k or block.spec.num_experts, self.normalize)

    @classmethod
    def example(cls) -> TopPConfig:
        return cls(p=0.6)

    @classmethod
    def example_settings(cls, spec: RouterSpec) -> dict[str, Sequence[Any]]:
        normalize = (None, True) if spec.kind.score == "softmax_topk" else (None, True, False)
        return {"p": (0.01, 0.3, 0.6, 1.0), "max_k": (None, 1, spec.num_experts), "normalize": normalize}

    @classmethod
    def bad_settings(cls) -> Sequence[tuple[str, Any, type[Exception], str]]:
        return [
            ("p", math.nan, ValueError, "finite"),
            ("p", 0.0, ValueError, "must lie in"),
            ("p", 1.5, ValueError, "must lie in"),
            ("max_k", 2.5, TypeError, "integer"),
            ("max_k", 0, ValueError, "must lie in"),
            ("normalize", "false", TypeError, "true or false"),
        ]
