"""lm-eval integration: the ``hf-moe-routing`` model type and offline task definitions.

>>> import hf_moe_routing, lm_eval
>>> from hf_moe_routing.integrations.lm_eval import task_manager
>>> results = lm_eval.simple_evaluate(
...     model="hf-moe-routing",
...     model_args="pretrained=Qwen/Qwen1.5-MoE-A2.7B,routing=topk,routing_top_k=1",
...     tasks=["blimp_local", "wikitext2_local"],
...     task_manager=task_manager(),
... )
>>> results["config"]["routing_stats"]["mean_activated"]

The tasks (in :data:`TASKS_DIR`): ``blimp_local`` (group of the 67 BLiMP paradigms, subtasks
``blimp_local_<paradigm>``) and ``wikitext2_local`` (WikiText-2 test document perplexity), read from the
data folder (``data_dir`` metadata, else ``$HF_MOE_ROUTING_DATA``, else ``../shared/data``).
The model class lives in :mod:`.model` and is imported only when used (it imports lm-eval's HF model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

#: The folder of our lm-eval task YAMLs (pass it as ``--include_path`` / ``TaskManager(include_path=...)``).
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def task_manager(
    data_dir: str | os.PathLike | None = None,
    include_path: str | os.PathLike | list[str | os.PathLike] | None = None,
    metadata: dict[str, Any] | None = None,
    **kwargs: Any,
) -> TaskManager:
    """An lm-eval ``TaskManager`` that knows lm-eval's tasks, ours (:data:`TASKS_DIR`) and ``include_path``.

    ``data_dir`` sets where the offline tasks read their files (stored as the ``data_dir`` metadata entry).
    Other keyword arguments go to ``TaskManager``.
    """
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else include_path if isinstance(include_path, list) else [include_path]
    metadata = dict(metadata or {})
    if data_dir is not None:
        metadata["data_dir"] = str(data_dir)
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)], metadata=metadata, **kwargs)


def is_ours(task: str) -> bool:
    """Whether ``task`` is one of the packaged offline tasks (no need to index lm-eval's own)."""
    return task.startswith(("blimp_local", "wikitext2_local"))


def check_tasks(tasks: list[str], manager: TaskManager | None = None) -> TaskManager:
    """ValueError naming the tasks (or groups) lm-eval does not know; returns the task manager used.

    Only our offline tasks are indexed when every name is one of them (lm-eval's ~10k task files
    take ~20 s to index on a small CPU).
    """
    manager = manager or task_manager(include_defaults=not all(map(is_ours, tasks)))
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(
            f"Unknown lm-eval task(s) {', '.join(map(repr, unknown))}: list the known ones with "
            "`hf-moe-routing lm-eval ls tasks` (ours: blimp_local, blimp_local_<paradigm>, wikitext2_local)."
        )
    return manager


def __getattr__(name: str) -> Any:
    if name in {"HFMoERoutingLM", "evaluate_lm_eval", "format_routing_report", "last_routing_report"}:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TASKS_DIR",
    "HFMoERoutingLM",
    "check_tasks",
    "evaluate_lm_eval",
    "format_routing_report",
    "is_ours",
    "last_routing_report",
    "task_manager",
]
