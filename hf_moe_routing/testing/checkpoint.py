"""A tiny MoE checkpoint folder as a user has one (config, safetensors weights, tokenizer, some text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .tiny import tiny_model


def tiny_checkpoint(
    folder: str | Path, family: str = "mixtral", *, lines: int = 30, seed: int = 0, **overrides: Any
) -> Path:
    """Save a tiny ``family`` model with a word-level tokenizer over its ids and a ``text.txt`` of random words.

    What a user's local checkpoint folder looks like (``config.json``, safetensors weights, tokenizer
    files), for command-line and README tests: ``lines`` lines of 20 words ``w0`` .. ``w119``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    words = [f"w{i}" for i in range(120)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    tiny_model(family, seed=seed, **overrides).save_pretrained(folder)
    rng = torch.Generator().manual_seed(seed)
    text = [
        " ".join(words[int(i)] for i in torch.randint(0, 120, (20,), generator=rng)) for _ in range(lines)
    ]
    (folder / "text.txt").write_text("\n".join(text) + "\n")
    return folder
