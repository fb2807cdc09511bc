"""Dynamic-skipping routing config."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ...core.config import check_range
from ...core.context import RoutingContext
from ...families import MoEBlock, MoEModel, RouterSpec
from ..base import Requirement, RoutingConfig
from ..routing import weights_depend_on_chosen_set
from .layer import DynamicSkipLayer


@dataclass
class DynamicSkipConfig(RoutingConfig):
    """Dynamic skipping of Lu et al. 2024: a token skips its j-th expert (j > 1) when that expert's
    weight is below ``beta_l`` times its top weight.

    Args:
        beta: a fixed threshold in [0, 1] for every layer, or None to calibrate ``beta_l`` per layer
            with :func:`hf_moe_routing.fit_routing` (stored in the routing adapter).
        quantile: which quantile of the calibration ratios ``w_j / w_(1)`` becomes ``beta_l``, in
            (0, 1) (0.5 = the paper's median; higher skips more).
        renormalize: False (the paper) keeps the weights the family computes over the full top-k and
            zeroes skipped slots; True applies the family's weighting over the kept experts. True is
            refused (ValueError at patch time) for routers whose weights are per expert (Qwen1.5-MoE
            with ``norm_topk_prob=False``, DeepSeek-V2, OLMoE, Llama 4, PhiMoE): it would change nothing.
    """

    routing_type: ClassVar[str] = "dynamic_skip"
    variable_k: ClassVar[bool] = True
    requires: ClassVar[Requirement] = "fitting"
    beta: float | None = None
    quantile: float = 0.5
    renormalize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(
            "DynamicSkipConfig",
            "beta",
            self.beta,
            low=0.0,
            high=1.0,
            hint="beta is a ratio to the top expert's weight (or None to calibrate it per layer).",
        )
        check_range(
            "DynamicSkipConfig",
            "quantile",
            self.quantile,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
            hint="0.5 is the paper's median.",
        )

    def validate(self, model: MoEModel) -> None:
        if self.renormalize and not weights_depend_on_chosen_set(model.spec):
            raise ValueError(
                f"DynamicSkipConfig(renormalize=True) has no effect on {model.shape.family} routers: their "
                "weights are per expert, not renormalised over the chosen ones (e.g. norm_topk_prob=False), so "
                "a kept expert's weight is the same either way. Use renormalize=False."
            )
        if model.shape.top_k < 2:
            raise ValueError(
                f"Dynamic skipping drops experts after a token's first one, but this model routes each "
                f"token to top_k={model.shape.top_k} expert: there is nothing to skip. Use it on a top-k >= 2 model."
            )

    def create_layer(self, block: MoEBlock, model: MoEModel, context: RoutingContext) -> DynamicSkipLayer:
        return DynamicSkipLayer(block, context, self.beta, self.quantile, self.renormalize)

    @classmethod
    def example(cls) -> DynamicSkipConfig:
        return cls(beta=0.8)  # routes without calibration

    @classmethod
    def example_settings(cls, spec: RouterSpec) -> dict[str, Sequence[Any]]:
        renormalize = (False, True) if weights_depend_on_chosen_set(spec) else (False,)
        return {"beta": (0.0, 0.3, 0.8, 1.0), "renormalize": renormalize}

    @classmethod
    def bad_settings(cls) -> Sequence[tuple[str, Any, type[Exception], str]]:
        return [
            ("beta", math.nan, ValueError, "finite"),
            ("beta", 1.5, ValueError, "must lie in"),
            ("beta", -0.1, ValueError, "must lie in"),
            ("quantile", 0.0, ValueError, "must lie in"),
            ("quantile", 1.0, ValueError, "must lie in"),
            ("quantile", math.nan, ValueError, "finite"),
            ("renormalize", "false", TypeError, "true or false"),
        ]
