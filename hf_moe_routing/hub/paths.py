"""Relative paths that must stay inside their folder: ``subfolder``, ``path_in_repo``, output names.

A user- or config-given relative path is joined to a folder we control (an adapter folder, a Hub
snapshot, a repo). ``"../x"``, an absolute path, a drive letter or a backslash would reach outside
it, so they are refused with a ValueError naming the setting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_relative_path(value: str | os.PathLike | None, what: str = "subfolder") -> str | None:
    """``value`` as a clean relative POSIX path (``"a/b"``), or None for None / ``""`` / ``"."``.

    Raises:
        ValueError: ``value`` is absolute, has a drive letter or a backslash, or a ``..`` part, so it
            would name something outside the folder it is joined to.
        TypeError: ``value`` is not a string or path.
    """
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a relative folder name, got {type(value).__name__}: {value!r}.")
    text = os.fspath(value)
    if "\\" in text or _DRIVE.match(text) or text.startswith(("/", "~")):
        raise ValueError(
            f"{what}={text!r} must be a relative path inside the folder or repo (e.g. 'adak'), "
            "not an absolute path."
        )
    parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{what}={text!r} must stay inside the folder or repo: '..' is not allowed.")
    return "/".join(parts) or None


def join_inside(folder: str | os.PathLike, sub: str | os.PathLike | None, what: str = "subfolder") -> Path:
    """``folder / sub`` after :func:`safe_relative_path`, checked to resolve inside ``folder``.

    The resolved check also catches a symlink inside ``folder`` that points elsewhere.
    """
    folder = Path(folder)
    clean = safe_relative_path(sub, what)
    if clean is None:
        return folder
    joined = folder / clean
    root = folder.resolve()
    if joined.exists() and root not in (joined.resolve(), *joined.resolve().parents):
        raise ValueError(f"{what}={os.fspath(sub)!r} resolves outside {folder} (a symbolic link?).")
    return joined
