"""Routing configs for tests: deterministic variable-k and stateful routings that are not real methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..families import RouterOutput
from ..methods.base import RoutingConfig, RoutingLayer
from ..patching import routing_layers


@dataclass
class DropSlotsConfig(RoutingConfig):
    """A deterministic variable-k routing for tests: token t keeps the first ``1 + (t mod k)`` of its top-k slots.

    The other slots become sentinels (index = number of experts, weight 0). Not registered by name.
    """

    routing_type = "test_drop_slots"
    variable_k = True

    def create_layer(self, block, model, context) -> RoutingLayer:
        return _DropSlotsLayer(block, context)


class _DropSlotsLayer(RoutingLayer):
    def forward(self, router, hidden, *args):
        logits, weights, index = self.spec.route(router, hidden)
        n, k = index.shape
        keep = (
            torch.arange(k, device=index.device)[None, :]
            <= (torch.arange(n, device=index.device) % k)[:, None]
        )
        return RouterOutput(
            logits,
            weights.masked_fill(~keep, 0.0),
            index.masked_fill(~keep, self.spec.num_experts),
        )


class OffsetLayer(RoutingLayer):
    """Top-k on ``choice + offset`` with a learned per-expert offset (stateful, like BIP / Loss-Free)."""

    def __init__(self, block, context, top_k):
        super().__init__(block, context)
        self.top_k = top_k
        self.register_buffer("offset", torch.zeros(block.spec.num_experts))
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, router, hidden_states, *args):
        spec = self.spec
        logits = spec.logits(router, hidden_states)
        scores = spec.scores(logits)
        index = spec.topk(spec.choice(logits, scores, self.offset * self.scale), self.top_k)
        return RouterOutput(
            logits, spec.weights(logits, scores, index, hidden_dtype=hidden_states.dtype), index
        )


@dataclass
class OffsetConfig(RoutingConfig):
    """Test routing with per-layer state (an expert offset buffer and a scale parameter)."""

    routing_type = "test-offset"
    top_k: int = 2

    def create_layer(self, block, model, context):
        return OffsetLayer(block, context, self.top_k)


def randomize_offsets(model, seed=1):
    """Give every routing layer a different, large offset so the routing differs from top-k."""
    gen = torch.Generator().manual_seed(seed)
    for layer in routing_layers(model).values():
        layer.offset.copy_(torch.randn(layer.offset.shape, generator=gen))
        layer.scale.data.fill_(float(torch.rand((), generator=gen)) + 0.5)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits
