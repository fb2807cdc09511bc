"""The model's context length (kept free of heavy imports: evaluation and the CLI check it early)."""

from __future__ import annotations

from typing import Any


def context_length(model_or_config: Any) -> int | None:
    """``config.max_position_embeddings`` of a model or config (None if it has none)."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and not isinstance(limit, bool) else None


def check_context_length(model_or_config: Any, seq_len: int) -> None:
    """ValueError if ``seq_len`` tokens exceed the model's context (``max_position_embeddings``)."""
    limit = context_length(model_or_config)
    if limit is not None and seq_len > limit:
        raise ValueError(
            f"Sequence length {seq_len} is longer than the model's context ({limit} positions, "
            "config.max_position_embeddings): use sequences of at most that many tokens (--seq-len)."
        )
