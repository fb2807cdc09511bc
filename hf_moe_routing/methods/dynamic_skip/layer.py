"""Dynamic-skipping routing layer: the family's top-k, small experts (relative to the best) skipped."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...core.context import RoutingContext
from ...core.ops import to_sentinel
from ...families import MoEBlock, RouterOutput
from ..base import RoutingLayer
from .routing import calibrate_beta, score_ratios, skip_mask


class DynamicSkipLayer(RoutingLayer):
    """Top-k routing with small experts skipped. ``beta`` is a persistent buffer (routing-adapter state).

    While fitting (:meth:`begin_fit` ... :meth:`end_fit`), the layer routes with the model's own
    top-k and collects the ratios ``w_j / w_(1)`` of its real (non-padding) tokens; ``end_fit``
    sets ``beta`` to their ``quantile``.
    """

    display_name = "dynamic-skipping"

    def __init__(
        self, block: MoEBlock, context: RoutingContext, beta: float | None, quantile: float, renormalize: bool
    ) -> None:
        super().__init__(block, context)
        self.register_buffer("beta", torch.tensor(math.nan if beta is None else float(beta)))
        self.quantile = quantile
        self.renormalize = renormalize
        self.calibration: list[torch.Tensor] | None = None

    def allows_nonfinite(self, key: str) -> bool:
        return key == "beta"  # NaN = not calibrated yet

    def load_routing_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_routing_state(state)  # refuses inf
        beta = float(self.beta)
        if not math.isnan(beta) and not 0.0 <= beta <= 1.0:
            self.beta.fill_(math.nan)
            raise ValueError(
                f"The routing state 'beta' of {self.where} is {beta}, outside [0, 1] (a ratio to the top "
                "expert's weight): the adapter is corrupt. Re-calibrate it with fit_routing."
            )

    def is_fitted(self) -> bool:
        return not bool(torch.isnan(self.beta))

    def set_beta(self, value: float) -> None:
        """Set the threshold ``beta_l`` (a ratio ``w_j / w_(1)`` in [0, 1]; NaN = not calibrated)."""
        self.beta.fill_(float(value))

    def begin_fit(self) -> None:
        """Start collecting the calibration ratios ``w_j / w_(1)`` of the forwards that follow."""
        self.calibration = []

    def end_fit(self, quantile: float | None = None) -> float:
        """Stop collecting; ``beta`` becomes the ``quantile`` of the collected ratios (returned)."""
        ratios = torch.cat(self.calibration) if self.calibration else torch.empty(0)
        self.calibration = None
        beta = calibrate_beta(ratios, self.quantile if quantile is None else quantile)
        self.set_beta(beta)
        return beta

    def abort_fit(self) -> None:
        """Drop the collected ratios after an error; ``beta`` is unchanged."""
        self.calibration = None

    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args: Any) -> RouterOutput:
        spec = self.spec
        logits = spec.logits(router, hidden_states)
        scores = spec.scores(logits)
        index = spec.topk(spec.choice(logits, scores), spec.top_k)
        full = spec.weights(logits, scores, index, hidden_dtype=hidden_states.dtype)
        selected = spec.weights(logits, scores, index).float()  # scale-free ratios, float32
        if self.calibration is not None:
            mask = self.context.mask_for(selected.shape[0])
            ratios = score_ratios(selected.detach())
            ratios = ratios if mask is None else ratios[mask.to(ratios.device)]
            self.check_finite(
                ratios, "router weights (dynamic skipping calibrates its threshold beta from them)"
            )
            self.calibration.append(ratios.cpu())
            return RouterOutput(logits, full, index)
        if torch.compiler.is_compiling():  # no host sync inside a graph: a runtime check instead
            torch._assert_async(~self.beta.isnan(), f"Dynamic skipping layer {self.layer_index}: no beta yet")
        elif torch.isnan(self.beta):
            raise ValueError(
                f"Dynamic skipping of layer {self.layer_index} has no beta yet: fit it with "
                "hf_moe_routing.fit_routing(model, data) (or methods.dynamic_skip.calibrate), load a "
                "calibrated routing adapter, or pass DynamicSkipConfig(beta=...)."
            )
        keep = skip_mask(selected, self.beta)
        if self.renormalize:
            weights = spec.weights(logits, scores, index, keep, hidden_dtype=hidden_states.dtype)
            weights = weights.masked_fill(~keep, 0)  # a NaN token's renormalisation must not reach them
        else:
            weights = full.masked_fill(~keep, 0)
        return RouterOutput(logits, weights, to_sentinel(index, keep, spec.num_experts))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={float(self.beta):.4f}, renormalize={self.renormalize}"
