"""Where an adapter's base model is: a Hub id, an absolute local folder, or both.

``routing_config.json`` stores ``base_model = {"id": hub_id | None, "path": absolute_folder | None,
"revision": ...}``. A base loaded from a relative folder (``../ckpt/tiny``) is stored resolved, so
the adapter loads from any working directory; a folder inside the Hugging Face cache
(``.../models--org--name/snapshots/<commit>``) also gives its Hub id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})")


def is_hub_id(name: str | None) -> bool:
    """True for strings that look like Hub repo ids (``org/name``) and are not local paths."""
    return bool(name) and _REPO_ID.match(str(name)) is not None and not os.path.exists(str(name))


def hub_id_of_cache_folder(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(repo_id, commit)`` of a Hugging Face cache snapshot folder, else None."""
    match = _CACHE_SNAPSHOT.search(Path(path).as_posix())
    if match is None:
        return None
    return f"{match['org']}/{match['name']}", match["commit"]


def base_model_record(name: str | os.PathLike | None, revision: str | None = None) -> dict[str, Any]:
    """What ``routing_config.json`` stores about the base model called ``name``.

    A local folder (existing now) is stored as an absolute ``path``; a Hub id as ``id``; a cache
    snapshot folder as both. A relative name that is not a folder here and not a Hub id is stored
    as an absolute path too (relative to the working directory), never as given.
    """
    record: dict[str, Any] = {"id": None, "path": None, "revision": revision}
    if not name:
        return record
    text = os.fspath(name)
    local = Path(text).expanduser()
    if local.is_dir() or not is_hub_id(text):
        record["path"] = str(local.resolve())
        cached = hub_id_of_cache_folder(record["path"])
        if cached is not None:
            record["id"] = cached[0]
            record["revision"] = revision or cached[1]
    else:
        record["id"] = text
    return record


def with_hub_id(record: dict[str, Any] | None, hub_id: str | None) -> dict[str, Any]:
    """``record`` with its Hub ``id`` set to ``hub_id`` (refused unless it is a Hub repo id)."""
    record = dict(record or {"id": None, "path": None, "revision": None})
    if hub_id is not None:
        if not is_hub_id(hub_id):
            raise ValueError(
                f"--base-model / base_model_id {hub_id!r} is not a Hub repo id (org/name); a local "
                "base folder is recorded automatically."
            )
        record["id"] = hub_id
    return record


def base_model_to_load(record: dict[str, Any] | None, adapter: str | os.PathLike) -> tuple[str, str | None]:
    """``(name_or_path, revision)`` of the base model an adapter records, for ``from_pretrained``.

    The local ``path`` wins while it exists; else the Hub ``id``. Older adapters stored only
    ``id``, possibly a relative folder: it is used if it exists.

    Raises:
        ValueError: nothing usable is recorded (naming what was recorded and what to pass instead).
    """
    record = record or {}
    path, hub_id, revision = record.get("path"), record.get("id"), record.get("revision")
    if path and Path(path).is_dir():
        return str(path), None
    if hub_id and (is_hub_id(hub_id) or Path(hub_id).is_dir()):
        return str(hub_id), revision if is_hub_id(hub_id) else None
    if path or hub_id:
        raise ValueError(
            f"Routing adapter {adapter} records its base model as {path or hub_id!r} (in its routing_config.json), "
            "which is not a folder here nor a Hub repo id: pass the base model, e.g. "
            "AutoRoutedModelForCausalLM.from_pretrained('org/base-model', adapter=...)."
        )
    raise ValueError(
        f"Routing adapter {adapter} does not record its base model: pass it, e.g. "
        "AutoRoutedModelForCausalLM.from_pretrained('org/base-model', adapter=...)."
    )
