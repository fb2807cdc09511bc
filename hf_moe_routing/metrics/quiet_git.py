"""Ask git for the commit without git's "fatal: not a git repository" on stderr.

``evaluate.save`` and lm-eval record the git commit of the working directory by running ``git``
with stderr inherited, so every run outside a repository prints git's error. :func:`quiet_git`
swaps their helpers for quiet ones that give the same answer (the commit, or None).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=os.getcwd(), check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.decode().strip() or None


def evaluate_commit_hash() -> str | None:
    """``evaluate.saving._git_commit_hash`` without the stderr noise."""
    return _git("rev-parse", "HEAD") if _git("rev-parse", "--is-inside-work-tree") == "true" else None


def lm_eval_commit_hash() -> str | None:
    """``lm_eval.loggers.utils.get_git_commit_hash`` without the stderr noise."""
    commit = _git("describe", "--always")
    if commit is not None:
        return commit
    from lm_eval.loggers.utils import get_commit_from_path

    return get_commit_from_path(os.getcwd())


_TARGETS = (
    ("evaluate.saving", "_git_commit_hash", evaluate_commit_hash),
    ("lm_eval.loggers.utils", "get_git_commit_hash", lm_eval_commit_hash),
    ("lm_eval.evaluator", "get_git_commit_hash", lm_eval_commit_hash),
)


@contextlib.contextmanager
def quiet_git() -> Iterator[None]:
    """Within the block, the already imported ``evaluate`` / lm-eval ask git quietly."""
    saved = []
    for module_name, attr, quiet in _TARGETS:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, quiet)
    try:
        yield
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)
