"""Export a routing into a standard transformers checkpoint (no hf-moe-routing needed to load it).

Where a family's own parameters and config can express a routing exactly, ``export_checkpoint``
writes it there:

* a selection offset or bias (BIP's prices ``-q``, Loss-Free's bias) is folded, in float32, into the
  family's selection-bias tensor (``e_score_correction_bias`` and the like);
* a static k (``TopKConfig(top_k=k)``, BIP at another k) is written into the config's top-k field.

Everything else (per-token k, thresholds, offsets on routers without a selection bias) is refused
before anything is written (:class:`~hf_moe_routing.methods.base.NotExportableError`), with a
pointer to the vLLM plugin. The base checkpoint is streamed shard by shard (``files_export.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.context import RoutingContext
from ..families import MoEModel, describe_model
from ..families.base import text_config
from ..methods.base import NotExportableError, RoutingConfig, RoutingLayer
from ..patching import describe, get_patch_state, routing_layers, unwrap_model
from .adapter_io import check_fingerprint, read_adapter
from .download import resolve_adapter_folder

#: The file an export writes beside the weights: what was folded in, and from which routing.
EXPORT_RECORD = "routing_export.json"


@dataclass
class ExportPlan:
    """What an export changes in the base checkpoint.

    Attributes:
        routing_type: the exported routing's name (``"bip"``, ``"loss_free"``, ``"topk"``...).
        family: the model family.
        top_k: ``(config attribute, k)`` to write into the text config, or None.
        biases: module path of a selection-bias tensor (e.g. ``model.layers.3.mlp.gate.e_score_correction_bias``)
            -> its new value, float32 on the CPU, in the shape the model holds it.
    """

    routing_type: str
    family: str
    top_k: tuple[str, int] | None = None
    biases: dict[str, torch.Tensor] = field(default_factory=dict)

    def describe(self) -> str:
        parts = []
        if self.top_k is not None:
            parts.append(f"config.{self.top_k[0]} = {self.top_k[1]}")
        if self.biases:
            parts.append(f"{len(self.biases)} selection-bias tensors (float32)")
        return ", ".join(parts) or "nothing (the routing equals the model's own)"


def skeleton_model(folder: str | os.PathLike) -> nn.Module:
    """The model of checkpoint ``folder`` built on the meta device (no weights read, no memory used).

    Raises ValueError if the folder has no ``config.json`` or transformers has no causal-LM class for it.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a transformers checkpoint folder: it has no config.json.")
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            names = [getattr(transformers, a, None) for a in getattr(config, "architectures", None) or ()]
            classes = [c for c in names if c is not None]
            if not classes:
                raise
            return classes[0]._from_config(config)


def adapter_layers(model: nn.Module, adapter: str | os.PathLike) -> tuple[MoEModel, RoutingConfig, dict]:
    """``(described model, routing config, {layer index: RoutingLayer})`` of a routing adapter on ``model``.

    ``model`` may live on the meta device (:func:`skeleton_model`): the layers are built beside it on
    the CPU and hold the adapter's state. The model is not patched.

    Raises ValueError if the adapter was saved for another model (family, expert count, fingerprint).
    """
    folder = resolve_adapter_folder(adapter)
    data, weights = read_adapter(folder)
    config = RoutingConfig.from_dict(data["routing"])
    described = describe_model(model)
    stored = data["moe_shape"]
    try:
        check_fingerprint(stored, described.shape.fingerprint())
    except ValueError as error:
        raise ValueError(
            f"The routing adapter {folder} was saved for a {stored.get('family')} model with "
            f"{stored.get('num_experts')} experts, but this is a {described.shape.family} model with "
            f"{described.shape.num_experts} experts: {error}"
        ) from None
    config.validate(described)
    context = RoutingContext()
    layers = {}
    for block in described.blocks:
        layer = config.create_layer(block, described, context)
        layer.to_empty(device="cpu")
        try:
            layer.load_routing_state(weights.get(block.layer_index, {}))
        except (RuntimeError, KeyError) as error:
            raise ValueError(
                f"Routing adapter {folder} does not fit layer {block.layer_index}: {error}"
            ) from None
        layers[block.layer_index] = layer.eval()
    return described, config, layers


def plan_export(
    model: nn.Module, described: MoEModel, config: RoutingConfig, layers: dict[int, RoutingLayer]
) -> ExportPlan:
    """What the checkpoint of ``model`` must change so that the plain family routes as ``layers`` do.

    Raises:
        NotExportableError: some layer's routing has no exact form in the family's parameters and
            config (the message names the layer and the vLLM plugin route).
    """
    plan = ExportPlan(config.routing_type, described.shape.family)
    ks = {}
    for block in described.blocks:
        exported = layers[block.layer_index].exported_routing()
        spec = block.spec
        ks[block.layer_index] = exported.top_k if exported.top_k is not None else spec.top_k
        offset, replacement = exported.selection_offset, exported.selection_bias
        if offset is not None and not bool(offset.abs().max() > 0):
            offset = None  # nothing to fold (an unfitted BIP): exact on every family
        if offset is None and replacement is None:
            continue
        if spec.selection_bias is None:
            raise NotExportableError(
                f"Layer {block.layer_index} ({block.router_name}): the {described.shape.family} router "
                f"({spec.kind.describe()}) has no selection-bias parameter, so a standard checkpoint cannot hold "
                f"this {config.routing_type} routing's expert offsets. Serve it with the vLLM plugin instead "
                "(the model folder holds the routing adapter), see docs/serving.md."
            )
        current = spec.selection_bias.get()
        shape = current.shape
        if replacement is not None:
            new = replacement.float().reshape(shape)
        else:
            if current.device.type == "meta":
                raise ValueError(f"{spec.selection_bias.path}: the current bias is needed (read it first).")
            new = current.detach().float().cpu() + offset.float().reshape(shape)
        plan.biases[spec.selection_bias.path] = new.contiguous()
    distinct = sorted(set(ks.values()))
    if len(distinct) > 1:
        raise NotExportableError(
            f"The {config.routing_type} routing uses different k per layer ({ks}); a transformers config "
            "holds one top-k for every layer. Serve it with the vLLM plugin instead, see docs/serving.md."
        )
    if distinct and any(block.spec.top_k != distinct[0] for block in described.blocks):
        plan.top_k = (top_k_attribute(model, described), distinct[0])
    return plan


def top_k_attribute(model: nn.Module, described: MoEModel) -> str:
    """The text config's field that sets the family's experts per token (e.g. ``num_experts_per_tok``).

    Raises NotExportableError if the family reads its k from somewhere else.
    """
    config = text_config(model)
    for name in described.family.top_k_names:
        if getattr(config, name, None) is not None and not isinstance(getattr(config, name), bool):
            return name
    raise NotExportableError(
        f"The {described.shape.family} config has none of {list(described.family.top_k_names)}: a checkpoint "
        "cannot set its top-k. Serve the routing with the vLLM plugin instead, see docs/serving.md."
    )


def check_top_k_in_config(config: Any, attribute: str, k: int) -> None:
    """NotExportableError unless a model built from ``config`` with ``attribute = k`` routes every block with k."""
    import copy

    import transformers
    from transformers import AutoModelForCausalLM

    changed = copy.deepcopy(config)
    setattr(changed.get_text_config(), attribute, k)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(changed)
        except ValueError:
            model = getattr(transformers, changed.architectures[0])._from_config(changed)
    try:  # verify: each router (random CPU copies of the meta weights) must route as its spec, with k
        got = sorted({block.spec.top_k for block in describe_model(model).blocks})
    except TypeError as error:
        raise NotExportableError(
            f"With config.{attribute} = {k} the family's routers no longer route as a learned top-k with "
            f"k = {k} ({error}). Serve this routing with the vLLM plugin instead, see docs/serving.md."
        ) from None
    if got != [k]:
        raise NotExportableError(
            f"Setting config.{attribute} = {k} gives routers with k = {got}: the family does not read its "
            "top-k from the config alone. Serve this routing with the vLLM plugin instead, see docs/serving.md."
        )


def read_current_biases(described: MoEModel, reader) -> None:
    """Fill the skeleton's (meta) selection-bias tensors from the checkpoint (m floats per layer).

    ``reader(module_path) -> tensor`` reads one tensor of the base checkpoint.
    """
    for block in described.blocks:
        slot = block.spec.selection_bias
        if slot is not None and slot.get().device.type == "meta":
            value = reader(slot.path).reshape(slot.get().shape)
            if slot.name in slot.owner._buffers:
                slot.owner._buffers[slot.name] = value
            else:
                slot.owner._parameters[slot.name] = nn.Parameter(value, requires_grad=False)


def routing_of(model_or_path: nn.Module | str | os.PathLike, adapter: str | os.PathLike | None):
    """``(source folder, model, described model, routing config, layers)`` for ``export_checkpoint``.

    ``model`` is the given (patched) model, or a meta-device skeleton of the folder's checkpoint.
    """
    if isinstance(model_or_path, nn.Module):
        target = unwrap_model(model_or_path)
        source = _source_of(target)
        if adapter is not None:
            skeleton = skeleton_model(source)
            return source, skeleton, *adapter_layers(skeleton, adapter)
        state = get_patch_state(target)
        if state is None:
            raise ValueError(
                "The model is not patched and no routing adapter was given: patch it (patch_model / "
                "load_routing_adapter) or pass adapter=<routing adapter folder>."
            )
        return source, target, describe(target), state.config, routing_layers(target)
    if adapter is None:
        raise ValueError(
            f"Exporting {model_or_path} needs a routing adapter: pass adapter=<routing adapter folder>."
        )
    skeleton = skeleton_model(model_or_path)
    return Path(model_or_path), skeleton, *adapter_layers(skeleton, adapter)


def _source_of(model: nn.Module) -> Path:
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name or not Path(name).is_dir():
        raise ValueError(
            f"The model's checkpoint folder is unknown or not local ({name!r}): export streams the base "
            "checkpoint from disk. Pass its local folder: export_checkpoint(folder, adapter, output_dir)."
        )
    return Path(name)
