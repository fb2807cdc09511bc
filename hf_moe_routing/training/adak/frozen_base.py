"""The frozen base model of Ada-K training: only the allocators may train (Yue et al., 2025, Sec. 3).

:class:`FrozenBase` holds the base model's parameters (every parameter that is not an allocator's) and checks
that none received a gradient (after each backward) and, optionally, that none changed (a float64 sum per
parameter, taken at construction and compared at the end).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .distributed import local_tensor


class FrozenBase:
    """The base-model parameters of ``model``: all but ``trainable``.

    Args:
        model: the patched model.
        trainable: the allocators' parameters.
        verify_unchanged: record per-parameter checksums now, for :meth:`check_unchanged`.
    """

    def __init__(self, model: nn.Module, trainable: Iterable[nn.Parameter], verify_unchanged: bool) -> None:
        ids = {id(p) for p in trainable}
        self.params = [(n, p) for n, p in model.named_parameters() if id(p) not in ids]
        self.checksums = self._checksums() if verify_unchanged else None

    def _checksums(self) -> dict[str, float]:
        with torch.no_grad():  # offloaded (meta) weights cannot change; FSDP shards are checked locally
            return {
                n: float(local_tensor(p).detach().double().sum())
                for n, p in self.params
                if p.device.type != "meta"
            }

    def check_no_gradients(self) -> None:
        """Raises RuntimeError naming the first base parameter that requires or received a gradient."""
        for name, param in self.params:
            if param.requires_grad or param.grad is not None:
                raise RuntimeError(
                    f"Base-model parameter {name} received a gradient; only allocators may train."
                )

    def check_unchanged(self) -> None:
        """Raises RuntimeError naming (up to 5) base parameters whose checksum changed since construction;
        does nothing where checksums were not recorded."""
        if self.checksums is None:
            return
        now = self._checksums()
        changed = [n for n, before in self.checksums.items() if now[n] != before]
        if changed:
            raise RuntimeError(f"Base-model parameters changed during allocator training: {changed[:5]}.")
