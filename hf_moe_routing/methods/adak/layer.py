"""Ada-K routing layer: the router's own ranking, a learned number of experts per token."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.context import RoutingContext
from ...families import MoEBlock, RouterOutput
from ..base import RoutingLayer
from ..routing import keep_slots, rank_experts
from .allocator import Allocator
from .ppo import action_log_probs, choose_k
from .warmup import ordered_probabilities


@dataclass
class AllocatorRecord:
    """What a routing layer saw and decided in its last forward (detached; overwritten every forward).

    All tensors have one row per token of the forward (batch-major, as the router sees them).
    """

    states: torch.Tensor  # (n, hidden) float32: the allocator's input
    ordered_probs: torch.Tensor  # (n, k_max): router probabilities in ranking order (sum over m = 1)
    activated: torch.Tensor  # (n,) long: routed experts each token actually used
    actions: torch.Tensor | None = None  # (n,) long in 1..k_max: the allocator's choice (None in top-k mode)
    log_probs: torch.Tensor | None = None  # (n,) float32: log P(action | state) when it was chosen


class AdaKLayer(RoutingLayer):
    """Routes every token to its k best experts in the router's own ranking, with k from the allocator.

    ``k`` is sampled in training mode and chosen by ``decision`` in eval mode, then capped at
    ``k_cap`` (default: the model's top-k) at inference unless the config allows more. The first
    ``top_k`` slots are the family's own top-k (its selection rule, ties included), the following
    ones the next best experts; a token given k experts keeps the k best of them. Unused slots hold
    the sentinel index m and weight 0; weights are the family's (``renormalize=None``), renormalised
    over the kept experts (True, the paper), or not renormalised (False), times the family's scaling.
    ``use_topk = True`` switches the layer to the model's own Top-K routing (bit-exact), as the PPO
    baseline needs. With ``record = True`` the layer keeps an :class:`AllocatorRecord` of its last
    forward in ``self.last``.

    A non-finite hidden state raises ValueError naming the layer whenever k is sampled or recorded
    (the policy of ``methods/base.py``). Under activation checkpointing the recomputed forward
    reuses the k of the original forward (no second draw).
    """

    display_name = "Ada-K"

    def __init__(
        self,
        block: MoEBlock,
        context: RoutingContext,
        k_max: int,
        decision: str = "greedy",
        renormalize: bool | None = True,
        k_cap: int | None = None,
    ) -> None:
        super().__init__(block, context)
        self.k_max = int(k_max)
        self.default_k = self.spec.top_k
        self.decision = decision
        self.renormalize = renormalize
        self.k_cap = k_cap
        self.allocator = Allocator(self.spec.hidden_size, self.k_max)
        self.use_topk = False
        self.record = False
        self.last: AllocatorRecord | None = None
        self.generator: torch.Generator | None = None
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long), persistent=False)

    def is_fitted(self) -> bool:
        return bool(self.num_updates > 0)

    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args: Any) -> RouterOutput:
        spec = self.spec
        hidden = hidden_states.reshape(-1, spec.hidden_size)
        if self.use_topk:
            output = spec.route(router, hidden_states)
            if self.record:
                self.check_finite(hidden, "hidden states (recorded to train the Ada-K allocator)")
                ranking = rank_experts(spec, router, hidden_states, self.k_max)
                self.last = AllocatorRecord(
                    states=hidden.detach().float(),
                    ordered_probs=_probs_in_rank_order(ranking).detach(),
                    activated=torch.full(
                        (hidden.shape[0],), self.default_k, dtype=torch.long, device=hidden.device
                    ),
                )
            return output
        ranking = rank_experts(spec, router, hidden_states, self.k_max)
        allocator_logits = self.allocator(hidden)
        sampling = self.training or self.decision == "sample"
        replaying = self.replaying()
        if (sampling or self.record) and not replaying:  # a NaN must not reach a draw or PPO's records
            self.check_finite(allocator_logits, "Ada-K allocator logits (k is sampled or recorded from them)")
        if replaying and self._replay_state is not None:  # checkpoint recomputation: the same k again
            k = self._replay_state.to(allocator_logits.device)
        else:
            decision = "sample" if self.training else self.decision  # a draw needs no graph:
            k = choose_k(allocator_logits.detach(), decision, self.generator)  # recomputation skips it
            if not self.training and self.k_cap is not None:
                k = k.clamp(max=self.k_cap)
            k = self.replay(k)
        output = keep_slots(
            spec,
            ranking,
            ranking.rank < k.unsqueeze(-1),
            renormalize=self.renormalize,
            hidden_dtype=hidden_states.dtype,
        )
        if self.record:
            self.last = AllocatorRecord(
                states=hidden.detach().float(),
                ordered_probs=_probs_in_rank_order(ranking).detach(),
                activated=(output.index < spec.num_experts).sum(dim=-1),
                actions=k.detach(),
                log_probs=action_log_probs(allocator_logits.detach(), k),
            )
        return output

    def load_routing_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load allocator weights, with a clear error if they were trained for another model or k_max."""
        expected = tuple(self.allocator.weight.shape)
        weight = state.get("allocator.weight")
        if weight is not None and tuple(weight.shape) != expected:
            raise ValueError(
                f"The Ada-K allocator of layer {self.layer_index} has shape (k_max, hidden_size) = "
                f"{expected}, but the checkpoint holds {tuple(weight.shape)}: it was trained for another model "
                "(different hidden size or expert count) or another k_max. Use the checkpoint's base model "
                "and AdaKConfig, or train allocators for this model."
            )
        missing = {"allocator.weight"} - set(state)
        unexpected = set(state) - {"allocator.weight"}
        if missing or unexpected:
            raise ValueError(
                f"Ada-K state of layer {self.layer_index} should hold exactly 'allocator.weight'; "
                f"missing {sorted(missing)}, unexpected {sorted(unexpected)} (not an Ada-K checkpoint?)."
            )
        super().load_routing_state(state)
        self.num_updates.fill_(1)

    def routing_state(self) -> dict[str, torch.Tensor]:
        return {"allocator.weight": self.allocator.weight.detach()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k_max={self.k_max}, decision={self.decision}"


def _probs_in_rank_order(ranking) -> torch.Tensor:
    order = torch.empty_like(ranking.index).scatter_(1, ranking.rank, ranking.index)
    return ordered_probabilities(ranking.scores, order)


def adak_layers(model: nn.Module) -> dict[int, AdaKLayer]:
    """Decoder-layer index -> Ada-K layer of a model patched with ``AdaKConfig``, in layer order.

    Raises ValueError if the model has none.
    """
    layers = {m.layer_index: m for m in model.modules() if isinstance(m, AdaKLayer)}
    if not layers:
        raise ValueError(
            "This model has no Ada-K allocators: patch it with patch_model(model, AdaKConfig())."
        )
    return dict(sorted(layers.items()))


@contextlib.contextmanager
def default_routing(model: nn.Module) -> Iterator[None]:
    """Within the block, the Ada-K layers of ``model`` route with the model's own Top-K (no re-patching)."""
    layers = list(adak_layers(model).values())
    previous = [layer.use_topk for layer in layers]
    for layer in layers:
        layer.use_topk = True
    try:
        yield
    finally:
        for layer, value in zip(layers, previous, strict=True):
            layer.use_topk = value


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[dict[int, AdaKLayer]]:
    """Within the block, Ada-K layers keep an :class:`AllocatorRecord` of their last forward; cleared after."""
    layers = adak_layers(model)
    for layer in layers.values():
        layer.record = True
    try:
        yield layers
    finally:
        for layer in layers.values():
            layer.record = False
            layer.last = None
