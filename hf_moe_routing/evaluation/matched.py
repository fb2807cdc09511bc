"""Training-free dynamic-k baselines with per-layer budgets, evaluated at exactly a given compute.

A :class:`BudgetedBaseline` is a model patched with dynamic skipping or top-p whose thresholds are set from
*per-layer budgets* (mean routed experts per token in each MoE layer, measured on calibration tokens under the
model's Top-K). Three ways to set it:

* ``set_budgets({layer: k_l})``: any split of the experts across layers;
* :func:`greedy_layer_budgets`: the split searched on validation rows, by greedy marginal value per expert
  (from Top-K, repeatedly take ``step`` experts from the layer where that costs the least validation NLL);
* :func:`match_compute`: a scalar knob (a uniform budget, top-p's one ``p``, or a common shift of searched
  per-layer budgets) solved so that the mean routed experts *on the evaluation rows* equal a target, e.g. an
  Ada-K run's (false position with bisection safeguards; no reading off a chord between grid points).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..methods.dynamic_skip import DynamicSkipConfig, collect_ratios
from ..methods.dynamic_skip import calibrate_to_budget as skip_to_budget
from ..methods.kept_gain import KeptWeightGain, fit_gains
from ..methods.routing import weights_depend_on_chosen_set
from ..methods.top_p import TopPConfig, collect_probs, set_p
from ..methods.top_p import calibrate_to_budget as top_p_to_budget
from ..patching import describe, patch_model, routing_layers
from .paired import RowScores, row_scores

BASELINE_KINDS = ("dyn-skip", "top-p")


class BudgetedBaseline:
    """A copy of ``model`` patched with ``kind`` (``"dyn-skip"`` or ``"top-p"``), calibrated on ``calibration``.

    Weights follow the family's own rule over the kept experts (dynamic skipping renormalises exactly where
    the family's weights depend on the chosen set, e.g. Mixtral, and not on Qwen-MoE); top-p is capped at the
    model's top-k. ``token_classes`` (V,) int64 adds per-class scores to :meth:`score` (see
    :func:`~hf_moe_routing.evaluation.paired.row_scores`). Raises ValueError for an unknown ``kind``.
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        calibration: Any,
        *,
        batch_size: int = 8,
        token_classes: torch.Tensor | None = None,
    ) -> None:
        if kind not in BASELINE_KINDS:
            raise ValueError(f"Unknown baseline {kind!r}; choose one of {', '.join(BASELINE_KINDS)}.")
        self.kind, self.batch_size, self.token_classes = kind, batch_size, token_classes
        self.model = copy.deepcopy(model)
        spec = describe(self.model).blocks[0].spec
        self.top_k = spec.top_k
        if kind == "dyn-skip":
            patch_model(self.model, DynamicSkipConfig(renormalize=weights_depend_on_chosen_set(spec)))
            self.stats = collect_ratios(self.model, calibration, batch_size=batch_size)
        else:
            patch_model(self.model, TopPConfig(p=1.0, max_k=self.top_k))
            self.stats = collect_probs(self.model, calibration, batch_size=batch_size)
        self.layers = sorted(self.stats)
        self.budgets: dict[int, float] = {}
        self.gains: dict[int, KeptWeightGain] = {}

    def fit_weight_gains(self, rows: Any, **settings: Any) -> dict[str, float]:
        """Give every routing layer a learned gain per number of kept experts (the weight rule of
        ``AdaKConfig(weight_gain=True)``, :mod:`~hf_moe_routing.methods.kept_gain`) and fit the gains on ``rows``
        at the current thresholds (``settings`` as :func:`~hf_moe_routing.methods.kept_gain.fit_gains`): the
        baseline gets the same freedom as Ada-K. Every call fits from gains of 1 (a refit at another budget does
        not depend on the previous one); they stay in place for :meth:`score` and :func:`match_compute`."""
        for gain in self.gains.values():
            with torch.no_grad():
                gain.gain.fill_(1.0)
        if not self.gains:
            for index, layer in routing_layers(self.model).items():
                gain = self.gains[index] = KeptWeightGain(layer.output_slots, self.top_k)
                layer.register_forward_hook(
                    lambda module, args, output, gain=gain: gain(output, module.num_experts)
                )
        return fit_gains(self.model, [g.gain for g in self.gains.values()], rows, **settings)

    def set_budgets(self, budgets: dict[int, float] | float) -> dict[int, float]:
        """Thresholds so that layer l keeps ``budgets[l]`` experts per calibration token (clipped to [1, top_k])."""
        if isinstance(budgets, (int, float)):
            budgets = dict.fromkeys(self.layers, float(budgets))
        self.budgets = {i: min(float(self.top_k), max(1.0, float(budgets[i]))) for i in self.layers}
        to_budget = skip_to_budget if self.kind == "dyn-skip" else top_p_to_budget
        return to_budget(self.model, self.budgets, self.stats)

    def set_global_p(self, p: float) -> None:
        """Top-p only: one threshold ``p`` for every layer (the method as published)."""
        if self.kind != "top-p":
            raise ValueError("set_global_p is for the top-p baseline.")
        set_p(self.model, p)
        self.budgets = {}

    def score(self, rows: Any) -> RowScores:
        return row_scores(self.model, rows, batch_size=self.batch_size, token_classes=self.token_classes)


def greedy_layer_budgets(
    baseline: BudgetedBaseline, validation: Any, targets: list[float], *, step: float = 0.25
) -> dict[float, dict[str, Any]]:
    """Per-layer budgets for each mean budget in ``targets``, searched on ``validation`` rows.

    From every layer at top-k, each round tries taking ``step`` experts (less where a target or 1 comes first)
    from each layer and keeps the move with the lowest validation NLL; at each target (a mean over layers)
    the split is refined (the uniform split and moves of ``step / 2`` between layers are tried, kept if they
    lower the validation NLL) and recorded. Returns ``{target: {"budgets": {layer: k_l}, "validation_nll": nats, "path": [...]}}``.
    Cost: about ``len(layers) * (top_k - min(targets)) / step`` validation evaluations.
    """
    layers, top_k = baseline.layers, float(baseline.top_k)
    if not targets or not all(1.0 <= t <= top_k for t in targets):
        raise ValueError(f"targets={targets} must be mean budgets in [1, {top_k:g}].")
    budgets = dict.fromkeys(layers, top_k)
    path: list[dict[str, Any]] = []
    out: dict[float, dict[str, Any]] = {}
    pending = sorted(set(targets), reverse=True)
    while pending:
        mean = sum(budgets.values()) / len(layers)
        if mean <= pending[0] + 1e-9:
            target = pending.pop(0)
            out[target] = _refine(baseline, validation, dict(budgets), step / 2.0)
            out[target]["path"] = list(path)
            continue
        take = min(step, (mean - pending[0]) * len(layers))
        best = None
        for i in layers:
            if budgets[i] - take < 1.0 - 1e-9:
                continue
            trial = {**budgets, i: budgets[i] - take}
            baseline.set_budgets(trial)
            nll = float(baseline.score(validation).nll.sum())
            if best is None or nll < best[0]:
                best = (nll, i)
        if best is None:
            raise ValueError(
                f"No layer can give up {take:g} more experts: the targets are below 1 per layer."
            )
        budgets[best[1]] -= take
        path.append({"layer": best[1], "take": take, "validation_nll": best[0]})
    return out


def _refine(
    baseline: BudgetedBaseline, validation: Any, budgets: dict[int, float], move: float
) -> dict[str, Any]:
    """Greedy is myopic: at a target, also try the uniform split and moves of ``move`` experts between
    layers (same mean), keeping whatever lowers the validation NLL, until no move helps."""

    def nll_of(candidate: dict[int, float]) -> float:
        baseline.set_budgets(candidate)
        return float(baseline.score(validation).nll.sum())

    mean = sum(budgets.values()) / len(budgets)
    best_nll, best = min(
        (nll_of(budgets), 0, budgets), (nll_of(dict.fromkeys(budgets, mean)), 1, dict.fromkeys(budgets, mean))
    )[0::2]
    improved = True
    while improved:
        improved = False
        for a in budgets:
            for b in budgets:
                if a == b or best[a] - move < 1.0 - 1e-9 or best[b] + move > baseline.top_k + 1e-9:
                    continue
                trial = {**best, a: best[a] - move, b: best[b] + move}
                nll = nll_of(trial)
                if nll < best_nll:
                    best_nll, best, improved = nll, trial, True
    return {"budgets": best, "validation_nll": best_nll}


def solve_monotone(
    f: Callable[[float], float], lo: float, hi: float, target: float, *, tol: float, max_iter: int = 30
) -> tuple[float, float]:
    """``(x, f(x))`` with ``|f(x) - target| <= tol`` for a non-decreasing ``f`` on ``[lo, hi]``.

    Illinois false position (a bisection step whenever it stalls). If the target lies outside
    ``[f(lo), f(hi)]`` or ``max_iter`` runs out, returns the closest point evaluated.
    Raises ValueError if ``lo >= hi`` or ``tol <= 0``.
    """
    if not lo < hi or tol <= 0:
        raise ValueError(f"Need lo < hi and tol > 0, got lo={lo}, hi={hi}, tol={tol}.")
    f_lo, f_hi = f(lo), f(hi)
    seen = [(abs(f_lo - target), lo, f_lo), (abs(f_hi - target), hi, f_hi)]
    if not f_lo <= target <= f_hi:
        return min(seen)[1:]
    side = 0
    for it in range(max_iter):
        if min(seen)[0] <= tol:
            break
        if it % 3 == 2 or f_hi == f_lo:
            x = (lo + hi) / 2.0
        else:
            x = lo + (target - f_lo) * (hi - lo) / (f_hi - f_lo)
            x = min(max(x, lo + 1e-6 * (hi - lo)), hi - 1e-6 * (hi - lo))
        fx = f(x)
        seen.append((abs(fx - target), x, fx))
        if fx < target:
            lo, f_lo = x, fx
            if side == -1:
                f_hi = target + (f_hi - target) / 2.0
            side = -1
        else:
            hi, f_hi = x, fx
            if side == 1:
                f_lo = target - (target - f_lo) / 2.0
            side = 1
    return min(seen)[1:]


def match_compute(
    baseline: BudgetedBaseline,
    rows: Any,
    target: float,
    *,
    mode: str,
    budgets: dict[int, float] | None = None,
    tol: float = 1e-3,
) -> tuple[RowScores, dict[str, Any]]:
    """The baseline scored on ``rows`` at mean routed experts ``target`` (within ``tol``) measured on those rows.

    ``mode``: ``"uniform"`` (one budget for every layer; for dynamic skipping this is the paper's one-quantile
    calibration), ``"global-p"`` (top-p's single ``p``) or ``"per-layer"`` (``budgets`` shifted by one common
    amount, clipped to [1, top_k]). Returns the scores and ``{"knob", "mean_experts", "evaluations", ...}``.
    """
    top_k, cache = float(baseline.top_k), {}

    def apply(x: float) -> None:
        if mode == "uniform":
            baseline.set_budgets(x)
        elif mode == "global-p":
            baseline.set_global_p(x)
        elif mode == "per-layer":
            if budgets is None:
                raise ValueError("mode='per-layer' needs budgets.")
            baseline.set_budgets({i: b + x for i, b in budgets.items()})
        else:
            raise ValueError(f"Unknown mode {mode!r}; choose uniform, global-p or per-layer.")

    def mean(x: float) -> float:
        apply(x)
        cache[x] = baseline.score(rows)
        return cache[x].mean_experts

    lo, hi = {"uniform": (1.0, top_k), "global-p": (1e-6, 1.0), "per-layer": (-top_k, top_k)}[mode]
    x, achieved = solve_monotone(mean, lo, hi, target, tol=tol)
    apply(x)
    info = {
        "mode": mode,
        "knob": x,
        "mean_experts": achieved,
        "target": target,
        "evaluations": len(cache),
        "budgets": dict(baseline.budgets),
    }
    return cache[x], info
