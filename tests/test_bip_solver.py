"""BIP's dual solver against the exact optimum (scipy HiGHS), over streams of batches, and on bad input."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from hf_moe_routing.core.ops import max_vio, tokens_per_expert
from hf_moe_routing.families.kinds import limit_to_groups
from hf_moe_routing.methods.bip.solver import (
    assign,
    bip_round,
    expert_capacity,
    expert_prices,
    solve_duals,
    token_prices,
)


def skewed_scores(n: int, m: int, seed: int, skew: float = 3.0) -> torch.Tensor:
    """Softmax scores whose experts differ in popularity (plain top-k is badly unbalanced)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, m, generator=g) * 1.5 + torch.linspace(0, skew, m)[torch.randperm(m, generator=g)]
    return logits.softmax(-1)


def exact_optimum(scores: torch.Tensor, k: int, capacity: int) -> float:
    """max sum s x  s.t. each token exactly k experts, each expert <= C tokens, x binary (HiGHS)."""
    n, m = scores.shape
    tokens = sp.kron(sp.identity(n), np.ones((1, m)))
    experts = sp.kron(np.ones((1, n)), sp.identity(m))
    constraints = LinearConstraint(
        sp.vstack([tokens, experts]).tocsr(),
        np.concatenate([np.full(n, k), np.full(m, -np.inf)]),
        np.concatenate([np.full(n, k), np.full(m, capacity)]),
    )
    result = milp(
        -scores.double().flatten().numpy(),
        constraints=constraints,
        integrality=np.ones(n * m),
        bounds=Bounds(0, 1),
    )
    assert result.success, result.message
    return -result.fun


@pytest.mark.parametrize(
    ("n", "m", "k"), [(300, 8, 1), (240, 8, 2), (300, 16, 2), (200, 16, 6), (200, 64, 1), (256, 64, 6)]
)
def test_bip_reaches_the_lp_optimum_within_one_token_of_capacity(n, m, k):
    scores = skewed_scores(n, m, seed=n + m + k)
    capacity = expert_capacity(n, m, k)
    optimum = exact_optimum(scores, k, capacity)

    result = solve_duals(scores, torch.zeros(m), k, capacity, num_iters=4, tolerance=1, max_extra_iters=64)
    objective = scores.gather(1, result.index).sum().item()
    overload = int(tokens_per_expert(result.index, m).max()) - capacity

    assert result.index.shape == (n, k) and (result.index.sort(1).values.diff(dim=1) > 0).all()  # k distinct
    assert objective >= 0.98 * optimum
    assert overload <= 1
    # the same instance is badly unbalanced under plain top-k
    assert int(tokens_per_expert(scores.topk(k, 1).indices, m).max()) - capacity > max(2, capacity // 5)


def test_stream_of_batches_stays_balanced_with_warm_started_q():
    """q persists across batches; every batch of a stream must be balanced, not only the first."""
    n, m, k = 512, 16, 2
    capacity = expert_capacity(n, m, k)
    q = torch.zeros(m)
    vios, topk_vios = [], []
    for step in range(30):
        scores = (
            skewed_scores(n, m, seed=1000 + step, skew=2.0)
            if step < 15
            else skewed_scores(n, m, 7 + step, 4.0)
        )
        result = solve_duals(
            scores, q, k, capacity, num_iters=4, tolerance=max(1, capacity // 20), max_extra_iters=16
        )
        q = result.q
        vios.append(max_vio(tokens_per_expert(result.index, m)))
        topk_vios.append(max_vio(tokens_per_expert(scores.topk(k, 1).indices, m)))
        assert float(q.min()) == 0.0 and float(q.max()) < 2.0  # normalised, no drift
    assert max(vios) <= 0.1  # including step 15, where the score distribution changes
    assert sum(vios) / len(vios) < 0.06 < 0.5 < min(topk_vios)


def test_warm_start_needs_fewer_rounds_than_cold():
    n, m, k = 400, 16, 2
    capacity = expert_capacity(n, m, k)
    first = solve_duals(
        skewed_scores(n, m, 1), torch.zeros(m), k, capacity, 2, tolerance=1, max_extra_iters=64
    )
    warm = solve_duals(skewed_scores(n, m, 2), first.q, k, capacity, 2, tolerance=1, max_extra_iters=64)
    cold = solve_duals(
        skewed_scores(n, m, 2), torch.zeros(m), k, capacity, 2, tolerance=1, max_extra_iters=64
    )
    assert warm.overload <= 1 and cold.overload <= 1
    assert warm.rounds < cold.rounds


def test_rounds_are_block_minimisers_of_the_dual():
    """p and q each minimise the dual objective with the other block fixed (checked by perturbation)."""
    scores, k = skewed_scores(60, 8, 3), 2
    capacity = expert_capacity(60, 8, k, capacity_factor=1.25)  # slack: some q_j = 0, no shift

    def dual(p, q):
        return k * p.sum() + capacity * q.sum() + (scores - p[:, None] - q[None]).clamp_min(0).sum()

    p0 = token_prices(scores, k)
    q = expert_prices(scores - p0[:, None], capacity)
    p = token_prices(scores - q, k)
    assert float(q.min()) == 0.0
    for eps in (1e-3, -1e-3):
        assert dual(p + eps, q) >= dual(p, q) - 1e-5
        assert dual(p0, q + eps * (q > 1e-3)) >= dual(p0, q) - 1e-5  # q_j at its bound 0 may only rise
        assert dual(p0, q + abs(eps)) >= dual(p0, q) - 1e-5
    # complementary slackness: each token's chosen experts are exactly those above its price
    chosen = (scores - q - p[:, None]) > 0
    assert (chosen.sum(1) == k).all()
    assert torch.equal(chosen, torch.zeros_like(chosen).scatter_(1, assign(scores, q, k), True))


def test_group_limited_selection_keeps_experts_outside_groups_excluded():
    n, m, k = 256, 16, 4
    scores = skewed_scores(n, m, 4).sigmoid()

    def selection(offset):
        return limit_to_groups(scores + offset, 4, 2, "top2")

    capacity = expert_capacity(n, m, k)
    result = solve_duals(
        scores, torch.zeros(m), k, capacity, 4, selection=selection, tolerance=1, max_extra_iters=32
    )
    allowed = torch.isfinite(selection(-result.q))
    assert allowed.gather(1, result.index).all()
    plain = limit_to_groups(scores, 4, 2, "top2").topk(k, 1).indices
    assert max_vio(tokens_per_expert(result.index, m)) < 0.5 * max_vio(tokens_per_expert(plain, m))


def test_group_limited_stream_of_collapsing_routers_stays_balanced_with_demand_rounds():
    """DeepSeek-V3 shape (64 experts, 8 groups, 4 kept, top-6), sigmoid scores of a router whose
    experts' popularity drifts apart batch by batch: all tokens rank experts alike, so they all
    keep the same groups. Exact rounds alone oscillate between groups; demand rounds keep balance."""
    n, m, k = 512, 64, 6
    capacity = expert_capacity(n, m, k)
    g = torch.Generator().manual_seed(0)
    means, drift = torch.randn(m, generator=g) * 0.3, torch.randn(m, generator=g) * 0.05
    stream = [
        (
            means + step * drift + 0.1 * torch.randn(n, m, generator=torch.Generator().manual_seed(step))
        ).sigmoid()
        for step in range(20)
    ]

    def run(with_demand: bool) -> list[float]:
        q, vios = torch.zeros(m), []
        for scores in stream:
            result = solve_duals(
                scores,
                q,
                k,
                capacity,
                4,
                selection=lambda offset, s=scores: limit_to_groups(s + offset, 8, 4, "top2"),
                demand=(lambda offset, s=scores: s + offset) if with_demand else None,
                tolerance=max(1, capacity // 20),
                max_extra_iters=16,
            )
            q = result.q
            vios.append(max_vio(tokens_per_expert(result.index, m)))
        return vios[1:]

    topk = limit_to_groups(stream[-1], 8, 4, "top2").topk(k, 1).indices
    assert max_vio(tokens_per_expert(topk, m)) > 3  # collapsed: plain top-k is badly unbalanced
    ours, exact_only = run(True), run(False)
    assert sum(ours) / len(ours) < 0.16 and max(ours) < 0.25
    assert sum(exact_only) / len(exact_only) > 1.3 * sum(ours) / len(ours)


def test_capacity_rounding_and_infeasible_capacity():
    assert expert_capacity(100, 8, 2) == 25
    assert expert_capacity(101, 8, 2) == 26  # rounded up: m * C >= k * n
    assert expert_capacity(100, 8, 2, capacity_factor=1.2) == 30
    with pytest.raises(ValueError, match="infeasible"):
        expert_capacity(100, 8, 2, capacity_factor=0.9)


def test_k_larger_than_experts_is_refused():
    with pytest.raises(ValueError, match="1 <= k <= number of experts"):
        solve_duals(torch.rand(10, 4), torch.zeros(4), 5, 13, 2)


def test_k_equal_to_experts_and_capacity_above_batch():
    scores = torch.rand(5, 4)
    result = solve_duals(scores, torch.zeros(4), 4, expert_capacity(5, 4, 4), 2)
    assert result.overload == 0 and torch.equal(result.q, torch.zeros(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    scores = skewed_scores(300, 16, 5)
    capacity = expert_capacity(300, 16, 2)
    cpu = solve_duals(scores, torch.zeros(16), 2, capacity, 4)
    gpu = solve_duals(scores.cuda(), torch.zeros(16, device="cuda"), 2, capacity, 4)
    torch.testing.assert_close(gpu.q.cpu(), cpu.q, atol=1e-5, rtol=0)


# ---- one round by hand, and the price shift ------------------------------------------------------
def _mid_of_ranks(values: torch.Tensor, rank: int) -> torch.Tensor:
    """Per row: the midpoint of the ``rank``-th and ``rank + 1``-th largest entries (1-based), by sorting."""
    ordered = values.sort(dim=1, descending=True).values
    return (ordered[:, rank - 1] + ordered[:, rank]) / 2


def _one_round_by_hand(scores, q, k, capacity, selection, demand):
    """One BIP round written from the paper's rules (not the solver's helpers): token prices from the
    selection scores s - q, expert prices from the demand scores (every token) minus p, clamped at 0,
    shifted so the smallest is 0."""
    reduced = selection(-q)
    p = _mid_of_ranks(reduced, k)
    wanted = (demand(-q) + q) - p[:, None]  # s_ij - p_i over every token
    raw = _mid_of_ranks(wanted.T, capacity).clamp_min(0.0)
    return raw - raw.min()


@pytest.mark.parametrize("groups", [False, True], ids=["plain", "group-limited"])
def test_one_round_of_the_solve_is_one_bip_round_by_hand(groups):
    """With T = 1 and no extra rounds, the solve is exactly one BIP round: for group-limited selection,
    the round that prices experts by the demand of every token (rounds 1, 3, ... use the demand scores)."""
    n, m, k = 40, 8, 2
    scores = skewed_scores(n, m, seed=3)
    q0 = torch.rand(m, generator=torch.Generator().manual_seed(4)) * 0.05
    capacity = expert_capacity(n, m, k)
    if groups:
        selection = lambda offset: limit_to_groups(scores + offset, 4, 2, "top2")  # noqa: E731
    else:
        selection = lambda offset: scores + offset  # noqa: E731
    demand = lambda offset: scores + offset  # noqa: E731
    expected = _one_round_by_hand(scores, q0, k, capacity, selection, demand)
    result = solve_duals(
        scores, q0, k, capacity, 1, selection=selection, demand=demand if groups else None, max_extra_iters=0
    )
    torch.testing.assert_close(result.q, expected, rtol=0, atol=1e-6)
    assert result.rounds == 1
    assert torch.equal(result.index, selection(-result.q).topk(k, dim=1).indices)
    if groups:  # the exact (group-counting) update differs here, so the test sees which one ran
        exact = _one_round_by_hand(scores, q0, k, capacity, selection, selection)
        assert (exact - expected).abs().max() > 1e-3
    # and with T = 2 the second round is the exact update for the groups then chosen
    two = solve_duals(
        scores, q0, k, capacity, 2, selection=selection, demand=demand if groups else None, max_extra_iters=0
    )
    by_hand = _one_round_by_hand(scores, expected, k, capacity, selection, selection)
    torch.testing.assert_close(two.q, by_hand, rtol=0, atol=1e-6)


def test_prices_are_shifted_so_the_smallest_is_exactly_zero_when_every_expert_is_over_demanded():
    """Every expert wanted by more than C tokens (each column's C-th and (C+1)-th values positive):
    every clamped price is positive, and the shift brings the smallest to exactly 0, the rest by as much."""
    n, m, capacity = 12, 4, 3
    g = torch.Generator().manual_seed(0)
    adjusted = 0.1 + torch.rand(n, m, generator=g)  # every token wants every expert: all over-demanded
    raw = _mid_of_ranks(adjusted.T, capacity)
    assert (raw > 0.1).all()
    q = expert_prices(adjusted, capacity)
    assert q.min().item() == 0.0
    torch.testing.assert_close(q, raw - raw.min(), rtol=0, atol=1e-7)


def test_a_demand_round_that_over_demands_every_expert_still_leaves_a_zero_price():
    """Under group-limited selection, the demand round prices experts by every token's wish: a token's
    price comes from its few allowed experts, so experts outside its groups look over-demanded. Here every
    expert is (each clamped price positive), and the shift still brings the smallest price to exactly 0."""
    n, m, k = 32, 8, 2
    scores = (torch.randn(n, m, generator=torch.Generator().manual_seed(69)) * 2).softmax(-1)
    capacity = expert_capacity(n, m, k)
    selection = lambda offset: limit_to_groups(scores + offset, 4, 2, "top2")  # noqa: E731
    demand = lambda offset: scores + offset  # noqa: E731
    q = torch.zeros(m)
    p = token_prices(selection(-q), k)
    raw = _mid_of_ranks((demand(-q) - p[:, None]).T, capacity)
    assert (raw > 0).all()  # over-demanded everywhere: the clamp alone leaves no price at 0
    new = bip_round(scores, q, k, capacity, selection, demand)
    assert new.min().item() == 0.0
    torch.testing.assert_close(new, raw - raw.min(), rtol=0, atol=1e-7)
    for _ in range(5):  # a stream of the same batch: prices do not drift upwards
        new = solve_duals(scores, new, k, capacity, 1, selection=selection, demand=demand).q
        assert new.min().item() == 0.0
