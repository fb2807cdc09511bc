"""One writer per output folder, and what a previous run of ours left in it.

Every command and Python API that writes an output folder (``fit``, ``train``, ``warmup``, ``demo``,
``export``; :class:`~hf_moe_routing.AdaKTrainer`, the fit and demo recipes) holds
:func:`output_dir_lock` on it while it writes::

    with output_dir_lock("runs/adak") as folder:   # a second writer gets OutputDirBusyError at once
        ...write into folder...

The lock is an exclusive ``filelock`` lock on ``<folder>/.hf-moe-routing.lock`` (kept: an empty hidden
file); the holder's PID, host, command and start time are in ``<folder>/.hf-moe-routing.lock.json``
while it runs, so the refusal can name it. A folder the writer created is removed again if nothing
but the lock file is in it at the end (a failed command leaves no empty folder behind).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

LOCK_NAME = ".hf-moe-routing.lock"
OWNER_NAME = ".hf-moe-routing.lock.json"
#: names inside an output folder that belong to the lock, not to any result
LOCK_FILES = (LOCK_NAME, OWNER_NAME)

#: resolved folder -> [lock, depth, pid] of the locks this process holds (re-entrant within a process)
_HELD: dict[str, list] = {}


class OutputDirBusyError(OSError):
    """Another process is writing the output folder (the message names the folder and its PID)."""


def _is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` / ``accelerate launch`` job (or no job at all)."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value) == 0
    return True


@contextlib.contextmanager
def output_dir_lock(
    path: str | os.PathLike, *, main_process: bool | None = None, created: bool = False
) -> Iterator[Path]:
    """Hold an exclusive lock on the output folder ``path`` (created if missing) while the block runs.

    Args:
        path: the output folder.
        main_process: whether this process writes (default: rank 0 of a distributed job, from the
            ``RANK`` / ``LOCAL_RANK`` environment). Other ranks of the same job do not lock: they write
            what the main process asks them to, inside its lock.
        created: the caller has just created ``path`` (e.g. a fresh default folder): it is removed
            at the end if it is empty, as a folder created here would be.

    Re-entrant within a process (the CLI locks, then ``AdaKTrainer`` locks the same folder). On exit
    a folder this call created is removed if only the lock file is left in it.

    Yields:
        The folder (a ``Path``).

    Raises:
        OutputDirBusyError: another process holds the lock; the message names the folder and the
            holder's PID (an ``OSError``: the command line prints it as one ``error:`` line).
        FileExistsError: ``path`` exists and is not a folder.
    """
    folder = Path(path).expanduser()
    if main_process is None:
        main_process = _is_main_process()
    if not main_process:
        yield folder
        return
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder: choose another --output-dir.")
    key = str(folder.resolve())
    held = _HELD.get(key)
    if held is not None and held[2] == os.getpid():
        held[1] += 1
        try:
            yield folder
        finally:
            held[1] -= 1
        return
    from filelock import FileLock, Timeout

    made = _make_folders(folder) or ([folder] if created else [])
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputDirBusyError(_busy_message(folder)) from None
    except BaseException:
        _remove_if_empty(folder, made)
        raise
    _HELD[key] = [lock, 1, os.getpid()]
    try:
        _write_owner(folder)
        yield folder
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            (folder / OWNER_NAME).unlink()
        _remove_if_empty(folder, made)  # still holding the lock: no one else can be inside
        lock.release()


def holds_output_dir_lock(path: str | os.PathLike) -> bool:
    """Whether this process holds :func:`output_dir_lock` on ``path``."""
    held = _HELD.get(str(Path(path).expanduser().resolve()))
    return held is not None and held[2] == os.getpid()


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; returns those created, deepest first."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_if_empty(folder: Path, created: list[Path]) -> None:
    if not created:
        return
    with contextlib.suppress(OSError):
        if {p.name for p in folder.iterdir()} <= set(LOCK_FILES):
            for name in LOCK_FILES:
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
            for path in created:  # deepest first; stops at the first one that is not empty
                path.rmdir()


def _write_owner(folder: Path) -> None:
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    tmp = folder / f"{OWNER_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(owner) + "\n")
    os.replace(tmp, folder / OWNER_NAME)


def _busy_message(folder: Path) -> str:
    owner: dict = {}
    for _ in range(40):  # the holder writes its record right after locking: give it 2 s
        try:
            owner = json.loads((folder / OWNER_NAME).read_text())
            if isinstance(owner, dict) and "pid" in owner:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    if not isinstance(owner, dict) or "pid" not in owner:
        who = "another process (PID unknown)"
    else:
        where = "" if owner.get("host") in (None, socket.gethostname()) else f" on {owner['host']}"
        since = f", since {owner['started']}" if owner.get("started") else ""
        command = f": {owner['command']}" if owner.get("command") else ""
        who = f"process PID {owner['pid']}{where}{since}{command}"
    return (
        f"{folder} is being written by another writer ({who}). One writer per output folder: wait for "
        "it to finish, or choose another --output-dir."
    )


# ---- what a previous run of ours wrote -----------------------------------------------------------
#: a training checkpoint of ours: a routing adapter plus the trainer's state (see training/adak/checkpoint.py)
_CHECKPOINT_MARKERS = ("routing_config.json", "trainer_state.json")
_TMP_CHECKPOINT = (".tmp-checkpoint-*", ".tmp-old-checkpoint-*")


def written_by_us(entry: Path) -> bool:
    """Whether ``entry`` (a file or folder in an output folder) is something a run of ours wrote.

    ``checkpoint-N`` folders count only with our checkpoint files (an adapter and a trainer state
    that records the MoE shape), so a transformers ``Trainer`` checkpoint beside them is never ours;
    ``log.jsonl`` only if its first line is one of our log records. Other names are taken as given.
    """
    name = entry.name
    if fnmatch.fnmatchcase(name, "checkpoint-*") or fnmatch.fnmatchcase(name, ".checkpoint-*"):
        if not entry.is_dir() or entry.is_symlink():
            return False
        if not all((entry / marker).is_file() for marker in _CHECKPOINT_MARKERS):
            return False
        try:
            state = json.loads((entry / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(state, dict) and "moe_shape" in state
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in _TMP_CHECKPOINT):
        return entry.is_dir() and not entry.is_symlink()
    if name == "log.jsonl":
        try:
            with open(entry) as f:
                first = json.loads(f.readline() or "null")
        except (OSError, ValueError):
            return False
        return isinstance(first, dict) and "step" in first
    return True


def remove_previous_run(folder: str | os.PathLike, patterns: Iterable[str]) -> list[Path]:
    """Delete what a previous run of ours left in ``folder`` among the names matching ``patterns``.

    Only entries :func:`written_by_us` are deleted; returns them.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    patterns = tuple(patterns)
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.name in LOCK_FILES or not any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
            continue
        if not written_by_us(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    return removed
