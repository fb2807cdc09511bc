"""Ada-K routing config: learned per-token expert counts (Yue et al., ICLR 2025, arXiv 2410.10456)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import check_choice, check_range
from ...core.context import RoutingContext
from ...families import MoEBlock, MoEModel
from ..base import RoutingConfig, RoutingLayer, TopKLayer, register_routing
from ..routing import selectable_experts
from .layer import AdaKLayer

DECISIONS = ("greedy", "sample")


@register_routing
@dataclass
class AdaKConfig(RoutingConfig):
    """Ada-K routing: an allocator per MoE layer picks how many experts each token gets.

    Args:
        k_max: the largest k an allocator may choose, in ``1..num_experts``. Default None: in training
            every expert the router can select, at inference at most the model's top-k (so Ada-K never
            costs more than the model); set it to allow more at inference too.
        decision: how k is chosen at inference (``"greedy"``: the most probable k, ``"sample"``).
            In training mode (``layer.train()``) k is always sampled.
        layers: decoder-layer indices that get allocators (default: every MoE layer); the other MoE
            layers keep the model's own Top-K routing.
        renormalize: True divides the chosen experts' probabilities by their sum (the paper's rule);
            False never does; None follows the family's own rule (e.g. Qwen1.5-MoE's
            ``norm_topk_prob=False``), so that a token given the model's k is routed exactly as before.
            The family's scaling (e.g. DeepSeek's ``routed_scaling_factor``) is kept in every case.
    """

    routing_type: ClassVar[str] = "adak"
    variable_k: ClassVar[bool] = True
    needs_fitting: ClassVar[bool] = True

    k_max: int | None = None
    decision: str = "greedy"
    layers: list[int] | None = None
    renormalize: bool | None = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("AdaKConfig", "decision", self.decision, DECISIONS)
        check_range("AdaKConfig", "k_max", self.k_max, low=1)
        if self.layers is not None:
            if not self.layers or min(self.layers) < 0:
                raise ValueError(
                    f"AdaKConfig(layers={self.layers}) must list decoder-layer indices >= 0 (or be None for "
                    "every MoE layer)."
                )
            self.layers = sorted(set(self.layers))

    def validate(self, model: MoEModel) -> None:
        self.check_k("k_max", self.k_max, model, selectable=False)  # checked per block in create_layer
        if self.layers is not None:
            unknown = sorted(set(self.layers) - set(model.shape.moe_layers))
            if unknown or not self.layers:
                raise ValueError(
                    f"AdaKConfig(layers={self.layers}) names layers without MoE block {unknown}: the MoE "
                    f"layers of this model are {list(model.shape.moe_layers)} (or pass layers=None for all)."
                )
        if self.renormalize is False and model.spec.kind.score in ("softmax_topk", "sparsemixer"):
            raise ValueError(
                f"AdaKConfig(renormalize=False) has no meaning for {model.shape.family} routers, whose weights "
                "are a softmax over the chosen experts' logits (always renormalised): use None or True."
            )

    def create_layer(self, block: MoEBlock, model: MoEModel, context: RoutingContext) -> RoutingLayer:
        if self.layers is not None and block.layer_index not in self.layers:
            return TopKLayer(block, context, None)
        selectable = selectable_experts(block.spec)
        k_max = selectable if self.k_max is None else self.k_max
        if k_max > selectable:
            raise ValueError(
                f"AdaKConfig(k_max={k_max}) is larger than the {selectable} experts the router of "
                f"{block.name} lets a token choose from (group-limited routing): use k_max <= {selectable}."
            )
        k_cap = block.spec.top_k if self.k_max is None else self.k_max
        return AdaKLayer(block, context, k_max, self.decision, self.renormalize, k_cap)
