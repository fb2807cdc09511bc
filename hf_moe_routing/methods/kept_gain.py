"""Kept-expert weight gains: a learned scale of the routing weights per layer and per number of kept experts.

A router that gives a token fewer experts than the model's top-k (Ada-K, dynamic skipping, top-p) drops the
mass of the experts it skips: under Qwen1.5-MoE's rule (no renormalisation) the kept weights sum to less than
before, under Mixtral's they are renormalised to 1. Neither is what the frozen model would want for that
token. Issue 19 makes the weight rule over the kept experts a measured choice; this is the learned one:

    c_t      = #{s : index[t, s] < m}                    kept experts of token t (1 .. S)
    g'_c     = 1 if c == top_k else g_c                  g: (S,) float32, one gain per count, init 1
    w'[t, s] = g'_{c_t} * w[t, s]                        every kept weight of the token, sentinel slots stay 0

so a token given the model's own top-k is routed bit-exactly as before (its gain is fixed at 1), and only the
layers' S - 1 other gains are fitted, by gradient descent on the language-model loss with the model frozen
(:func:`fit_gains`). It is a weight rule, not a new expert choice: it never changes which experts run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..core.batching import iter_batches, model_device
from ..families import RouterOutput


class KeptWeightGain(nn.Module):
    """Gains ``g`` (slots,) float32 of one MoE layer, indexed by the number of kept experts (see module docs).

    Args:
        slots: the most experts a token may keep (the routing layer's output slots, >= 1).
        top_k: the model's top-k; a token that keeps exactly ``top_k`` experts keeps gain 1 whatever ``g`` holds.

    The gain is a frozen parameter (``requires_grad=False``) until :func:`fit_gains` trains it. Raises
    ValueError for ``slots < 1`` or ``top_k < 1``. Where ``top_k > slots`` no token keeps top-k experts and
    every gain is fitted.
    """

    def __init__(self, slots: int, top_k: int) -> None:
        super().__init__()
        if slots < 1 or top_k < 1:
            raise ValueError(f"KeptWeightGain needs slots >= 1 and top_k >= 1, got {slots} and {top_k}.")
        self.top_k = int(top_k)
        self.gain = nn.Parameter(torch.ones(slots, dtype=torch.float32), requires_grad=False)

    def effective(self) -> torch.Tensor:
        """``g'`` (slots,): ``g`` with the entry of ``top_k`` kept experts fixed at 1."""
        counts = torch.arange(1, self.gain.numel() + 1, device=self.gain.device)
        return torch.where(counts == self.top_k, torch.ones_like(self.gain), self.gain)

    def forward(self, output: RouterOutput, num_experts: int) -> RouterOutput:
        """``output`` with every token's weights (n, S) times the gain of its kept-expert count."""
        kept = (output.index < num_experts).sum(dim=-1).clamp(1, self.gain.numel())  # (n,) 1..S
        scale = self.effective().to(kept.device)[kept - 1].unsqueeze(-1)  # (n, 1)
        return output._replace(weights=output.weights * scale.to(output.weights.dtype))

    def extra_repr(self) -> str:
        return f"slots={self.gain.numel()}, top_k={self.top_k}"


def kept_gains(model: nn.Module) -> list[nn.Parameter]:
    """The gain parameters of every routing layer of ``model`` that has a :class:`KeptWeightGain` (layer order).

    Raises ValueError if there is none (patch with a routing that keeps them, e.g. ``AdaKConfig(weight_gain=True)``).
    """
    found = [m.gain for m in model.modules() if isinstance(m, KeptWeightGain)]
    if not found:
        raise ValueError(
            "This model's routing layers have no kept-expert weight gains: patch it with a routing config that "
            "keeps them, e.g. AdaKConfig(weight_gain=True)."
        )
    return found


def fit_gains(
    model: nn.Module,
    gains: Iterable[nn.Parameter],
    rows: Any,
    *,
    max_steps: int = 100,
    batch_size: int = 8,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> dict[str, float]:
    """Fit ``gains`` (and nothing else) by Adam on ``model``'s language-model loss over ``rows``; in place.

    Args:
        model: a patched causal LM; it routes in eval mode during the fit (its inference decisions, greedy by
            default; with ``decision="sample"`` the draws follow torch's global seed, not ``seed``).
        gains: the parameters to fit, e.g. :func:`kept_gains` (model) or gains a caller attached with hooks.
        rows: packed training rows (``datasets.Dataset`` with ``input_ids`` / ``attention_mask`` / ``labels``,
            a (N, T) tensor of token ids, a dict of columns or a list of rows), drawn in a seeded random order, ``batch_size`` per step, cycling.
        max_steps: optimiser steps (>= 1); learning_rate: Adam's step size (> 0); seed: the row order.

    Returns ``{"loss_first": nats, "loss_last": nats (mean of the last 10 steps), "steps": max_steps}``.
    The base model gets no gradient (``torch.autograd.grad`` w.r.t. ``gains`` only) and is left unchanged.
    Batches of padding only are skipped. Raises ValueError for bad settings, no gains, empty rows or a
    non-finite loss.
    """
    params = list(gains)
    if not params:
        raise ValueError("fit_gains got no gain parameters to fit.")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}.")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}.")
    if isinstance(rows, dict):  # a dict of columns: one list of rows
        rows = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
    num_rows = len(rows)
    if num_rows == 0:
        raise ValueError("fit_gains got no rows: pass packed training rows.")
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    was_training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    losses: list[float] = []
    try:
        while len(losses) < max_steps:
            order = torch.randperm(num_rows, generator=generator).tolist()
            epoch = _reorder(rows, order)
            for batch in iter_batches(epoch, batch_size, device):
                if not bool((batch["labels"] != -100).any()):  # only padding: no loss to fit
                    continue
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise ValueError(f"fit_gains: the loss is {loss.item()} at step {len(losses)}.")
                grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if len(losses) == max_steps:
                    break
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        model.train(was_training)
    return {"loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]), "steps": max_steps}


def _reorder(rows: Any, order: list[int]) -> Any:
    if isinstance(rows, torch.Tensor):
        return rows[order]
    if hasattr(rows, "select"):  # datasets.Dataset
        return rows.select(order)
    return [rows[i] for i in order]


def fit_kept_weight_gains(model: nn.Module, rows: Any, **settings: Any) -> dict[str, float]:
    """Fit the kept-expert weight gains of every routing layer of ``model`` on ``rows`` (see :func:`fit_gains`
    for ``settings`` and what is returned). Raises ValueError where the model has none (:func:`kept_gains`)."""
    return fit_gains(model, kept_gains(model), rows, **settings)


__all__ = ["KeptWeightGain", "fit_gains", "fit_kept_weight_gains", "kept_gains"]
