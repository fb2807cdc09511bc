"""Folder writes that a crash cannot half-do, and the clean-up of what a killed writer left behind.

:func:`atomic_write_folder` writes into a hidden sibling ``.<name>.tmp-<pid>-<random>``, flushes it
to disk and swaps it in with one rename (``renameat2(RENAME_EXCHANGE)`` on Linux). A process killed
in between leaves only such hidden folders; the next save removes those whose writer is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

#: Hidden siblings older than this whose writer cannot be identified are removed by the next save.
STALE_AFTER_S = 3600.0


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (the content hash recorded for adapter weights)."""
    return hashlib.sha256(data).hexdigest()


def atomic_write_folder(target: Path, write: Callable[[Path], None], *, replace: set[str]) -> None:
    """Run ``write(tmp)`` into a fresh folder next to ``target``, then swap it in atomically.

    Files of an existing ``target`` that are not in ``replace`` are carried over (hard links, or
    copies across file systems), so unrelated files in the folder survive. If anything fails before
    the swap, ``target`` is untouched and the temporary folder is removed. Hidden temporary folders
    of earlier writers that were killed (``kill -9``, power loss) are removed first.

    Raises:
        FileExistsError: ``target`` exists and is not a folder.
        OSError: the disk is full or not writable (``target`` is then unchanged).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder: choose another save directory.")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp: Path | None = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=parent))
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
            _swap_folders(tmp, target)  # the old folder is now at tmp, removed below
        else:
            os.rename(tmp, target)
            tmp = None
        _fsync(parent)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)-)?[^/]*$")


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` siblings of ``target`` left by dead writers.

    A folder tagged with a process id is stale when that process no longer runs; an untagged one
    (older versions) when it is older than :data:`STALE_AFTER_S`. Returns the folders removed.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        match = _TEMP.match(entry.name)
        if match is None or match.group("name") != target.name or not entry.is_dir():
            continue
        pid, stale = match.group("pid"), False
        if pid is not None:
            stale = int(pid) != os.getpid() and not _process_alive(int(pid))
        else:
            with contextlib.suppress(OSError):
                stale = time.time() - entry.stat().st_mtime > STALE_AFTER_S
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or cannot tell): keep its folder
    return True


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
    renamed aside (a crash in between leaves it complete as ``.<name>.old-<pid>-*``).
    """
    if _exchange(new, target):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
    os.rmdir(aside)
    os.rename(target, aside)
    os.rename(new, target)
    os.rename(aside, new)
