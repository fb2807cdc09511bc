"""Find a routing adapter: a local folder, or a Hub repo downloaded with ``snapshot_download``."""

from __future__ import annotations

import os
from pathlib import Path

from .paths import join_inside, safe_relative_path

#: The files of a routing adapter (the only ones downloaded from an adapter repo).
CONFIG_NAME = "routing_config.json"
WEIGHTS_NAME = "routing_adapter.safetensors"
CARD_NAME = "README.md"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
#: PEFT's adapter files (a folder may hold a LoRA adapter beside the routing adapter).
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_FILES = (PEFT_CONFIG_NAME, "adapter_model.safetensors")


def looks_like_local_path(text: str) -> bool:
    """True for strings that can only be local paths (``./x``, ``/x``, ``~/x``, ``a/b/c``)."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def resolve_adapter_folder(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    subfolder: str | None = None,
    with_peft: bool = False,
) -> Path:
    """A local folder holding the adapter files: ``path_or_repo_id`` itself, or a Hub download.

    Hub repos are fetched with ``huggingface_hub.snapshot_download`` (only the adapter files, of
    ``subfolder`` if given; with ``with_peft`` also PEFT's ``adapter_config.json`` and weights).

    Raises:
        ValueError: ``subfolder`` leaves the folder (``..``, absolute), or the id is not a valid repo id.
        FileNotFoundError: a local path that does not exist, or is a file.
        OSError: the Hub repo cannot be found or reached (network, offline mode, token, gated repo).
    """
    subfolder = safe_relative_path(subfolder, "subfolder")
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return join_inside(local, subfolder, "subfolder")
    text = os.fspath(path_or_repo_id)
    if local.exists():
        raise FileNotFoundError(
            f"{text} is a file; pass the routing adapter folder that contains {CONFIG_NAME}."
        )
    if looks_like_local_path(text):
        raise FileNotFoundError(f"Routing adapter folder {text} does not exist.")
    names = ADAPTER_FILES + (PEFT_FILES if with_peft else ())
    return download_files(
        text, names, revision=revision, token=token, cache_dir=cache_dir, subfolder=subfolder
    )


def download_files(
    repo_id: str,
    names: tuple[str, ...],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    subfolder: str | None = None,
    what: str = "Routing adapter",
) -> Path:
    """``snapshot_download`` of only ``names`` (inside ``subfolder``); returns the local folder.

    Files the repo does not have are simply absent from the folder. Errors say whether the repo id
    is invalid or unknown, or the Hub could not be reached (network, offline mode, token).
    """
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

    subfolder = safe_relative_path(subfolder, "subfolder")
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
            allow_patterns=[f"{subfolder}/{name}" if subfolder else name for name in names],
        )
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is neither an existing local folder nor a valid Hugging Face Hub repo id: {error}"
        ) from error
    except GatedRepoError as error:
        raise OSError(
            f"{what} {where} is gated: request access on the Hub and log in (`hf auth login`) "
            "or pass token=..."
        ) from error
    except RepositoryNotFoundError as error:
        raise OSError(
            f"{what} {where} was not found on the Hugging Face Hub: check the id, or, for a private "
            "repo, log in (`hf auth login`) or pass a token that can read it."
        ) from error
    except RevisionNotFoundError as error:
        raise OSError(f"{what} {repo_id!r} has no revision {revision!r} on the Hub.") from error
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise OSError(
            f"Could not download {what.lower()} {where}: the Hugging Face Hub cannot be reached (no "
            "network, or HF_HUB_OFFLINE=1) and it is not in the local cache. Check the network "
            "connection and your token, or pass a local folder."
        ) from error
    except HfHubHTTPError as error:
        raise OSError(
            f"Could not download {what.lower()} {where} from the Hugging Face Hub ({error}). "
            "Check the network connection and your token (`hf auth login` or token=...)."
        ) from error
    except Exception as error:
        if is_network_error(error):
            raise OSError(
                f"Could not download {what.lower()} {where}: the Hugging Face Hub cannot be reached "
                f"({type(error).__name__}: {error}). Check the network connection and your token."
            ) from error
        raise
    return join_inside(Path(folder), subfolder, "subfolder")


def is_network_error(error: BaseException) -> bool:
    """True for errors that mean the Hub could not be reached (connection, timeout, HTTP transport)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return type(error).__module__.split(".")[0] in {"httpx", "httpx2", "requests", "urllib3", "httpcore"}
