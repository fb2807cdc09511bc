"""Ada-K routing layer: the router's own ranking, a learned number of experts per token."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ...adapters import MoEAdapter, MoEBlock
from ...context import RoutingContext
from ..base import RoutingLayer
from .allocator import Allocator
from .ppo import action_log_probs, choose_k
from .warmup import ordered_probabilities


def selectable_experts(adapter: MoEAdapter, gate: nn.Module, num_experts: int) -> int:
    """How many experts a token can choose from (fewer than m under DeepSeek's group-limited routing).

    Probes ``adapter.choice_scores`` with uniform scores (group-limited families mark experts outside
    the selected groups with -inf) and counts the finite entries.
    """
    try:
        device = gate.weight.device if gate.weight.device.type != "meta" else torch.device("cpu")
        scores = torch.full((1, num_experts), 1.0 / num_experts, device=device)
        choice = adapter.choice_scores(gate, scores)
        return int(torch.isfinite(choice).sum())
    except (RuntimeError, NotImplementedError):  # offloaded buffers (meta tensors): assume all experts
        return num_experts


@dataclass
class AllocatorRecord:
    """What a routing layer saw and decided in its last forward (detached; overwritten every forward).

    All tensors have one row per token of the forward (batch-major, as the router sees them).
    """

    states: torch.Tensor  # (n, hidden) float32: the allocator's input
    ordered_probs: torch.Tensor  # (n, k_max): router probabilities in the router's order (sum over m = 1)
    activated: torch.Tensor  # (n,) long: routed experts each token actually used
    actions: torch.Tensor | None = None  # (n,) long in 1..k_max: the allocator's choice (None in top-k mode)
    log_probs: torch.Tensor | None = None  # (n,) float32: log P(action | state) when it was chosen


class AdaKLayer(RoutingLayer):
    """Routes every token to its top-k experts in the router's own order, with k from the allocator.

    ``k`` is sampled in training mode and chosen by ``decision`` in eval mode. Slots beyond a
    token's k (and experts its router cannot select) hold the sentinel index m and weight 0; the
    chosen experts' weights are ``P_j / sum over chosen P`` (``renormalize=True``) times the family's
    scaling. ``use_topk = True`` switches the layer to the model's own Top-K routing (bit-exact), as
    the PPO baseline needs. With ``record = True`` the layer keeps an :class:`AllocatorRecord` of
    its last forward in ``self.last``.
    """

    def __init__(
        self,
        adapter: MoEAdapter,
        block: MoEBlock,
        context: RoutingContext,
        hidden_size: int,
        k_max: int,
        decision: str = "greedy",
        renormalize: bool | None = True,
    ) -> None:
        super().__init__(adapter, block, context)
        self.k_max = int(k_max)
        self.num_experts = adapter.num_experts(block.gate)
        self.default_k = adapter.top_k(block.gate)
        self.decision = decision
        self.renormalize = renormalize
        self.allocator = Allocator(hidden_size, self.k_max)
        self.use_topk = False
        self.record = False
        self.last: AllocatorRecord | None = None

    def forward(self, gate: nn.Module, hidden_states: torch.Tensor):
        if self.use_topk:
            logits, weights, index = self.adapter.route(gate, hidden_states)
            if self.record:
                self._record_topk(gate, hidden_states, logits)
            return logits, weights, index
        m = self.num_experts
        logits = self.adapter.logits(gate, hidden_states)
        scores = self.adapter.scores(gate, logits)
        choice = self.adapter.choice_scores(gate, scores)
        ranked = torch.topk(choice, self.k_max, dim=-1, sorted=True)
        hidden = hidden_states.reshape(-1, self.adapter.hidden_dim(gate))
        allocator_logits = self.allocator(hidden)
        k = choose_k(allocator_logits, "sample" if self.training else self.decision)
        slots = torch.arange(self.k_max, device=k.device)
        valid = (slots < k.unsqueeze(-1)) & torch.isfinite(ranked.values)
        weights = self.adapter.weights(
            gate, scores, ranked.indices, valid=valid, normalize=self.renormalize, logits_dtype=logits.dtype
        )
        index = ranked.indices.masked_fill(~valid, m)
        if self.record:
            self.last = AllocatorRecord(
                states=hidden.detach().float(),
                ordered_probs=ordered_probabilities(scores, ranked.indices).detach(),
                activated=valid.sum(dim=-1),
                actions=k.detach(),
                log_probs=action_log_probs(allocator_logits.detach(), k),
            )
        return logits, weights, index

    def _record_topk(self, gate: nn.Module, hidden_states: torch.Tensor, logits: torch.Tensor) -> None:
        scores = self.adapter.scores(gate, logits)
        choice = self.adapter.choice_scores(gate, scores)
        order = torch.topk(choice, self.k_max, dim=-1, sorted=True).indices
        hidden = hidden_states.reshape(-1, self.adapter.hidden_dim(gate))
        self.last = AllocatorRecord(
            states=hidden.detach().float(),
            ordered_probs=ordered_probabilities(scores, order).detach(),
            activated=torch.full((hidden.shape[0],), self.default_k, dtype=torch.long, device=hidden.device),
        )

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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k_max={self.k_max}, decision={self.decision}"


def adak_layers(model: nn.Module) -> dict[int, AdaKLayer]:
    """Decoder-layer index -> Ada-K layer of a model patched with :class:`AdaKConfig`, in layer order."""
    from ...patching import routing_layers  # patching imports methods; import lazily to avoid a cycle

    layers = {i: layer for i, layer in routing_layers(model).items() if isinstance(layer, AdaKLayer)}
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
        for layer, value in zip(layers, previous):
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
