"""BIP load-balancing routing config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...adapters import MoEAdapter, MoEBlock, MoEShape
from ...context import RoutingContext
from ..base import RoutingConfig, register_routing
from .layer import BIPLayer

UPDATE_MODES = ("after", "before")


@register_routing
@dataclass
class BIPConfig(RoutingConfig):
    """BIP-Based Balancing (Sun, arXiv 2502.15451): per-layer expert prices q from an LP dual.

    Each token takes its top-k experts by ``s - q`` (through the family's own selection, so
    DeepSeek-V3's ``e_score_correction_bias`` and group limiting still apply); gating weights are
    the family's weights of the *original* scores. q lives in a float32 buffer per layer, persists
    across batches and is saved in the routing adapter. See ``methods/bip/solver.py`` for the math.

    Args:
        num_iters: T, dual rounds per batch (warm-started from the previous batch's q). Default 4: on
            streams of skewed batches (``scripts/bench_bip_overhead.py --quality``) it gives mean MaxVio
            ~0.04 before any extra round (T=2: ~0.08, T=8: ~0.02), and its solve time at the
            Qwen1.5-MoE-A2.7B layer shape is well under the 5% budget of the layer forward (README).
        capacity_factor: expert capacity ``C = ceil(capacity_factor * k * n / m)`` (n = real tokens
            of the batch, global under torch.distributed). Must be >= 1 (below, not every token can
            get k experts).
        update: ``"after"`` (default): route with the q of earlier batches, then update q from this
            batch. Causal: a token's experts never depend on tokens after it, so cached generation
            equals a full forward; balance lags one batch (step 1 is routed like Top-K).
            ``"before"``: solve on this batch, then route it (the paper's behaviour): balanced from
            the first step, but a token's experts depend on the other tokens of the batch, later
            positions included (a small non-causal leak in LM training; prompt-length dependent
            routing in generation).
        update_in_eval: also update q when the model is in eval mode (default False: q is frozen in
            eval, so generation and evaluation are deterministic and causal in either mode).
        top_k: experts per token; None = the model's own top-k.
        tolerance: overload, as a fraction of C, accepted after T rounds; above it up to
            ``max_extra_iters`` more rounds run (only the first batches need them).
        max_extra_iters: limit on those extra rounds (0 = exactly T rounds always).
        sync_global: under torch.distributed, gather the real tokens' scores of all ranks so every
            rank solves the global batch and holds the same q (default True).
    """

    routing_type: ClassVar[str] = "bip"

    num_iters: int = 4
    capacity_factor: float = 1.0
    update: str = "after"
    update_in_eval: bool = False
    top_k: int | None = None
    tolerance: float = 0.05
    max_extra_iters: int = 16
    sync_global: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.num_iters, int) or self.num_iters < 1:
            raise ValueError(f"BIPConfig(num_iters={self.num_iters!r}): T must be an int >= 1 (default 4).")
        if not self.capacity_factor >= 1.0:
            raise ValueError(
                f"BIPConfig(capacity_factor={self.capacity_factor}) is infeasible: experts that take at most "
                f"{self.capacity_factor} * k * n / m tokens cannot give every one of n tokens k experts. "
                "Use capacity_factor >= 1.0 (1.0 = perfectly even loads)."
            )
        if self.update not in UPDATE_MODES:
            raise ValueError(f"BIPConfig(update={self.update!r}): choose 'after' (causal) or 'before'.")
        if not self.tolerance >= 0:
            raise ValueError(f"BIPConfig(tolerance={self.tolerance}) must be >= 0.")
        if self.max_extra_iters < 0:
            raise ValueError(f"BIPConfig(max_extra_iters={self.max_extra_iters}) must be >= 0.")

    def validate(self, shape: MoEShape) -> None:
        if self.top_k is not None and not 1 <= self.top_k <= shape.num_experts:
            raise ValueError(
                f"BIPConfig(top_k={self.top_k}) is outside 1..{shape.num_experts}: the model has "
                f"{shape.num_experts} routed experts per layer."
            )

    def create_layer(
        self, adapter: MoEAdapter, block: MoEBlock, shape: MoEShape, context: RoutingContext
    ) -> BIPLayer:
        return BIPLayer(adapter, block, context, self, shape.num_experts, self.top_k or shape.top_k)
