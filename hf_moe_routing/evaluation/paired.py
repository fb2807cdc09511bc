"""Per-row scores and paired bootstrap confidence intervals, for comparisons "A is better than B".

Every method is scored on the *same* rows; a comparison resamples rows (with replacement) and recomputes the
statistic from the resampled rows of *both* methods, so the row-to-row variance that both share cancels. The
interval is the percentile bootstrap's.

Perplexity is token-weighted, so per-row contributions are summed, not averaged::

    ppl change of A vs R  =  exp( (sum_i nll_A[i] - sum_i nll_R[i]) / sum_i tokens[i] ) - 1

with ``nll_X[i]`` the summed next-token NLL of row i under method X and ``tokens[i]`` its predicted tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.batching import IGNORE_INDEX, iter_batches, model_device
from ..patching import describe
from .evaluate import hook_expert_counts, token_nll


@dataclasses.dataclass
class RowScores:
    """Per-row results of one routing on a fixed list of rows.

    ``nll`` (R,) float64: summed next-token NLL of each row (nats); ``tokens`` (R,) int64: predicted tokens;
    ``experts`` (R, L) float64: routed experts summed over each row's real tokens, per MoE layer;
    ``real_tokens`` (R,) int64: non-padding tokens of each row. With ``token_classes`` given to
    :func:`row_scores`, per row and class of the *predicted* token (C classes): ``class_nll`` (R, C) float64
    summed NLL, ``class_tokens`` (R, C) int64 predicted tokens and ``class_correct`` (R, C) int64 tokens
    whose argmax prediction is right; else None.
    """

    nll: np.ndarray
    tokens: np.ndarray
    experts: np.ndarray
    real_tokens: np.ndarray
    class_nll: np.ndarray | None = None
    class_tokens: np.ndarray | None = None
    class_correct: np.ndarray | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.sum() / self.tokens.sum())

    @property
    def mean_experts(self) -> float:
        """Mean routed experts per real token over the MoE layers."""
        return float(self.experts.sum() / (self.real_tokens.sum() * self.experts.shape[1]))

    @property
    def experts_per_layer(self) -> list[float]:
        return (self.experts.sum(axis=0) / self.real_tokens.sum()).tolist()


def row_scores(
    model: nn.Module, rows: Any, *, batch_size: int = 8, token_classes: torch.Tensor | None = None
) -> RowScores:
    """Score ``model`` (patched or not) on every row of ``rows`` (a packed dataset; order kept).

    Counts a routed expert as a non-sentinel slot of the router's output, on real (attention-mask) tokens;
    a shared expert is not counted. ``token_classes`` (V,) int64, the class index of every token id (e.g.
    :func:`hf_moe_routing.evaluation.token_classes.vocab_classes`), adds per-class NLL, token counts and
    next-token accuracy. Raises FloatingPointError if a row's NLL is not finite; TypeError / ValueError for
    ``token_classes`` that is not a 1-D tensor of non-negative integers, or that has no entry for a predicted
    token id (e.g. classes of ``len(tokenizer)`` ids and data made with another tokenizer).
    """
    if token_classes is not None:
        _check_token_classes(token_classes)
    blocks = describe(model).blocks
    current: dict[int, torch.Tensor] = {}
    handles = hook_expert_counts(blocks, current)
    nll, tokens, experts, real = [], [], [], []
    by_class: list[torch.Tensor] = []  # per batch (B, 3, C): nll, tokens, correct
    try:
        with torch.no_grad():
            for batch in iter_batches(rows, batch_size, model_device(model), progress=False):
                current.clear()
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                mask = batch["attention_mask"].cpu()
                for r in range(len(mask)):
                    row_nll, count = token_nll(out.logits[r : r + 1], batch["labels"][r : r + 1])
                    nll.append(row_nll)
                    tokens.append(count)
                real.extend(mask.sum(dim=1).tolist())
                per_layer = [
                    (current[b.layer_index].reshape(mask.shape) * mask).sum(dim=1).double() for b in blocks
                ]
                experts.append(torch.stack(per_layer, dim=1).numpy())
                if token_classes is not None:
                    by_class.append(_class_sums(out.logits, batch["labels"], token_classes))
    finally:
        for handle in handles:
            handle.remove()
    scores = RowScores(
        nll=np.asarray(nll, dtype=np.float64),
        tokens=np.asarray(tokens, dtype=np.int64),
        experts=np.concatenate(experts),
        real_tokens=np.asarray(real, dtype=np.int64),
    )
    if token_classes is not None:
        sums = torch.cat(by_class).numpy()
        scores.class_nll = sums[:, 0]
        scores.class_tokens = sums[:, 1].round().astype(np.int64)
        scores.class_correct = sums[:, 2].round().astype(np.int64)
    if not np.isfinite(scores.nll).all():
        raise FloatingPointError("A row's NLL is not finite: the model produced NaN or infinite logits.")
    return scores


def _check_token_classes(token_classes: Any) -> None:
    if (
        not isinstance(token_classes, torch.Tensor)
        or token_classes.ndim != 1
        or token_classes.dtype.is_floating_point
        or token_classes.dtype.is_complex
        or token_classes.dtype == torch.bool
    ):
        what = (
            f"a {token_classes.ndim}-D {token_classes.dtype} tensor"
            if isinstance(token_classes, torch.Tensor)
            else type(token_classes).__name__
        )
        raise TypeError(
            f"token_classes must be a 1-D integer tensor (the class index of every token id, e.g. "
            f"hf_moe_routing.evaluation.token_classes.vocab_classes(tokenizer)), got {what}."
        )
    if token_classes.numel() == 0 or int(token_classes.min()) < 0:
        raise ValueError("token_classes must give every token id a class index >= 0.")


def _class_sums(logits: torch.Tensor, labels: torch.Tensor, token_classes: torch.Tensor) -> torch.Tensor:
    """(B, 3, C) float64: per row and class of the predicted token, summed NLL, tokens and right argmaxes."""
    logits = logits[:, :-1].float()  # (B, T-1, V) predict labels[:, 1:]
    target = labels[:, 1:].to(logits.device)
    keep = target != IGNORE_INDEX
    safe = target.clamp(min=0)
    if keep.any() and int(target[keep].max()) >= len(token_classes):
        raise ValueError(
            f"Token id {int(target[keep].max())} has no class: token_classes covers ids 0..{len(token_classes) - 1}. "
            "Make the classes with the tokenizer that made the data (vocab_classes covers len(tokenizer) ids)."
        )
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), safe, reduction="none")  # (B, T-1)
    correct = logits.argmax(dim=-1) == safe
    classes = token_classes.to(device=safe.device, dtype=torch.long)[safe]  # (B, T-1)
    num_classes = int(token_classes.max()) + 1
    out = torch.zeros(target.shape[0], 3, num_classes, dtype=torch.float64, device=logits.device)
    for i, values in enumerate((nll, torch.ones_like(nll), correct)):
        out[:, i].scatter_add_(1, classes, (values.double() * keep))
    return out.cpu()


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray],
    n_rows: int,
    *,
    n_resamples: int = 4000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the statistic on all rows and its percentile-bootstrap interval.

    ``statistic`` maps row weights ``(B, n_rows)`` (how often each row is drawn; all ones for the estimate)
    to ``(B,)`` values, so any sum-based statistic is one matrix product. Rows are resampled with
    replacement, ``n_resamples`` times, from a generator seeded by ``seed``.

    Raises ValueError for fewer than 2 rows or a confidence outside (0, 1).
    """
    if n_rows < 2:
        raise ValueError(f"A bootstrap needs at least 2 rows, got {n_rows}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1), e.g. 0.95.")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_rows, size=(n_resamples, n_rows))
    weights = np.zeros((n_resamples, n_rows))
    np.add.at(weights, (np.repeat(np.arange(n_resamples), n_rows), draws.reshape(-1)), 1.0)
    values = statistic(weights)
    estimate = float(statistic(np.ones((1, n_rows)))[0])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return estimate, float(low), float(high)


def paired_mean_difference_ci(x: np.ndarray, y: np.ndarray, **kwargs: Any) -> tuple[float, float, float]:
    """Mean of the per-row differences ``x - y`` with its paired bootstrap interval (see :func:`bootstrap_ci`)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"Paired values need the same 1-D shape, got {x.shape} and {y.shape}.")
    diff = x - y
    return bootstrap_ci(lambda w: w @ diff / w.sum(axis=1), len(diff), **kwargs)


def ppl_change_ci(nll: np.ndarray, ref_nll: np.ndarray, tokens: np.ndarray, **kwargs: Any):
    """Perplexity change of a method vs a reference on the same rows (a fraction), with its paired interval."""
    diff, tokens = np.asarray(nll) - np.asarray(ref_nll), np.asarray(tokens, dtype=np.float64)
    return bootstrap_ci(lambda w: np.expm1(w @ diff / (w @ tokens)), len(diff), **kwargs)


def ppl_margin_ci(
    nll_a: np.ndarray, nll_b: np.ndarray, ref_nll: np.ndarray, tokens: np.ndarray, **kwargs: Any
) -> tuple[float, float, float]:
    """``change(B) - change(A)`` of perplexity vs the reference (a fraction; > 0: A is better), paired.

    All three are resampled together, row by row: the margin by which A beats B in percentage points of the
    reference's perplexity is ``100 *`` this.
    """
    da = np.asarray(nll_a) - np.asarray(ref_nll)
    db = np.asarray(nll_b) - np.asarray(ref_nll)
    tokens = np.asarray(tokens, dtype=np.float64)

    def margin(w: np.ndarray) -> np.ndarray:
        n = w @ tokens
        return np.expm1(w @ db / n) - np.expm1(w @ da / n)

    return bootstrap_ci(margin, len(da), **kwargs)
