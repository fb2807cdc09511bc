"""Saving and loading of the Ada-K trainer: checkpoints (see :mod:`.checkpoint`) and routing adapters."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ...hub.output_dir import output_dir_lock, remove_previous_run, written_by_us
from . import checkpoint as ckpt
from .config import TrainerState
from .reporting import _finite, settings_that_did_not_run

#: what a previous run wrote into output_dir (refused without overwrite_output_dir; a stale temporary
#: folder of a run that died does not count: the next save removes it)
PREVIOUS_OUTPUT = ("checkpoint-*", ckpt.LOG_NAME, ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME)
#: what overwrite_output_dir removes first (the adapter files are replaced atomically by the save)
REMOVE_ON_OVERWRITE = (
    "checkpoint-*",
    ckpt.LOG_NAME,
    f"{ckpt.TMP_PREFIX}{ckpt.CHECKPOINT_PREFIX}*",
    f"{ckpt.TMP_PREFIX}old-{ckpt.CHECKPOINT_PREFIX}*",
)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


class SavingMixin:
    """Checkpoint and adapter methods of :class:`~hf_moe_routing.training.adak.trainer.AdaKTrainer`."""

    # ---- checkpoints and adapters ------------------------------------------------------------------------
    def _checkpoint_name(self) -> str:
        return f"{ckpt.CHECKPOINT_PREFIX}{self.state.global_step}"

    def _info(self) -> dict[str, Any]:
        return {
            "phase": self._phase,
            "trainer_state": dataclasses.asdict(self.state),
            "training_config": self.config.to_dict(),
            "adak_config": self.adak_config.to_dict(),
            "moe_shape": self.shape.fingerprint(),
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Save allocators, optimiser, RNG states and progress atomically; returns the folder.

        Raises OSError (naming the file; "Disk full" for ENOSPC) if a file cannot be written: the
        temporary folder is removed and earlier checkpoints stay intact.
        """
        acc = self.accelerator
        output = Path(self.config.output_dir)
        folder = Path(path) if path is not None else output / self._checkpoint_name()
        tmp = ckpt.temp_folder(folder.parent, self.state.global_step, self._run_token)
        main = acc.is_main_process

        def write_main() -> None:
            ckpt.finish(
                tmp,
                folder,
                model=self.model,
                bank=self.bank,
                optimizer=self.optimizer,
                info=_finite(self._info()),
                world=acc.num_processes,
            )
            if path is None:
                ckpt.rotate(output, self.config.save_total_limit)

        acc.wait_for_everyone()
        with output_dir_lock(folder.parent, main_process=main):  # re-entrant inside train()
            return self._save_checkpoint_stages(folder, tmp, write_main)

    def _save_checkpoint_stages(self, folder: Path, tmp: Path, write_main: Any) -> Path:
        acc, main = self.accelerator, self.accelerator.is_main_process
        stages = [
            lambda: ckpt.begin(folder.parent, self.state.global_step, self._run_token) if main else None,
            lambda: ckpt.write_rng(tmp, acc.process_index),
            lambda: write_main() if main else None,
        ]
        for stage in stages:  # every process passes each stage, or all raise (none waits at a barrier)
            error: BaseException | None = None
            try:
                stage()
            except BaseException as exc:  # noqa: BLE001 - re-raised below on every process
                error = exc
            try:
                self._agree(error)
            except BaseException:
                if main:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
        return folder

    def _check_output_dir(self, resuming: bool) -> None:
        """Refuse to replace a previous run's output in ``output_dir`` unless ``overwrite_output_dir``.

        With ``overwrite_output_dir`` the previous run's checkpoints and ``log.jsonl`` are removed first
        (only what a run of ours wrote; the adapter is replaced atomically at the end). Resuming, and a
        second ``train()`` of this trainer, continue in the folder. Raises FileExistsError on every process.
        """
        error: BaseException | None = None
        folder = Path(self.config.output_dir)
        if self.accelerator.is_main_process and not resuming and not self._wrote_output and folder.is_dir():
            try:
                found = [
                    p.name for p in folder.iterdir() if _matches(p.name, PREVIOUS_OUTPUT) and written_by_us(p)
                ]
                if found and not self.config.overwrite_output_dir:
                    names = ", ".join(sorted(found)[:4]) + (", ..." if len(found) > 4 else "")
                    raise FileExistsError(
                        f"{folder} already holds the output of an earlier run ({names}): pass "
                        "AdaKTrainingConfig(overwrite_output_dir=True) to replace it (other files are kept), "
                        "train(resume_from_checkpoint=True) to continue it, or choose another output_dir."
                    )
                if found:
                    remove_previous_run(folder, REMOVE_ON_OVERWRITE)
            except BaseException as exc:  # noqa: BLE001 - re-raised on every process
                error = exc
        self._agree(error)
        self._wrote_output = True

    def _agree(self, error: BaseException | None) -> None:
        """Raise on every process if any process failed (so none waits forever at the next barrier)."""
        failed = torch.tensor(0.0 if error is None else 1.0, device=self.device)
        if self.accelerator.num_processes > 1:
            failed = self.accelerator.reduce(failed, "sum")
        if error is not None:
            raise error
        if float(failed) > 0:
            raise RuntimeError("Saving the checkpoint failed on another process (see its error).")

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore allocators, optimiser, RNG state and progress saved by :meth:`save_checkpoint`.

        Raises CheckpointError (a ValueError naming the file) for an incomplete or damaged folder, and
        ValueError for a checkpoint of another model, AdaKConfig or number of processes.
        """
        folder = Path(path)
        info = ckpt.verify(folder, self.accelerator.process_index)
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
        tensors, _ = ckpt.read_tensors(folder, ckpt.WEIGHTS_NAME)
        ckpt.load_allocator_state(self.model, tensors)
        self.state = TrainerState(**info["trainer_state"])
        self._phase = None
        if info["phase"] is not None:
            self._set_phase(info["phase"])
            tensors, _ = ckpt.read_tensors(folder, ckpt.OPTIMIZER_NAME)
            ckpt.load_optimizer_state(self.bank, self.optimizer, tensors, info["optimizer_param_groups"])
        ckpt.set_rng_state(*ckpt.read_tensors(folder, ckpt.rng_file(self.accelerator.process_index)))

    def save_adapter(self, directory: str | os.PathLike, **info: Any) -> Path:
        """Save the trained allocators as a routing adapter (``hf_moe_routing.hub.save_routing_adapter``).

        ``info`` is passed on (``training_info`` is merged into the trainer's own record, ``results``,
        ``base_model_id``, ...). Every process must call it; the main process writes, holding the
        folder's lock (:func:`~hf_moe_routing.hub.output_dir.output_dir_lock`).

        Raises:
            OutputDirBusyError: another process holds the lock of ``directory`` (e.g. trains into it).
        """
        from ...hub import save_routing_adapter

        self.accelerator.wait_for_everyone()
        skip = (
            "output_dir",
            "overwrite_output_dir",
            "report_to",
            "progress_bar",
            "log_level",
            "logging_steps",
            "save_steps",
            "save_total_limit",
        )
        training_info = {
            "method": "Ada-K (warm start + PPO)",
            **{k: v for k, v in self.config.to_dict().items() if k not in skip},
            "allocator_input": self.adak_config.allocator_input,
            "warmup_p": self.state.warmup_p,
            "warmup_mean_label": self.state.warmup_mean_label,
            "final_k_penalty": self.state.k_penalty,
            "warmup_steps_run": self.state.warmup_step,
            "ppo_steps_run": self.state.ppo_step,
            **info.pop("training_info", {}),
        }
        for key in settings_that_did_not_run(self):
            training_info.pop(key, None)
        main = self.accelerator.is_main_process
        if main:  # another process writing ``directory`` gets OutputDirBusyError (re-entrant inside train())
            with output_dir_lock(directory, main_process=True):
                save_routing_adapter(self.model, directory, training_info=_finite(training_info), **info)
        self.accelerator.wait_for_everyone()
        return Path(directory)

    # ---- Ctrl-C: the state before the step in progress --------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        """Allocators, optimiser, RNG and progress before a step (small: allocators are tiny)."""
        return {
            "params": [p.detach().clone() for p in self.bank.parameters()],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None,
            "rng": torch.get_rng_state(),
            "state": dataclasses.replace(self.state, log_history=[]),
            "log_length": len(self.state.log_history),
        }

    def _restore(self, snapshot: dict[str, Any]) -> None:
        with torch.no_grad():
            for param, saved in zip(self.bank.parameters(), snapshot["params"]):
                param.copy_(saved)
                param.grad = None
        if snapshot["optimizer"] is not None:
            self.optimizer.load_state_dict(snapshot["optimizer"])
        torch.set_rng_state(snapshot["rng"])
        history = self.state.log_history[: snapshot["log_length"]]
        self.state = dataclasses.replace(snapshot["state"], log_history=history)
