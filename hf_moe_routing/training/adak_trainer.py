"""Train Ada-K allocators on a frozen MoE model: warm start, then PPO (Yue et al., ICLR 2025).

>>> from hf_moe_routing import AdaKConfig, AdaKTrainer, AdaKTrainingConfig
>>> trainer = AdaKTrainer(model, AdaKTrainingConfig(output_dir="adak"), train_data, eval_data,
...                       tokenizer=tokenizer, adak_config=AdaKConfig())
>>> trainer.train()                    # P-Warm, then PPO; checkpoints under output_dir
>>> trainer.save_adapter("adak/adapter")

The trainer runs on ``accelerate``: one process per device (DDP over the allocators; each process
keeps a full copy of the frozen model), mixed precision, gradient accumulation, trackers
(TensorBoard, W&B, ... via ``report_to``). A model loaded with ``device_map="auto"`` (sharded over
several GPUs) trains in a single process: every allocator lives on its router's execution device.

One PPO step (a *rollout*) draws ``gradient_accumulation_steps`` micro-batches per process; for each:

1. a no-grad forward with sampled k records each allocator's state, action and log-probability;
   the reward of token t is ``log p(x_{t+1} | x_{<=t})`` (labels -100 and padding: no reward);
2. a second no-grad forward with the model's own Top-K gives the baseline reward;
3. ``A_l = gamma^(L-l) (R - R_topk)``.

Then ``ppo_epochs`` optimiser steps on the recorded states (the frozen model is not run again):
clipped surrogate + ``k_penalty`` * expected k - ``entropy_coef`` * entropy (see ``methods/adak/ppo.py``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..methods.adak import AdaKConfig, AdaKLayer, adak_layers, default_routing, recording
from ..methods.adak.ppo import (
    ADVANTAGE_NORMALIZATIONS,
    action_log_probs,
    entropy_bonus,
    expected_k_penalty,
    layer_advantages,
    masked_mean,
    normalize_advantages,
    ppo_clipped_objective,
    token_log_likelihood,
)
from ..methods.adak.warmup import (
    WARMUP_METHODS,
    constant_labels,
    default_candidates,
    label_means,
    pick_threshold,
    threshold_labels,
    warmup_loss,
)
from ..patching import get_patch_state, patch_model

CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
ALLOCATORS_NAME = "allocators.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
LOG_NAME = "log.jsonl"
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class AdaKTrainingConfig:
    """Hyper-parameters of :class:`AdaKTrainer` (JSON-serialisable; stored in every checkpoint).

    Paper values: ``learning_rate=1e-3``, ``weight_decay=0.1`` (AdamW), ``k_penalty`` (lambda) ``=3e-3``,
    ``ppo_epochs=2``, bf16. The paper leaves ``gamma``, ``clip_epsilon``, advantage normalisation and an
    entropy bonus unstated; the defaults here are ``gamma=0.99`` (a mild discount, so every layer of a
    deep model still sees most of the reward), ``clip_epsilon=0.2`` (the standard PPO value),
    ``advantage_normalization="none"`` (advantages stay in nats, so lambda keeps the paper's meaning:
    nats of log-likelihood per expected expert, averaged over layers) and ``entropy_coef=0.0`` (sampling
    from a warm-started policy explores enough; a bonus would fight the expected-k penalty).
    """

    output_dir: str = "adak-output"
    # warm start
    warmup: str = "p-warm"
    warmup_steps: int = 100
    warmup_learning_rate: float = 1e-2
    warmup_p: float | None = None  # None: choose p so that the mean pseudo-label is the model's k
    calibration_batches: int = 4
    # PPO
    max_steps: int = 300  # rollouts; each makes ppo_epochs optimiser steps
    ppo_epochs: int = 2
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    k_penalty: float = 3e-3
    gamma: float = 0.99
    clip_epsilon: float = 0.2
    advantage_normalization: str = "none"
    entropy_coef: float = 0.0
    max_grad_norm: float | None = 1.0
    # data and devices
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"  # bf16 on GPUs that support it, else no
    seed: int = 0
    shuffle: bool = True
    # bookkeeping
    logging_steps: int = 10
    eval_steps: int = 0  # 0: evaluate only at the end
    eval_batches: int | None = None  # None: the whole eval dataset
    save_steps: int = 0  # 0: checkpoint only at the end (and on Ctrl-C)
    save_total_limit: int | None = 2
    report_to: list[str] | None = None  # accelerate trackers, e.g. ["tensorboard"]
    progress_bar: bool = True
    verify_base_unchanged: bool = True

    def __post_init__(self) -> None:
        if self.warmup not in WARMUP_METHODS:
            raise ValueError(f"warmup must be one of {WARMUP_METHODS}, got {self.warmup!r}.")
        if self.advantage_normalization not in ADVANTAGE_NORMALIZATIONS:
            raise ValueError(
                f"advantage_normalization must be one of {ADVANTAGE_NORMALIZATIONS}, "
                f"got {self.advantage_normalization!r}."
            )
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}."
            )
        for name in ("batch_size", "gradient_accumulation_steps", "ppo_epochs", "calibration_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("warmup_steps", "max_steps", "logging_steps", "eval_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}.")
        if self.clip_epsilon <= 0:
            raise ValueError(f"clip_epsilon must be > 0, got {self.clip_epsilon}.")
        if self.warmup_p is not None and not 0.0 < self.warmup_p <= 1.0:
            raise ValueError(f"warmup_p must be in (0, 1], got {self.warmup_p}.")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaKTrainingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown AdaKTrainingConfig settings {sorted(unknown)}.")
        return cls(**data)


@dataclass
class TrainerState:
    """Progress of a training run (saved in ``trainer_state.json``)."""

    warmup_step: int = 0
    ppo_step: int = 0
    batches_seen: int = 0  # micro-batches drawn from the training stream by each process
    warmup_p: float | None = None
    warmup_mean_label: float | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def global_step(self) -> int:
        return self.warmup_step + self.ppo_step


class AllocatorBank(nn.Module):
    """The allocators of a patched model as one module (what the optimiser and DDP see)."""

    def __init__(self, layers: dict[int, AdaKLayer]) -> None:
        super().__init__()
        self.layer_indices = list(layers)
        self.allocators = nn.ModuleList(layer.allocator for layer in layers.values())

    def forward(self, states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [allocator(s) for allocator, s in zip(self.allocators, states)]


@dataclass
class _Rollout:
    """One micro-batch of experience: per layer, states/actions/old log-probs; per layer, advantages."""

    states: list[torch.Tensor]
    actions: list[torch.Tensor]
    old_log_probs: list[torch.Tensor]
    advantages: list[torch.Tensor]
    mask: list[torch.Tensor]


def _pad_collate(pad_id: int):
    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(r["input_ids"], dtype=torch.long).reshape(-1) for r in rows]
        masks = [
            torch.as_tensor(r["attention_mask"], dtype=torch.long).reshape(-1)
            if "attention_mask" in r
            else torch.ones_like(i)
            for r, i in zip(rows, ids)
        ]
        labels = [
            torch.as_tensor(r["labels"], dtype=torch.long).reshape(-1)
            if "labels" in r
            else i.masked_fill(m == 0, -100)
            for r, i, m in zip(rows, ids, masks)
        ]
        length = max(len(i) for i in ids)

        def pad(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
            return torch.stack([torch.nn.functional.pad(s, (0, length - len(s)), value=value) for s in seqs])

        return {"input_ids": pad(ids, pad_id), "attention_mask": pad(masks, 0), "labels": pad(labels, -100)}

    return collate


def prepare_dataset(data: Any, model: nn.Module, tokenizer: Any = None, seq_len: int | None = None) -> Any:
    """A dataset of ``input_ids`` (and optionally ``attention_mask``/``labels``) rows.

    Tokenised datasets are used as they are; text datasets (a ``text`` column or chat/SFT records) are
    tokenised and packed with :func:`hf_moe_routing.data.pack_dataset` (needs ``tokenizer``).
    """
    from ..data import check_context_length, pack_dataset

    if data is None:
        raise ValueError("No training data: pass a dataset of input_ids or of text (with a tokenizer).")
    columns = getattr(data, "column_names", None)
    if columns is None and len(data) > 0 and isinstance(data[0], dict):
        columns = list(data[0])
    if len(data) == 0:
        raise ValueError("The dataset is empty (0 rows): pass a dataset with at least batch_size rows.")
    if columns is not None and "input_ids" not in columns:
        if tokenizer is None:
            raise ValueError(
                f"The dataset has columns {columns} but no input_ids: pass tokenizer=... (and seq_len) so "
                "the trainer can tokenise and pack it, or tokenise it with hf_moe_routing.data.pack_dataset."
            )
        data = pack_dataset(data, tokenizer, seq_len or 256)
    length = len(data[0]["input_ids"])
    check_context_length(model, max(length, seq_len or 0))
    return data


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


class AdaKTrainer:
    """Warm-starts and PPO-trains the Ada-K allocators of a frozen MoE model.

    Args:
        model: a transformers MoE causal LM, unpatched (it is patched with ``adak_config``) or already
            patched with :class:`AdaKConfig` (e.g. from a saved routing adapter).
        config: training hyper-parameters.
        train_dataset, eval_dataset: rows of ``input_ids``/``attention_mask``/``labels`` (e.g. from
            :func:`hf_moe_routing.data.pack_dataset`) or text datasets (then pass ``tokenizer``).
        tokenizer: used to pack text datasets; ``seq_len`` is their block length.
        accelerator: an ``accelerate.Accelerator`` to use (default: one built from ``config``).
        eval_fn: an extra evaluation hook, called as ``eval_fn(trainer) -> dict`` whenever the trainer
            evaluates (every ``eval_steps`` and at the end); its results are logged with the others.

    Every base-model parameter is frozen (``requires_grad=False``); after each optimiser step the
    trainer asserts that none has a gradient, and at the end that none changed.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdaKTrainingConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        *,
        tokenizer: Any = None,
        adak_config: AdaKConfig | None = None,
        seq_len: int | None = None,
        accelerator: Any = None,
        eval_fn: Callable[[AdaKTrainer], dict[str, Any]] | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.config = config or AdaKTrainingConfig()
        state = get_patch_state(model)
        if state is None:
            patch_model(model, adak_config or AdaKConfig())
        elif not isinstance(state.config, AdaKConfig):
            raise ValueError(
                f"The model is patched with {state.config.routing_type!r} routing: unpatch it "
                "(hf_moe_routing.unpatch_model) or pass a model patched with AdaKConfig."
            )
        elif adak_config is not None and adak_config != state.config:
            raise ValueError(
                f"The model is already patched with {state.config}, which differs from adak_config={adak_config}."
            )
        self.model = model
        self.adak_config: AdaKConfig = get_patch_state(model).config
        self.shape = get_patch_state(model).shape
        self.layers = adak_layers(model)
        self.sharded = (
            bool(getattr(model, "hf_device_map", None))
            and len({str(d) for d in model.hf_device_map.values()}) > 1
        )

        self.accelerator = accelerator or Accelerator(
            mixed_precision=_mixed_precision(self.config.mixed_precision),
            log_with=self.config.report_to,
            project_dir=self.config.output_dir,
        )
        if self.sharded and self.accelerator.num_processes > 1:
            raise ValueError(
                "A model sharded with device_map over several devices trains in one process; launch without "
                "data parallelism (or load one full copy of the model per process)."
            )
        if not getattr(model, "hf_device_map", None):
            model.to(self.accelerator.device)
        model.eval()  # no dropout in the frozen model; Ada-K layers switch to sampling during rollouts

        for param in model.parameters():
            param.requires_grad_(False)
        self.bank = AllocatorBank(self.layers)
        for param in self.bank.parameters():
            param.requires_grad_(True)
        allocator_ids = {id(p) for p in self.bank.parameters()}
        self._base_params = [(n, p) for n, p in model.named_parameters() if id(p) not in allocator_ids]
        self._base_checksum = self._checksum() if self.config.verify_base_unchanged else None
        self.ddp_bank = self.accelerator.prepare_model(self.bank, device_placement=False)

        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
            pad = tokenizer.pad_token_id
        self.collate = _pad_collate(int(pad or 0))
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.train_dataset = prepare_dataset(train_dataset, model, tokenizer, seq_len)
        self.eval_dataset = (
            prepare_dataset(eval_dataset, model, tokenizer, seq_len) if eval_dataset is not None else None
        )
        world, batch = self.accelerator.num_processes, self.config.batch_size
        self.batches_per_epoch = len(self.train_dataset) // (batch * world)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"The training dataset has {len(self.train_dataset)} rows, fewer than batch_size * processes = "
                f"{batch * world}: use a smaller batch_size or more data."
            )
        self.state = TrainerState()
        self.optimizer: torch.optim.Optimizer | None = None
        self._phase: str | None = None
        self._trackers_started = False
        self.eval_fn = eval_fn

    # ---- devices and checks ---------------------------------------------------------------------
    @property
    def input_device(self) -> torch.device:
        """Where the model's inputs go (the embedding's device)."""
        return self.model.get_input_embeddings().weight.device

    def _checksum(self) -> list[float]:
        with torch.no_grad():
            # offloaded weights (meta tensors) are not in memory here, so they cannot change
            return [float(p.detach().double().sum()) for _, p in self._base_params if p.device.type != "meta"]

    def _check_base_frozen(self) -> None:
        for name, param in self._base_params:
            if param.requires_grad or param.grad is not None:
                raise RuntimeError(
                    f"Base-model parameter {name} received a gradient; only allocators may train."
                )

    def _check_base_unchanged(self) -> None:
        if self._base_checksum is not None and self._checksum() != self._base_checksum:
            names = [n for n, p in self._base_params if p.device.type != "meta"]
            changed = [n for n, a, b in zip(names, self._checksum(), self._base_checksum) if a != b]
            raise RuntimeError(f"Base-model parameters changed during allocator training: {changed[:5]}.")

    # ---- data ----------------------------------------------------------------------------------
    def _batch_indices(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches (row indices) of an epoch (a seeded shuffle, equal counts per process)."""
        n = len(self.train_dataset)
        if self.config.shuffle:
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.config.seed + epoch)
            ).tolist()
        else:
            order = list(range(n))
        world, rank, batch = (
            self.accelerator.num_processes,
            self.accelerator.process_index,
            self.config.batch_size,
        )
        return [
            order[(b * world + rank) * batch : (b * world + rank + 1) * batch]
            for b in range(self.batches_per_epoch)
        ]

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.input_device) for k, v in batch.items()}

    def _next_batch(self) -> dict[str, torch.Tensor]:
        epoch, position = divmod(self.state.batches_seen, self.batches_per_epoch)
        rows = self._batch_indices(epoch)[position]
        self.state.batches_seen += 1
        return self._to_device(self.collate([self.train_dataset[i] for i in rows]))

    def _eval_batches(self, dataset: Any, max_batches: int | None) -> Iterator[dict[str, torch.Tensor]]:
        world, rank, batch = (
            self.accelerator.num_processes,
            self.accelerator.process_index,
            self.config.batch_size,
        )
        starts = list(range(rank * batch, len(dataset), batch * world))
        if max_batches is not None:
            starts = starts[:max_batches]
        for start in starts:
            rows = range(start, min(start + batch, len(dataset)))
            yield self._to_device(self.collate([dataset[i] for i in rows]))

    # ---- forwards ------------------------------------------------------------------------------
    def _forward_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), self.accelerator.autocast():
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    @contextlib.contextmanager
    def _sampling(self, sample: bool) -> Iterator[None]:
        """Ada-K layers sample k (training mode) or use their decision rule (eval mode)."""
        previous = [layer.training for layer in self.layers.values()]
        for layer in self.layers.values():
            layer.train(sample)
        try:
            yield
        finally:
            for layer, mode in zip(self.layers.values(), previous):
                layer.train(mode)

    def _records(self, batch: dict[str, torch.Tensor], sample: bool):
        """Forward with Ada-K routing; returns (logits, {layer: AllocatorRecord})."""
        with self._sampling(sample), recording(self.model) as layers:
            logits = self._forward_logits(batch)
            records = {i: layer.last for i, layer in layers.items()}
        return logits, records

    def _token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n,) tokens that count for warm-up labels: real (non-padding) tokens."""
        return batch["attention_mask"].reshape(-1).bool()

    # ---- warm start ----------------------------------------------------------------------------
    def _topk_records(self, batch: dict[str, torch.Tensor]):
        with default_routing(self.model), recording(self.model) as layers:
            self._forward_logits(batch)
            return {i: layer.last for i, layer in layers.items()}

    def calibrate_threshold(self) -> tuple[float, float]:
        """Choose P-Warm's p on ``calibration_batches`` batches: mean n_i(p) closest to the model's k."""
        probs = []
        for _ in range(self.config.calibration_batches):
            batch = self._next_batch()
            mask = self._token_mask(batch)
            for record in self._topk_records(batch).values():
                probs.append(record.ordered_probs[mask.to(record.ordered_probs.device)].cpu())
        ordered = torch.cat(probs)
        candidates = default_candidates()
        sums = label_means(ordered, candidates).double() * len(ordered)
        count = torch.tensor(float(len(ordered)), dtype=torch.float64)
        if self.accelerator.num_processes > 1:  # every process must pick the same p
            device = self.accelerator.device
            sums = self.accelerator.reduce(sums.to(device), "sum").cpu()
            count = self.accelerator.reduce(count.to(device), "sum").cpu()
        return pick_threshold(candidates, (sums / count).float(), float(self.shape.top_k))

    def _warmup_step(self) -> dict[str, Any]:
        batches = [self._next_batch() for _ in range(self.config.gradient_accumulation_steps)]
        totals = {"warmup_loss": 0.0, "warmup_accuracy": 0.0}
        for micro, batch in enumerate(batches):
            records = self._topk_records(batch)
            mask = self._token_mask(batch)
            states, labels, masks = [], [], []
            for index, record in records.items():
                layer = self.layers[index]
                device = record.states.device
                if self.config.warmup == "p-warm":
                    target = threshold_labels(record.ordered_probs, self.state.warmup_p)
                else:
                    target = constant_labels(len(record.states), min(layer.default_k, layer.k_max), device)
                states.append(record.states)
                labels.append(target.to(device))
                masks.append(mask.to(device))
            sync = micro == len(batches) - 1
            with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.ddp_bank):
                logits = self.ddp_bank(states)
                losses = [warmup_loss(lg, lb, mk) for lg, lb, mk in zip(logits, labels, masks)]
                loss = torch.stack([loss.to(self.input_device) for loss in losses]).mean()
                (loss / len(batches)).backward()
            with torch.no_grad():
                accuracy = torch.stack(
                    [
                        masked_mean((lg.argmax(-1) + 1 == lb.clamp(max=lg.shape[-1])).float(), mk).to(
                            self.input_device
                        )
                        for lg, lb, mk in zip(logits, labels, masks)
                    ]
                ).mean()
            totals["warmup_loss"] += float(loss.detach()) / len(batches)
            totals["warmup_accuracy"] += float(accuracy) / len(batches)
        self._optimizer_step()
        return totals

    # ---- PPO -----------------------------------------------------------------------------------
    def _rollout(self, batch: dict[str, torch.Tensor]) -> tuple[_Rollout, dict[str, Any]]:
        logits, records = self._records(batch, sample=True)
        rewards, reward_mask = token_log_likelihood(logits, batch["labels"], batch["attention_mask"])
        del logits
        with default_routing(self.model):
            baseline_logits = self._forward_logits(batch)
        baseline, _ = token_log_likelihood(baseline_logits, batch["labels"], batch["attention_mask"])
        del baseline_logits
        advantages = layer_advantages(
            rewards.reshape(-1), baseline.reshape(-1), len(records), self.config.gamma
        )
        flat_mask = reward_mask.reshape(-1)
        advantages = normalize_advantages(
            advantages, flat_mask.unsqueeze(0), self.config.advantage_normalization
        )
        rollout = _Rollout([], [], [], [], [])
        activated = []
        for position, record in enumerate(records.values()):
            device = record.states.device
            mask = flat_mask.to(device)
            rollout.states.append(record.states)
            rollout.actions.append(record.actions)
            rollout.old_log_probs.append(record.log_probs)
            rollout.advantages.append(advantages[position].to(device))
            rollout.mask.append(mask)
            activated.append(float(masked_mean(record.activated.float(), mask)))
        stats = {
            "reward": float(masked_mean(rewards, reward_mask)),
            "reward_topk": float(masked_mean(baseline, reward_mask)),
            "advantage": float(masked_mean(advantages, flat_mask.unsqueeze(0))),
            "activated_per_layer": activated,
            "tokens": int(reward_mask.sum()),
        }
        return rollout, stats

    def _ppo_loss(self, rollout: _Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.ddp_bank(rollout.states)
        device = self.input_device
        policy_terms, clip_terms = [], []
        for lg, actions, old, adv, mask in zip(
            logits, rollout.actions, rollout.old_log_probs, rollout.advantages, rollout.mask
        ):
            loss, clip_fraction = ppo_clipped_objective(
                action_log_probs(lg, actions), old, adv, mask, self.config.clip_epsilon
            )
            policy_terms.append(loss.to(device))
            clip_terms.append(clip_fraction.to(device))
        policy = torch.stack(policy_terms).mean()
        config = self.config
        penalty = torch.stack(
            [
                expected_k_penalty([lg], [mk], config.k_penalty).to(device)
                for lg, mk in zip(logits, rollout.mask)
            ]
        ).mean()
        total = policy + penalty
        ent = torch.zeros((), device=device)
        if config.entropy_coef:
            ent = torch.stack(
                [
                    entropy_bonus([lg], [mk], config.entropy_coef).to(device)
                    for lg, mk in zip(logits, rollout.mask)
                ]
            ).mean()
            total = total + ent
        return total, {
            "loss": float(total.detach()),
            "policy_loss": float(policy.detach()),
            "k_penalty_loss": float(penalty.detach()),
            "entropy_loss": float(ent.detach()),
            "clip_fraction": float(torch.stack(clip_terms).mean()),
        }

    def _ppo_step(self) -> dict[str, Any]:
        rollouts, rollout_stats = [], []
        for _ in range(self.config.gradient_accumulation_steps):
            rollout, stats = self._rollout(self._next_batch())
            rollouts.append(rollout)
            rollout_stats.append(stats)
        epoch_stats = []
        for _ in range(self.config.ppo_epochs):
            sums: dict[str, float] = {}
            for micro, rollout in enumerate(rollouts):
                sync = micro == len(rollouts) - 1
                with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.ddp_bank):
                    loss, stats = self._ppo_loss(rollout)
                    (loss / len(rollouts)).backward()
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value / len(rollouts)
            sums["grad_norm"] = self._optimizer_step()
            epoch_stats.append(sums)
        out: dict[str, Any] = {
            key: sum(s[key] for s in epoch_stats) / len(epoch_stats) for key in epoch_stats[0]
        }
        for key in ("reward", "reward_topk", "advantage"):
            out[key] = sum(s[key] for s in rollout_stats) / len(rollout_stats)
        out["tokens"] = sum(s["tokens"] for s in rollout_stats)
        per_layer = [
            sum(v) / len(rollout_stats) for v in zip(*(s["activated_per_layer"] for s in rollout_stats))
        ]
        out["activated_per_layer"] = per_layer
        out["activated_mean"] = sum(per_layer) / len(per_layer)
        return out

    # ---- optimisation --------------------------------------------------------------------------
    def _make_optimizer(self, phase: str) -> torch.optim.Optimizer:
        if phase == "warmup":
            return torch.optim.AdamW(
                self.bank.parameters(), lr=self.config.warmup_learning_rate, weight_decay=0.0
            )
        return torch.optim.AdamW(
            self.bank.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )

    def _set_phase(self, phase: str) -> None:
        if self._phase != phase:
            self._phase = phase
            self.optimizer = self._make_optimizer(phase)

    def _optimizer_step(self) -> float:
        norm = float("nan")
        if self.config.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.bank.parameters(), self.config.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for layer in self.layers.values():  # trained: RoutingLayer.is_fitted() is True from now on
            layer.num_updates += 1
        self._check_base_frozen()
        return norm

    # ---- logging -------------------------------------------------------------------------------
    def _reduce(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Average the numeric statistics over processes (sums for token counts)."""
        if self.accelerator.num_processes == 1:
            return stats
        out = dict(stats)
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                tensor = torch.tensor(float(value), device=self.accelerator.device)
                reduced = self.accelerator.reduce(tensor, "sum" if key == "tokens" else "mean")
                out[key] = int(reduced) if key == "tokens" else float(reduced)
            elif isinstance(value, list):
                tensor = torch.tensor(value, dtype=torch.float32, device=self.accelerator.device)
                out[key] = self.accelerator.reduce(tensor, "mean").tolist()
        return out

    def log(self, stats: dict[str, Any], bar: Any = None) -> None:
        """Record ``stats`` in the history, ``log.jsonl``, stdout and the accelerate trackers."""
        entry = {"step": self.state.global_step, **stats}
        self.state.log_history.append(entry)
        if not self.accelerator.is_main_process:
            return
        Path(self.config.output_dir).mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, default=float)
        with open(Path(self.config.output_dir) / LOG_NAME, "a") as f:
            f.write(line + "\n")
        (bar.write if bar is not None else print)(line)
        if self.config.report_to:
            scalars = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and k != "step"}
            for key in ("activated_per_layer", "eval_activated_per_layer"):
                for index, value in zip(self.layers, entry.get(key, [])):
                    scalars[f"{key}/{index}"] = value
            self.accelerator.log(scalars, step=self.state.global_step)

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, dataset: Any = None, max_batches: int | None = None) -> dict[str, Any]:
        """Held-out log-likelihood and activated experts, Ada-K (eval decision) against Top-K.

        Returns ``eval_nll`` / ``eval_ppl`` (Ada-K), ``eval_nll_topk`` / ``eval_ppl_topk``,
        ``eval_activated_mean``, ``eval_activated_per_layer`` and ``eval_tokens``.
        """
        if dataset is not None:
            dataset = prepare_dataset(dataset, self.model, self.tokenizer, self.seq_len)
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("No evaluation data: pass eval_dataset to the trainer or dataset= here.")
        max_batches = self.config.eval_batches if max_batches is None else max_batches
        device = self.accelerator.device
        nll = torch.zeros((), dtype=torch.float64, device=device)
        nll_topk = torch.zeros_like(nll)
        tokens = torch.zeros_like(nll)
        activated = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        for batch in self._eval_batches(dataset, max_batches):
            logits, records = self._records(batch, sample=False)
            rewards, mask = token_log_likelihood(logits, batch["labels"], batch["attention_mask"])
            with default_routing(self.model):
                baseline, _ = token_log_likelihood(
                    self._forward_logits(batch), batch["labels"], batch["attention_mask"]
                )
            flat = mask.reshape(-1)
            nll -= rewards.sum().double().to(device)
            nll_topk -= baseline.masked_fill(~mask, 0.0).sum().double().to(device)
            tokens += flat.sum().double().to(device)
            for position, record in enumerate(records.values()):
                activated[position] += (
                    record.activated[flat.to(record.activated.device)].sum().double().to(device)
                )
        nll, nll_topk, tokens, activated = (
            self.accelerator.reduce(t, "sum") for t in (nll, nll_topk, tokens, activated)
        )
        count = max(float(tokens), 1.0)
        per_layer = (activated / count).tolist()
        mean_nll, mean_topk = float(nll) / count, float(nll_topk) / count
        return {
            "eval_nll": mean_nll,
            "eval_ppl": math.exp(mean_nll),
            "eval_nll_topk": mean_topk,
            "eval_ppl_topk": math.exp(mean_topk),
            "eval_activated_mean": sum(per_layer) / len(per_layer),
            "eval_activated_per_layer": per_layer,
            "eval_default_k": self.shape.top_k,
            "eval_tokens": int(tokens),
        }

    # ---- the loop ------------------------------------------------------------------------------
    def _warmup_total(self) -> int:
        return 0 if self.config.warmup == "random" else self.config.warmup_steps

    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None) -> TrainerState:
        """Warm start, then PPO; resumes from ``resume_from_checkpoint`` (a folder, or True: the latest).

        On Ctrl-C (KeyboardInterrupt) a checkpoint is saved before the exception propagates.
        """
        if resume_from_checkpoint:
            path = (
                latest_checkpoint(self.config.output_dir)
                if resume_from_checkpoint is True
                else Path(resume_from_checkpoint)
            )
            if path is None:
                raise FileNotFoundError(
                    f"No {CHECKPOINT_PREFIX}* folder in {self.config.output_dir} to resume from."
                )
            self.load_checkpoint(path)
        if self.config.report_to and not self._trackers_started:
            self.accelerator.init_trackers("adak", config=_flat_config(self.config.to_dict()))
            self._trackers_started = True
        warmup_total, total = self._warmup_total(), self._warmup_total() + self.config.max_steps
        bar = tqdm(
            total=total,
            initial=min(self.state.global_step, total),
            desc="Ada-K",
            disable=not (self.config.progress_bar and self.accelerator.is_local_main_process),
            dynamic_ncols=True,
        )
        snapshot = None  # the state before the step in progress (restored on Ctrl-C)
        try:
            while self.state.warmup_step < warmup_total:
                self._set_phase("warmup")
                snapshot = self._snapshot()
                if self.config.warmup == "p-warm" and self.state.warmup_p is None:
                    if self.config.warmup_p is None:
                        self.state.warmup_p, self.state.warmup_mean_label = self.calibrate_threshold()
                    else:
                        self.state.warmup_p = self.config.warmup_p
                    self.log(
                        {"warmup_p": self.state.warmup_p, "warmup_mean_label": self.state.warmup_mean_label},
                        bar,
                    )
                started = time.perf_counter()
                stats = self._warmup_step()
                self.state.warmup_step += 1
                snapshot = None
                bar.update(1)
                self._after_step(stats, started, bar, last=self.state.global_step == total)
            while self.state.ppo_step < self.config.max_steps:
                self._set_phase("ppo")
                snapshot = self._snapshot()
                started = time.perf_counter()
                stats = self._ppo_step()
                self.state.ppo_step += 1
                snapshot = None
                bar.update(1)
                bar.set_postfix(k=f"{stats['activated_mean']:.2f}", reward=f"{stats['reward']:.3f}")
                self._after_step(stats, started, bar, last=self.state.global_step == total)
        except KeyboardInterrupt:
            if snapshot is not None:  # drop the half-done step: the checkpoint is the last step boundary
                self._restore(snapshot)
            path = self.save_checkpoint()
            if self.accelerator.is_main_process:
                bar.write(f"Interrupted: saved {path}; resume with train(resume_from_checkpoint=True).")
            raise
        finally:
            bar.close()
        if (
            self.state.global_step == total
            and not (Path(self.config.output_dir) / self._checkpoint_name()).exists()
        ):
            self.save_checkpoint()
        if self.config.verify_base_unchanged:
            self._check_base_unchanged()
        if self._trackers_started:
            self.accelerator.end_training()
            self._trackers_started = False
        return self.state

    def _snapshot(self) -> dict[str, Any]:
        """Allocators, optimiser, RNG and progress before a step (small: allocators are tiny)."""
        return {
            "params": [p.detach().clone() for p in self.bank.parameters()],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "state": (self.state.batches_seen, self.state.warmup_p, self.state.warmup_mean_label),
            "log_length": len(self.state.log_history),
        }

    def _restore(self, snapshot: dict[str, Any]) -> None:
        with torch.no_grad():
            for param, saved in zip(self.bank.parameters(), snapshot["params"]):
                param.copy_(saved)
                param.grad = None
        self.optimizer.load_state_dict(snapshot["optimizer"])
        torch.set_rng_state(snapshot["rng"])
        if snapshot["cuda_rng"]:
            torch.cuda.set_rng_state_all(snapshot["cuda_rng"])
        self.state.batches_seen, self.state.warmup_p, self.state.warmup_mean_label = snapshot["state"]
        del self.state.log_history[snapshot["log_length"] :]

    def _after_step(self, stats: dict[str, Any], started: float, bar: Any, last: bool) -> None:
        config, step = self.config, self.state.global_step
        if config.logging_steps and (step % config.logging_steps == 0 or last):
            stats = self._reduce(stats)
            stats["phase"] = "warmup" if self._phase == "warmup" else "ppo"
            stats["seconds"] = time.perf_counter() - started
            self.log(stats, bar)
        due = (config.eval_steps and step % config.eval_steps == 0) or last
        if due and (self.eval_dataset is not None or self.eval_fn is not None):
            results = self.evaluate() if self.eval_dataset is not None else {}
            if self.eval_fn is not None:
                results.update(self.eval_fn(self))
            self.log(results, bar)
        if (config.save_steps and step % config.save_steps == 0) or last:
            self.save_checkpoint()

    # ---- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_name(self) -> str:
        return f"{CHECKPOINT_PREFIX}{self.state.global_step}"

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Save allocators, optimiser, RNG states and progress (safetensors + JSON); returns the folder."""
        folder = Path(path) if path is not None else Path(self.config.output_dir) / self._checkpoint_name()
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            save_file(allocator_state(self.model), str(folder / ALLOCATORS_NAME))
            tensors, groups = _optimizer_tensors(self.optimizer) if self.optimizer is not None else ({}, [])
            save_file(tensors, str(folder / OPTIMIZER_NAME))
            info = {
                "phase": self._phase,
                "trainer_state": dataclasses.asdict(self.state),
                "training_config": self.config.to_dict(),
                "adak_config": self.adak_config.to_dict(),
                "moe_shape": self.shape.fingerprint(),
                "optimizer_param_groups": groups,
                "num_processes": accelerator.num_processes,
            }
            (folder / STATE_NAME).write_text(json.dumps(info, indent=2, default=float))
        accelerator.wait_for_everyone()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(folder / f"rng_state_{accelerator.process_index}.safetensors"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and path is None:
            self._rotate_checkpoints()
        return folder

    def _rotate_checkpoints(self) -> None:
        limit = self.config.save_total_limit
        if not limit:
            return
        folders = sorted(_checkpoints(self.config.output_dir), key=lambda p: _step_of(p))
        for old in folders[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore allocators, optimiser, RNG state and progress saved by :meth:`save_checkpoint`."""
        folder = Path(path)
        if not (folder / STATE_NAME).is_file():
            raise FileNotFoundError(f"{folder} is not an Ada-K checkpoint (no {STATE_NAME}).")
        info = json.loads((folder / STATE_NAME).read_text())
        if info["moe_shape"] != self.shape.fingerprint():
            raise ValueError(
                f"Checkpoint {folder} was trained for another model (MoE shape {info['moe_shape']}), not this one "
                f"({self.shape.fingerprint()}): resume with the same base model."
            )
        if info["adak_config"] != self.adak_config.to_dict():
            raise ValueError(
                f"Checkpoint {folder} used {info['adak_config']}, this trainer {self.adak_config.to_dict()}: "
                "resume with the same AdaKConfig."
            )
        if info["num_processes"] != self.accelerator.num_processes:
            raise ValueError(
                f"Checkpoint {folder} was written by {info['num_processes']} processes; resume with the same "
                f"number (now {self.accelerator.num_processes}) so that the data order continues exactly."
            )
        load_allocator_state(self.model, load_file(str(folder / ALLOCATORS_NAME)))
        state = dict(info["trainer_state"])
        self.state = TrainerState(**state)
        self._phase = None
        if info["phase"] is not None:
            self._set_phase(info["phase"])
            _load_optimizer_tensors(
                self.optimizer, load_file(str(folder / OPTIMIZER_NAME)), info["optimizer_param_groups"]
            )
        rng_file = folder / f"rng_state_{self.accelerator.process_index}.safetensors"
        if rng_file.is_file():
            rng = load_file(str(rng_file))
            torch.set_rng_state(rng["cpu"])
            cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
            if cuda and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(cuda)

    def save_adapter(self, directory: str | os.PathLike, **info: Any) -> Path:
        """Save the trained allocators as a routing adapter (``hf_moe_routing.hub.save_routing_adapter``)."""
        from ..hub import save_routing_adapter

        self.accelerator.wait_for_everyone()
        training_info = {
            "method": "Ada-K (warm start + PPO)",
            "warmup_p": self.state.warmup_p,
            **{
                k: v
                for k, v in self.config.to_dict().items()
                if k not in ("output_dir", "report_to", "progress_bar")
            },
            **info.pop("training_info", {}),
        }
        if self.accelerator.is_main_process:
            save_routing_adapter(self.model, directory, training_info=training_info, **info)
        self.accelerator.wait_for_everyone()
        return Path(directory)


# ---- state helpers -----------------------------------------------------------------------------
def allocator_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The allocator weights of an Ada-K-patched model, keyed ``layers.{layer_index}.allocator.weight``."""
    return {
        f"layers.{index}.{name}": tensor.detach().to("cpu", copy=True).contiguous()
        for index, layer in adak_layers(model).items()
        for name, tensor in layer.routing_state().items()
    }


def load_allocator_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`allocator_state` (clear errors for checkpoints of other models)."""
    layers = adak_layers(model)
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = re.match(r"^layers\.(\d+)\.(.+)$", key)
        if match is None:
            raise ValueError(f"Unexpected allocator key {key!r} (expected layers.<index>.allocator.weight).")
        per_layer.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    if set(per_layer) != set(layers):
        raise ValueError(
            f"The allocator state covers layers {sorted(per_layer)}, this model's Ada-K layers are {sorted(layers)}: "
            "it belongs to another model (different layer count) or another AdaKConfig(layers=...)."
        )
    for index, layer in layers.items():
        layer.load_routing_state(per_layer[index])


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            tensors[f"state.{param_id}.{name}"] = (
                torch.as_tensor(value).detach().to("cpu", copy=True).contiguous()
            )
    return tensors, state["param_groups"]


def _load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]


def _step_of(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder with the highest step under ``output_dir`` (None if there is none)."""
    folders = [p for p in _checkpoints(output_dir) if (p / STATE_NAME).is_file()]
    return max(folders, key=_step_of) if folders else None


def _flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """Tracker-friendly hyper-parameters (lists and None as strings)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
