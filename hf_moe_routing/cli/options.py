"""Output folders with one meaning of ``--overwrite``, and options generated from config dataclasses.

No heavy import here either (see :mod:`hf_moe_routing.cli.common`).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


# ---- output folders ---------------------------------------------------------------------------------
def add_output_arguments(
    parser: argparse.ArgumentParser, *, required: bool, what: str, default: str | None = None
) -> argparse._ArgumentGroup:
    """Add ``--output-dir`` (help text ``what``) and ``--overwrite`` (replace only the files the command writes)."""
    group = parser.add_argument_group("output")
    group.add_argument("--output-dir", required=required, default=default, help=what)
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files this command writes if --output-dir already has them; other files in the "
        "folder are never touched",
    )
    return group


def prepare_output_dir(
    path: str | os.PathLike,
    *,
    ours: Iterable[str],
    overwrite: bool,
    resume: bool = False,
    remove: Iterable[str] = (),
) -> Path:
    """Check an output folder before anything runs (one meaning of ``--overwrite`` for every command).

    ``ours`` are glob patterns of the files and folders the command writes. Without ``overwrite``
    (and without ``resume``) a folder that already holds any of them is refused. With ``overwrite``
    the command replaces them: files it rewrites atomically (adapters) are left for the save to
    swap, and only what matches ``remove`` (e.g. a previous run's ``checkpoint-*`` and
    ``log.jsonl``) is deleted first, and only if a run of ours wrote it
    (:func:`hf_moe_routing.hub.output_dir.written_by_us`: a transformers ``Trainer`` checkpoint is
    kept). Files that match nothing (your notes, a LoRA adapter, a model) never block and are never
    deleted. Run it inside :func:`~hf_moe_routing.hub.output_dir.output_dir_lock`.

    Raises:
        FileExistsError: the path is a file, or holds our files and neither ``overwrite`` nor ``resume``.
        FileNotFoundError: ``resume`` of a folder that does not exist. ValueError: both ``resume`` and ``overwrite``.
    """
    folder = Path(path).expanduser()
    if resume and overwrite:
        raise ValueError(
            "Pass either --resume (continue in --output-dir) or --overwrite (start afresh), not both."
        )
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder: choose another --output-dir.")
    if resume:
        if not folder.is_dir():
            raise FileNotFoundError(f"Nothing to resume: {folder} does not exist.")
        return folder
    patterns = tuple(ours)
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    found = [p for p in entries if _matches(p.name, patterns) and _ours(p)]
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        resume_hint = (
            ", --resume to continue it" if any(_matches(p.name, ("checkpoint-*",)) for p in found) else ""
        )
        raise FileExistsError(
            f"{folder} already holds output of this command ({names}): pass --overwrite to replace it "
            f"(other files in the folder are kept){resume_hint}, or choose another --output-dir."
        )
    if overwrite:
        from ..hub.output_dir import remove_previous_run  # (lazy: hub imports torch)

        remove_previous_run(folder, remove)  # only what a run of ours wrote: never a file of yours
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _ours(entry: Path) -> bool:
    from ..hub.output_dir import written_by_us

    return written_by_us(entry)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def check_output_file(path: str | os.PathLike, overwrite: bool) -> Path:
    """A file to write (``--json``, ``--plot``): refused if it exists, unless ``overwrite``."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise FileExistsError(f"{target} is a folder: give a file name.")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists: pass --overwrite to replace it, or choose another name.")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


# ---- options from config dataclasses ----------------------------------------------------------------
def add_dataclass_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """One option per field of the dataclass ``cls``: ``--field-name``, typed, with its help and choices.

    Names, defaults, help (``field.metadata["help"]``) and choices (``metadata["choices"]``) all come
    from the dataclass. ``bool`` fields get ``--x / --no-x``; ``X | None`` fields accept ``none``;
    list fields take several values. Returns the field names added (the option's ``dest``).
    """
    hints = typing.get_type_hints(cls)
    skip = set(exclude)
    overrides = defaults or {}
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init or f.name.startswith("_"):
            continue
        default = overrides.get(f.name, _default_of(f))
        kind, optional = _unwrap(hints.get(f.name, str))
        help_text = f.metadata.get("help") or f"{cls.__name__}.{f.name}"
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        option = "--" + f.name.replace("_", "-")
        if kind is bool and optional:
            kwargs.update(type=_optional_bool, metavar="true|false|none")
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) in (list, tuple) or kind in (list, tuple):
            item = (typing.get_args(kind) or (str,))[0]
            kwargs.update(nargs="*", type=_converter(item if isinstance(item, type) else str, optional=False))
        else:
            kwargs["type"] = _converter(kind if isinstance(kind, type) else str, optional=optional)
            if optional:
                kwargs["metavar"] = f"{f.name.upper()}|none"
        if "choices" in f.metadata:
            kwargs["choices"] = tuple(f.metadata["choices"])
            kwargs.pop("metavar", None)
        parser.add_argument(option, **kwargs)
        added.append(f.name)
    return added


def dataclass_kwargs(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The values of generated options, as keyword arguments of the dataclass."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """``(inner type, optional)`` of ``X`` or ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), type(None) in typing.get_args(hint)
    return hint, False


def _optional_bool(text: str) -> bool | None:
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None and text.lower() not in ("none", "null"):
        raise argparse.ArgumentTypeError(f"expected true, false or none, got {text!r}")
    return value


def _converter(kind: type, *, optional: bool):
    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if kind is float:
            value = float(text)
            if value != value or value in (float("inf"), float("-inf")):
                raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
            return value
        return kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in its errors
    return convert
