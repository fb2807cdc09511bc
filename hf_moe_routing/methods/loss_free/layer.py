"""Loss-Free routing layer: top-k of ``c + b``, weights from the family's scores, b updated after each batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.context import RoutingContext
from ...core.distributed import all_reduce_sum
from ...core.ops import tokens_per_expert
from ...families import MoEBlock, RouterOutput
from ..base import ExportedRouting, NotExportableError, RoutingLayer
from .bias import bias_update


class LossFreeLayer(RoutingLayer):
    """Selection bias b: the family's own (e.g. DeepSeek-V3's ``e_score_correction_bias``) or a new one.

    ``bias`` (float32, (m,)) is the master copy that updates accumulate in. For a family with its own
    selection bias, every update is also written (rounded) into the model's tensor, which the family
    adds itself: a bias stored in bf16 thus still moves by updates far below bf16 resolution, and the
    model routes as before once unpatched. Other families get ``bias`` added as an offset.
    """

    display_name = "Loss-Free"

    def __init__(
        self,
        block: MoEBlock,
        context: RoutingContext,
        *,
        update_rate: float,
        update_in_eval: bool,
        sync_global: bool,
    ) -> None:
        super().__init__(block, context)
        self.update_rate = update_rate
        self.update_in_eval = update_in_eval
        self.sync_global = sync_global
        self.model_bias = self.spec.selection_bias  # a TensorSlot, or None
        self.register_buffer("bias", torch.zeros(self.spec.num_experts, dtype=torch.float32), persistent=True)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long), persistent=True)
        if self.model_bias is not None and self.model_bias.get().device.type != "meta":
            with torch.no_grad():
                self.bias.copy_(self.model_bias.get().detach().float().reshape(-1))
        self.fitting = False

    @property
    def selection_bias(self) -> torch.Tensor:
        """The bias selection adds to the scores now (the model's own tensor where it has one)."""
        return self.model_bias.get() if self.model_bias is not None else self.bias

    def begin_fit(self) -> None:
        """Start fitting: the bias updates on every batch, also in eval mode."""
        self.fitting = True

    def end_fit(self) -> dict[str, float]:
        """Stop fitting; returns the number of updates so far and the bias range."""
        self.fitting = False
        return {
            "updates": int(self.num_updates),
            "bias_min": float(self.bias.min()),
            "bias_max": float(self.bias.max()),
        }

    def abort_fit(self) -> None:
        """Stop fitting after an error (the state keeps the updates made so far)."""
        self.fitting = False

    def updates_now(self) -> bool:
        """Whether this forward updates the state: in training mode, while fitting, or with ``update_in_eval``."""
        return self.training or self.fitting or self.update_in_eval

    def is_fitted(self) -> bool:
        return bool(self.num_updates > 0) or self.model_bias is not None

    @torch.no_grad()
    def update_bias(self, index: torch.Tensor, mask: torch.Tensor | None) -> None:
        """``b_j += u * sign(mean load - load_j)`` with loads over real tokens (all ranks under DDP)."""
        loads = tokens_per_expert(index, self.spec.num_experts, mask)
        if self.sync_global:
            all_reduce_sum(loads)
        if loads.sum() == 0:  # no real token: nothing to learn from
            return
        self.bias.add_(bias_update(loads, self.update_rate).to(self.bias.device))
        self.num_updates += 1
        if self.model_bias is not None:
            target = self.model_bias.get()
            target.copy_(self.bias.view_as(target).to(device=target.device, dtype=target.dtype))

    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args: Any) -> RouterOutput:
        spec = self.spec
        logits = spec.logits(router, hidden_states)
        scores = spec.scores(logits)
        bias = self.replay(self.selection_bias)
        if self.model_bias is not None:
            choice = spec.choice(logits, scores, bias=bias)
        else:
            choice = spec.choice(logits, scores, bias.to(device=scores.device, dtype=torch.float32))
        index = spec.topk(choice, spec.top_k)
        weights = spec.weights(logits, scores, index, hidden_dtype=hidden_states.dtype)
        if self.updates_now() and not self.replaying():
            mask = self.context.mask_for(index.shape[0])
            real = scores if mask is None else scores[mask.to(scores.device)]
            self.check_finite(real, "router scores (Loss-Free updates its selection bias from them)")
            self.update_bias(index, mask)
        return RouterOutput(logits, weights, index)

    def load_routing_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_routing_state(state)
        if self.model_bias is not None:
            with torch.no_grad():
                target = self.model_bias.get()
                target.copy_(self.bias.view_as(target).to(device=target.device, dtype=target.dtype))

    def exported_routing(self) -> ExportedRouting:
        """The learned bias (float32 master copy) replaces the family's selection bias.

        Raises NotExportableError for a family without a selection bias (the bias is an offset only
        this package adds).
        """
        if self.model_bias is None:
            raise NotExportableError(
                f"{self.where}: this {self.spec.kind.describe()} router has no selection-bias parameter, so a "
                "standard checkpoint cannot hold the Loss-Free bias. Serve it with the vLLM plugin instead "
                "(the model folder holds the routing adapter), see docs/serving.md."
            )
        return ExportedRouting(selection_bias=self.bias.detach().float().cpu().clone())

    def extra_repr(self) -> str:
        where = self.model_bias.path if self.model_bias is not None else "own bias"
        return f"{super().extra_repr()}, u={self.update_rate}, {where}"
