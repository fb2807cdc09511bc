"""BIP routing layer: the family's scores, selection by ``top-k(c - q)``, q updated by the dual solver."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ...core.context import RoutingContext
from ...core.distributed import gather_rows
from ...families import MoEBlock, RouterOutput
from ..base import ExportedRouting, RoutingLayer
from .solver import check_k, expert_capacity, solve_duals


class BIPLayer(RoutingLayer):
    """Routes one MoE block by ``top-k(c - q)``; q (buffer ``q``, float32, (m,)) persists across batches.

    ``c`` are the family's selection scores (softmax or sigmoid scores plus any selection bias, or
    the logits for routers that select on logits); weights are the family's weights of the chosen
    experts. q is updated from each batch in training mode (and in eval mode while fitting, or with
    ``update_in_eval``), never while activation checkpointing recomputes a forward.
    """

    display_name = "BIP"

    def __init__(
        self,
        block: MoEBlock,
        context: RoutingContext,
        *,
        top_k: int,
        num_iters: int,
        capacity_factor: float,
        update: str,
        update_in_eval: bool,
        tolerance: float,
        max_extra_iters: int,
        sync_global: bool,
        fit_estimate: str = "last",
    ) -> None:
        super().__init__(block, context)
        check_k(top_k, self.spec.num_experts)
        self.top_k = top_k
        self.num_iters = num_iters
        self.capacity_factor = capacity_factor
        self.update = update
        self.update_in_eval = update_in_eval
        self.tolerance = tolerance
        self.max_extra_iters = max_extra_iters
        self.sync_global = sync_global
        self.fit_estimate = fit_estimate
        self.register_buffer("q", torch.zeros(self.spec.num_experts, dtype=torch.float32), persistent=True)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long), persistent=True)
        self.fitting = False
        self._fit_sum: torch.Tensor | None = None  # sum of the fitting batches' q (fit_estimate="mean")
        self._fit_count = 0
        #: rounds run by the last update (T plus extra ones), and its overload (max load - C), in tokens
        self.last_rounds = 0
        self.last_overload = 0

    def begin_fit(self) -> None:
        """Start fitting: q updates on every batch, also in eval mode."""
        self.fitting = True
        self._fit_sum, self._fit_count = torch.zeros_like(self.q), 0

    def end_fit(self) -> dict[str, float]:
        """Stop fitting (q becomes the mean solve with ``fit_estimate="mean"``); returns the last solve's
        rounds and overload (tokens) and q's largest price."""
        self._stop_fit()
        return {"rounds": self.last_rounds, "overload": self.last_overload, "q_max": float(self.q.max())}

    def abort_fit(self) -> None:
        """Stop fitting after an error: q is the ``fit_estimate`` over the batches that finished (with
        ``"mean"``, their mean solve, as :meth:`end_fit` would give; with ``"last"``, the last one)."""
        self._stop_fit()

    def _stop_fit(self) -> None:
        self.fitting = False
        if self.fit_estimate == "mean" and self._fit_count:
            self.q.copy_(self._fit_sum / self._fit_count)
        self._fit_sum, self._fit_count = None, 0

    def updates_now(self) -> bool:
        """Whether this forward updates the state: in training mode, while fitting, or with ``update_in_eval``."""
        return self.training or self.fitting or self.update_in_eval

    def is_fitted(self) -> bool:
        return bool(self.num_updates > 0)

    @torch.no_grad()
    def update_duals(self, choice_base: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Update q from the real tokens of this batch (all ranks' tokens under torch.distributed).

        ``choice_base`` (n, m) are the selection scores before the family's bias and group limit.
        A batch with no real token (empty, or only padding) leaves q unchanged.
        """
        real = choice_base.detach().float()
        if mask is not None:
            real = real[mask.to(real.device)]
        self.check_finite(real, "router scores (BIP updates its expert prices q from them)")
        if self.sync_global:
            real = gather_rows(real)
        n = real.shape[0]
        if n == 0:
            return
        spec = self.spec
        scores_of = self._selection_scores(spec, real)
        capacity = expert_capacity(n, spec.num_experts, self.top_k, self.capacity_factor)
        demand = functools.partial(scores_of, limit_groups=False) if spec.limits_groups else None
        result = solve_duals(
            real,
            self.q,
            self.top_k,
            capacity,
            self.num_iters,
            selection=scores_of,
            demand=demand,
            tolerance=max(1, int(self.tolerance * capacity)),
            max_extra_iters=self.max_extra_iters,
        )
        self.q.copy_(result.q)
        if self.fitting and self._fit_sum is not None:
            self._fit_sum += result.q
            self._fit_count += 1
        self.num_updates += 1
        self.last_rounds, self.last_overload = result.rounds, result.overload

    @staticmethod
    def _selection_scores(spec, base: torch.Tensor):
        """``offset -> c + offset`` with the family's bias and group limit, for the solver."""

        def selection(offset: torch.Tensor, limit_groups: bool = True) -> torch.Tensor:
            return spec.choice(base, base, offset, limit_groups=limit_groups)

        return selection

    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args: Any) -> RouterOutput:
        spec = self.spec
        logits = spec.logits(router, hidden_states)
        scores = spec.scores(logits)
        base = logits if spec.kind.selects_on_logits else scores
        update = self.updates_now() and not self.replaying()
        mask = self.context.mask_for(scores.shape[0]) if update else None
        if update and self.update == "before":
            self.update_duals(base, mask)
        q = self.replay(self.q)
        choice = spec.choice(logits, scores, -q.to(device=scores.device, dtype=torch.float32))
        index = spec.topk(choice, self.top_k)
        weights = spec.weights(logits, scores, index, hidden_dtype=hidden_states.dtype)
        if update and self.update == "after":
            self.update_duals(base, mask)
        return RouterOutput(logits, weights, index)

    def exported_routing(self) -> ExportedRouting:
        """``top-k(c + b - q)`` is the family's own selection with its bias b lowered by the prices q."""
        return ExportedRouting(top_k=self.top_k, selection_offset=-self.q.detach().float().cpu())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, T={self.num_iters}, update={self.update!r}"
