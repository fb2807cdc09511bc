"""Strict JSON config dataclasses: every field's type is checked at construction and at JSON load.

A config is a ``@dataclass`` subclassing :class:`JSONConfig` (PEFT's ``PeftConfig`` habit). Field
types come from the annotations and are enforced exactly: ``int`` refuses ``2.5`` and ``True``,
``bool`` refuses the string ``"false"``, ``float`` refuses NaN and infinity, ``X | None`` accepts
None. Ranges and choices are each config's own ``__post_init__`` business, through the helpers
below, so that a bad value fails where it is written, with a message that says what to use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C", bound="JSONConfig")

#: The deepest JSON nesting any config file may have (a hostile file cannot exhaust the stack).
MAX_JSON_DEPTH = 32


class JSONConfig:
    """Mixin for config dataclasses: strict field types, ``to_dict`` / ``from_dict`` / JSON files.

    Subclasses are dataclasses that call ``super().__post_init__()`` (or :meth:`check_types`)
    first in their own ``__post_init__``.
    """

    def __post_init__(self) -> None:
        self.check_types()

    def check_types(self) -> None:
        """Raise TypeError for the first field whose value does not match its annotation."""
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            converted = _check(value, hints.get(f.name, Any), f"{type(self).__name__}({f.name}=...)")
            if converted is not value:
                object.__setattr__(self, f.name, converted)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-serialisable values."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from :meth:`to_dict` output; unknown keys raise ValueError naming the known ones."""
        return cls.from_fields(data)

    @classmethod
    def from_fields(cls: type[C], data: dict[str, Any]) -> C:
        """``cls(**data)`` with unknown keys refused (ValueError) and non-mappings refused (TypeError)."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__} settings must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"Unknown {cls.__name__} settings {sorted(unknown)}; expected some of {sorted(known)}."
            )
        return cls(**data)

    def to_json_string(self) -> str:
        """The config as indented, key-sorted standard JSON (no NaN), ending in a newline."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check nothing rather than fail
        return {}


def _check(value: Any, hint: Any, where: str) -> Any:
    """``value`` (possibly converted: int -> float, tuple -> list) if it matches ``hint``, else TypeError."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, where)
            except ValueError:  # the right type with a bad value (NaN): that error, not a type error
                raise
            except TypeError:
                if isinstance(value, (list, tuple)) and typing.get_origin(option) in (list, tuple, Sequence):
                    raise  # a list with a bad item: say which item
                continue
        raise TypeError(f"{where}: expected {_name(hint)}, got {value!r}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true or false (a bool), got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {value!r}.")
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {value!r}.")
        return value
    if origin in (list, Sequence, tuple) or hint in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}.")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return [_check(v, item, f"{where} item {i}") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}.")
        return value
    return value


_NAMES = {bool: "true or false (a bool)", int: "an integer", float: "a number", str: "a string"}


def _name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    names = [_NAMES.get(a, "a list" if typing.get_origin(a) in (list, tuple) else str(a)) for a in args]
    return " or ".join(names) + (" or None" if type(None) in typing.get_args(hint) else "")


# ---- range and choice checks ---------------------------------------------------------------------
def check_range(
    owner: str,
    name: str,
    value: float | int | None,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> None:
    """ValueError unless ``value`` is None or lies in the interval ``[low, high]`` (``(`` if open)."""
    if value is None:
        return
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{owner}({name}={value!r}) must lie in {interval}.{' ' + hint if hint else ''}")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}({name}={value!r}): choose one of {', '.join(map(repr, choices))}.")


# ---- JSON files ----------------------------------------------------------------------------------
def read_json(path: str | Path, what: str = "JSON file", *, allow_nan: bool = False) -> Any:
    """Parse a JSON file with clear errors: missing, unreadable, truncated, too deep, or NaN literals.

    Raises:
        FileNotFoundError: no such file. ValueError: not valid, standard JSON, or nested deeper than
        :data:`MAX_JSON_DEPTH` (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text ({error}): not a JSON file.") from None
    return parse_json(
        text, f"{what} {path}", allow_nan=allow_nan, hint="; it may be truncated by an interrupted write"
    )


def parse_json(text: str, what: str = "JSON text", *, allow_nan: bool = False, hint: str = "") -> Any:
    """Parse JSON text with the checks of :func:`read_json` (depth limit, no NaN/Infinity literals).

    ``allow_nan=True`` reads the ``NaN`` / ``Infinity`` literals Python's ``json`` writes (files of
    earlier versions may hold them in their results); config fields still refuse them by type.

    Raises:
        ValueError: not valid, standard JSON, or nested deeper than :data:`MAX_JSON_DEPTH`; the
        message starts with ``what``.
    """
    if _depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels: not a file we wrote.")

    def refuse_constant(name: str) -> float:
        raise ValueError(f"non-standard JSON number {name}")

    try:
        return json.loads(text, parse_constant=None if allow_nan else refuse_constant)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{what} is not valid JSON ({error}){hint}.") from None


def write_json(path: str | Path, data: Any) -> None:
    """Write standard JSON (NaN/inf refused with a ValueError naming the file) via a temporary file."""
    path = Path(path)
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except ValueError as error:
        raise ValueError(f"Refusing to write {path}: {error} (a NaN or infinite result).") from None
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _depth(text: str) -> int:
    """Maximum bracket nesting of a JSON text (strings skipped), without recursion."""
    depth = best = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            best = max(best, depth)
        elif char in "]}":
            depth -= 1
    return best
