"""``export_checkpoint``: stream a base checkpoint into a new folder, rewriting only what the routing changes.

Shards whose tensors do not change are copied byte for byte; a shard holding a changed tensor is
read with ``safe_open`` and written again (one shard in memory at a time). Only safetensors and
JSON are read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.version import __version__
from .download import ADAPTER_FILES, CONFIG_NAME, WEIGHTS_NAME
from .export import (
    EXPORT_RECORD,
    check_top_k_in_config,
    plan_export,
    read_current_biases,
    routing_of,
)
from .files import atomic_write_folder
from .output_dir import output_dir_lock

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: Files that make a folder "hold a model" (export refuses to write over them without overwrite).
MODEL_MARKERS = ("config.json", SINGLE_NAME, INDEX_NAME)


def shard_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name of the safetensors checkpoint in ``folder``.

    Raises ValueError if the folder holds no safetensors weights (``.bin`` checkpoints are pickle).
    """
    index = folder / INDEX_NAME
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map: the checkpoint index is corrupt.")
        return {str(k): str(v) for k, v in weight_map.items()}
    single = folder / SINGLE_NAME
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_NAME)
    raise ValueError(
        f"{folder} holds no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}); export reads safetensors "
        "only (never pickle). Convert the checkpoint with save_pretrained(..., safe_serialization=True)."
    )


def checkpoint_key(model: nn.Module, module_path: str, keys: dict[str, str]) -> str:
    """The checkpoint's name for the model tensor ``module_path``.

    transformers 5 renames some tensors between checkpoint and model (``block_sparse_moe`` -> ``mlp``);
    the name is the model's own, or what ``save_pretrained`` would write for it (its reverse mapping).

    Raises ValueError if neither is in the checkpoint.
    """
    if module_path in keys:
        return module_path
    from transformers.core_model_loading import revert_weight_conversion

    reverted = list(revert_weight_conversion(model, {module_path: torch.zeros(1, device="meta")}))
    for key in reverted:
        if key in keys:
            return key
    raise ValueError(
        f"Cannot find the tensor {module_path} (saved as {reverted}) in the checkpoint: the folder does not "
        "match the model its config describes."
    )


def export_checkpoint(
    model_or_path: nn.Module | str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a standard transformers checkpoint whose own routing equals the adapter's; returns the folder.

    The result loads with plain ``AutoModelForCausalLM.from_pretrained(output_dir)`` (and serves with
    vLLM's or SGLang's native kernels), without hf-moe-routing.

    Args:
        model_or_path: the base checkpoint folder (local, safetensors), or a model loaded from one:
            patched (its routing is exported) or not (then ``adapter`` names the routing).
        adapter: a routing adapter folder (or Hub id); None for a patched model.
        output_dir: the new checkpoint folder. It must not hold a model unless ``overwrite``.
        overwrite: replace the model files of an existing folder. Other files there are kept, never
            deleted; the write is atomic (a temporary sibling folder swapped in).

    What is written: every file of the base folder (routing-adapter files excepted), with shards that
    hold a changed selection bias rewritten (that tensor in float32: BIP's prices or Loss-Free's
    bias folded in), ``config.json`` with the new top-k when the routing changes k, and
    ``routing_export.json`` recording the routing.

    Raises:
        NotExportableError: the routing has no exact form in the family's parameters and config
            (per-token k, top-p, thresholds, offsets on routers without a selection bias); nothing
            is written. Serve such routings with the vLLM plugin.
        FileExistsError: ``output_dir`` holds a model and ``overwrite`` is False, or is the base folder.
        ValueError: the adapter is for another model, or the base folder is not a safetensors checkpoint.
    """
    if output_dir is None:
        raise ValueError("export_checkpoint needs output_dir, the folder to write the checkpoint into.")
    source, model, described, config, layers = routing_of(model_or_path, adapter)
    output = Path(output_dir)
    _check_output(source, output, overwrite)
    keys = shard_map(source)

    def read(module_path: str) -> torch.Tensor:
        key = checkpoint_key(model, module_path, keys)
        with safe_open(source / keys[key], framework="pt") as f:
            return f.get_tensor(key)

    read_current_biases(described, read)
    plan = plan_export(model, described, config, layers)
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(source)
    if plan.top_k is not None:
        check_top_k_in_config(model_config, *plan.top_k)
        setattr(model_config.get_text_config(), *plan.top_k)
    changes = {checkpoint_key(model, path, keys): value for path, value in plan.biases.items()}
    files = _files_to_copy(source)
    written = set(files) | {EXPORT_RECORD}

    def write(folder: Path) -> None:
        by_shard: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in changes.items():
            by_shard.setdefault(keys[key], {})[key] = value
        for name in files:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name in by_shard:
                _rewrite_shard(source / name, target, by_shard[name])
            elif name == "config.json" and plan.top_k is not None:
                model_config.to_json_file(target)
            elif name == INDEX_NAME and changes:
                _rewrite_index(source / name, target, changes, keys)
            else:
                shutil.copyfile(source / name, target)
        record = {
            "library": {"name": "hf-moe-routing", "version": __version__},
            "routing": config.to_dict(),
            "family": plan.family,
            "base_model": str(source.resolve()),
            "top_k": None if plan.top_k is None else {"attribute": plan.top_k[0], "value": plan.top_k[1]},
            "selection_bias_tensors": sorted(changes),
            "changes": plan.describe(),
        }
        (folder / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    with output_dir_lock(output):  # one writer per folder; a failed export leaves no empty folder
        atomic_write_folder(output, write, replace=written)
    return output


def _files_to_copy(source: Path) -> list[str]:
    """Relative paths of the base folder's files, routing-adapter files and hidden entries excepted."""
    out = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if relative.as_posix() in (CONFIG_NAME, WEIGHTS_NAME, EXPORT_RECORD):
            continue
        out.append(relative.as_posix())
    return out


def _check_output(source: Path, output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder: choose another output folder.")
    if output.exists() and output.resolve() == source.resolve():
        raise FileExistsError(f"{output} is the base checkpoint itself: export into a new folder.")
    if not output.is_dir():
        return
    held = [name for name in MODEL_MARKERS if (output / name).exists()]
    if held and not overwrite:
        raise FileExistsError(
            f"{output} already holds a model ({', '.join(held)}): pass overwrite=True (--overwrite) to "
            "replace its model files, or choose an empty folder."
        )
    ours = set(_files_to_copy(source)) | set(ADAPTER_FILES)
    stray = sorted(p.name for p in output.glob("*.safetensors*") if p.name not in ours)
    if stray and overwrite:
        raise FileExistsError(
            f"{output} holds weights this export would not replace ({', '.join(stray)}); they would mix with "
            "the exported ones. Remove them yourself or choose another folder (export never deletes files "
            "it did not write)."
        )


def _rewrite_shard(source: Path, target: Path, changes: dict[str, torch.Tensor]) -> None:
    """Copy one safetensors shard with ``changes`` applied (metadata kept)."""
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(source, framework="pt") as f:
        metadata = f.metadata()
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            tensors[key] = changes[key] if key in changes else f.get_tensor(key)
    save_file(tensors, target, metadata=metadata or {"format": "pt"})


def _rewrite_index(source: Path, target: Path, changes: dict[str, torch.Tensor], keys: dict) -> None:
    """The shard index with ``metadata.total_size`` adjusted for tensors whose dtype changed."""
    data = json.loads(source.read_text(encoding="utf-8"))
    total = (data.get("metadata") or {}).get("total_size")
    if isinstance(total, int):
        for key, value in changes.items():
            with safe_open(source.parent / keys[key], framework="pt") as f:
                old = f.get_slice(key)
                old_bytes = _numel(old.get_shape()) * _itemsize(old.get_dtype())
            total += value.numel() * value.element_size() - old_bytes
        data["metadata"]["total_size"] = total
    target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _numel(shape: list[int]) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}.get(
        dtype, 4
    )
