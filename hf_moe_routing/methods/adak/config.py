"""Ada-K routing config: learned per-token expert counts (Yue et al., ICLR 2025, arXiv 2410.10456)."""

from __future__ import annotations

from dataclasses import dataclass

from ...adapters import MoEAdapter, MoEBlock, MoEShape
from ...context import RoutingContext
from ..base import RoutingConfig, RoutingLayer, register_routing
from ..topk import TopKLayer
from .layer import AdaKLayer, selectable_experts

DECISIONS = ("greedy", "sample")


@register_routing
@dataclass
class AdaKConfig(RoutingConfig):
    """Ada-K routing: an allocator per MoE layer picks how many experts each token gets.

    Args:
        k_max: the largest k an allocator may choose (default: every expert the router can select).
        decision: how k is chosen at inference (``"greedy"``: the most probable k, ``"sample"``).
            In training mode (``layer.train()``) k is always sampled.
        layers: decoder-layer indices that get allocators (default: every MoE layer); the other MoE
            layers keep the model's own Top-K routing.
        renormalize: True divides the chosen experts' probabilities by their sum (the paper's rule);
            False never does; None follows the family's own rule (e.g. Qwen1.5-MoE's
            ``norm_topk_prob=False``), so that a token given the model's k is routed exactly as before.
            The family's scaling (e.g. DeepSeek's ``routed_scaling_factor``) is kept in every case.
    """

    routing_type = "adak"
    variable_k = True

    k_max: int | None = None
    decision: str = "greedy"
    layers: list[int] | None = None
    renormalize: bool | None = True

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ValueError(f"AdaKConfig(decision={self.decision!r}): choose one of {DECISIONS}.")
        if self.k_max is not None and (isinstance(self.k_max, bool) or not isinstance(self.k_max, int)):
            raise TypeError(f"AdaKConfig(k_max=...) must be an int or None, got {self.k_max!r}.")
        if self.layers is not None:
            self.layers = sorted({int(i) for i in self.layers})

    def validate(self, shape: MoEShape) -> None:
        if self.k_max is not None and not 1 <= self.k_max <= shape.num_experts:
            raise ValueError(
                f"AdaKConfig(k_max={self.k_max}) is outside 1..{shape.num_experts}: the model has "
                f"{shape.num_experts} routed experts per layer. Pick k_max in that range (or None for all)."
            )
        if self.layers is not None:
            unknown = sorted(set(self.layers) - set(shape.moe_layers))
            if unknown or not self.layers:
                raise ValueError(
                    f"AdaKConfig(layers={self.layers}) names layers without MoE block {unknown}: the MoE "
                    f"layers of this model are {list(shape.moe_layers)} (or pass layers=None for all)."
                )

    def create_layer(
        self, adapter: MoEAdapter, block: MoEBlock, shape: MoEShape, context: RoutingContext
    ) -> RoutingLayer:
        if self.layers is not None and block.layer_index not in self.layers:
            return TopKLayer(adapter, block, context, None)
        selectable = selectable_experts(adapter, block.gate, shape.num_experts)
        k_max = selectable if self.k_max is None else self.k_max
        if k_max > selectable:
            raise ValueError(
                f"AdaKConfig(k_max={k_max}) is larger than the {selectable} experts the router of "
                f"{block.name} lets a token choose from (group-limited routing): use k_max <= {selectable}."
            )
        return AdaKLayer(adapter, block, context, shape.hidden_size, k_max, self.decision, self.renormalize)
