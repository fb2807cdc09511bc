"""Training checkpoints: atomic folders, verified on resume, safetensors and JSON only (never pickle).

``checkpoint-N/`` (N = global step) is a routing adapter folder plus the trainer's files::

    routing_config.json, routing_adapter.safetensors   the allocators (hub format, keys layers.{i}.{name})
    optimizer.safetensors                              AdamW moments and steps, keyed by parameter name
    rng_state_{rank}.safetensors                       every process's torch / CUDA / numpy / Python RNG
    trainer_state.json                                 progress, settings, and a SHA-256 of every file above

A checkpoint is written into a hidden temporary folder, flushed to disk and renamed into place, and
``trainer_state.json`` is written last, so a crash leaves either a complete checkpoint or none.
Resuming checks every listed file against its hash; :func:`find_checkpoint` falls back to the newest
complete checkpoint (with a warning naming what was wrong with the newer ones).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from ...core.config import read_json
from ...hub.adapter_io import CONFIG_NAME, WEIGHTS_NAME, adapter_config_dict, adapter_state_dict
from ...methods.adak import adak_layers

CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
#: Kept for old imports: the allocators now live in the adapter file of the checkpoint.
ALLOCATORS_NAME = WEIGHTS_NAME
LOG_NAME = "log.jsonl"
TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or corrupt (the message names the file and the problem)."""


# ---- allocator tensors (the adapter's key format) ------------------------------------------------
def allocator_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The allocator tensors of an Ada-K-patched model, keyed ``layers.{i}.allocator.{name}`` (CPU copies)."""
    adak_layers(model)  # clear error if there are none
    return adapter_state_dict(model)


def load_allocator_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`allocator_state` (clear errors for checkpoints of other models)."""
    layers = adak_layers(model)
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = re.match(r"^layers\.(\d+)\.(.+)$", key)
        if match is None:
            raise ValueError(f"Unexpected allocator key {key!r} (expected layers.<index>.allocator.<name>).")
        per_layer.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    if set(per_layer) != set(layers):
        raise ValueError(
            f"The allocator state covers layers {sorted(per_layer)}, this model's Ada-K layers are {sorted(layers)}: "
            "it belongs to another model (different layer count) or another AdaKConfig(layers=...)."
        )
    for index, layer in layers.items():
        layer.load_routing_state(per_layer[index])


# ---- optimizer and RNG -----------------------------------------------------------------------------
def _optimizer_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def optimizer_state(
    bank: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, param_groups)``: the optimiser state flattened by parameter name (torch's DCP helpers)."""
    if optimizer is None or not optimizer.state:  # (the helper would initialise an empty state: skip)
        return {}, {}
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    flat = get_optimizer_state_dict(bank, optimizer, options=_optimizer_options())
    tensors = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in flat.items()
        if isinstance(v, torch.Tensor)
    }
    groups = {
        k: list(v) if isinstance(v, tuple) else v for k, v in flat.items() if not isinstance(v, torch.Tensor)
    }
    return tensors, groups


def load_optimizer_state(
    bank: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    groups: dict[str, Any],
) -> None:
    if not tensors:
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    flat = {**{k: tuple(v) if isinstance(v, list) else v for k, v in groups.items()}, **tensors}
    set_optimizer_state_dict(bank, optimizer, optim_state_dict=flat, options=_optimizer_options())


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    metadata = {
        "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
        "python": json.dumps([version, list(internal), gauss]),
    }
    return tensors, metadata


def set_rng_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in metadata:
        kind, pos, has_gauss, cached = json.loads(metadata["numpy"])
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    if "python" in metadata:
        version, internal, gauss = json.loads(metadata["python"])
        random.setstate((version, tuple(internal), gauss))


# ---- files -------------------------------------------------------------------------------------------
def write_file(path: Path, data: bytes) -> str:
    """Write ``data`` durably (flush + fsync); returns its SHA-256. A full disk raises OSError(ENOSPC)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"Disk full: no space left on the device while writing {path}. Free some space or choose "
                "another output_dir; the previous checkpoints are intact.",
            ) from error
        raise OSError(error.errno, f"Could not write {path}: {error.strerror or error}") from error
    return hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


def run_token(accelerator: Any = None) -> str:
    """``<pid>-<random>`` of the main process, the same on every process of the run (broadcast)."""
    token = [f"{os.getpid()}-{secrets.token_hex(4)}"]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(token)
    return token[0]


def temp_folder(output_dir: Path, step: int, token: str = "") -> Path:
    """``.tmp-checkpoint-<step>-<pid>-<random>``: unique to one run, so two runs never share one."""
    return output_dir / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}{'-' + token if token else ''}"


def begin(output_dir: Path, step: int, token: str = "") -> Path:
    """(main process) A fresh temporary folder for the checkpoint of ``step``.

    Temporary folders of other runs are removed: the caller holds the output folder's lock
    (:func:`hf_moe_routing.hub.output_dir.output_dir_lock`), so they were left by a process that died.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(output_dir, step, token)
    for stale in output_dir.glob(f"{TMP_PREFIX}{CHECKPOINT_PREFIX}*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    """(every process) This process's RNG states."""
    tensors, metadata = rng_state()
    write_file(tmp / rng_file(rank), save_bytes(tensors, metadata=metadata))


def finish(
    tmp: Path,
    target: Path,
    *,
    model: nn.Module,
    bank: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    info: dict[str, Any],
    world: int,
) -> Path:
    """(main process) Write allocators, optimiser and state (hashes last), then rename into place."""
    hashes = {}
    weights = save_bytes(allocator_state(model), metadata={"format": "pt"})
    config = adapter_config_dict(model, training_info={"checkpoint": True})
    config["weights_sha256"] = hashlib.sha256(weights).hexdigest()  # a routing adapter folder, as saved
    hashes[CONFIG_NAME] = write_file(tmp / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    hashes[WEIGHTS_NAME] = write_file(tmp / WEIGHTS_NAME, weights)
    tensors, groups = optimizer_state(bank, optimizer)
    hashes[OPTIMIZER_NAME] = write_file(tmp / OPTIMIZER_NAME, save_bytes(tensors, metadata={"format": "pt"}))
    for rank in range(world):
        path = tmp / rng_file(rank)
        if not path.is_file():
            raise CheckpointError(f"Process {rank} did not write {path}.")
        hashes[path.name] = _sha256(path)
    state = {**info, "optimizer_param_groups": groups, "num_processes": world, "files": hashes}
    text = json.dumps(state, indent=2, allow_nan=False) + "\n"
    write_file(tmp / STATE_NAME, text.encode())
    _fsync_dir(tmp)
    if target.exists():  # e.g. saved again at the same step after a Ctrl-C: swap, then drop the old one
        aside = target.with_name(f"{TMP_PREFIX}old-{target.name}-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(target, aside)
        os.rename(tmp, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, target)
    _fsync_dir(target.parent)
    return target


# ---- reading -----------------------------------------------------------------------------------------
def verify(folder: Path, rank: int) -> dict[str, Any]:
    """The parsed ``trainer_state.json`` of a complete, intact checkpoint; CheckpointError otherwise."""
    path = folder / STATE_NAME
    try:
        info = read_json(path, "Checkpoint state")
    except (FileNotFoundError, ValueError) as error:
        raise CheckpointError(str(error)) from None
    files = info.get("files") if isinstance(info, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(
            f"{path} has no file hashes: it was not written by this version, or is damaged."
        )
    if rng_file(rank) not in files:
        raise CheckpointError(
            f"{folder} has no RNG state for process {rank} ({rng_file(rank)}): resuming would not continue "
            "the run exactly."
        )
    for name, digest in files.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing.")
        if _sha256(file) != digest:
            raise CheckpointError(
                f"{file} does not match the hash recorded in {path} (truncated or replaced)."
            )
    return info


def read_tensors(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    data = (folder / name).read_bytes()
    with safe_open(str(folder / name), "pt") as f:
        metadata = f.metadata() or {}
    return load_bytes(data), metadata


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders under ``output_dir``, newest (highest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=step_of, reverse=True)


def step_of(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def find_checkpoint(output_dir: str | os.PathLike, rank: int = 0) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, warning about each newer one that does not."""
    for folder in checkpoints(output_dir):
        try:
            return folder, verify(folder, rank)
        except CheckpointError as error:
            warnings.warn(f"Skipping checkpoint {folder}: {error} Trying an older one.", stacklevel=2)
    return None


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``output_dir`` (None if there is none)."""
    found = find_checkpoint(output_dir)
    return found[0] if found else None


def rotate(output_dir: Path, limit: int | None) -> None:
    """Delete all but the newest ``limit`` checkpoints."""
    if limit:
        for old in checkpoints(output_dir)[limit:]:
            shutil.rmtree(old, ignore_errors=True)
