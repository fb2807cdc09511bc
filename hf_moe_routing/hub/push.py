"""Share routing adapters on the Hugging Face Hub (``huggingface_hub.HfApi``).

Only adapter files go up: ``routing_config.json``, ``routing_adapter.safetensors``, a model card
rendered for the repo id, and, if the folder also holds one, PEFT's ``adapter_config.json`` /
``adapter_model.safetensors``. Checkpoints, logs, optimizer state and temporary files in the folder
never do: the files are staged in a temporary folder and uploaded with ``allow_patterns``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..core.config import write_json
from .adapter_io import read_adapter, read_peft_config, save_routing_adapter
from .base_model import with_hub_id
from .download import CARD_NAME, CONFIG_NAME, PEFT_FILES, WEIGHTS_NAME, is_network_error
from .model_card import build_model_card, may_replace_card
from .paths import safe_relative_path


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    path_in_repo: str | None = None,
    base_model_id: str | None = None,
    training_info: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
    api: Any = None,
) -> Any:
    """Upload the routing adapter of a patched ``model`` with its model card to the Hub repo ``repo_id``.

    The repo is created if needed (``private`` applies then). ``revision`` is the branch to commit to
    (created from ``main`` if missing), ``create_pr`` opens a pull request instead of committing,
    ``path_in_repo`` puts the adapter in a subfolder (load it with ``subfolder=``; a relative path
    inside the repo). ``token`` defaults to the usual places (``HF_TOKEN``, ``hf auth login``).
    ``results`` (e.g. ``{"wikitext-2/test": {"perplexity": 12.3, "mean_activated_experts": 1.6}}``)
    go on the card as ``model-index`` metadata and a table. ``api`` is an ``HfApi``-like object (for
    tests). A routing that was never fitted or trained is pushed with a warning. Returns the
    ``CommitInfo`` of the upload.

    Raises:
        ValueError: the model is not patched, or ``path_in_repo`` leaves the repo.
        OSError: the Hub refused the write (token) or cannot be reached.
    """
    safe_relative_path(path_in_repo, "path_in_repo")
    with tempfile.TemporaryDirectory(prefix="hf-moe-routing-push-") as tmp:
        folder = Path(tmp) / "adapter"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # warned once below, for the push
            save_routing_adapter(
                model,
                folder,
                base_model_id=base_model_id,
                training_info=training_info,
                results=results,
                model_card=False,
            )
        return upload_adapter_folder(
            folder,
            repo_id,
            private=private,
            commit_message=commit_message,
            revision=revision,
            token=token,
            create_pr=create_pr,
            path_in_repo=path_in_repo,
            api=api,
            _stacklevel=3,
            _source=f"of the {type(model).__name__} being pushed (not saved in a folder)",
        )


def stage_adapter_files(
    folder: str | os.PathLike, staging: str | os.PathLike, *, repo_id: str, base_model: str | None = None
) -> list[str]:
    """Copy the adapter files of ``folder`` into ``staging``, with a card rendered for ``repo_id``.

    ``base_model`` (a Hub id) replaces the recorded base model id in the staged config. A README
    that is not an hf-moe-routing card (the user's own) is staged as it is. Returns the file names.

    Raises:
        FileNotFoundError / ValueError: ``folder`` is not a valid routing adapter (checked first).
    """
    folder, staging = Path(folder), Path(staging)
    config, _ = read_adapter(folder)  # refuse folders that are not (valid, consistent) adapters
    if base_model is not None:
        config["base_model"] = with_hub_id(config.get("base_model"), base_model)
    staging.mkdir(parents=True, exist_ok=True)
    write_json(staging / CONFIG_NAME, config)
    shutil.copyfile(folder / WEIGHTS_NAME, staging / WEIGHTS_NAME)
    names = [CONFIG_NAME, WEIGHTS_NAME]
    peft = read_peft_config(folder)
    if peft is not None:
        for name in PEFT_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staging / name)
                names.append(name)
    if may_replace_card(folder / CARD_NAME):
        build_model_card(config, repo_id=repo_id, peft_config=peft).save(staging / CARD_NAME)
    else:
        shutil.copyfile(folder / CARD_NAME, staging / CARD_NAME)
    names.append(CARD_NAME)
    return names


def upload_adapter_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    path_in_repo: str | None = None,
    base_model: str | None = None,
    api: Any = None,
    _stacklevel: int = 2,
    _source: str | None = None,
) -> Any:
    """Upload the routing adapter in ``folder`` (checked first) to ``repo_id``; see :func:`push_to_hub`.

    Only the adapter files are uploaded (see the module docstring), with a model card rendered for
    ``repo_id``; the folder itself is not changed. ``base_model`` (a Hub id) is recorded as the
    adapter's base model in the uploaded config and card (useful when the adapter was trained on
    a local copy of a Hub model).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    path_in_repo = safe_relative_path(path_in_repo, "path_in_repo")
    config, _ = read_adapter(folder)  # refuse folders that are not (valid, consistent) adapters
    if base_model is not None:
        with_hub_id(None, base_model)  # a bad --base-model fails before anything is sent
    with tempfile.TemporaryDirectory(prefix="hf-moe-routing-push-") as tmp:
        if config.get("fitted") is False:
            warnings.warn(
                f"The {config['routing'].get('routing_type')} routing adapter {_source or f'in {folder}'} was "
                "never fitted or trained: it holds its initial state (fit it with hf_moe_routing.fit_routing / "
                "`hf-moe-routing fit`, or train it).",
                UserWarning,
                stacklevel=_stacklevel,
            )
        api = api if api is not None else HfApi(token=token)
        message = (
            commit_message
            or f"Upload {config['routing'].get('routing_type', '')} routing adapter (hf-moe-routing)"
        )
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
            repo_id = getattr(url, "repo_id", None) or repo_id
            if revision and not create_pr:
                api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
            names = stage_adapter_files(folder, tmp, repo_id=repo_id, base_model=base_model)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                path_in_repo=path_in_repo,
                commit_message=message,
                revision=revision,
                create_pr=create_pr,
                token=token,
                allow_patterns=names,
            )
        except HfHubHTTPError as error:
            status = getattr(getattr(error, "response", None), "status_code", None)
            if status in (401, 403):
                raise OSError(
                    f"The Hugging Face Hub refused to write to {repo_id!r} ({status}): log in with `hf auth login`, "
                    "set HF_TOKEN, or pass a token with write access."
                ) from error
            raise OSError(f"Uploading to {repo_id!r} failed: {error}") from error
        except Exception as error:
            if is_network_error(error):
                raise OSError(
                    f"Could not reach the Hugging Face Hub to upload {repo_id!r} ({type(error).__name__}: {error}): "
                    "check the network connection (and that HF_HUB_OFFLINE is not set)."
                ) from error
            raise
