"""One-call loading of a base model plus a routing adapter (local folder or Hub repo)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel

from .adapter_io import CONFIG_NAME, load_routing_adapter, read_adapter_config, resolve_adapter_folder


class AutoRoutedModelForCausalLM:
    """``AutoModelForCausalLM`` plus a routing adapter, in the style of PEFT's ``AutoPeftModelForCausalLM``.

    >>> model = AutoRoutedModelForCausalLM.from_pretrained(adapter="user/qwen-moe-adak")  # base from the adapter
    >>> model = AutoRoutedModelForCausalLM.from_pretrained("Qwen/Qwen1.5-MoE-A2.7B", adapter="./adak", dtype="auto")
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("Use AutoRoutedModelForCausalLM.from_pretrained(base_model, adapter=...).")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        *model_args: Any,
        adapter: str | os.PathLike | None = None,
        adapter_revision: str | None = None,
        adapter_subfolder: str | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Load the base model with transformers and patch it with the routing adapter.

        Args:
            pretrained_model_name_or_path: the base model (Hub id or folder). May be omitted when the
                adapter records its base model id. A folder that holds a routing adapter (and no
                ``adapter=``) is read as the adapter; if it also holds a checkpoint, that is the base.
            adapter: routing adapter folder or Hub repo id.
            adapter_revision: revision of the adapter repo (``revision=`` is the base model's, as in
                transformers).
            adapter_subfolder: folder of the adapter inside ``adapter`` (e.g. one of several adapters in a repo).
            **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``,
                ``revision``, ``token``, ...); ``token`` and ``cache_dir`` are also used for the adapter.
        """
        base = pretrained_model_name_or_path
        if adapter is None:
            if base is not None and (Path(base) / CONFIG_NAME).is_file():
                adapter = base
                base = base if (Path(base) / "config.json").is_file() else None
            else:
                raise ValueError(
                    "Pass the routing adapter: AutoRoutedModelForCausalLM.from_pretrained(base_model, "
                    "adapter='folder-or-repo-id'). To load a model without one, use AutoModelForCausalLM."
                )
        token = kwargs.get("token")
        folder = resolve_adapter_folder(
            adapter,
            revision=adapter_revision,
            token=token,
            cache_dir=kwargs.get("cache_dir"),
            subfolder=adapter_subfolder,
        )
        stored = read_adapter_config(folder).get("base_model") or {}
        if base is None:
            base = stored.get("id")
            if not base:
                raise ValueError(
                    f"Routing adapter {adapter} does not record its base model: pass it, e.g. "
                    "AutoRoutedModelForCausalLM.from_pretrained('org/base-model', adapter=...)."
                )
            if "revision" not in kwargs and stored.get("revision") and not Path(str(base)).is_dir():
                kwargs["revision"] = stored["revision"]
        model = AutoModelForCausalLM.from_pretrained(base, *model_args, **kwargs)
        return load_routing_adapter(model, folder)
