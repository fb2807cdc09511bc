"""Loss-Controlled routing layer: the family's own routing plus an auxiliary balancing loss."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...adapters import MoEAdapter, MoEBlock
from ...context import RoutingContext
from ..base import RoutingLayer
from .loss import load_balancing_loss

if TYPE_CHECKING:
    from .config import LossControlledConfig


class LossControlledLayer(RoutingLayer):
    """Routes exactly like the model; in training records ``coefficient * L_aux`` in the context.

    The per-sequence variant needs the (batch, sequence) shape that the flattened router input has
    lost: a forward pre-hook on the MoE block records it. The hook removes itself once this layer
    is no longer the block's routing (after ``unpatch_model``).
    """

    def __init__(
        self, adapter: MoEAdapter, block: MoEBlock, context: RoutingContext, config: LossControlledConfig
    ) -> None:
        super().__init__(adapter, block, context)
        self.config = config
        self.num_sequences = 1
        self._hook = None
        if config.per_sequence:
            self._hook = block.block.register_forward_pre_hook(_record_batch_shape(self, block.gate))

    def forward(self, gate: nn.Module, hidden_states: torch.Tensor):
        logits = self.adapter.logits(gate, hidden_states)
        scores = self.adapter.scores(gate, logits)
        index = self.adapter.topk(gate, self.adapter.choice_scores(gate, scores), self.adapter.top_k(gate))
        weights = self.adapter.weights(gate, scores, index, logits_dtype=logits.dtype)
        if self.training and torch.is_grad_enabled():
            n = scores.shape[0]
            sequences = self.num_sequences if self.config.per_sequence and n % self.num_sequences == 0 else 1
            loss = load_balancing_loss(scores, index, self.context.mask_for(n), sequences)
            self.context.add_aux_loss(self.config.coefficient * loss)
        return logits, weights, index

    def extra_repr(self) -> str:
        c = self.config
        return f"{super().extra_repr()}, coefficient={c.coefficient}, per_sequence={c.per_sequence}"


def _record_batch_shape(layer: LossControlledLayer, gate: nn.Module):
    ref = weakref.ref(layer)

    def hook(block: nn.Module, args: tuple) -> None:
        current = ref()
        if current is None or getattr(gate, "routing", None) is not current:
            if current is not None and current._hook is not None:
                current._hook.remove()
            return
        hidden = args[0] if args else None
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
            current.num_sequences = int(hidden.shape[0])

    return hook
