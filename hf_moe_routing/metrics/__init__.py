"""Routing metrics as ``evaluate`` modules, loadable offline by path, and results saved with ``evaluate.save``.

>>> import evaluate
>>> from hf_moe_routing.metrics import metric_path
>>> routing = evaluate.combine([metric_path("activated_experts"), "accuracy"])  # mixes with other metrics
>>> max_vio = evaluate.load(metric_path("max_vio"))
>>> with RoutingStats(model) as stats:
...     for batch in loader:
...         model(**batch)
...         max_vio.add(loads=stats.last.loads.tolist())
>>> max_vio.compute()
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

#: Metric modules shipped with the package (folder ``hf_moe_routing/metrics/<name>/<name>.py``).
METRICS: tuple[str, ...] = ("max_vio", "activated_experts", "flops_per_token")


def metric_path(name: str) -> str:
    """Local path of a routing metric module, for ``evaluate.load(path)`` / ``evaluate.combine``."""
    if name not in METRICS:
        raise ValueError(f"Unknown routing metric {name!r}; choose one of {', '.join(METRICS)}.")
    return str(Path(str(resources.files(__name__) / name / f"{name}.py")))


def load(name: str, **kwargs: Any):
    """``evaluate.load`` of a routing metric by name (offline: loaded from the package by path)."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


def save_results(path_or_file: str | os.PathLike, results: Mapping[str, Any], **params: Any) -> Path:
    """Write ``results`` and ``params`` with ``evaluate.save`` (JSON plus time, git commit, versions).

    A folder gets a new ``result-<time>.json``; a path with a suffix is the file. Tensors and numpy
    values are converted to plain numbers first, NaN and infinite values to ``null`` (standard JSON).
    git is asked for the commit quietly (no "fatal: not a git repository" outside a repository).
    Returns the file written.
    """
    import evaluate
    import evaluate.saving

    from .quiet_git import quiet_git

    data = _finite(json.loads(json.dumps({**params, **results}, default=_plain)))
    with quiet_git():
        return Path(evaluate.save(str(path_or_file), **data))


def _finite(value: Any) -> Any:
    """NaN and infinite numbers as None (standard JSON has no NaN literal)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"Cannot write {type(value).__name__} to JSON: {value!r}")


__all__ = ["METRICS", "load", "metric_path", "save_results"]
