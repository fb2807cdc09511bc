"""Pure helpers of routing replay: prefix hashes of token ids, and which tokens' experts changed.

A recorded row stores, for its t-th real token, a hash of the row's real token ids ``0..t``
(a prefix hash). Replay recomputes the hash of the batch row's real tokens and compares it at
the last recorded position it uses, so a batch in another order, with other tokens, or with
padding counted as real tokens is refused, also when the training forward covers only a prefix
of the recorded row (tokens after EOS masked out)::

    h_t = (h_{t-1} * B1 + id_t + 1) mod P1      g_t = (g_{t-1} * B2 + id_t + 1) mod P2
    hash_t = h_t * 2**31 + g_t                  (int64; P1, P2 primes below 2**31)

Two independent 31-bit polynomial hashes: two different rows collide with probability ~2**-60.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_P1, _B1 = 2147483647, 1000003
_P2, _B2 = 2147483629, 999983
_SHIFT = 31


def prefix_hashes(token_ids: Sequence[int], state: int = 0) -> list[int]:
    """The prefix hash after each of ``token_ids`` (ints), continuing from ``state`` (0 = empty prefix).

    Returns a list of ``len(token_ids)`` non-negative ints below 2**62 (they fit int64).
    """
    h, g = state >> _SHIFT, state & ((1 << _SHIFT) - 1)
    out = []
    for token in token_ids:
        token = int(token) + 1
        h = (h * _B1 + token) % _P1
        g = (g * _B2 + token) % _P2
        out.append((h << _SHIFT) | g)
    return out


def expert_sets_differ(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(n,) bool: whether token i uses another set of experts in ``a`` (n, S) than in ``b`` (n, S').

    Slot order does not matter; sentinel slots (index >= ``num_experts``) are ignored.
    """
    n = a.shape[0]
    sets = []
    for index in (a, b):
        onehot = torch.zeros(n, num_experts + 1, dtype=torch.bool, device=a.device)
        onehot.scatter_(1, index.to(a.device, torch.long).clamp(0, num_experts), True)
        sets.append(onehot[:, :num_experts])
    return (sets[0] != sets[1]).any(dim=1)


def duplicate_slots(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(n,) bool: tokens whose (n, S) ``index`` names one expert twice (sentinels excepted)."""
    if index.shape[-1] < 2:
        return torch.zeros(index.shape[0], dtype=torch.bool, device=index.device)
    ordered = index.sort(dim=-1).values
    same = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] < num_experts)
    return same.any(dim=-1)
