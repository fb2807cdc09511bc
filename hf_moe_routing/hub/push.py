"""Share routing adapters on the Hugging Face Hub (``huggingface_hub.HfApi``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .adapter_io import (
    CARD_NAME,
    is_network_error,
    read_adapter_config,
    read_adapter_weights,
    save_routing_adapter,
)
from .model_card import build_model_card


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
    ``path_in_repo`` puts the adapter in a subfolder (load it with ``subfolder=``).
    ``token`` defaults to the usual places (``HF_TOKEN``, ``hf auth login``). ``results`` (e.g.
    ``{"wikitext-2": {"perplexity": 12.3, "mean_activated_experts": 1.6}}``) go on the card as
    ``model-index`` metadata and a table. ``api`` is an ``HfApi``-like object (for tests). Returns the
    ``CommitInfo`` of the upload.
    """
    with tempfile.TemporaryDirectory(prefix="hf-moe-routing-push-") as tmp:
        folder = Path(tmp) / "adapter"
        save_routing_adapter(
            model,
            folder,
            base_model_id=base_model_id,
            training_info=training_info,
            results=results,
            model_card=False,
        )
        build_model_card(read_adapter_config(folder), repo_id=repo_id).save(folder / CARD_NAME)
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
        )


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
    api: Any = None,
) -> Any:
    """Upload a saved routing adapter folder (checked first) to ``repo_id``; see :func:`push_to_hub`.

    If the folder has no ``README.md``, a model card is rendered from its ``routing_config.json``
    and written into the folder first. Hidden files are not uploaded.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    config = read_adapter_config(folder)  # refuse folders that are not (valid) adapters
    read_adapter_weights(folder)
    if not (folder / CARD_NAME).exists():
        build_model_card(config, repo_id=repo_id).save(folder / CARD_NAME)
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
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            path_in_repo=path_in_repo,
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
            token=token,
            ignore_patterns=[".*", "**/.*"],
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
