"""BIP load balancing: block-coordinate updates of the dual of the capacity-constrained assignment LP.

For one MoE layer and one batch of n tokens, m routed experts, k experts per token and routing
scores ``s`` (n x m), the assignment problem is::

    maximise  sum_ij s_ij x_ij
    s.t.      sum_j x_ij  = k        (each token i: the experts implementation runs exactly k)
              sum_i x_ij <= C        (each expert j)
              x_ij in {0, 1}

Its constraint matrix is that of a bipartite b-matching (totally unimodular), so the LP relaxation
has an integral optimum. The LP dual, with token prices p (free, because the token constraint is an
equality), expert prices q >= 0 and slack r >= 0, is::

    minimise  k sum_i p_i + C sum_j q_j + sum_ij max(0, s_ij - p_i - q_j)

With q fixed, p_i minimises ``k p_i + sum_j max(0, s_ij - q_j - p_i)``, a convex piecewise-linear
function with slope ``k - #{j : s_ij - q_j > p_i}``: every p_i between the (k+1)-th and the k-th
largest ``s_ij - q_j`` is optimal. The same holds for q_j with p fixed. One BIP round is exact
block-coordinate descent on the dual::

    p_i = mid( k-th, (k+1)-th largest over j of (s_ij - q_j) )            (per token)
    q_j = max(0, mid( C-th, (C+1)-th largest over i of (s_ij - p_i) ))    (per expert; 0 if C >= n)
    q  <- q - min_j q_j                                                    (see below)

and each token then takes its top-k experts by ``s_ij - q_j`` (complementary slackness: x_ij = 1
where ``s_ij - q_j > p_i``).

Four choices go beyond the literal rules of the paper (their measurements are in the README's
BIP section and ``scripts/bench_bip_overhead.py``):

1. **p is not clamped at 0.** Routing gives every token exactly k experts, so the token constraint
   is an equality and its dual price is free; with the clamp, tokens whose scores fall below the
   prices look to the dual as if they took fewer than k experts, and the experts they still use
   overload.
2. **Prices are the midpoint of the optimal interval**, not its lower end, so that no price lies
   exactly on a score (top-k would break that tie either way, one token of overload per expert).
3. **q is shifted so that its minimum is 0.** Routing by ``s - q`` is unchanged by a uniform shift,
   and without it q drifts upwards from batch to batch.
4. **Under group-limited selection (DeepSeek), every other round prices experts by the demand of
   all tokens** (the choice scores without the group limit). The exact q-update counts only the
   tokens whose current groups contain expert j, so an expert in a group nobody picked gets
   ``q_j = 0``, the next round every token's groups switch to it, and the rounds oscillate. Rounds
   1, 3, ... use the demand scores; rounds 2, 4, ... are the exact update for the groups then
   chosen, so with even T the last round fits the assignment.

:func:`solve_duals` runs the T rounds from the layer's persistent q (warm start) and, while the
resulting assignment still overloads an expert by more than ``tolerance`` tokens, up to
``max_extra_iters`` further rounds (an early-exit loop; the first batch, from q = 0, is the one
that needs them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...core.ops import tokens_per_expert

#: ``selection(offset) -> (n, m) choice scores``; the default is ``scores + offset``. Families with
#: group-limited selection (DeepSeek) return -inf for experts outside a token's chosen groups.
Selection = Callable[[torch.Tensor], torch.Tensor]


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float = 1.0) -> int:
    """``C = ceil(capacity_factor * k * n / m)``: the most tokens one expert may take.

    Rounding up keeps the problem feasible (``m * C >= k * n``) for ``capacity_factor >= 1``.
    """
    if capacity_factor < 1.0:
        raise ValueError(
            f"capacity_factor={capacity_factor} < 1 is infeasible: {num_experts} experts with capacity "
            f"{capacity_factor} * k * n / m cannot take k={k} experts for every one of {num_tokens} tokens. "
            "Use capacity_factor >= 1 (1.0 = perfectly even loads)."
        )
    return math.ceil(capacity_factor * k * num_tokens / num_experts - 1e-9)


def check_finite(scores: torch.Tensor, where: str) -> None:
    """ValueError if routing scores contain NaN or inf (they would poison the persistent prices)."""
    if scores.numel() and not torch.isfinite(scores).all():
        raise ValueError(
            f"{where}: the router produced NaN/inf scores, so the balancing state cannot be updated. "
            "Check the model's weights and inputs (fp16 overflow? a diverged training step?)."
        )


def check_k(k: int, num_experts: int) -> None:
    """ValueError unless ``1 <= k <= num_experts``."""
    if not 1 <= k <= num_experts:
        raise ValueError(
            f"BIP needs 1 <= k <= number of experts, got k={k} with {num_experts} experts. "
            "Pick a top_k no larger than the number of routed experts."
        )


def _top_two(x: torch.Tensor, k: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-th and (k+1)-th largest entries of ``x`` along ``dim`` (k is 1-based), via ``torch.topk``."""
    values = x.topk(k + 1, dim=dim, sorted=True).values
    return values.select(dim, k - 1), values.select(dim, k)


def token_prices(reduced: torch.Tensor, k: int) -> torch.Tensor:
    """``p_i = (k-th + (k+1)-th largest over j of reduced_ij) / 2`` with ``reduced = s - q``.

    If a token has only k selectable experts (the rest -inf, or k = m), ``p_i = k-th - 1``: all of
    them are taken, with a margin (scores lie in [0, 1]).
    """
    n, m = reduced.shape
    if k >= m:
        return reduced.min(dim=1).values - 1.0
    kth, next_ = _top_two(reduced, k, dim=1)
    return torch.where(torch.isfinite(next_), (kth + next_) / 2, kth - 1.0)


def expert_prices(adjusted: torch.Tensor, capacity: int) -> torch.Tensor:
    """``q_j = max(0, (C-th + (C+1)-th largest over i of adjusted_ij) / 2)`` with ``adjusted = s - p``.

    0 where fewer than C + 1 tokens can use expert j (C >= n, or -inf entries), then shifted so
    that ``min_j q_j = 0``.
    """
    n, m = adjusted.shape
    if capacity >= n:
        return adjusted.new_zeros(m)
    kth, next_ = _top_two(adjusted, capacity, dim=0)
    q = ((kth + next_) / 2).nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    return q - q.min()


def bip_round(
    scores: torch.Tensor,
    q: torch.Tensor,
    k: int,
    capacity: int,
    selection: Selection | None = None,
    demand: Selection | None = None,
) -> torch.Tensor:
    """One block-coordinate round: the p-update for the given q, then the q-update. Returns the new q.

    ``selection(-q)`` gives the reduced scores ``s - q`` with the family's selection rules (e.g.
    DeepSeek's group limiting, -inf outside a token's groups); ``s_ij - p_i`` is then
    ``reduced_ij + q_j - p_i``, so excluded experts stay excluded in the q-update. With
    ``demand`` (the same scores without the group limit; change 4 of the module docstring) the
    q-update counts every token instead: ``q = expert_prices(demand(-q) + q - p)``.
    """
    reduced = scores - q if selection is None else selection(-q)
    p = token_prices(reduced, k).unsqueeze(1)
    if demand is None:
        return expert_prices(reduced + q - p, capacity)
    return expert_prices(demand(-q) + q - p, capacity)


def assign(scores: torch.Tensor, q: torch.Tensor, k: int, selection: Selection | None = None) -> torch.Tensor:
    """Each token's top-k experts by ``s_ij - q_j`` (with the family's selection rules): (n, k) indices."""
    reduced = scores - q if selection is None else selection(-q)
    return reduced.topk(k, dim=1).indices


@dataclass
class SolveResult:
    """What :func:`solve_duals` returns for one batch (``n`` tokens, ``m`` experts, ``k`` per token)."""

    q: torch.Tensor  # (m,) float32 expert prices
    index: torch.Tensor  # (n, k) assignment: top-k of s - q
    overload: int  # max_j load_j - C (<= 0: every expert within capacity)
    rounds: int  # rounds run: T plus the extra ones


def solve_duals(
    scores: torch.Tensor,
    q: torch.Tensor,
    k: int,
    capacity: int,
    num_iters: int,
    *,
    selection: Selection | None = None,
    demand: Selection | None = None,
    tolerance: int = 0,
    max_extra_iters: int = 0,
) -> SolveResult:
    """T rounds of :func:`bip_round` warm-started from ``q``, then extra rounds while overloaded.

    Args:
        scores: (n, m) float32 routing scores of the real tokens (finite, n >= 1).
        q: (m,) warm-start expert prices (the layer's persistent q).
        k: experts per token (1 <= k <= m); capacity: C from :func:`expert_capacity`.
        num_iters: T, rounds always run.
        selection: the family's selection rule (see :data:`Selection`); None = ``scores + offset``.
        demand: for group-limited selection, the choice scores without the group limit
            (``s + b + offset``); rounds 1, 3, 5, ... (1-based) price experts by them (change 4
            above). None = every round is the exact block update.
        tolerance: overload in tokens (``max_j load_j - C``) accepted without extra rounds.
        max_extra_iters: most rounds added while the overload exceeds ``tolerance``; the q with
            the smallest overload seen is returned.
    """
    n, m = scores.shape
    check_k(k, m)
    q = q.to(device=scores.device, dtype=torch.float32)
    for r in range(num_iters):
        q = bip_round(scores, q, k, capacity, selection, demand if r % 2 == 0 else None)
    index = assign(scores, q, k, selection)
    best = SolveResult(q, index, int(tokens_per_expert(index, m).max().item()) - capacity, num_iters)
    rounds = num_iters
    while best.overload > tolerance and rounds < num_iters + max_extra_iters:
        q = bip_round(scores, q, k, capacity, selection, demand if rounds % 2 == 0 else None)
        rounds += 1
        index = assign(scores, q, k, selection)
        overload = int(tokens_per_expert(index, m).max().item()) - capacity
        if overload < best.overload:
            best = SolveResult(q, index, overload, rounds)
        else:
            best.rounds = rounds
    return best
