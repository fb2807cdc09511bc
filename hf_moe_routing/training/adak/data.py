"""Training and evaluation batches of the Ada-K trainer, and the per-token noise k is sampled from.

Batches go through :func:`hf_moe_routing.core.batching.iter_batches`, the path evaluation and
pre-training use (right padding, attention mask, labels with -100). Each process draws its own rows:
epoch e shuffles the dataset with ``seed + e`` and process r of W takes rows
``order[(b W + r) B : (b W + r + 1) B]`` for its b-th micro-batch, so W processes with batch B see
exactly the rows one process with batch W B sees, in the same order.

k is sampled by inverse CDF from uniforms that depend only on (seed, rollout, sample, dataset row,
position, layer) (:func:`token_uniforms`), never on how rows are split over processes or padded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ...core.batching import iter_batches

_MASK64 = (1 << 64) - 1


def prepare_dataset(data: Any, model: nn.Module, tokenizer: Any = None, seq_len: int | None = None) -> Any:
    """A dataset of ``input_ids`` (and optionally ``attention_mask``/``labels``) rows.

    Tokenised datasets are used as they are; text datasets (a ``text`` column or chat/SFT records) are
    tokenised and packed with :func:`hf_moe_routing.data.pack_dataset` (needs ``tokenizer``).

    Raises ValueError for no data, an empty dataset, text without a tokenizer, or rows longer than
    the model's context.
    """
    from ...data import check_context_length, pack_dataset

    if data is None:
        raise ValueError("No training data: pass a dataset of input_ids or of text (with a tokenizer).")
    if len(data) == 0:
        raise ValueError("The dataset is empty (0 rows): pass a dataset with at least batch_size rows.")
    columns = getattr(data, "column_names", None)
    if columns is None and isinstance(data[0], dict):
        columns = list(data[0])
    if columns is not None and "input_ids" not in columns:
        if tokenizer is None:
            raise ValueError(
                f"The dataset has columns {columns} but no input_ids: pass tokenizer=... (and seq_len) so "
                "the trainer can tokenise and pack it, or tokenise it with hf_moe_routing.data.pack_dataset."
            )
        data = pack_dataset(data, tokenizer, seq_len or 256)
    check_context_length(model, max(row_length(data, 0), seq_len or 0))
    return data


def row_length(data: Any, index: int) -> int:
    row = data[index]
    ids = row["input_ids"] if isinstance(row, dict) else row
    return len(ids)


def batch_of(data: Any, rows: Sequence[int], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The rows ``rows`` of ``data`` as one padded batch on ``device`` (``iter_batches`` conventions)."""
    select = getattr(data, "select", None)
    subset = select(list(rows)) if callable(select) else [data[i] for i in rows]
    return next(iter_batches(subset, len(rows), device))


class TrainingStream:
    """This process's micro-batches: ``(row indices, batch)`` for the n-th micro-batch it draws."""

    def __init__(self, data: Any, batch_size: int, world: int, rank: int, seed: int, shuffle: bool) -> None:
        self.data, self.batch_size, self.world, self.rank = data, batch_size, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = len(data) // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"The training dataset has {len(data)} rows, fewer than batch_size * processes = "
                f"{batch_size * world}: use a smaller batch_size or more data."
            )
        self._epoch: int | None = None
        self._order: list[int] = []

    def rows(self, position: int) -> list[int]:
        """Dataset rows of this process's ``position``-th micro-batch (0-based, over epochs)."""
        epoch, b = divmod(position, self.batches_per_epoch)
        if epoch != self._epoch:
            n = len(self.data)
            self._order = (
                torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
                if self.shuffle
                else list(range(n))
            )
            self._epoch = epoch
        start = (b * self.world + self.rank) * self.batch_size
        return self._order[start : start + self.batch_size]

    def batch(self, position: int, device: torch.device | str) -> tuple[list[int], dict[str, torch.Tensor]]:
        rows = self.rows(position)
        return rows, batch_of(self.data, rows, device)


def eval_batches(
    data: Any, batch_size: int, world: int, rank: int, max_batches: int | None, device: torch.device | str
) -> Iterator[tuple[bool, dict[str, torch.Tensor]]]:
    """``(counts, batch)`` pairs; every process yields the same number (FSDP forwards are collectives).

    Process r takes the batches starting at rows ``r B, (W + r) B, ...``; a process past the end repeats
    its last batch with ``counts=False`` (run the forward, add nothing).
    """
    starts = list(range(0, len(data), batch_size))
    per_rank = -(-len(starts) // world)
    if max_batches is not None:
        per_rank = min(per_rank, max_batches)
    mine = starts[rank::world][:per_rank]
    last = mine[-1] if mine else starts[-1]
    for i in range(per_rank):
        start = mine[i] if i < len(mine) else last
        rows = range(start, min(start + batch_size, len(data)))
        yield i < len(mine), batch_of(data, rows, device)


def _mix(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps), stable across runs, processes and platforms."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state + (int(value) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def token_uniforms(
    seed: int, key: Sequence[int], rows: Sequence[int], length: int, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Per layer, uniforms (len(rows) * length,) in [0, 1) for the tokens of a batch (batch-major).

    The uniform of (row, position, layer) depends only on ``seed``, ``key`` (e.g. rollout and sample
    index), the dataset row, the position and the layer: a token gets the same draw whatever batch
    or process it is in. Rows are generated at a fixed length of at least ``length`` and cut.
    """
    width = max(64, 1 << max(0, length - 1).bit_length())  # a stable generation length per row
    out = {}
    for layer in layers:
        values = []
        for row in rows:
            generator = torch.Generator().manual_seed(_mix(seed, *key, row, layer))
            values.append(torch.rand(width, generator=generator)[:length])
        out[layer] = torch.cat(values)
    return out
