"""Batches of token ids for forward passes: padding, attention masks and labels, on a device.

Used by evaluation, fitting and calibration alike. ``data`` may be a packed ``datasets.Dataset`` /
dict of columns (``input_ids``, optional ``attention_mask`` and ``labels``), a (N, T) tensor of
token ids, or a list of token-id sequences or dicts; ragged rows are right-padded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the device of the input embeddings (or of the first parameter)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        weight = next(model.parameters())
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def _as_rows(data: Any) -> tuple[int, Any]:
    """``(number of rows, getter(start, stop) -> dict of columns)`` for the supported data types."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(
                f"Token ids must be a 2-D (batch, seq_len) tensor, got shape {tuple(data.shape)}."
            )
        return data.shape[0], lambda a, b: {"input_ids": data[a:b]}
    if isinstance(data, Mapping):
        if "input_ids" not in data:
            raise ValueError(f"Evaluation data has no 'input_ids' (keys: {sorted(data)}); tokenise it first.")
        ids = data["input_ids"]
        return len(ids), lambda a, b: {k: v[a:b] for k, v in data.items() if k in _COLUMNS}
    column_names = getattr(data, "column_names", None)
    if column_names is not None:  # datasets.Dataset
        if "input_ids" not in column_names:
            raise ValueError(
                f"The dataset has columns {column_names} but no 'input_ids': tokenise and pack it first, "
                "e.g. with hf_moe_routing.data.pack_dataset(dataset, tokenizer, seq_len)."
            )
        return len(data), lambda a, b: {k: v for k, v in data[a:b].items() if k in _COLUMNS}
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        rows = list(data)

        def get(a: int, b: int) -> dict[str, list]:
            chunk = rows[a:b]
            if all(isinstance(r, Mapping) for r in chunk):
                missing = [i for i, r in enumerate(chunk) if "input_ids" not in r]
                if missing:
                    raise ValueError("Every record of the evaluation data needs 'input_ids'.")
                return {k: [r[k] for r in chunk] for k in _COLUMNS if k in chunk[0]}
            return {"input_ids": chunk}

        return len(rows), get
    raise TypeError(
        f"Unsupported evaluation data {type(data).__name__}: pass a packed datasets.Dataset (input_ids, "
        "attention_mask, labels), a (batch, seq_len) tensor of token ids, or a list of token-id lists / dicts."
    )


_COLUMNS = ("input_ids", "attention_mask", "labels")


def _pad(rows: Any, value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of sequences to a (B, T) long tensor; returns it and the (B, T) real-token mask."""
    if isinstance(rows, torch.Tensor):
        return rows.long(), torch.ones_like(rows, dtype=torch.long)
    seqs = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in rows]
    width = max((s.numel() for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : s.numel()] = s
        mask[i, : s.numel()] = 1
    return out, mask


def iter_batches(
    data: Any,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    max_batches: int | None = None,
    progress: bool = False,
    desc: str = "evaluating",
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``{"input_ids", "attention_mask", "labels"}`` (B, T) of evaluation data on ``device``.

    ``data``: a packed ``datasets.Dataset`` / dict of columns, a (N, T) tensor of token ids, or a list of
    token-id sequences or dicts (ragged rows are right-padded; padding gets mask 0 and label -100).
    Missing labels are the input ids with padding set to -100 (the usual causal-LM convention).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(
            f"max_batches must be a positive integer or None (all batches), got {max_batches!r}."
        )
    num_rows, get = _as_rows(data)
    if num_rows == 0:
        raise ValueError("The data is empty: pass at least one sequence of token ids.")
    starts = list(range(0, num_rows, batch_size))
    if max_batches is not None:
        starts = starts[:max_batches]
    iterator: Any = starts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(starts, desc=desc, unit="batch", leave=False)
    for start in iterator:
        columns = get(start, min(start + batch_size, num_rows))
        ids, mask = _pad(columns["input_ids"], 0)
        if "attention_mask" in columns:
            mask = _pad(columns["attention_mask"], 0)[0]
        if "labels" in columns:
            labels = _pad(columns["labels"], IGNORE_INDEX)[0]
        else:
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        if ids.shape[1] < 2:
            raise ValueError(
                "Evaluation sequences need at least 2 tokens (one to predict from, one to predict)."
            )
        yield {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def run_forwards(
    model: nn.Module,
    data: Any,
    batch_size: int,
    *,
    max_batches: int | None = None,
    progress: bool = False,
    desc: str = "fitting",
) -> tuple[int, int]:
    """Run ``model`` on ``data`` without gradients (the forwards that fit or calibrate routing state).

    ``data`` as in :func:`iter_batches`. Returns ``(batches, tokens)``: forwards run and real
    (non-padding) tokens seen.
    """
    batches = tokens = 0
    with torch.no_grad():
        for batch in iter_batches(
            data, batch_size, model_device(model), max_batches=max_batches, progress=progress, desc=desc
        ):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            batches += 1
            tokens += int(batch["attention_mask"].sum())
    return batches, tokens
