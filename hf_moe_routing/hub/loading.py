"""One-call loading of a base model plus a routing adapter (local folder or Hub repo), PEFT included."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel

from .adapter_io import load_routing_adapter, read_adapter_config
from .base_model import base_model_to_load, is_hub_id
from .download import (
    ADAPTER_FILES,
    CONFIG_NAME,
    PEFT_CONFIG_NAME,
    PEFT_FILES,
    download_files,
    looks_like_local_path,
    resolve_adapter_folder,
)
from .paths import join_inside, safe_relative_path


class AutoRoutedModelForCausalLM:
    """``AutoModelForCausalLM`` plus a routing adapter, in the style of PEFT's ``AutoPeftModelForCausalLM``.

    >>> model = AutoRoutedModelForCausalLM.from_pretrained("user/qwen-moe-adak")  # the adapter repo first
    >>> model = AutoRoutedModelForCausalLM.from_pretrained(adapter="user/qwen-moe-adak")  # the same
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
        load_peft: bool = True,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Load the base model with transformers and patch it with the routing adapter.

        Args:
            pretrained_model_name_or_path: the base model (Hub id or folder), or, without ``adapter=``,
                a routing adapter (folder or Hub repo, tried first as PEFT's ``AutoPeftModelForCausalLM``
                does): its ``routing_config.json`` names the base model. A folder holding both a
                checkpoint and a routing adapter loads both.
            adapter: routing adapter folder or Hub repo id.
            adapter_revision: revision of the adapter repo (``revision=`` is the base model's, as in
                transformers).
            adapter_subfolder: folder of the adapter inside ``adapter`` (a relative path inside it).
            load_peft: when the adapter folder also holds a PEFT adapter (``adapter_config.json``),
                load it too (returns the ``PeftModel``); False loads the routing only (with a warning).
            **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``,
                ``revision``, ``token``, ...); ``token`` and ``cache_dir`` are also used for the adapter.

        Raises:
            ValueError: no adapter given or found, or no base model known; a subfolder that leaves its folder.
            OSError / FileNotFoundError: the adapter or base model cannot be found or downloaded.
        """
        base = pretrained_model_name_or_path
        adapter_subfolder = safe_relative_path(adapter_subfolder, "adapter_subfolder")
        token, cache_dir = kwargs.get("token"), kwargs.get("cache_dir")
        folder = None
        if adapter is None:
            folder = _adapter_in(base, adapter_revision, token, cache_dir, adapter_subfolder)
            if folder is None:
                raise ValueError(
                    f"{base!r} holds no routing adapter ({CONFIG_NAME}). Pass the routing adapter: AutoRoutedModelForCausalLM."
                    "from_pretrained(base_model, adapter='folder-or-repo-id'). To load a model without one, "
                    "use AutoModelForCausalLM."
                )
            adapter = base
            base = base if Path(os.fspath(base)).is_dir() and (Path(base) / "config.json").is_file() else None
        if folder is None:
            folder = resolve_adapter_folder(
                adapter,
                revision=adapter_revision,
                token=token,
                cache_dir=cache_dir,
                subfolder=adapter_subfolder,
                with_peft=load_peft,
            )
        if base is None:
            base, revision = base_model_to_load(read_adapter_config(folder).get("base_model"), adapter)
            if revision and "revision" not in kwargs:
                kwargs["revision"] = revision
        model = AutoModelForCausalLM.from_pretrained(base, *model_args, **kwargs)
        load_routing_adapter(model, folder)
        if (folder / PEFT_CONFIG_NAME).is_file():
            if not load_peft:
                warnings.warn(
                    f"{adapter} also holds a PEFT adapter ({PEFT_CONFIG_NAME}), not loaded (load_peft=False).",
                    UserWarning,
                    stacklevel=2,
                )
            else:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        return model


def _adapter_in(
    name: str | os.PathLike | None,
    revision: str | None,
    token: Any,
    cache_dir: Any,
    subfolder: str | None,
) -> Path | None:
    """The local folder of the routing adapter at ``name`` (a folder or Hub repo), or None if it has none."""
    if name is None:
        raise ValueError(
            "Pass the routing adapter: AutoRoutedModelForCausalLM.from_pretrained('user/adapter-repo') or "
            "from_pretrained(base_model, adapter='folder-or-repo-id')."
        )
    text = os.fspath(name)
    local = Path(text).expanduser()
    if local.is_dir():
        folder = join_inside(local, subfolder, "adapter_subfolder")
        return folder if (folder / CONFIG_NAME).is_file() else None
    if looks_like_local_path(text) or not is_hub_id(text):
        raise FileNotFoundError(f"{text} is neither a local folder nor a Hub repo id.")
    folder = download_files(
        text,
        ADAPTER_FILES + PEFT_FILES,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        subfolder=subfolder,
    )
    return folder if (folder / CONFIG_NAME).is_file() else None
