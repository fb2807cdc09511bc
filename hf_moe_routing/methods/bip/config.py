"""BIP load-balancing routing config."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ...core.config import check_choice, check_range
from ...core.context import RoutingContext
from ...families import MoEBlock, MoEModel, RouterSpec
from ..base import Requirement, RoutingConfig
from ..routing import selectable_experts
from .layer import BIPLayer

UPDATE_MODES = ("after", "before")
FIT_ESTIMATES = ("last", "mean")


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
        fit_estimate: the q that :func:`~hf_moe_routing.fit_routing` keeps: ``"mean"`` (default), the mean
            of every fitting batch's solve (Polyak averaging; each solve still warm-starts from the
            previous batch's), or ``"last"``, the last fitting batch's solve. Chosen by measurement
            (docs/bip.md, on validation rows of 4 reference models): the mean balances held-out text
            better (AvgMaxVio 0.243 vs 0.292 at C=1) and varies 6x less between fits on different rows.
            No effect on training, where q moves with the model.
    """

    routing_type: ClassVar[str] = "bip"
    display_name: ClassVar[str] = "BIP-balanced"
    requires: ClassVar[Requirement] = "fitting"

    num_iters: int = 4
    capacity_factor: float = 1.0
    update: str = "after"
    update_in_eval: bool = False
    top_k: int | None = None
    tolerance: float = 0.05
    max_extra_iters: int = 16
    sync_global: bool = True
    fit_estimate: str = "mean"

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
        check_choice(owner, "fit_estimate", self.fit_estimate, FIT_ESTIMATES)
        check_range(owner, "tolerance", self.tolerance, low=0.0, high=1.0)
        check_range(owner, "max_extra_iters", self.max_extra_iters, low=0, high=1000)
        check_range(owner, "top_k", self.top_k, low=1)

    def validate(self, model: MoEModel) -> None:
        self.check_k("top_k", self.top_k, model)

    def create_layer(self, block: MoEBlock, model: MoEModel, context: RoutingContext) -> BIPLayer:
        return BIPLayer(
            block,
            context,
            top_k=self.top_k or block.spec.top_k,
            num_iters=self.num_iters,
            capacity_factor=self.capacity_factor,
            update=self.update,
            update_in_eval=self.update_in_eval,
            tolerance=self.tolerance,
            max_extra_iters=self.max_extra_iters,
            sync_global=self.sync_global,
            fit_estimate=self.fit_estimate,
        )

    @classmethod
    def example_settings(cls, spec: RouterSpec) -> dict[str, Sequence[Any]]:
        return {
            "num_iters": (1, 2, 6),
            "capacity_factor": (1.0, 1.37, 3.0),
            "update": UPDATE_MODES,
            "update_in_eval": (False, True),
            "top_k": (None, 1, selectable_experts(spec)),
            "tolerance": (0.0, 0.05, 1.0),
            "max_extra_iters": (0, 3, 8),
            "fit_estimate": FIT_ESTIMATES,
        }

    @classmethod
    def bad_settings(cls) -> Sequence[tuple[str, Any, type[Exception], str]]:
        return [
            ("top_k", 2.0, TypeError, "integer"),
            ("top_k", 0, ValueError, "must lie in"),
            ("num_iters", 2.5, TypeError, "integer"),
            ("num_iters", 0, ValueError, "must lie in"),
            ("num_iters", 10_000, ValueError, "must lie in"),
            ("capacity_factor", math.nan, ValueError, "finite"),
            ("capacity_factor", math.inf, ValueError, "finite"),
            ("capacity_factor", 0.5, ValueError, "infeasible"),
            ("capacity_factor", "1.2", TypeError, "number"),
            ("update", "sometimes", ValueError, "choose one of 'after', 'before'"),
            ("update", None, TypeError, "string"),
            ("update_in_eval", "false", TypeError, "true or false"),
            ("update_in_eval", 0, TypeError, "true or false"),
            ("tolerance", math.nan, ValueError, "finite"),
            ("tolerance", 1.5, ValueError, "must lie in"),
            ("tolerance", -0.1, ValueError, "must lie in"),
            ("max_extra_iters", math.nan, TypeError, "integer"),
            ("max_extra_iters", math.inf, TypeError, "integer"),
            ("max_extra_iters", -1, ValueError, "must lie in"),
            ("max_extra_iters", 10**6, ValueError, "must lie in"),
            ("sync_global", "false", TypeError, "true or false"),
            ("fit_estimate", "median", ValueError, "choose one of 'last', 'mean'"),
        ]
