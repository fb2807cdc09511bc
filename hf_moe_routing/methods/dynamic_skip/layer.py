"""Dynamic skipping through the family adapter."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...adapters import MoEAdapter, MoEBlock
from ...context import RoutingContext
from ..base import RoutingLayer
from ..top_p.routing import to_sentinel
from .routing import score_ratios, skip_mask


class DynamicSkipLayer(RoutingLayer):
    """Top-k routing with small experts skipped. ``beta`` is a persistent buffer (routing-adapter state).

    While ``calibration`` is a list, the layer routes with the model's own top-k and appends the
    ratios ``w_j / w_(1)`` of its real (non-padding) tokens to it.
    """

    def __init__(
        self,
        adapter: MoEAdapter,
        block: MoEBlock,
        context: RoutingContext,
        beta: float | None,
        renormalize: bool,
    ) -> None:
        super().__init__(adapter, block, context)
        self.register_buffer("beta", torch.tensor(math.nan if beta is None else float(beta)))
        self.renormalize = renormalize
        self.calibration: list[torch.Tensor] | None = None
        self._beta_checked = False

    def load_routing_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_routing_state(state)
        self._beta_checked = False

    def set_beta(self, value: float) -> None:
        self.beta.fill_(float(value))
        self._beta_checked = False

    def forward(self, gate: nn.Module, hidden_states: torch.Tensor):
        adapter = self.adapter
        logits = adapter.logits(gate, hidden_states)
        scores = adapter.scores(gate, logits)
        index = adapter.topk(gate, adapter.choice_scores(gate, scores), adapter.top_k(gate))
        selected = scores.gather(1, index)
        if self.calibration is not None:
            mask = self.context.mask_for(selected.shape[0])
            ratios = score_ratios(selected.detach())
            self.calibration.append((ratios if mask is None else ratios[mask]).cpu())
            return logits, adapter.weights(gate, scores, index, logits_dtype=logits.dtype), index
        if not self._beta_checked:
            if torch.isnan(self.beta):
                raise ValueError(
                    f"Dynamic skipping of layer {self.layer_index} has no beta yet: run "
                    "hf_moe_routing.methods.dynamic_skip.calibrate(model, data) first, load a calibrated "
                    "routing adapter, or pass DynamicSkipConfig(beta=...)."
                )
            self._beta_checked = True
        keep = skip_mask(selected, self.beta.to(selected.dtype))
        if self.renormalize:
            weights = adapter.weights(gate, scores, index, valid=keep, logits_dtype=logits.dtype)
        else:
            weights = adapter.weights(gate, scores, index, logits_dtype=logits.dtype).masked_fill(~keep, 0)
        return logits, weights, to_sentinel(index, keep, scores.shape[-1])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={float(self.beta):.4f}, renormalize={self.renormalize}"
