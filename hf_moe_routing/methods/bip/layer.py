"""BIP routing layer: the family's scores, selection by ``s - q``, q updated by the dual solver."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ...adapters import MoEAdapter, MoEBlock
from ...context import RoutingContext, is_recomputing
from ..base import RoutingLayer
from .solver import check_k, expert_capacity, solve_duals

if TYPE_CHECKING:
    from .config import BIPConfig


def distributed_world() -> int:
    """Number of data-parallel processes (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate the (n_r, m) tensors of all ranks in rank order (n_r may differ, or be 0).

    Every rank must call this (it is a collective). Sizes are exchanged first, then each rank's
    rows are padded to the largest size, all-gathered and trimmed.
    """
    world = distributed_world()
    if world == 1:
        return rows
    size = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = rows.new_zeros((max(counts), rows.shape[1]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:c] for g, c in zip(gathered, counts)], dim=0)


def real_token_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The float32 scores of the real (non-padding) tokens, detached."""
    scores = scores.detach().float()
    return scores if mask is None else scores[mask.to(scores.device)]


def check_finite(scores: torch.Tensor, where: str) -> None:
    """ValueError if routing scores contain NaN or inf (they would poison the persistent state)."""
    if scores.numel() and not torch.isfinite(scores).all():
        raise ValueError(
            f"{where}: the router produced NaN/inf scores, so the balancing state cannot be updated. "
            "Check the model's weights and inputs (fp16 overflow? a diverged training step?)."
        )


class BIPLayer(RoutingLayer):
    """Routes one MoE block by ``top-k(s - q)``; q (buffer ``q``, float32, (m,)) persists across batches."""

    def __init__(
        self,
        adapter: MoEAdapter,
        block: MoEBlock,
        context: RoutingContext,
        config: BIPConfig,
        num_experts: int,
        top_k: int,
    ) -> None:
        super().__init__(adapter, block, context)
        check_k(top_k, num_experts)
        self.config = config
        self.num_experts = num_experts
        self.top_k = top_k
        self.register_buffer("q", torch.zeros(num_experts, dtype=torch.float32), persistent=True)
        #: rounds run by the last update (T plus extra ones), for diagnostics
        self.last_rounds = 0
        #: overload (max load - C) of the last solve's assignment, in tokens
        self.last_overload = 0
        #: the q the last training forward routed with (reused by checkpoint recomputation)
        self._routed_q: torch.Tensor | None = None

    def updates_now(self) -> bool:
        return self.training or self.config.update_in_eval

    @torch.no_grad()
    def update_duals(self, gate: nn.Module, scores: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Update q from the real tokens of this batch (all ranks' tokens under torch.distributed).

        A batch with no real token (empty, or only padding) leaves q unchanged.
        """
        real = real_token_scores(scores, mask)
        check_finite(real, f"BIP layer {self.layer_index}")
        if self.config.sync_global:
            real = gather_rows(real)
        n = real.shape[0]
        if n == 0:
            return
        capacity = expert_capacity(n, self.num_experts, self.top_k, self.config.capacity_factor)
        demand = None  # group-limited routers: alternate rounds price experts without the limit
        if self.adapter.limits_groups(gate):
            demand = functools.partial(self.adapter.choice_scores, gate, real, limit_groups=False)
        result = solve_duals(
            real,
            self.q,
            self.top_k,
            capacity,
            self.config.num_iters,
            selection=lambda offset: self.adapter.choice_scores(gate, real, offset),
            demand=demand,
            tolerance=max(1, int(self.config.tolerance * capacity)),
            max_extra_iters=self.config.max_extra_iters,
        )
        self.q.copy_(result.q)
        self.last_rounds, self.last_overload = result.rounds, result.overload

    def forward(self, gate: nn.Module, hidden_states: torch.Tensor):
        logits = self.adapter.logits(gate, hidden_states)
        scores = self.adapter.scores(gate, logits)
        recomputing = is_recomputing()  # activation checkpointing: route as the original forward did
        update = self.updates_now() and not recomputing
        mask = self.context.mask_for(scores.shape[0]) if update else None
        if update and self.config.update == "before":
            self.update_duals(gate, scores, mask)
        q = self._routed_q if recomputing and self._routed_q is not None else self.q
        if self.training and not recomputing:
            self._routed_q = q.clone()
        offset = -q.to(device=scores.device, dtype=scores.dtype)
        index = self.adapter.topk(gate, self.adapter.choice_scores(gate, scores, offset), self.top_k)
        weights = self.adapter.weights(gate, scores, index, logits_dtype=logits.dtype)
        if update and self.config.update == "after":
            self.update_duals(gate, scores, mask)
        return logits, weights, index

    def extra_repr(self) -> str:
        c = self.config
        return f"{super().extra_repr()}, top_k={self.top_k}, T={c.num_iters}, update={c.update!r}"
