"""Where the Ada-K trainer runs: one device, a ``device_map``-sharded model, or FSDP2 over processes.

* **One process** (one device, or a model split over devices with ``device_map``): forwards run as
  loaded; each allocator lives on its router's device.
* **Data parallel** (``accelerate launch``, several processes): every process holds the frozen model
  (a full copy, or an FSDP2 shard) and samples its own rows; allocators are replicated float32
  ``nn.Parameter`` s whose gradients are summed over processes with one all-reduce per step.
* **FSDP2** (``accelerate launch --use_fsdp --fsdp_version 2``, or ``AdaKTrainingConfig(fsdp=True)``):
  :func:`shard_frozen_model` applies ``fully_shard`` to every decoder layer and the root with the
  allocators as ``ignored_params`` (never sharded, cast or moved). The sharded model only runs no-grad
  forwards; the PPO update runs on recorded states outside FSDP.

DeepSpeed ZeRO-3 is refused (:func:`fsdp_plugin`): it has no ``ignored_params``, so it would partition
the allocators nested in the model, and accelerate builds its engine around the trained module (here
the allocators) rather than a frozen one.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


def fsdp_plugin(accelerator: Any, requested: bool) -> Any:
    """The FSDP2 plugin to shard the frozen model with, or None (no sharding).

    Raises ValueError under DeepSpeed or FSDP1, and when ``WORLD_SIZE`` disagrees with accelerate
    (a launch that would run independent copies).
    """
    from accelerate.utils import DistributedType

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        raise ValueError(
            f"WORLD_SIZE={world} but accelerate runs {accelerator.num_processes} process(es): the processes "
            "would train independent copies. On CPU pass Accelerator(cpu=True) (accelerate only sets up "
            "gloo then), or launch with `accelerate launch`."
        )
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ValueError(
            "AdaKTrainer does not support DeepSpeed: ZeRO-3 has no ignored_params, so it would partition the "
            "allocators nested in the frozen model, and accelerate builds its engine around the trained module. "
            "Shard the frozen model with FSDP2 instead: `accelerate launch --use_fsdp --fsdp_version 2 ...`."
        )
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError("AdaKTrainer shards the frozen model with FSDP2: launch with --fsdp_version 2.")
        return plugin
    env = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    if requested or env:
        if accelerator.num_processes < 2:
            return None  # nothing to shard over
        from accelerate import FullyShardedDataParallelPlugin

        return FullyShardedDataParallelPlugin(fsdp_version=2)  # CPU/gloo: accelerate reports MULTI_CPU
    return None


def shard_frozen_model(model: nn.Module, allocators: set[nn.Parameter], plugin: Any) -> list[nn.Module]:
    """FSDP2 over the frozen model: one unit per decoder layer plus the root; returns the units.

    Every unit reshards after its forward (no-grad forwards never leave parameters gathered); the
    allocators are ``ignored_params``. Mixed precision and CPU offload follow the plugin.

    Raises ValueError for ``cpu_ram_efficient_loading`` (it would leave the allocators on the meta
    device) or when no decoder layer class is known (``_no_split_modules`` / the plugin's wrap list).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if getattr(plugin, "cpu_ram_efficient_loading", False):
        raise ValueError(
            "fsdp_cpu_ram_efficient_loading is not supported by AdaKTrainer (the allocators would stay on the "
            "meta device): load the model normally."
        )
    kwargs = dict(
        ignored_params=set(allocators),
        reshard_after_forward=True,
        mp_policy=getattr(plugin, "mixed_precision_policy", None) or MixedPrecisionPolicy(),
        offload_policy=getattr(plugin, "cpu_offload", None) or OffloadPolicy(),
    )
    names = set(
        getattr(plugin, "transformer_cls_names_to_wrap", None)
        or getattr(model, "_no_split_modules", None)
        or ()
    )
    units = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not units:
        raise ValueError(
            f"No decoder layers ({sorted(names)}) to shard in {type(model).__name__}: set "
            "fsdp_transformer_layer_cls_to_wrap in the accelerate config."
        )
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return units


def local_tensor(param: Any) -> Any:
    """A parameter's local shard (DTensor) or the parameter itself."""
    to_local = getattr(param, "to_local", None)
    return to_local() if callable(to_local) else param


def mixed_precision(setting: str) -> str:
    """accelerate's ``mixed_precision`` for a config setting: ``"auto"`` is bf16 where CUDA supports it, else "no"."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
