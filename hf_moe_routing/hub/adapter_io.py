"""Routing adapters on disk: a JSON config plus a safetensors file, written atomically.

A routing adapter folder holds::

    routing_config.json            routing config, base model id/revision, MoE fingerprint, training, results
    routing_adapter.safetensors    every routing layer's ``routing_state()``, keyed ``layers.{i}.{name}``
    README.md                      model card (optional, rendered from ``model_cards/``)

Only JSON and safetensors are read: never pickle, never remote code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.config import read_json
from ..methods.base import RoutingConfig
from ..patching import describe, get_patch_state, patch_model, routing_layers, unpatch_model, unwrap_model
from .model_card import LIBRARY_TAG, build_model_card

CONFIG_NAME = "routing_config.json"
WEIGHTS_NAME = "routing_adapter.safetensors"
CARD_NAME = "README.md"
#: Version of the folder format (bumped on incompatible changes).
FORMAT_VERSION = 1
_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def _require_patched(model: nn.Module):
    state = get_patch_state(model)  # looks through PEFT wrappers
    if state is None:
        raise ValueError(
            "This model is not patched, so it has no routing to save: call "
            "hf_moe_routing.patch_model(model, config) (or load a routing adapter) first."
        )
    return state


def _library_version() -> str:
    from .. import __version__

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
    ``to_dict()`` (e.g. ``FlopsBreakdown``); they are converted to JSON types.
    """
    state = _require_patched(model)
    model_config = getattr(model, "config", None)
    base_model_id = base_model_id or getattr(model_config, "_name_or_path", None) or None
    revision = revision or getattr(model_config, "_commit_hash", None) or None
    config = {
        "format_version": FORMAT_VERSION,
        "library": {"name": "hf-moe-routing", "version": _library_version()},
        "routing": state.config.to_dict(),
        "base_model": {"id": base_model_id, "revision": revision},
        "moe_shape": state.shape.fingerprint(),
        "training": dict(training_info or {}),
        "results": dict(results or {}),
    }
    return json.loads(json.dumps(config, default=_json_default))  # plain JSON types, as read back later


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
        base_model_id, revision: the base model's Hub id and revision (default: read from ``model.config``).
        training_info: how the routing was obtained (free-form JSON, shown on the model card).
        results: measured results, ``{dataset: {metric: value}}`` or ``{metric: value}`` (shown on the card).
        model_card: also write ``README.md`` (unless the folder holds a README that is not ours).

    The write is atomic: everything is written to a temporary folder next to the target, flushed to
    disk, and swapped in with a rename, so a crash leaves the previous adapter intact.
    """
    model = unwrap_model(model)
    config = adapter_config_dict(
        model, base_model_id=base_model_id, revision=revision, training_info=training_info, results=results
    )
    tensors = adapter_state_dict(model)
    target = Path(save_directory)
    write_card = model_card and _may_write_card(target / CARD_NAME)

    def write(folder: Path) -> None:
        _write_json(folder / CONFIG_NAME, config)
        save_file(
            tensors,
            str(folder / WEIGHTS_NAME),
            metadata={"format": "pt", "routing_type": config["routing"]["routing_type"]},
        )
        if write_card:
            build_model_card(config).save(folder / CARD_NAME)

    replace = {CONFIG_NAME, WEIGHTS_NAME} | ({CARD_NAME} if write_card else set())
    atomic_write_folder(target, write, replace=replace)
    return target


def _write_json(path: Path, data: Any) -> None:
    path.write_text(
        json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n", encoding="utf-8"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if hasattr(value, "to_dict"):  # e.g. FlopsBreakdown, configs
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"training_info/results must be JSON-serialisable; got {type(value).__name__}: {value!r}")


def _may_write_card(path: Path) -> bool:
    """Write README.md if absent, or if the existing one is an hf-moe-routing card."""
    if not path.exists():
        return True
    try:
        text = path.read_text(encoding="utf-8")
        tags = ModelCard(text).data.to_dict().get("tags") or [] if text.startswith("---") else []
    except Exception:  # an unparsable README is the user's: keep it
        return False
    return LIBRARY_TAG in tags


def atomic_write_folder(target: Path, write: Callable[[Path], None], *, replace: set[str]) -> None:
    """Run ``write(tmp)`` into a fresh folder next to ``target``, then swap it in atomically.

    Files of an existing ``target`` that are not in ``replace`` are carried over (hard links, or
    copies across file systems), so unrelated files in the folder survive. If anything fails before
    the swap, ``target`` is untouched and the temporary folder is removed.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder: choose another save directory.")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        os.chmod(tmp, _folder_mode(target))  # mkdtemp makes 0700 folders
        if target.is_dir():
            for entry in target.iterdir():
                if entry.name not in replace:
                    _carry_over(entry, tmp / entry.name)
        write(tmp)
        for entry in tmp.iterdir():
            if entry.is_file():
                _fsync(entry)
        _fsync(tmp)
        if target.is_dir():
            _swap_folders(tmp, target)
        else:
            os.rename(tmp, target)
            tmp = None
        _fsync(parent)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _folder_mode(target: Path) -> int:
    """The permissions the folder should get: the existing folder's, else the umask default."""
    if target.is_dir():
        return stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _carry_over(src: Path, dst: Path) -> None:
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link_or_copy(str(src), str(dst))


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    status = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return status == 0


def _swap_folders(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; the old ``target`` ends up at ``new`` (removed by the caller).

    On Linux the exchange is a single atomic ``renameat2``; elsewhere the old folder is first
    renamed aside (a crash in between leaves it complete as ``.<name>.tmp-*``).
    """
    if _exchange(new, target):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(aside)
    os.rename(target, aside)
    os.rename(new, target)
    os.rename(aside, new)


# ---- reading ---------------------------------------------------------------------------------


def resolve_adapter_folder(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    subfolder: str | None = None,
) -> Path:
    """A local folder holding the adapter files: ``path_or_repo_id`` itself, or a Hub download.

    Hub repos are fetched with ``huggingface_hub.snapshot_download`` (only the adapter files, of
    ``subfolder`` if given). Errors say whether the folder is missing, the repo id is invalid or
    unknown, or the Hub could not be reached (network or token).
    """
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local / subfolder if subfolder else local
    text = str(path_or_repo_id)
    if local.exists():
        raise FileNotFoundError(
            f"{text} is a file; pass the routing adapter folder that contains {CONFIG_NAME}."
        )
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text):
        raise FileNotFoundError(f"Routing adapter folder {text} does not exist.")
    return _download(text, revision=revision, token=token, cache_dir=cache_dir, subfolder=subfolder)


def _download(
    repo_id: str,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    subfolder: str | None,
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    where = (
        f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "") + " (no such local folder either)"
    )
    try:
        validate_repo_id(repo_id)
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=[
                f"{subfolder.strip('/')}/{name}" if subfolder else name
                for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
            ],
        )
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is neither an existing local folder nor a valid Hugging Face Hub repo id: {error}"
        ) from error
    except GatedRepoError as error:
        raise OSError(
            f"Routing adapter {where} is gated: request access on the Hub and log in (`hf auth login`) "
            "or pass token=..."
        ) from error
    except RepositoryNotFoundError as error:
        raise OSError(
            f"Routing adapter {where} was not found on the Hugging Face Hub: check the id, or, for a private "
            "repo, log in (`hf auth login`) or pass a token that can read it."
        ) from error
    except RevisionNotFoundError as error:
        raise OSError(f"Routing adapter {repo_id!r} has no revision {revision!r} on the Hub.") from error
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise OSError(
            f"Could not download routing adapter {where}: the Hugging Face Hub cannot be reached (no network, "
            "or HF_HUB_OFFLINE=1) and the adapter is not in the local cache. Check the network connection "
            "and your token, or pass a local folder."
        ) from error
    except HfHubHTTPError as error:
        raise OSError(
            f"Could not download routing adapter {where} from the Hugging Face Hub ({error}). "
            "Check the network connection and your token (`hf auth login` or token=...)."
        ) from error
    except Exception as error:
        if is_network_error(error):
            raise OSError(
                f"Could not download routing adapter {where}: the Hugging Face Hub cannot be reached "
                f"({type(error).__name__}: {error}). Check the network connection and your token."
            ) from error
        raise
    return Path(folder) / subfolder if subfolder else Path(folder)


def is_network_error(error: BaseException) -> bool:
    """True for errors that mean the Hub could not be reached (connection, timeout, HTTP transport)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return type(error).__module__.split(".")[0] in {"httpx", "httpx2", "requests", "urllib3", "httpcore"}


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``routing_config.json`` of a local adapter folder (clear errors if missing or corrupt)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{Path(folder)} is not a routing adapter: it has no {CONFIG_NAME}. Save one with "
            "hf_moe_routing.save_routing_adapter(model, folder)."
        )
    try:  # depth-limited, standard JSON only (a hostile file cannot exhaust the stack)
        data = read_json(path, "Routing adapter config", allow_nan=True)
    except ValueError as error:
        raise ValueError(f"{error} The file is corrupt: save the adapter again.") from None
    missing = [key for key in ("routing", "moe_shape") if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(
            f"{path} is not a routing adapter config: it lacks {missing}. Save the adapter again."
        )
    version = data.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses adapter format version {version!r}; this hf-moe-routing reads up to "
            f"{FORMAT_VERSION}. Upgrade hf-moe-routing."
        )
    return data


def read_adapter_weights(folder: str | os.PathLike) -> dict[int, dict[str, torch.Tensor]]:
    """The routing state of a local adapter folder, grouped by layer index."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"Routing adapter {Path(folder)} has no {WEIGHTS_NAME}: save the adapter again."
        )
    try:
        tensors = load_file(str(path))
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
    already patched model. ``subfolder`` selects an adapter inside the folder or repo. Everything is
    read and checked before the model changes; if loading the state fails anyway, the model's
    previous routing is restored.
    """
    folder = resolve_adapter_folder(path_or_repo_id, revision=revision, token=token, subfolder=subfolder)
    data = read_adapter_config(folder)
    weights = read_adapter_weights(folder)
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
