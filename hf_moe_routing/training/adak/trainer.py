"""Train Ada-K allocators on a frozen MoE model: warm start, then PPO (Yue et al., ICLR 2025).

>>> from hf_moe_routing import AdaKConfig, AdaKTrainer, AdaKTrainingConfig
>>> trainer = AdaKTrainer(model, AdaKTrainingConfig(output_dir="adak", target_experts=1.4), train_data,
...                       eval_data, tokenizer=tokenizer, adak_config=AdaKConfig())
>>> output = trainer.train()   # warm start, PPO, checkpoints every save_steps, adapter in output_dir
>>> print(output)              # a readable summary; output.metrics holds the numbers

The control loop lives here; the pieces are in :mod:`.rollout` (forwards and advantages), :mod:`.update`
(losses, gradient sync, dual ascent), :mod:`.warmstart`, :mod:`.steps`, :mod:`.checkpoint` and
:mod:`.distributed` (one device, ``device_map`` sharding or FSDP2).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core.batching import model_device
from ...hub.output_dir import output_dir_lock
from ...methods.adak import AdaKConfig, adak_layers
from ...methods.kept_gain import kept_gains
from ...patching import get_patch_state, patch_model, unwrap_model
from . import checkpoint as ckpt
from . import steps
from .config import AdaKTrainingConfig, TrainerState
from .data import TrainingStream, prepare_dataset
from .distributed import fsdp_plugin, mixed_precision, shard_frozen_model
from .frozen_base import FrozenBase
from .reporting import AdaKTrainOutput, LoggingMixin, _flat
from .saving import SavingMixin
from .targets import layer_targets
from .update import AllocatorBank, optimizer_step, synchronize_gradients
from .warmstart import exact_start_available, layer_target


class AdaKTrainer(LoggingMixin, SavingMixin):
    """Warm-starts and PPO-trains the Ada-K allocators of a frozen MoE model.

    Args:
        model: a transformers MoE causal LM, unpatched (it is patched with ``adak_config``) or already
            patched with :class:`AdaKConfig`. Allocators that come trained (from a routing adapter) are
            the starting point: the warm start is skipped.
        config: training settings (:class:`AdaKTrainingConfig`).
        train_dataset, eval_dataset: rows of ``input_ids``/``attention_mask``/``labels`` (e.g. from
            :func:`hf_moe_routing.data.pack_dataset`) or text datasets (then pass ``tokenizer``).
        tokenizer: used to pack text datasets; ``seq_len`` is their block length.
        accelerator: an ``accelerate.Accelerator`` to use (default: one built from ``config``).
        eval_fn: an extra evaluation hook, ``eval_fn(trainer) -> dict``, run whenever the trainer evaluates.

    ``config.seed`` seeds everything (transformers' ``set_seed``, the allocators' initialisation, k
    sampling and the data order), so two runs with one seed train identical allocators. Every base
    parameter is frozen; after each optimiser step the trainer checks that none has a gradient, and
    at the end that none changed.

    Raises ValueError for a model patched with another routing (or another AdaKConfig), bad data, or
    an unsupported distributed set-up (DeepSpeed, FSDP1, FSDP with a device_map).
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
        from transformers import set_seed

        self.config = config = config or AdaKTrainingConfig()
        if config.budget_calibration_data == "eval" and eval_dataset is None:  # before the model is touched
            raise ValueError(
                "AdaKTrainingConfig(budget_calibration_data='eval') measures the budget on eval_dataset: "
                "pass eval_dataset (command line: --eval-dataset, or --eval-batches to hold out the end of "
                "--dataset), or use 'train'."
            )
        set_seed(config.seed)
        model = unwrap_model(model)
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
        patch = get_patch_state(model)
        self.adak_config: AdaKConfig = patch.config
        self.shape = patch.shape
        self.layers = adak_layers(model)
        self.pretrained = any(layer.is_fitted() for layer in self.layers.values())
        if not self.pretrained:
            for i, layer in self.layers.items():  # seeded initialisation, whatever happened before
                layer.allocator.reset_parameters(torch.Generator().manual_seed(config.seed * 1_000_003 + i))
        self.layer_target = layer_target(
            config.target_experts, self.shape.top_k, len(self.shape.moe_layers), len(self.layers)
        )
        most = min(layer.k_max for layer in self.layers.values())
        if self.layer_target is not None and not 1.0 <= self.layer_target <= most:
            raise ValueError(
                f"target_experts={config.target_experts} cannot be reached: each Ada-K layer chooses 1..{most} "
                f"experts (the others use top-{self.shape.top_k})."
            )

        self.layer_targets = layer_targets(config, sorted(self.layers), most, self.moe_mean)

        device_map = getattr(model, "hf_device_map", None) or {}
        self.sharded = len({str(d) for d in device_map.values()}) > 1
        self.accelerator = accelerator or Accelerator(
            mixed_precision=mixed_precision(config.mixed_precision),
            log_with=config.report_to,
            project_dir=config.output_dir,
        )
        self.fsdp = fsdp_plugin(self.accelerator, config.fsdp)
        self.gains = kept_gains(model) if self.adak_config.weight_gain else []
        if self.gains and self.fsdp is not None:
            raise ValueError(
                "AdaKConfig(weight_gain=True) is not trained under FSDP: train without FSDP (one process, or "
                "device_map sharding), or with weight_gain=False."
            )
        if self.accelerator.num_processes > 1 and device_map:
            raise ValueError(
                "A model dispatched with device_map trains in one process; launch without data parallelism "
                "(or load one full copy of the model per process, or shard it with FSDP2)."
            )
        model.eval()  # no dropout in the frozen model; Ada-K layers sample only inside rollouts
        model.requires_grad_(False)
        self.bank = AllocatorBank(self.layers)
        if self.fsdp is not None:
            self.bank.to(self.accelerator.device)
            shard_frozen_model(model, set(self.bank.parameters()), self.fsdp)
        elif not device_map:
            model.to(self.accelerator.device)
        self.bank.requires_grad_(True)
        self.frozen_base = FrozenBase(
            model, [*self.bank.parameters(), *self.gains], config.verify_base_unchanged
        )

        self.tokenizer, self.seq_len, self.eval_fn = tokenizer, seq_len, eval_fn
        self.train_dataset = prepare_dataset(train_dataset, model, tokenizer, seq_len)
        self.eval_dataset = (
            prepare_dataset(eval_dataset, model, tokenizer, seq_len) if eval_dataset is not None else None
        )
        acc = self.accelerator
        self.stream = TrainingStream(
            self.train_dataset,
            config.batch_size,
            acc.num_processes,
            acc.process_index,
            config.seed,
            config.shuffle,
        )
        self.exact_start = (
            not self.pretrained
            and config.warmup in ("k-warm", "skip-warm")
            and exact_start_available(config.warmup, self.layers)
        )
        self.state = TrainerState(k_penalty=config.k_penalty)
        self._run_token = ckpt.run_token(self.accelerator)  # temporary checkpoint folders of this run only
        self._wrote_output = False
        if self.layer_targets is not None:
            self.state.layer_k_penalties = [config.k_penalty] * len(self.layer_targets)
        self.optimizer: torch.optim.Optimizer | None = None
        self._phase: str | None = None
        self._trackers_started = False

    # ---- devices, collectives, checks ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The process's device (collectives run there)."""
        return self.accelerator.device

    @property
    def input_device(self) -> torch.device:
        """Where the model's inputs go (the embedding's device)."""
        return model_device(self.model)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over processes (itself in one process)."""
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), "sum")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """No-grad forward of the frozen model; logits (B, T, V)."""
        with torch.no_grad(), self.accelerator.autocast():
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def moe_mean(self, per_adak_layer: list[float]) -> float:
        """Mean routed experts over all MoE layers (layers without an allocator run the model's top-k)."""
        others = len(self.shape.moe_layers) - len(per_adak_layer)
        return (sum(per_adak_layer) + others * self.shape.top_k) / len(self.shape.moe_layers)

    # ---- optimisation ----------------------------------------------------------------------------------
    def _set_phase(self, phase: str) -> None:
        if self._phase != phase:
            config = self.config
            lr, decay = (
                (config.warmup_learning_rate, 0.0)
                if phase == "warmup"
                else (config.learning_rate, config.weight_decay)
            )
            self._phase = phase
            self.optimizer = torch.optim.AdamW(self.bank.parameters(), lr=lr, weight_decay=decay)

    def step_optimizer(self) -> float:
        """Sum gradients over processes, clip, step; returns the gradient norm."""
        params = list(self.bank.parameters())
        if self.accelerator.num_processes > 1:
            synchronize_gradients(params, self.reduce_sum)
        norm = optimizer_step(params, self.optimizer, self.config.max_grad_norm)
        self.frozen_base.check_no_gradients()
        for layer in self.layers.values():
            layer.num_updates += 1
        return norm

    # ---- the loop --------------------------------------------------------------------------------------
    def warmup_total(self) -> int:
        """Cross-entropy warm-start steps of this run (0 for an exact start, ``warmup="random"``, or
        allocators that came trained, e.g. from a routing adapter)."""
        skip = self.config.warmup == "random" or self.exact_start or self.pretrained
        return 0 if skip else self.config.warmup_steps

    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None) -> AdaKTrainOutput:
        """Warm start, then PPO; saves the routing adapter into ``output_dir`` and returns a summary.

        ``resume_from_checkpoint``: a checkpoint folder, or True for the newest complete one in
        ``output_dir`` (older ones are tried, with a warning, if a newer one is damaged). On Ctrl-C
        (KeyboardInterrupt) a checkpoint of the last finished step is saved before the exception
        propagates.

        The main process holds ``output_dir``'s lock meanwhile (one writer per folder). An
        ``output_dir`` that already holds a previous run's adapter, checkpoints or log is refused
        unless ``config.overwrite_output_dir`` (which removes that run's checkpoints and log first) or
        resuming.

        Raises FileNotFoundError if there is no checkpoint to resume from, CheckpointError (a
        ValueError naming the file) for a damaged explicit checkpoint, OSError for a full disk,
        FileExistsError for a previous run's output, OutputDirBusyError (an OSError naming the PID)
        if another process is writing ``output_dir``.
        """
        main = self.accelerator.is_main_process
        with output_dir_lock(self.config.output_dir, main_process=main):
            self._check_output_dir(bool(resume_from_checkpoint))
            return self._train(resume_from_checkpoint)

    def _train(self, resume_from_checkpoint: str | os.PathLike | bool | None) -> AdaKTrainOutput:
        if resume_from_checkpoint:
            if resume_from_checkpoint is True:
                found = ckpt.find_checkpoint(self.config.output_dir, self.accelerator.process_index)
                if found is None:
                    raise FileNotFoundError(
                        f"No complete {ckpt.CHECKPOINT_PREFIX}* folder in {self.config.output_dir} to resume from."
                    )
                path = found[0]
            else:
                path = Path(resume_from_checkpoint)
            self.load_checkpoint(path)
        if self.config.report_to and not self._trackers_started:
            self.accelerator.init_trackers("adak", config=_flat(self.config.to_dict()))
            self._trackers_started = True
        started = time.perf_counter()
        warmup_total, total = self.warmup_total(), self.warmup_total() + self.config.max_steps
        bar = tqdm(
            total=total,
            initial=min(self.state.global_step, total),
            desc="Ada-K",
            disable=not (self.config.progress_bar and self.accelerator.is_local_main_process),
            dynamic_ncols=True,
        )
        snapshot = None  # the state before the step in progress (restored on Ctrl-C)
        try:
            if self.exact_start and not self.state.exact_start:
                snapshot = self._snapshot()
                self.log(steps.exact_start(self), bar)
                snapshot = None
            while self.state.warmup_step < warmup_total:
                self._set_phase("warmup")
                snapshot = self._snapshot()
                if self.config.warmup in ("p-warm", "skip-warm") and self._thresholds_missing():
                    found = steps.calibrate(self, self.config.warmup)
                    for key, value in found.items():
                        setattr(self.state, key, value)
                    self.log(found, bar)
                t0 = time.perf_counter()
                stats = steps.warmup_step(self)
                self.state.warmup_step += 1
                snapshot = None
                bar.update(1)
                self._after_step(stats, "warmup", t0, bar, last=self.state.global_step == total)
            while self.state.ppo_step < self.config.max_steps:
                self._set_phase("ppo")
                snapshot = self._snapshot()
                t0 = time.perf_counter()
                stats = steps.ppo_step(self)
                self.state.ppo_step += 1
                snapshot = None
                bar.update(1)
                bar.set_postfix(k=f"{stats['greedy_k_mean']:.2f}", reward=f"{stats['reward']:.3f}")
                self._after_step(stats, "ppo", t0, bar, last=self.state.global_step == total)
        except KeyboardInterrupt:
            if snapshot is not None:  # drop the half-done step: the checkpoint is the last step boundary
                self._restore(snapshot)
            path = self.save_checkpoint()
            if self.accelerator.is_main_process:
                bar.write(
                    f"Interrupted at step {self.state.global_step}: saved {path}. Resume with "
                    "trainer.train(resume_from_checkpoint=True) in Python, or `--resume` on the command line."
                )
            raise
        finally:
            bar.close()
        calibrate, fit = self._budget_calibration_due(), self._weight_gain_due()
        if calibrate:
            found = steps.match_budget(self)
            self.state.budget_tilt = found["budget_tilt"]
            self.log({**found, "phase": "budget"})
        if fit:
            self.save_checkpoint()  # PPO's work is safe if the fit (the run's one backward pass) fails
            self.state.weight_gain_fit = steps.fit_weight_gains(self)
            self.log({**self.state.weight_gain_fit, "phase": "weight-gain"})
        if calibrate or fit:
            self._evaluate_and_log()
            self.save_checkpoint()
        elif not (Path(self.config.output_dir) / self._checkpoint_name()).is_dir():
            self.save_checkpoint()
        if self.config.verify_base_unchanged:
            self.frozen_base.check_unchanged()
        if self._trackers_started:
            self.accelerator.end_training()
            self._trackers_started = False
        return self._finish(time.perf_counter() - started)

    def _budget_calibration_due(self) -> bool:
        config = self.config
        return (
            config.target_experts is not None
            and config.budget_calibration
            and self.state.budget_tilt is None
            and all(layer.allocator.bias is not None for layer in self.layers.values())
        )

    def _weight_gain_due(self) -> bool:
        return bool(self.gains) and self.config.weight_gain_steps > 0 and self.state.weight_gain_fit is None

    def _thresholds_missing(self) -> bool:
        if self.config.warmup == "p-warm":
            return self.state.warmup_p is None
        return self.state.skip_log_betas is None

    def _finish(self, runtime: float) -> AdaKTrainOutput:
        last_eval = next((e for e in reversed(self.state.log_history) if "eval_ppl" in e), None)
        results = {
            k: v for k, v in (last_eval or {}).items() if k.startswith("eval_") and not isinstance(v, list)
        }
        adapter = self.save_adapter(self.config.output_dir, results=results)
        metrics = {
            "train_runtime": runtime,
            "warmup_steps": self.state.warmup_step,
            "ppo_steps": self.state.ppo_step,
            "top_k": self.shape.top_k,
            "target_experts": self.config.target_experts,
            "k_penalty": self.state.k_penalty,
            **results,
        }
        output = AdaKTrainOutput(self.state.global_step, metrics, str(adapter), self.state.log_history)
        if self.accelerator.is_main_process and self._verbose:
            print(output)
        return output

    def _after_step(self, stats: dict[str, Any], phase: str, started: float, bar: Any, last: bool) -> None:
        config, step = self.config, self.state.global_step
        if (config.logging_steps and step % config.logging_steps == 0) or last:
            stats = self._reduce(stats)
            self.log({**stats, "phase": phase, "seconds": time.perf_counter() - started}, bar)
        # else: evaluate and save after calibrating the budget / fitting the weight gains
        final = last and not self._budget_calibration_due() and not self._weight_gain_due()
        if (config.eval_steps and step % config.eval_steps == 0) or final:
            self._evaluate_and_log(bar)
        if (config.save_steps and step % config.save_steps == 0) or final:
            self.save_checkpoint()
