"""Loss-Free routing layer: top-k of ``s + b``, weights from s, b updated after each batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ...adapters import MoEAdapter, MoEBlock
from ...context import RoutingContext, is_recomputing
from ..base import RoutingLayer
from ..bip.layer import check_finite, distributed_world
from .bias import bias_update, token_loads

if TYPE_CHECKING:
    from .config import LossFreeConfig

#: DeepSeek-V3's own selection bias; Loss-Free updates it instead of keeping a separate one.
MODEL_BIAS = "e_score_correction_bias"


class LossFreeLayer(RoutingLayer):
    """Selection bias b (buffer ``bias``), or the router's own ``e_score_correction_bias`` if it has one."""

    def __init__(
        self, adapter: MoEAdapter, block: MoEBlock, context: RoutingContext, config: LossFreeConfig
    ) -> None:
        super().__init__(adapter, block, context)
        self.config = config
        self.num_experts = adapter.num_experts(block.gate)
        # a plain reference (not a submodule: the gate owns this layer)
        object.__setattr__(self, "_gate", block.gate)
        self.uses_model_bias = isinstance(getattr(block.gate, MODEL_BIAS, None), torch.Tensor)
        if not self.uses_model_bias:
            self.register_buffer("bias", torch.zeros(self.num_experts, dtype=torch.float32), persistent=True)
        #: the bias the last training forward routed with (reused by checkpoint recomputation)
        self._routed_bias: torch.Tensor | None = None

    @property
    def selection_bias(self) -> torch.Tensor:
        """The bias that selection adds to the scores (the model's own one for DeepSeek-V3)."""
        return getattr(self._gate, MODEL_BIAS) if self.uses_model_bias else self.bias

    def updates_now(self) -> bool:
        return self.training or self.config.update_in_eval

    @torch.no_grad()
    def update_bias(self, index: torch.Tensor, mask: torch.Tensor | None) -> None:
        """``b_j += u * sign(mean load - load_j)`` with loads over real tokens (all ranks under DDP)."""
        loads = token_loads(index, self.num_experts, mask)
        if self.config.sync_global and distributed_world() > 1:
            dist.all_reduce(loads)
        if loads.sum() == 0:  # no real token: nothing to learn from
            return
        bias = self.selection_bias
        bias.add_(bias_update(loads, self.config.update_rate).to(device=bias.device, dtype=bias.dtype))

    def forward(self, gate: nn.Module, hidden_states: torch.Tensor):
        logits = self.adapter.logits(gate, hidden_states)
        scores = self.adapter.scores(gate, logits)
        recomputing = is_recomputing()  # activation checkpointing: route as the original forward did
        current = self.selection_bias
        routed = self._routed_bias if recomputing and self._routed_bias is not None else current
        if self.training and not recomputing:
            self._routed_bias = current.detach().clone()
        offset = routed
        if self.uses_model_bias:  # DeepSeek-V3's choice_scores adds the model's current bias itself
            offset = None if routed is current else routed - current
        if offset is not None:
            offset = offset.to(device=scores.device, dtype=scores.dtype)
        index = self.adapter.topk(
            gate, self.adapter.choice_scores(gate, scores, offset), self.adapter.top_k(gate)
        )
        weights = self.adapter.weights(gate, scores, index, logits_dtype=logits.dtype)
        if self.updates_now() and not recomputing:
            check_finite(scores.detach(), f"Loss-Free layer {self.layer_index}")
            self.update_bias(index, self.context.mask_for(index.shape[0]))
        return logits, weights, index

    def routing_state(self) -> dict[str, torch.Tensor]:
        if self.uses_model_bias:
            return {MODEL_BIAS: self.selection_bias.detach().clone()}
        return dict(self.state_dict())

    def load_routing_state(self, state: dict[str, torch.Tensor]) -> None:
        if not self.uses_model_bias:
            self.load_state_dict(state, strict=True)
            return
        if set(state) != {MODEL_BIAS}:
            raise ValueError(
                f"Loss-Free state of layer {self.layer_index} must hold exactly {MODEL_BIAS!r}, got {sorted(state)}."
            )
        with torch.no_grad():
            self.selection_bias.copy_(state[MODEL_BIAS])

    def extra_repr(self) -> str:
        where = MODEL_BIAS if self.uses_model_bias else "own bias"
        return f"{super().extra_repr()}, u={self.config.update_rate}, {where}"
