"""Routing adapters on disk: a JSON config plus a safetensors file, written atomically.

A routing adapter folder holds::

    routing_config.json            routing config, base model, MoE fingerprint, training, results,
                                   and the SHA-256 of the weights file (checked on load)
    routing_adapter.safetensors    every routing layer's ``routing_state()``, keyed ``layers.{i}.{name}``
    README.md                      model card (optional, rendered from ``model_cards/``)

Only JSON and safetensors are read: never pickle, never remote code.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ..core.config import read_json, write_json
from ..core.version import __version__
from ..methods.base import RoutingConfig
from ..patching import describe, get_patch_state, patch_model, routing_layers, unpatch_model, unwrap_model
from ..patching.fitting import unfitted_layers, warn_if_unfitted
from .base_model import base_model_record
from .download import CARD_NAME, CONFIG_NAME, PEFT_CONFIG_NAME, WEIGHTS_NAME, resolve_adapter_folder
from .files import atomic_write_folder, sha256_bytes
from .json_values import to_json
from .model_card import build_model_card, may_replace_card

#: Version of the folder format (bumped on incompatible changes; 1 and 2 are read).
FORMAT_VERSION = 2
_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
#: How often a load re-reads a folder whose config and weights come from different saves.
_READ_ATTEMPTS = 5


def _require_patched(model: nn.Module):
    state = get_patch_state(model)  # looks through PEFT wrappers
    if state is None:
        raise ValueError(
            "This model is not patched, so it has no routing to save: call "
            "hf_moe_routing.patch_model(model, config) (or load a routing adapter) first."
        )
    return state


def _library_version() -> str:
    return __version__


# ---- writing ---------------------------------------------------------------------------------


def adapter_config_dict(
    model: nn.Module,
    *,
    base_model_id: str | None = None,
    revision: str | None = None,
    training_info: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``routing_config.json`` stores for the patched ``model`` (plain JSON types).

    ``training_info`` and ``results`` may hold tensors, numpy values, dataclasses and objects with
    ``to_dict()`` (e.g. ``FlopsBreakdown``); they are converted to JSON types. NaN or infinite
    results are stored as ``null`` (with a warning): standard JSON has no NaN.

    ``fitted`` is False when some routing layer was never fitted or trained (see
    :func:`~hf_moe_routing.patching.unfitted_layers`). ``base_model`` records ``id`` (a Hub repo id, when known), ``path`` (an absolute local folder,
    when the base was loaded from one) and ``revision``.

    Raises:
        ValueError: the model is not patched. TypeError: a value cannot be written as JSON.
    """
    state = _require_patched(model)
    model_config = getattr(model, "config", None)
    name = base_model_id or getattr(model_config, "_name_or_path", None) or None
    revision = revision or getattr(model_config, "_commit_hash", None) or None
    return {
        "format_version": FORMAT_VERSION,
        "library": {"name": "hf-moe-routing", "version": _library_version()},
        "routing": state.config.to_dict(),
        "fitted": not unfitted_layers(model),
        "base_model": base_model_record(name, revision),
        "moe_shape": state.shape.fingerprint(),
        "training": to_json(dict(training_info or {}), "training_info"),
        "results": to_json(dict(results or {}), "results"),
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every routing layer's ``routing_state()``, keyed ``layers.{layer_index}.{name}`` (CPU copies)."""
    out: dict[str, torch.Tensor] = {}
    for index, layer in routing_layers(model).items():
        for name, tensor in layer.routing_state().items():
            out[f"layers.{index}.{name}"] = tensor.detach().to("cpu", copy=True).contiguous()
    return out


def save_routing_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    base_model_id: str | None = None,
    revision: str | None = None,
    training_info: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
    model_card: bool = True,
) -> Path:
    """Save the routing of a patched model as a routing adapter folder; returns the folder.

    Args:
        model: a model patched with :func:`~hf_moe_routing.patch_model` (a PEFT model wrapping one works too).
        save_directory: the adapter folder. Other files in it (a LoRA adapter, a checkpoint) are kept.
        base_model_id, revision: the base model's Hub id (or folder) and revision (default: read from
            ``model.config``); a local folder is stored as an absolute path.
        training_info: how the routing was obtained (free-form JSON, shown on the model card).
        results: measured results, ``{dataset: {metric: value}}`` or ``{metric: value}`` (shown on the card).
        model_card: also write ``README.md`` (unless the folder holds a README that is not ours).

    The write is atomic: everything is written to a temporary folder next to the target, flushed to
    disk, and swapped in with a rename, so a crash leaves the previous adapter intact. A routing
    that was never fitted or trained is saved with a warning (its state is the initial one).

    Raises:
        ValueError: the model is not patched. TypeError: ``training_info``/``results`` are not JSON.
        FileExistsError: ``save_directory`` is a file. OSError: the disk is full or not writable.
    """
    model = unwrap_model(model)
    warn_if_unfitted(model, "the saved routing adapter holds its initial state", stacklevel=2)
    config = adapter_config_dict(
        model, base_model_id=base_model_id, revision=revision, training_info=training_info, results=results
    )
    blob = save_safetensors(
        adapter_state_dict(model),
        metadata={"format": "pt", "routing_type": config["routing"]["routing_type"]},
    )
    config["weights_sha256"] = sha256_bytes(blob)
    target = Path(save_directory)
    write_card = model_card and may_replace_card(target / CARD_NAME)

    def write(folder: Path) -> None:
        write_weights(folder / WEIGHTS_NAME, blob)
        write_json(folder / CONFIG_NAME, config)
        if write_card:
            build_model_card(config, peft_config=read_peft_config(folder)).save(folder / CARD_NAME)

    replace = {CONFIG_NAME, WEIGHTS_NAME} | ({CARD_NAME} if write_card else set())
    atomic_write_folder(target, write, replace=replace)
    return target


def write_weights(path: Path, blob: bytes) -> None:
    """Write the serialised weights (a seam for fault-injection tests)."""
    path.write_bytes(blob)


def read_peft_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """PEFT's ``adapter_config.json`` in ``folder`` (a LoRA adapter beside the routing), or None."""
    path = Path(folder) / PEFT_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = read_json(path, "PEFT adapter config")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# ---- reading ---------------------------------------------------------------------------------


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``routing_config.json`` of a local adapter folder.

    Raises:
        FileNotFoundError: the folder has no ``routing_config.json``.
        ValueError: the file is not standard JSON (truncated, NaN literals, nested too deep), lacks
            the routing or MoE shape, or uses a newer format version.
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{Path(folder)} is not a routing adapter: it has no {CONFIG_NAME}. Save one with "
            "hf_moe_routing.save_routing_adapter(model, folder)."
        )
    try:  # depth-limited, standard JSON only (results are saved with NaN as null)
        data = read_json(path, "Routing adapter config")
    except ValueError as error:
        raise ValueError(f"{error} The adapter is corrupt: save it again.") from None
    missing = [key for key in ("routing", "moe_shape") if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(
            f"{path} is not a routing adapter config: it lacks {missing}. Save the adapter again."
        )
    version = data.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            f"{path}: 'format_version' must be a positive integer, got {version!r}. The adapter is corrupt."
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses adapter format version {version}; this hf-moe-routing reads up to "
            f"{FORMAT_VERSION}. Upgrade hf-moe-routing."
        )
    if version >= 2 and not isinstance(data.get("weights_sha256"), str):
        raise ValueError(
            f"{path} lacks the weights' content hash ('weights_sha256'): save the adapter again."
        )
    for key in ("routing", "moe_shape"):
        if not isinstance(data[key], dict):
            raise ValueError(f"{path}: {key!r} must be a JSON object, got {type(data[key]).__name__}.")
    for key in ("training", "results", "base_model"):
        if key in data and data[key] is not None and not isinstance(data[key], dict):
            raise ValueError(f"{path}: {key!r} must be a JSON object, got {type(data[key]).__name__}.")
    return data


def read_adapter_weights(folder: str | os.PathLike) -> dict[int, dict[str, torch.Tensor]]:
    """The routing state of a local adapter folder, grouped by layer index.

    Checked against the content hash in its config, like :func:`read_adapter` (which it calls), so a
    folder being replaced by a writer yields one whole save. Raises as :func:`read_adapter`.
    """
    return read_adapter(folder)[1]


def read_adapter(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[int, dict[str, torch.Tensor]]]:
    """Config and weights of one save, checked against the content hash in the config.

    A reader racing a writer could see one save's config with the next save's weights; the hash
    catches that, and the folder is read again (a few times) until both belong together.

    Raises:
        FileNotFoundError / ValueError: as :func:`read_adapter_config`; also when the weights are
            missing or corrupt, or never match the recorded hash (modified by hand, or half copied).
    """
    folder = Path(folder)
    for attempt in range(_READ_ATTEMPTS):
        config = read_adapter_config(folder)
        blob = _read_weight_bytes(folder)
        expected = config.get("weights_sha256")
        if expected is None or sha256_bytes(blob) == expected:
            return config, _parse_weights(folder / WEIGHTS_NAME, blob)
        time.sleep(0.05 * (attempt + 1))  # a writer is swapping the folder: read it again
    _parse_weights(folder / WEIGHTS_NAME, blob)  # a corrupt file says so
    raise ValueError(
        f"{folder / WEIGHTS_NAME} does not match the content hash in {CONFIG_NAME}: the two files come "
        "from different saves (copied or edited separately). Save the adapter again."
    )


def _read_weight_bytes(folder: Path) -> bytes:
    path = folder / WEIGHTS_NAME
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"Routing adapter {folder} has no {WEIGHTS_NAME}: save the adapter again."
        ) from None


def _parse_weights(path: Path, blob: bytes) -> dict[int, dict[str, torch.Tensor]]:
    try:
        tensors = load_safetensors(blob)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{path} is corrupt or not a safetensors file ({error}). Save the adapter again."
        ) from error
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{path} holds an unexpected tensor {key!r} (expected layers.<index>.<name>).")
        by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    return by_layer


def check_fingerprint(
    stored: Mapping[str, Any], actual: Mapping[str, Any], *, source: str = "adapter"
) -> None:
    """Raise ValueError naming every MoE-shape field where the adapter and the model differ."""
    fields = sorted(set(stored) | set(actual))
    diffs = [
        f"{f}: {source} {stored.get(f)!r} vs model {actual.get(f)!r}"
        for f in fields
        if stored.get(f) != actual.get(f)
    ]
    if diffs:
        raise ValueError(
            f"This routing {source} was saved for a different MoE model ({'; '.join(diffs)}). "
            "Load it onto the base model it was trained for."
        )


def load_routing_adapter(
    model: nn.Module,
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    replace: bool = False,
    subfolder: str | None = None,
) -> nn.Module:
    """Patch ``model`` with a saved routing adapter (local folder or Hub repo id); returns ``model``.

    The adapter's MoE fingerprint must match the model's. ``replace=True`` swaps the routing of an
    already patched model. ``subfolder`` selects an adapter inside the folder or repo (a relative
    path that stays inside it). Everything is read and checked before the model changes; if loading
    the state fails anyway, the model's previous routing is restored.

    Raises:
        ValueError: ``subfolder`` leaves the folder; the adapter is corrupt, for another MoE shape,
            or does not fit; the model is already patched and ``replace`` is False.
        FileNotFoundError: no such folder or adapter files. OSError: the Hub cannot be reached.
    """
    folder = resolve_adapter_folder(path_or_repo_id, revision=revision, token=token, subfolder=subfolder)
    data, weights = read_adapter(folder)
    config = RoutingConfig.from_dict(data["routing"])
    target = unwrap_model(model)

    previous = get_patch_state(target)
    if previous is not None and not replace:
        raise ValueError(
            f"This model is already patched with {previous.config.routing_type!r} routing. Pass replace=True "
            "to load the routing adapter in its place, or call hf_moe_routing.unpatch_model(model) first."
        )
    described = describe(target)
    check_fingerprint(data["moe_shape"], described.shape.fingerprint())
    config.validate(described)
    indices = {block.layer_index for block in described.blocks}
    if set(weights) - indices:
        raise ValueError(
            f"Routing adapter {folder} has state for layers {sorted(set(weights) - indices)}, which are not "
            f"MoE layers of this model ({sorted(indices)})."
        )
    previous_states = (
        {
            i: {k: v.detach().clone() for k, v in layer.routing_state().items()}
            for i, layer in routing_layers(target).items()
        }
        if previous
        else {}
    )
    try:
        patch_model(target, config, family=described.family, replace=replace)
        for index, layer in routing_layers(target).items():
            try:
                layer.load_routing_state(weights.get(index, {}))
            except (RuntimeError, KeyError, ValueError) as error:
                raise ValueError(
                    f"Routing adapter {folder} does not fit layer {index} of this model "
                    f"({config.routing_type} routing): {error}"
                ) from error
    except BaseException:
        if get_patch_state(target) is not None:
            unpatch_model(target)
        if previous is not None:
            patch_model(target, previous.config, family=previous.family)
            for index, layer in routing_layers(target).items():
                layer.load_routing_state(previous_states.get(index, {}))
        raise
    return model
