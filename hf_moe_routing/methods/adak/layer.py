"""Ada-K routing layer: the router's own ranking, a learned number of experts per token."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.context import RoutingContext
from ...families import MoEBlock, RouterOutput
from ..base import RoutingLayer
from ..kept_gain import KeptWeightGain
from ..routing import keep_slots, rank_experts
from .allocator import Allocator
from .ppo import action_log_probs, choose_k
from .warmup import ordered_probabilities


@dataclass
class AllocatorRecord:
    """What a routing layer saw and decided in its last forward (detached; overwritten every forward).

    All tensors have one row per token of the forward (batch-major, as the router sees them).
    """

    states: torch.Tensor  # (n, in_features) float32: the allocator's input (hidden [+ router log-probs])
    ordered_probs: torch.Tensor  # (n, S): router probabilities in ranking order (sum over all m = 1)
    activated: torch.Tensor  # (n,) long: routed experts each token actually used
    actions: torch.Tensor | None = None  # (n,) long in 1..k_max: the allocator's choice (None in top-k mode)
    log_probs: torch.Tensor | None = None  # (n,) float32: log P(action | state) when it was chosen


class AdaKLayer(RoutingLayer):
    """Routes every token to its k best experts in the router's own ranking, with k from the allocator.

    ``k`` in ``1..k_max`` is sampled in training mode and chosen by ``decision`` in eval mode. The
    first ``top_k`` slots are the family's own top-k (its selection rule, ties included), the following
    ones the next best experts; a token given k experts keeps the k best of them. Unused slots hold
    the sentinel index m and weight 0; weights follow the family's rule over the kept experts
    (``renormalize=None``), are renormalised (True, the paper) or not (False), times the family's
    scaling, then (``weight_gain=True``) times the layer's learned gain for the token's number of kept
    experts (:class:`~hf_moe_routing.methods.kept_gain.KeptWeightGain`; 1 at top-k). Hooks used by the trainer:

    * ``use_topk = True``: the model's own Top-K routing (bit-exact), the PPO baseline;
    * ``forced_k`` (n,) long: route with these counts instead of the allocator's (counterfactual
      forwards replay sampled decisions);
    * ``noise`` (n,) uniforms: sample k by inverse CDF from them (reproducible, independent of how
      rows are split over processes) instead of ``torch.multinomial`` with ``generator``;
    * ``record = True``: keep an :class:`AllocatorRecord` of the last forward in ``self.last``.

    A non-finite hidden state raises ValueError naming the layer whenever k is sampled or recorded
    (the policy of ``methods/base.py``); greedy inference routes it as the model would. Under
    activation checkpointing the recomputed forward reuses the k of the original forward (no second
    draw).
    """

    def __init__(
        self,
        block: MoEBlock,
        context: RoutingContext,
        k_max: int,
        decision: str = "greedy",
        renormalize: bool | None = None,
        *,
        allocator_input: str = "hidden",
        allocator_bias: bool = False,
        weight_gain: bool = False,
    ) -> None:
        super().__init__(block, context)
        self.k_max = int(k_max)
        self.default_k = self.spec.top_k
        self.decision = decision
        self.renormalize = renormalize
        self.allocator_input = allocator_input
        router_features = self.k_max if allocator_input == "hidden+router" else 0
        self.allocator = Allocator(
            self.spec.hidden_size, self.k_max, router_features=router_features, bias=allocator_bias
        )
        #: (k_max,) weight gains per number of kept experts (AdaKConfig(weight_gain=True)), else None
        self.kept_gain = KeptWeightGain(self.k_max, self.default_k) if weight_gain else None
        self.use_topk = False
        self.record = False
        self.last: AllocatorRecord | None = None
        self.generator: torch.Generator | None = None
        self.noise: torch.Tensor | None = None
        self.forced_k: torch.Tensor | None = None
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long), persistent=False)

    def is_fitted(self) -> bool:
        return bool(self.num_updates > 0)

    def features(self, hidden: torch.Tensor, ranking: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(allocator input (n, in_features), router probabilities in rank order (n, S))``."""
        ordered = _probs_in_rank_order(ranking)
        return self.allocator.features(hidden, ordered), ordered

    @property
    def output_slots(self) -> int:
        return self.k_max

    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args: Any) -> RouterOutput:
        spec = self.spec
        hidden = hidden_states.reshape(-1, spec.hidden_size)
        if self.use_topk:
            output = spec.route(router, hidden_states)
            if self.record:
                self.check_finite(hidden, "hidden states (recorded to train the Ada-K allocator)")
                ranking = rank_experts(spec, router, hidden_states, self.k_max)
                states, ordered = self.features(hidden, ranking)
                self.last = AllocatorRecord(
                    states=states.detach(),
                    ordered_probs=ordered.detach(),
                    activated=(output.index < spec.num_experts).sum(dim=-1),
                )
            return output
        ranking = rank_experts(spec, router, hidden_states, self.k_max)
        states, ordered = self.features(hidden, ranking)
        allocator_logits = self.allocator(states)
        sampling = self.training or self.decision == "sample"
        replaying = self.replaying()
        if (sampling or self.record) and not replaying:  # a NaN must not reach a draw or PPO's records
            self.check_finite(allocator_logits, "Ada-K allocator logits (k is sampled or recorded from them)")
        if replaying and self._replay_state is not None:  # checkpoint recomputation: the same k again
            k = self._replay_state.to(allocator_logits.device)
        else:
            if self.forced_k is not None:
                k = self.forced_k.to(allocator_logits.device)
                if k.shape != allocator_logits.shape[:1]:
                    raise ValueError(
                        f"forced_k {tuple(k.shape)} must give one k per token ({hidden.shape[0]})."
                    )
            else:  # a draw needs no graph, so a recomputed forward saves the same tensors
                decision = "sample" if self.training else self.decision
                k = choose_k(
                    allocator_logits.detach(), decision, self.generator, self.noise if self.training else None
                )
            k = self.replay(k)
        output = keep_slots(
            spec,
            ranking,
            ranking.rank < k.unsqueeze(-1),
            renormalize=self.renormalize,
            hidden_dtype=hidden_states.dtype,
        )
        if self.kept_gain is not None:
            output = self.kept_gain(output, spec.num_experts)
        if self.record:
            self.last = AllocatorRecord(
                states=states.detach(),
                ordered_probs=ordered.detach(),
                activated=(output.index < spec.num_experts).sum(dim=-1),
                actions=k.detach(),
                log_probs=action_log_probs(allocator_logits.detach(), k),
            )
        return output

    # ---- state ---------------------------------------------------------------------------------
    def load_routing_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load allocator tensors, with a clear error if they were trained for another model or k_max.

        A paper-style allocator saved before k_max defaulted to the model's top-k has one row per
        expert; its first k_max rows are kept (with a warning).
        """
        expected = {name: tuple(t.shape) for name, t in self.routing_state().items()}
        state = dict(state)
        weight = state.get("allocator.weight")
        legacy = (
            weight is not None
            and set(state) == {"allocator.weight"} == set(expected)
            and weight.shape[0] > self.k_max
            and tuple(weight.shape[1:]) == expected["allocator.weight"][1:]
        )
        if legacy:
            warnings.warn(
                f"Ada-K layer {self.layer_index}: the adapter's allocator chooses among {weight.shape[0]} "
                f"expert counts; keeping k <= {self.k_max} (k_max; greedy inference was capped there before).",
                stacklevel=2,
            )
            state["allocator.weight"] = weight[: self.k_max]
        missing, unexpected = set(expected) - set(state), set(state) - set(expected)
        if missing or unexpected:
            raise ValueError(
                f"Ada-K state of layer {self.layer_index} should hold {sorted(expected)}; missing "
                f"{sorted(missing)}, unexpected {sorted(unexpected)}: it was saved for another allocator "
                "(AdaKConfig allocator_input / allocator_bias / weight_gain) or is not an Ada-K checkpoint."
            )
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise ValueError(
                    f"The Ada-K {name} of layer {self.layer_index} has shape {shape}, but the checkpoint "
                    f"holds {tuple(state[name].shape)}: it was trained for another model (different hidden "
                    "size or expert count) or another k_max. Use the checkpoint's base model and AdaKConfig, "
                    "or train allocators for this model."
                )
        super().load_routing_state(state)
        self.num_updates.fill_(1)

    def routing_state(self) -> dict[str, torch.Tensor]:
        state = {f"allocator.{name}": p.detach() for name, p in self.allocator.named_parameters()}
        if self.kept_gain is not None:
            state["kept_gain.gain"] = self.kept_gain.gain.detach()
        return state

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, k_max={self.k_max}, decision={self.decision}, "
            f"input={self.allocator_input}"
        )


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
