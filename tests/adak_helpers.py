"""Shared inputs for the Ada-K training tests: token rows and a quiet training config."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_moe_routing.training.adak import AdaKTrainingConfig


def token_rows(n: int = 24, length: int = 12, seed: int = 0) -> list[dict]:
    """``n`` rows of ``length`` random token ids in [3, 128) (``{"input_ids": (length,) int64}``), seeded."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 128, (length,), generator=g)} for _ in range(n)]


def adak_config(tmp_path: Path, **kw) -> AdaKTrainingConfig:
    """An Ada-K training config writing to ``tmp_path / "run"``, without progress bars or info logs."""
    base = dict(output_dir=str(tmp_path / "run"), progress_bar=False, log_level="warning")
    return AdaKTrainingConfig(**{**base, **kw})
