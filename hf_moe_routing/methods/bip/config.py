"""BIP load-balancing routing config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import check_choice, check_range
from ...core.context import RoutingContext
from ...families import MoEBlock, MoEModel
from ..base import RoutingConfig, register_routing
from .layer import BIPLayer

UPDATE_MODES = ("after", "before")


@register_routing
@dataclass
class BIPConfig(RoutingConfig):
    """BIP-Based Balancing (Sun, arXiv 2502.15451): per-layer expert prices q from an LP dual.

    Each token takes its top-k experts by ``c - q``, where c are the family's own selection scores
    (so DeepSeek-V3's ``e_score_correction_bias`` and group limiting still apply); gating weights
    are the family's weights of the *original* scores. q lives in a float32 buffer per layer,
    persists across batches and is saved in the routing adapter. Fit q on data with
    :func:`hf_moe_routing.fit_routing` (frozen models) or train with the model (q updates in
    training mode). See ``methods/bip/solver.py`` for the math.

    Args:
        num_iters: T, dual rounds per batch (warm-started from the previous batch's q), >= 1.
        capacity_factor: expert capacity ``C = ceil(capacity_factor * k * n / m)`` (n = real tokens
            of the batch, global under torch.distributed); finite and >= 1 (below, not every token
            can get k experts).
        update: ``"after"`` (default): route with the q of earlier batches, then update q from this
            batch. Causal: a token's experts never depend on tokens after it, so cached generation
            equals a full forward; balance lags one batch. ``"before"``: solve on this batch, then
            route it (the paper's behaviour): balanced from the first step, but a token's experts
            depend on the other tokens of the batch, later positions included.
        update_in_eval: also update q in eval mode (default False: q is frozen in eval, so
            generation and evaluation are deterministic and causal in either mode).
        top_k: experts per token; None = the model's own top-k. At most the experts a token can
            choose from (``topk_group * m / n_group`` on group-limited routers): ValueError otherwise.
        tolerance: overload, as a fraction of C in [0, 1], accepted after T rounds; above it up to
            ``max_extra_iters`` more rounds run (only the first batches need them).
        max_extra_iters: limit on those extra rounds (0 = exactly T rounds always), 0..1000.
        sync_global: under torch.distributed, gather the real tokens' scores of all ranks so every
            rank solves the global batch and holds the same q (default True).
    """

    routing_type: ClassVar[str] = "bip"
    needs_fitting: ClassVar[bool] = True

    num_iters: int = 4
    capacity_factor: float = 1.0
    update: str = "after"
    update_in_eval: bool = False
    top_k: int | None = None
    tolerance: float = 0.05
    max_extra_iters: int = 16
    sync_global: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = "BIPConfig"
        check_range(
            owner, "num_iters", self.num_iters, low=1, high=1000, hint="T rounds per batch (default 4)."
        )
        check_range(
            owner,
            "capacity_factor",
            self.capacity_factor,
            low=1.0,
            hint="Below 1 the problem is infeasible: experts that take at most capacity_factor * k * n / m "
            "tokens cannot give every token k experts (1.0 = perfectly even loads).",
        )
        check_choice(owner, "update", self.update, UPDATE_MODES)
        check_range(owner, "tolerance", self.tolerance, low=0.0, high=1.0)
        check_range(owner, "max_extra_iters", self.max_extra_iters, low=0, high=1000)
        check_range(owner, "top_k", self.top_k, low=1)

    def validate(self, model: MoEModel) -> None:
        self.check_k("top_k", self.top_k, model)

    def create_layer(self, block: MoEBlock, model: MoEModel, context: RoutingContext) -> BIPLayer:
        return BIPLayer(block, context, self, self.top_k or block.spec.top_k)
