"""Loss-Controlled routing layer: the family's own routing plus an auxiliary balancing loss."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from ...core.context import RoutingContext
from ...families import MoEBlock, RouterOutput
from ..base import ExportedRouting, RoutingLayer
from .loss import AuxLossScaler, load_balancing_loss


class LossControlledLayer(RoutingLayer):
    """Routes exactly like the model; in training records ``coefficient * L_aux`` in the context.

    ``hf_moe_routing.routing_aux_loss(model)`` returns the sum after a forward. Under activation
    checkpointing the loss is recorded once, by the original forward: with non-reentrant
    checkpointing it carries its gradient; with reentrant checkpointing (whose original forward runs
    without gradients) it is a value, and the recomputed forward routes the gradient of the loss
    into the router through :class:`AuxLossScaler`, so training is the same in every mode (in
    that mode the gradient reaches the router even if the loss is not added to the training loss;
    add it anyway, so that the logged losses agree).

    The per-sequence variant needs the (batch, sequence) shape that the flattened router input has
    lost: a forward pre-hook on the MoE block records it; it removes itself once this layer is no
    longer the block's routing (after ``unpatch_model``).
    """

    display_name = "Loss-Controlled"

    def __init__(
        self, block: MoEBlock, context: RoutingContext, *, coefficient: float, per_sequence: bool
    ) -> None:
        super().__init__(block, context)
        self.coefficient = coefficient
        self.per_sequence = per_sequence
        self.num_sequences = 1
        self._hook = None
        if per_sequence:
            self._hook = block.block.register_forward_pre_hook(_record_batch_shape(self, block))

    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args: Any) -> RouterOutput:
        spec = self.spec
        logits = spec.logits(router, hidden_states)
        scores = spec.scores(logits)
        index = spec.topk(spec.choice(logits, scores), spec.top_k)
        weights = spec.weights(logits, scores, index, hidden_dtype=hidden_states.dtype)
        if self.training:
            n = scores.shape[0]
            sequences = self.num_sequences if self.per_sequence and n % self.num_sequences == 0 else 1
            loss = self.coefficient * load_balancing_loss(scores, index, self.context.mask_for(n), sequences)
            # Did the original forward record the loss with its graph? (replayed when recomputing)
            recorded_with_graph = self.replay(torch.is_grad_enabled())
            if not self.replaying():
                self.context.add_aux_loss(loss if recorded_with_graph else loss.detach())
            elif not recorded_with_graph:  # reentrant checkpointing: route the gradient in now
                weights = AuxLossScaler.apply(weights, loss)
            # non-reentrant: the recorded loss already carries the gradient; the recomputation only
            # rebuilds the same tensors (it must not attach the loss a second time)
        return RouterOutput(logits, weights, index)

    def exported_routing(self) -> ExportedRouting:
        """Inference routes exactly like the model (the loss only acts in training): nothing changes."""
        return ExportedRouting()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coefficient={self.coefficient}, per_sequence={self.per_sequence}"


def _record_batch_shape(layer: LossControlledLayer, block: MoEBlock):
    ref = weakref.ref(layer)

    def hook(module: nn.Module, args: tuple) -> None:
        current = ref()
        if current is None or getattr(block.router, "routing", None) is not current:
            if current is not None and current._hook is not None:
                current._hook.remove()
            return
        hidden = args[0] if args else None
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
            current.num_sequences = int(hidden.shape[0])

    return hook
