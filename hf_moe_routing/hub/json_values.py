"""Plain, standard JSON values from what users pass as training info and results."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any


def to_json(value: Any, what: str = "value") -> Any:
    """``value`` with tensors, numpy values, paths, dataclasses and ``to_dict()`` objects converted.

    NaN and infinite numbers become ``None`` with a warning (standard JSON has no NaN; a NaN result
    is not a result).

    Raises:
        TypeError: something that has no JSON form (naming it).
    """
    bad: list[str] = []
    out = _convert(value, what, bad)
    if bad:
        warnings.warn(
            f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} NaN or infinite: stored as null.",
            UserWarning,
            stacklevel=3,
        )
    return out


def _convert(value: Any, where: str, bad: list[str]) -> Any:
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        bad.append(where)
        return None
    if isinstance(value, dict):
        return {str(k): _convert(v, f"{where}[{k!r}]", bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_convert(v, f"{where}[{i}]", bad) for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return _convert(value.tolist(), where, bad)
    if hasattr(value, "to_dict"):  # e.g. FlopsBreakdown, configs
        return _convert(value.to_dict(), where, bad)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _convert(dataclasses.asdict(value), where, bad)
    raise TypeError(
        f"training_info/results must be JSON-serialisable; {where} is a {type(value).__name__}: {value!r}"
    )
