"""Rollouts: sampled forwards of the frozen model, rewards, and the advantage of every (layer, token).

For one micro-batch, ``rollout_samples`` = G no-grad forwards sample k for every (token, layer) and
record each allocator's state, action and log-probability; token t's reward is
``R_t = log p(x_{t+1} | x_{<=t})`` (labels -100 and padding: no reward). The advantage of layer l
(l = 1..L) for token t of sample g, by ``baseline``:

* ``"topk"`` (the paper, Eq. 9-10): ``A = gamma^(L-l) (R_gt - R_t^topk)``, one extra forward with the
  model's own Top-K;
* ``"leave-one-out"``: ``A = gamma^(L-l) (R_gt - mean_{g' != g} R_g't)``, no extra forward (G >= 2);
* ``"counterfactual"``: ``A = R_gt - R_gt^(l)``, where ``R^(l)`` replays sample g's expert counts in
  every layer but l, which routes with the model's Top-K: L extra forwards per sample, and each
  layer is credited only with what its own choices changed (layers decide independently).

Every process runs the same number of forwards (FSDP gathers parameters collectively in each).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...methods.adak import AdaKLayer
from ...methods.adak.ppo import (
    layer_advantages,
    leave_one_out_advantages,
    masked_mean,
    policy_gradient_snr,
    token_log_likelihood,
)
from .data import token_uniforms

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class Experience:
    """One micro-batch of experience, per Ada-K layer (the G samples concatenated along rows)."""

    states: list[torch.Tensor]  # (N, in_features) float32
    actions: list[torch.Tensor]  # (N,) long
    old_log_probs: list[torch.Tensor]  # (N,) float32
    advantages: list[torch.Tensor]  # (N,) float32
    mask: list[torch.Tensor]  # (N,) bool: tokens with a reward
    tokens: int  # valid (token, sample) pairs on this process


@contextlib.contextmanager
def _layer_hooks(layers: dict[int, AdaKLayer], **values: dict[int, Any]) -> Iterator[None]:
    """Set attributes (``noise``, ``forced_k``, ``use_topk``, ``record``, ``training``) per layer, restore after."""
    saved = {i: {name: getattr(layer, name) for name in values} for i, layer in layers.items()}
    try:
        for name, per_layer in values.items():
            for i, value in per_layer.items():
                if name == "training":
                    layers[i].train(value)
                else:
                    setattr(layers[i], name, value)
        yield
    finally:
        for i, layer in layers.items():
            for name, value in saved[i].items():
                if name == "training":
                    layer.train(value)
                else:
                    setattr(layer, name, value)
            layer.last = None


def recorded_forward(
    forward: Forward,
    layers: dict[int, AdaKLayer],
    batch: dict[str, torch.Tensor],
    noise: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[int, Any]]:
    """A forward that samples k from ``noise`` (per layer), or decides as at inference if None.

    Returns (logits (B, T, V), {layer: AllocatorRecord}).
    """
    everywhere = lambda value: {i: value for i in layers}  # noqa: E731
    sample = noise is not None
    hooks = dict(training=everywhere(sample), record=everywhere(True), noise=noise or everywhere(None))
    with _layer_hooks(layers, **hooks):
        logits = forward(batch)
        records = {i: layer.last for i, layer in layers.items()}
    return logits, records


def counterfactual_rewards(
    forward: Forward,
    layers: dict[int, AdaKLayer],
    batch: dict[str, torch.Tensor],
    actions: dict[int, torch.Tensor],
    layer: int,
) -> torch.Tensor:
    """Rewards (B, T) when every layer but ``layer`` replays ``actions`` and ``layer`` routes Top-K."""
    forced = {i: (None if i == layer else actions[i]) for i in layers}
    topk = {i: i == layer for i in layers}
    with _layer_hooks(layers, forced_k=forced, use_topk=topk):
        logits = forward(batch)
    return token_log_likelihood(logits, batch["labels"], batch["attention_mask"])[0]


def collect(
    forward: Forward,
    layers: dict[int, AdaKLayer],
    batch: dict[str, torch.Tensor],
    rows: Sequence[int],
    *,
    seed: int,
    key: Sequence[int],
    samples: int,
    baseline: str,
    gamma: float,
    normalization: str = "none",
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    policy: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> tuple[Experience, dict[str, Any]]:
    """Run the forwards of one micro-batch and assemble its :class:`Experience` and statistics.

    ``rows`` are the batch's dataset row indices and ``key`` identifies the rollout (with ``seed``
    they fix the uniforms k is drawn from). ``reduce_sum`` sums a tensor over processes (for global
    advantage normalisation); ``policy`` maps states to allocator logits (for the logged
    signal-to-noise ratios).
    """
    labels, attention = batch["labels"], batch["attention_mask"]
    length = batch["input_ids"].shape[1]
    indices = list(layers)
    rewards, records = [], []
    for g in range(samples):
        noise = token_uniforms(seed, (*key, g), rows, length, indices)
        logits, record = recorded_forward(forward, layers, batch, noise)
        reward, mask = token_log_likelihood(logits, labels, attention)
        del logits
        rewards.append(reward.reshape(-1))
        records.append(record)
    flat_mask = mask.reshape(-1)
    stats: dict[str, Any] = {}
    if baseline == "topk":
        with _layer_hooks(layers, use_topk={i: True for i in layers}):
            base = token_log_likelihood(forward(batch), labels, attention)[0].reshape(-1)
        stats["reward_topk"] = float(masked_mean(base, flat_mask))
        advantages = [layer_advantages(r, base, len(indices), gamma) for r in rewards]
    elif baseline == "leave-one-out":
        centred = leave_one_out_advantages(torch.stack(rewards))
        advantages = [layer_advantages(c, torch.zeros_like(c), len(indices), gamma) for c in centred]
    elif baseline == "counterfactual":
        advantages = []
        for reward, record in zip(rewards, records):
            actions = {i: r.actions for i, r in record.items()}
            per_layer = [
                reward - counterfactual_rewards(forward, layers, batch, actions, i).reshape(-1)
                for i in indices
            ]
            advantages.append(torch.stack(per_layer))
    else:
        raise ValueError(f"Unknown baseline {baseline!r}.")
    advantages = [a.masked_fill(~flat_mask, 0.0) for a in advantages]
    advantages = _normalize(advantages, flat_mask, normalization, reduce_sum)

    experience = Experience([], [], [], [], [], tokens=int(flat_mask.sum()) * samples)
    for position, i in enumerate(indices):
        device = records[0][i].states.device
        experience.states.append(torch.cat([r[i].states for r in records]))
        experience.actions.append(torch.cat([r[i].actions for r in records]))
        experience.old_log_probs.append(torch.cat([r[i].log_probs for r in records]))
        experience.advantages.append(torch.cat([a[position] for a in advantages]).to(device))
        experience.mask.append(flat_mask.repeat(samples).to(device))
    all_adv = torch.stack([torch.cat([a[p] for a in advantages]) for p in range(len(indices))])
    valid = flat_mask.repeat(samples).unsqueeze(0).expand_as(all_adv)
    values = all_adv[valid]
    stats.update(
        reward=float(masked_mean(torch.stack(rewards), flat_mask.unsqueeze(0))),
        advantage_mean=float(values.mean()) if values.numel() else 0.0,
        advantage_std=float(values.std()) if values.numel() > 1 else 0.0,
        advantage_per_layer=[
            float(masked_mean(a, m)) for a, m in zip(experience.advantages, experience.mask)
        ],
        activated_per_layer=[
            float(masked_mean(torch.cat([r[i].activated for r in records]).float(), experience.mask[p]))
            for p, i in enumerate(indices)
        ],
        tokens=experience.tokens,
    )
    if policy is not None:
        with torch.no_grad():
            logits = policy(experience.states)
        stats["signal_to_noise_per_layer"] = [
            policy_gradient_snr(s, lg, a, adv, m)
            for s, lg, a, adv, m in zip(
                experience.states, logits, experience.actions, experience.advantages, experience.mask
            )
        ]
    return experience, stats


def _normalize(
    advantages: list[torch.Tensor],
    mask: torch.Tensor,
    method: str,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """``"scale"``: A / std(A); ``"standardize"``: (A - mean) / std, over every process's valid entries."""
    if method == "none":
        return advantages
    valid = mask.unsqueeze(0)
    sums = torch.zeros(3, dtype=torch.float64, device=mask.device)
    for a in advantages:
        kept = a.double() * valid
        sums += torch.stack([kept.sum(), (kept**2).sum(), valid.expand_as(a).sum().double()])
    total, squares, count = reduce_sum(sums).tolist()
    if count < 2:
        return advantages
    mean = total / count
    std = max((squares / count - mean**2) * count / (count - 1), 0.0) ** 0.5
    std = max(std, 1e-8)
    shift = mean if method == "standardize" else 0.0
    return [((a - shift) / std).masked_fill(~valid, 0.0) for a in advantages]
