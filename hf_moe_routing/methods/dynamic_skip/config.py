"""Dynamic-skipping routing config."""

from __future__ import annotations

from dataclasses import dataclass

from ...adapters import MoEAdapter, MoEBlock, MoEShape
from ...context import RoutingContext
from ..base import RoutingConfig, register_routing
from .layer import DynamicSkipLayer


@register_routing
@dataclass
class DynamicSkipConfig(RoutingConfig):
    """Dynamic skipping of Lu et al. 2024: a token skips its j-th expert (j > 1) when that expert's
    weight is below ``beta_l`` times its top weight.

    Args:
        beta: a fixed threshold in [0, 1] for every layer, or None to calibrate ``beta_l`` per layer with
            :func:`hf_moe_routing.methods.dynamic_skip.calibrate` (stored in the routing adapter).
        quantile: which quantile of the calibration ratios ``w_j / w_(1)`` becomes ``beta_l``
            (0.5 = the paper's median; higher skips more).
        renormalize: False (the paper) keeps the weights the family computes over the full top-k and
            zeroes skipped slots; True renormalises over the kept experts.
    """

    routing_type = "dynamic_skip"
    variable_k = True
    beta: float | None = None
    quantile: float = 0.5
    renormalize: bool = False

    def validate(self, shape: MoEShape) -> None:
        if self.beta is not None and (
            isinstance(self.beta, bool)
            or not isinstance(self.beta, (int, float))
            or not 0.0 <= self.beta <= 1.0
        ):
            raise ValueError(
                f"DynamicSkipConfig(beta={self.beta!r}): beta is a ratio to the top expert's weight and "
                "must be in [0, 1] (or None to calibrate it per layer)."
            )
        if not isinstance(self.quantile, (int, float)) or not 0.0 < self.quantile < 1.0:
            raise ValueError(
                f"DynamicSkipConfig(quantile={self.quantile!r}) must be in (0, 1); 0.5 is the paper's median."
            )
        if shape.top_k < 2:
            raise ValueError(
                f"Dynamic skipping drops experts after a token's first one, but this model routes each "
                f"token to top_k={shape.top_k} expert: there is nothing to skip. Use it on a top-k >= 2 model."
            )

    def create_layer(
        self, adapter: MoEAdapter, block: MoEBlock, shape: MoEShape, context: RoutingContext
    ) -> DynamicSkipLayer:
        return DynamicSkipLayer(adapter, block, context, self.beta, self.renormalize)
