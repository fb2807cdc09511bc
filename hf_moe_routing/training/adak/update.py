"""The allocator updates: PPO (clipped surrogate + expected-k penalty + entropy), the warm-start
cross-entropy, gradient synchronisation and the dual ascent on lambda.

Every loss is a sum over the valid (token, sample) pairs of this process divided by their count over
*all* processes (``n_global``), averaged over layers and micro-batches; gradients are then summed
over processes. With one process this is the per-layer token mean; with W processes it equals one
process on the union of their batches (exactly, up to float rounding), whatever the split.

    loss = (1/L) sum_l sum_i [ -min(r A, clip(r, 1 +- eps) A) + lambda E[k] - beta H ]_il / n_global
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ...methods.adak import AdaKLayer
from ...methods.adak.ppo import action_log_probs, clipped_surrogate, entropy, expected_k
from ...methods.adak.warmup import warmup_loss
from .rollout import Experience


class AllocatorBank(nn.Module):
    """The allocators of a patched model as one module (what the optimiser sees)."""

    def __init__(self, layers: dict[int, AdaKLayer]) -> None:
        super().__init__()
        self.layer_indices = list(layers)
        self.allocators = nn.ModuleList(layer.allocator for layer in layers.values())

    def forward(self, states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Allocator logits per layer (n_l, k_max) for states per layer (n_l, in_features)."""
        return [allocator(s) for allocator, s in zip(self.allocators, states)]


def _layer_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask.to(values.dtype)).sum()


def ppo_loss(
    bank: AllocatorBank,
    experience: Experience,
    *,
    n_global: float,
    clip_epsilon: float,
    k_penalty: float | Sequence[float],
    entropy_coef: float,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The PPO loss of one micro-batch (see the module docstring) and its statistics.

    ``k_penalty``: lambda, one for every layer or one per layer (in the bank's layer order).

    Statistics (this process, token means): ``policy_loss``, ``k_penalty_loss``, ``entropy_loss``,
    ``clip_fraction`` (share of entries with ``|r - 1| > eps``), ``approx_kl`` (``mean(log pi_old -
    log pi_new)``) and ``expected_k``.
    """
    logits = bank(experience.states)
    n = max(float(n_global), 1.0)
    terms = {"policy": [], "penalty": [], "entropy": []}
    clipped, kl, exp_k, local = [], [], [], []
    for lg, actions, old, adv, mask in zip(
        logits, experience.actions, experience.old_log_probs, experience.advantages, experience.mask
    ):
        new = action_log_probs(lg, actions)
        terms["policy"].append(-_layer_sum(clipped_surrogate(new, old, adv, clip_epsilon), mask).to(device))
        k = expected_k(lg)
        terms["penalty"].append(_layer_sum(k, mask).to(device))
        terms["entropy"].append(_layer_sum(entropy(lg), mask).to(device) if entropy_coef else None)
        with torch.no_grad():
            count = mask.sum().clamp(min=1)
            ratio = torch.exp(new - old)
            clipped.append(_layer_sum(((ratio - 1).abs() > clip_epsilon).float(), mask) / count)
            kl.append(_layer_sum(old - new, mask) / count)
            exp_k.append(_layer_sum(k, mask) / count)
            local.append(count)
    layers = len(logits)
    policy = torch.stack(terms["policy"]).sum() / (n * layers)
    lams = (
        [float(k_penalty)] * layers if isinstance(k_penalty, (int, float)) else [float(v) for v in k_penalty]
    )
    if len(lams) != layers:
        raise ValueError(f"k_penalty has {len(lams)} per-layer values for {layers} Ada-K layers.")
    penalty = sum(lam * term for lam, term in zip(lams, terms["penalty"])) / (n * layers)
    total = policy + penalty
    ent = torch.zeros((), device=device)
    if entropy_coef:
        ent = -entropy_coef * torch.stack(terms["entropy"]).sum() / (n * layers)
        total = total + ent
    scale = float(local[0]) / n if local else 0.0  # local share: stats are reported per token
    return total, {
        "loss": float(total.detach()) / max(scale, 1e-12),
        "policy_loss": float(policy.detach()) / max(scale, 1e-12),
        "k_penalty_loss": float(penalty.detach()) / max(scale, 1e-12),
        "entropy_loss": float(ent.detach()) / max(scale, 1e-12),
        "clip_fraction": float(torch.stack(clipped).mean()),
        "approx_kl": float(torch.stack(kl).mean()),
        "expected_k": float(torch.stack(exp_k).mean()),
    }


def warmup_ce_loss(
    bank: AllocatorBank,
    states: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    *,
    n_global: float,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the allocators on warm-start labels (n,) in 1..k (clamped to k_max)."""
    logits = bank(states)
    n = max(float(n_global), 1.0)
    losses, accuracy = [], []
    for lg, lb, mk in zip(logits, labels, masks):
        count = float(mk.sum())
        losses.append((warmup_loss(lg, lb, mk) * count).to(device))
        with torch.no_grad():
            hit = (lg.argmax(-1) + 1 == lb.clamp(1, lg.shape[-1])).float()
            accuracy.append(_layer_sum(hit, mk) / max(count, 1.0))
    loss = torch.stack(losses).sum() / (n * len(logits))
    local = float(masks[0].sum()) / n if masks else 1.0
    return loss, {
        "warmup_loss": float(loss.detach()) / max(local, 1e-12),
        "warmup_accuracy": float(torch.stack(accuracy).mean()),
    }


def synchronize_gradients(
    params: Sequence[nn.Parameter], reduce_sum: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Sum every parameter's gradient over processes (one flat all-reduce); None grads count as 0."""
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat = reduce_sum(flat)
    for param, grad in zip(params, flat.split([p.numel() for p in params])):
        param.grad = grad.view_as(param).clone()


def optimizer_step(
    params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer, max_grad_norm: float | None
) -> float:
    """Clip (if ``max_grad_norm``), step, zero the gradients; returns the gradient norm (NaN if unclipped)."""
    norm = float("nan")
    if max_grad_norm is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def greedy_k_sums(bank: AllocatorBank, experiences: Sequence[Experience]) -> torch.Tensor:
    """Per layer, ``[sum of greedy k over valid entries, count]`` (L, 2) float64 under the current policy."""
    sums = None
    with torch.no_grad():
        for experience in experiences:
            logits = bank(experience.states)
            rows = [
                torch.stack([_layer_sum((lg.argmax(-1) + 1).double(), mk), mk.sum().double()]).cpu()
                for lg, mk in zip(logits, experience.mask)
            ]
            current = torch.stack(rows)
            sums = current if sums is None else sums + current
    return sums


def dual_ascent(k_penalty: float, mean_k: float, target: float, learning_rate: float) -> float:
    """``lambda <- lambda + eta (mean_k / target - 1)``: the multiplier of the constraint E[k] = target.

    Lambda rises while the allocators use more experts than the budget and falls (below 0 if need be:
    a bonus per expert) while they use fewer, so a budget is met from above and from below.
    """
    return k_penalty + learning_rate * (mean_k / target - 1.0)
