"""The few torch.distributed collectives routing state needs (all no-ops in a single process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of data-parallel processes (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (a collective: every rank must call it)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate the (n_r, m) tensors of all ranks in rank order (n_r may differ, or be 0).

    Every rank must call this (it is a collective). Sizes are exchanged first, then each rank's
    rows are padded to the largest size, all-gathered and trimmed.
    """
    world = world_size()
    if world == 1:
        return rows
    size = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:c] for g, c in zip(gathered, counts, strict=True)], dim=0)
