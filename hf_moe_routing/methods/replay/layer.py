"""Replay routing layer: the recorded experts of each real token, weighed by the family's rule.

For the n tokens of a forward, the replay plan (built from the batch's token ids by
:class:`~.session.Replayer`) gives ``positions`` (N,) of the tokens with a record and their
experts (N, L, S). The layer routes::

    logits, scores = spec.logits(h), spec.scores(logits)       # the current router (gradients)
    own            = spec.topk(spec.choice(logits, scores), k)  # the router's own choice
    index          = own;  index[positions] = recorded[:, layer]
    weights        = spec.weights(logits, scores, index)        # the family's rule over `index`

At the recording's own routing (Top-K, same inputs) ``index`` equals what the router chose, so
the forward is bit-identical to the recorded one. ``last_replay`` keeps, for statistics, which
tokens were replayed and which of them the router would now send to other experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core.context import RoutingContext
from ...families import MoEBlock, RouterOutput
from ..base import TopKLayer
from .tokens import expert_sets_differ

#: Key of the current forward's :class:`ReplayPlan` in ``RoutingContext.extras``.
PLAN_KEY = "replay_plan"


@dataclass
class ReplayPlan:
    """The recorded experts of one forward's tokens.

    Attributes:
        num_tokens: n, tokens the routers see (batch x sequence, flattened row-major).
        positions: (N,) long, the flat positions of the tokens that have a record.
        experts: (N, L, S) int, their recorded experts (L in ``layers`` order).
        layers: decoder-layer index -> position on the L axis.
        sentinel_slots: whether the record has unused slots (index m).
    """

    num_tokens: int
    positions: torch.Tensor
    experts: torch.Tensor
    layers: dict[int, int]
    sentinel_slots: bool = False
    _on_device: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def num_slots(self) -> int:
        return self.experts.shape[-1]

    def for_layer(self, layer_index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions (N,), experts (N, S))`` long tensors of one MoE layer on ``device``."""
        if device not in self._on_device:
            self._on_device[device] = (self.positions.to(device), self.experts.to(device))
        positions, experts = self._on_device[device]
        return positions, experts[:, self.layers[layer_index]].long()


class ReplayLayer(TopKLayer):
    """Routes with the recorded experts where the current forward has a replay plan, else the model's Top-K."""

    display_name = "Replay"

    def __init__(self, block: MoEBlock, context: RoutingContext) -> None:
        super().__init__(block, context, top_k=None)
        #: ``(replayed (n,) bool, changed (n,) bool)`` of the last forward, or None without a plan.
        self.last_replay: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args: Any) -> RouterOutput:
        """Route ``hidden_states`` (n, d): ``RouterOutput`` of (n, S) weights / index (S: the record's slots)."""
        plan: ReplayPlan | None = self.context.extras.get(PLAN_KEY)
        self.last_replay = None
        if plan is None:
            return super().forward(router, hidden_states, *router_args)
        spec = self.spec
        logits = spec.logits(router, hidden_states)
        n = logits.shape[0]
        if n != plan.num_tokens:
            raise ValueError(
                f"{self.where}: the router sees {n} tokens but the forward's input has {plan.num_tokens}; "
                "replay needs routers that see every token of the batch (batch x sequence)."
            )
        scores = spec.scores(logits)
        choice = spec.choice(logits, scores)
        own = spec.topk(choice, spec.top_k)
        index = _fill(spec, choice, own, plan.num_slots)
        positions, recorded = plan.for_layer(self.layer_index, index.device)
        index = index.index_put((positions,), recorded)
        valid = index < spec.num_experts if plan.sentinel_slots else None
        weights = spec.weights(logits, scores, index, valid, hidden_dtype=hidden_states.dtype)
        if valid is not None:
            weights = weights.masked_fill(~valid, 0.0)
        with torch.no_grad():
            replayed = torch.zeros(n, dtype=torch.bool, device=index.device).index_fill(0, positions, True)
            changed = torch.zeros_like(replayed)
            changed[positions] = expert_sets_differ(own[positions], recorded, spec.num_experts)
        self.last_replay = (replayed, changed)
        return RouterOutput(logits, weights, index)

    def extra_repr(self) -> str:
        return super().extra_repr().replace(", top_k=model default", "")


def _fill(spec: Any, choice: torch.Tensor, own: torch.Tensor, slots: int) -> torch.Tensor:
    """The router's own choice with ``slots`` columns (for tokens without a record): its top-``slots``,
    or its top-k followed by unused slots (index m) when the record has more slots than k."""
    k = own.shape[1]
    if slots == k:
        return own
    if slots < k:
        return spec.topk(choice, slots)
    return torch.cat([own, own.new_full((own.shape[0], slots - k), spec.num_experts)], dim=1)
