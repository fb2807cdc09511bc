"""The two kinds of training step (warm-start cross-entropy, PPO) and evaluation, as functions of a trainer.

Kept apart from the control loop (:mod:`.trainer`) so each reads top to bottom: draw micro-batches,
run the frozen model, build the loss, synchronise, step.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ...methods.adak.ppo import token_log_likelihood
from ...methods.kept_gain import fit_gains
from . import warmstart
from .data import eval_batches
from .rollout import _layer_hooks, collect, recorded_forward
from .update import (
    dual_ascent,
    greedy_k_sums,
    ppo_loss,
    warmup_ce_loss,
)

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn

    from ...families import MoEShape
    from ...methods.adak import AdaKLayer
    from .config import AdaKTrainingConfig, TrainerState
    from .data import TrainingStream
    from .update import AllocatorBank


class Trainer(Protocol):
    """What the step functions read and call on the trainer: exactly these attributes.

    :class:`~hf_moe_routing.training.adak.trainer.AdaKTrainer` implements it (passed in, not
    imported: the trainer module imports this one).
    """

    config: AdaKTrainingConfig
    state: TrainerState  # run state: step counters, k-penalty, warm-start thresholds (updated here)
    layers: dict[int, AdaKLayer]  # MoE layer index -> Ada-K routing layer
    shape: MoEShape
    layer_target: float | None  # mean experts per Ada-K layer that the budget asks for
    bank: AllocatorBank  # the allocators' parameters, as one optimised group
    stream: TrainingStream  # training batches by index
    eval_dataset: Any  # prepared held-out rows, or None
    train_dataset: Any  # prepared training rows (all of them, in every process)
    model: nn.Module  # the patched, frozen model
    gains: list[nn.Parameter]  # kept-expert weight gains (AdaKConfig(weight_gain=True)), else empty
    accelerator: Accelerator

    @property
    def device(self) -> torch.device: ...  # where the allocators live

    @property
    def input_device(self) -> torch.device: ...  # where the model takes its inputs

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...  # frozen model: (B, T, V) logits

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...  # sum over data-parallel ranks

    def moe_mean(self, per_adak_layer: list[float]) -> float: ...  # mean experts over all MoE layers

    def step_optimizer(self) -> float: ...  # sum gradients over ranks, clip, step; the gradient norm


def _mean(dicts: list[dict[str, Any]], key: str) -> float:
    return sum(d[key] for d in dicts) / len(dicts)


def _next(trainer: Trainer) -> tuple[list[int], dict[str, torch.Tensor]]:
    rows, batch = trainer.stream.batch(trainer.state.batches_seen, trainer.input_device)
    trainer.state.batches_seen += 1
    return rows, batch


def calibrate(trainer: Trainer, method: str) -> dict[str, Any]:
    """Calibrate ``method``'s thresholds on ``calibration_batches`` training batches (Top-K forwards)."""
    records, masks = [], []
    for _ in range(trainer.config.calibration_batches):
        _, batch = _next(trainer)
        records.append(warmstart.topk_records(trainer.forward, trainer.layers, batch))
        masks.append(batch["attention_mask"].reshape(-1).bool())
    found = warmstart.calibrate(
        method,
        records,
        masks,
        trainer.layers,
        trainer.layer_targets or trainer.layer_target,
        trainer.reduce_sum,
    )
    if method == "p-warm" and trainer.config.warmup_p is not None:
        found["warmup_p"] = trainer.config.warmup_p
    return found


def exact_start(trainer: Trainer) -> dict[str, Any]:
    """Closed-form K-Warm / Skip-Warm start (calibrating Skip-Warm's thresholds first)."""
    method, state = trainer.config.warmup, trainer.state
    if method == "skip-warm" and state.skip_log_betas is None:
        found = calibrate(trainer, method)
        state.skip_log_betas, state.warmup_mean_label = found["skip_log_betas"], found["warmup_mean_label"]
    warmstart.apply_exact_start(method, trainer.layers, state.skip_log_betas, trainer.config.warmup_scale)
    state.exact_start = True
    for layer in trainer.layers.values():
        layer.num_updates += 1
    return {
        "warmup": f"{method} (exact)",
        "warmup_mean_label": state.warmup_mean_label,
        "skip_log_betas": state.skip_log_betas,
    }


def warmup_step(trainer: Trainer) -> dict[str, Any]:
    """One cross-entropy step on warm-start labels of Top-K forwards."""
    config, state = trainer.config, trainer.state
    stats: list[dict[str, float]] = []
    micro = [_next(trainer)[1] for _ in range(config.gradient_accumulation_steps)]
    for batch in micro:
        records = warmstart.topk_records(trainer.forward, trainer.layers, batch)
        mask = batch["attention_mask"].reshape(-1).bool()
        states, labels, masks = [], [], []
        for i, record in records.items():
            device = record.states.device
            states.append(record.states)
            labels.append(warmstart.labels(config.warmup, record, trainer.layers[i], state).to(device))
            masks.append(mask.to(device))
        n_global = trainer.reduce_sum(mask.sum().double())
        loss, st = warmup_ce_loss(
            trainer.bank, states, labels, masks, n_global=float(n_global), device=trainer.input_device
        )
        (loss / len(micro)).backward()
        stats.append(st)
    trainer.step_optimizer()
    return {key: _mean(stats, key) for key in stats[0]}


def ppo_step(trainer: Trainer) -> dict[str, Any]:
    """One PPO step: rollouts of every micro-batch, ``ppo_epochs`` updates, then lambda's dual step."""
    config, state = trainer.config, trainer.state
    experiences, rollout_stats, totals = [], [], []
    for micro in range(config.gradient_accumulation_steps):
        rows, batch = _next(trainer)
        experience, stats = collect(
            trainer.forward,
            trainer.layers,
            batch,
            rows,
            seed=config.seed,
            key=(state.ppo_step, micro),
            samples=config.rollout_samples,
            baseline=config.baseline,
            gamma=config.gamma,
            normalization=config.advantage_normalization,
            reduce_sum=trainer.reduce_sum,
            policy=trainer.bank,
        )
        experiences.append(experience)
        rollout_stats.append(stats)
        totals.append(float(trainer.reduce_sum(torch.tensor(float(experience.tokens), dtype=torch.float64))))
    lam = state.layer_k_penalties or state.k_penalty
    epochs = []
    for _ in range(config.ppo_epochs):
        per_micro = []
        for experience, n_global in zip(experiences, totals):
            loss, st = ppo_loss(
                trainer.bank,
                experience,
                n_global=n_global,
                clip_epsilon=config.clip_epsilon,
                k_penalty=lam,
                entropy_coef=config.entropy_coef,
                device=trainer.input_device,
            )
            (loss / len(experiences)).backward()
            per_micro.append(st)
        grad_norm = trainer.step_optimizer()
        epochs.append({**{k: _mean(per_micro, k) for k in per_micro[0]}, "grad_norm": grad_norm})
    out: dict[str, Any] = {
        k: _mean(epochs, k) for k in ("loss", "policy_loss", "k_penalty_loss", "entropy_loss", "expected_k")
    }
    later = epochs[1:] or epochs
    out.update(
        clip_fraction=_mean(later, "clip_fraction"),
        approx_kl=_mean(later, "approx_kl"),
        grad_norm=epochs[-1]["grad_norm"],
    )
    if config.ppo_epochs == 1:
        out["clip_fraction"] = 0.0
    for key in ("reward", "advantage_mean", "advantage_std"):
        out[key] = _mean(rollout_stats, key)
    if "reward_topk" in rollout_stats[0]:
        out["reward_topk"] = _mean(rollout_stats, "reward_topk")
    out["tokens"] = sum(s["tokens"] for s in rollout_stats)
    for key in ("activated_per_layer", "advantage_per_layer", "signal_to_noise_per_layer"):
        out[key] = [sum(v) / len(v) for v in zip(*(s[key] for s in rollout_stats))]
    out["activated_mean"] = sum(out["activated_per_layer"]) / len(out["activated_per_layer"])
    sums = trainer.reduce_sum(greedy_k_sums(trainer.bank, experiences).to(trainer.device)).cpu()
    out["greedy_k_per_layer"] = (sums[:, 0] / sums[:, 1].clamp(min=1)).tolist()
    out["greedy_k_mean"] = trainer.moe_mean(out["greedy_k_per_layer"])
    out["k_penalty"] = lam
    if state.layer_k_penalties is not None:  # one lambda per layer, each towards its own budget
        state.layer_k_penalties = [
            dual_ascent(lam_l, k_l, target_l, config.k_penalty_learning_rate)
            for lam_l, k_l, target_l in zip(
                state.layer_k_penalties,
                out["greedy_k_per_layer"],
                [trainer.layer_targets[i] for i in trainer.bank.layer_indices],
            )
        ]
        state.k_penalty = sum(state.layer_k_penalties) / len(state.layer_k_penalties)
    elif config.target_experts is not None:
        state.k_penalty = dual_ascent(
            lam, out["greedy_k_mean"], config.target_experts, config.k_penalty_learning_rate
        )
    return out


def fit_weight_gains(trainer: Trainer) -> dict[str, float]:
    """After PPO and the budget calibration: fit the kept-expert weight gains of ``AdaKConfig(weight_gain=True)``
    (``methods/kept_gain.py``) on the training rows, the allocators' inference choices fixed; returns
    :func:`~hf_moe_routing.methods.kept_gain.fit_gains`' summary. Every process fits the same gains (same rows,
    same seed)."""
    config = trainer.config
    return fit_gains(
        trainer.model,
        trainer.gains,
        trainer.train_dataset,
        max_steps=config.weight_gain_steps,
        batch_size=config.batch_size,
        learning_rate=config.weight_gain_learning_rate,
        seed=config.seed,
    )


@torch.no_grad()
def match_budget(trainer: Trainer, resolution: float = 1 / 128) -> dict[str, Any]:
    """Tilt every allocator's bias by ``delta * k`` (one delta) so the greedy mean k is ``target_experts``.

    The greedy count of every token is non-decreasing in delta, so the mean over ``calibration_batches``
    batches (full forwards, every process) is bisected on a grid of ``resolution`` (binary fractions,
    so runs that split rows differently try the same deltas); the delta closest to the target wins.
    The batches are training batches, or the first of ``eval_dataset`` with
    ``budget_calibration_data="eval"`` (the budget then holds on text like the evaluation text).
    """
    config = trainer.config
    target = config.target_experts
    if config.budget_calibration_data == "eval":
        acc = trainer.accelerator
        batches = list(  # (counts, batch): a process's padding batch runs the forward, counts nothing
            eval_batches(
                trainer.eval_dataset,
                config.batch_size,
                acc.num_processes,
                acc.process_index,
                config.calibration_batches,
                trainer.input_device,
            )
        )
    else:
        batches = [(True, _next(trainer)[1]) for _ in range(config.calibration_batches)]
    biases = {i: layer.allocator.bias.detach().clone() for i, layer in trainer.layers.items()}

    def mean_k(delta: float) -> float:
        totals = torch.zeros(1 + len(trainer.layers), dtype=torch.float64, device=trainer.device)
        for i, layer in trainer.layers.items():
            counts = torch.arange(1, layer.k_max + 1, dtype=torch.float32, device=biases[i].device)
            layer.allocator.bias.copy_(biases[i] + delta * counts)
        greedy = {i: "greedy" for i in trainer.layers}
        for counts, batch in batches:
            with _layer_hooks(trainer.layers, decision=greedy):
                _, records = recorded_forward(trainer.forward, trainer.layers, batch)
            mask = batch["attention_mask"].reshape(-1).bool() & counts
            sums = [
                r.activated[mask.to(r.activated.device)].sum().double().to(trainer.device)
                for r in records.values()
            ]
            totals += torch.stack([mask.sum().double().to(trainer.device), *sums])
        tokens, *per_layer = trainer.reduce_sum(totals).tolist()
        return trainer.moe_mean([value / max(tokens, 1.0) for value in per_layer])

    tried = {0.0: mean_k(0.0)}
    low, high = -1.0, 1.0
    while (value := mean_k(low)) > target and low > -1e4:
        tried[low] = value
        low *= 2
    tried[low] = value
    while (value := mean_k(high)) < target and high < 1e4:
        tried[high] = value
        high *= 2
    tried[high] = value
    while high - low > resolution:
        middle = (low + high) / 2
        tried[middle] = value = mean_k(middle)
        if abs(value - target) <= 1e-3 * target:
            break
        low, high = (middle, high) if value < target else (low, middle)
    best = min(tried, key=lambda d: (abs(tried[d] - target), abs(d)))
    mean_k(best)
    return {"budget_tilt": best, "budget_greedy_k_mean": tried[best], "budget_greedy_k_before": tried[0.0]}


@torch.no_grad()
def evaluate(trainer: Trainer, dataset: Any, max_batches: int | None) -> dict[str, Any]:
    """Held-out NLL and experts per token with greedy Ada-K against the model's Top-K (all processes)."""
    device = trainer.device
    totals = torch.zeros(
        3 + len(trainer.layers), dtype=torch.float64, device=device
    )  # nll, nll_topk, tokens, k_l
    batches = eval_batches(
        dataset,
        trainer.config.batch_size,
        trainer.accelerator.num_processes,
        trainer.accelerator.process_index,
        max_batches,
        trainer.input_device,
    )
    for counts, batch in batches:
        logits, records = recorded_forward(trainer.forward, trainer.layers, batch)
        rewards, mask = token_log_likelihood(logits, batch["labels"], batch["attention_mask"])
        with _layer_hooks(trainer.layers, use_topk={i: True for i in trainer.layers}):
            baseline, _ = token_log_likelihood(
                trainer.forward(batch), batch["labels"], batch["attention_mask"]
            )
        if not counts:
            continue
        flat = mask.reshape(-1)
        per_layer = [
            r.activated[flat.to(r.activated.device)].sum().double().to(device) for r in records.values()
        ]
        totals += torch.stack(
            [
                -rewards.sum().double().to(device),
                -baseline.masked_fill(~mask, 0).sum().double().to(device),
                flat.sum().double().to(device),
                *per_layer,
            ]
        )
    nll, nll_topk, tokens, *activated = trainer.reduce_sum(totals).tolist()
    if tokens == 0:
        raise ValueError("No token of the evaluation data is predicted (all labels are -100 or padding).")
    per_layer = [a / tokens for a in activated]
    mean = trainer.moe_mean(per_layer)
    top_k = trainer.shape.top_k
    if mean > top_k + 1e-9:
        warnings.warn(
            f"Ada-K uses {mean:.2f} routed experts per token on average, more than the model's top-k ({top_k}): "
            "it costs more compute than the model's own routing (AdaKConfig(k_max=...) allows that).",
            stacklevel=3,
        )
    return {
        "eval_nll": nll / tokens,
        "eval_ppl": math.exp(nll / tokens),
        "eval_nll_topk": nll_topk / tokens,
        "eval_ppl_topk": math.exp(nll_topk / tokens),
        "eval_ppl_change": math.exp((nll - nll_topk) / tokens) - 1.0,
        "eval_activated_mean": mean,
        "eval_activated_per_layer": per_layer,
        "eval_default_k": top_k,
        "eval_tokens": int(tokens),
    }
