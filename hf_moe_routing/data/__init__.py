"""Text data: local corpora, tokenizer training, any `datasets` dataset tokenised and packed, synthetic text.

Names are imported lazily (PEP 562): ``from hf_moe_routing.data.corpora import ...`` and the
command line do not pay for importing ``datasets`` until a dataset is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "CORPORA": "corpora",
    "DATA_ENV": "corpora",
    "HUB_EQUIVALENTS": "corpora",
    "data_dir": "corpora",
    "read_corpus": "corpora",
    "IGNORE_INDEX": "datasets",
    "context_length": "context",
    "check_context_length": "context",
    "load_text_dataset": "datasets",
    "pack_dataset": "datasets",
    "SYNTHETIC_CLASSES": "synthetic",
    "classify_words": "synthetic",
    "synthetic_corpus": "synthetic",
    "synthetic_tokenizer": "synthetic",
    "SPECIAL_TOKENS": "tokenizer",
    "train_tokenizer": "tokenizer",
    "EvidenceSplits": "splits",
    "evidence_splits": "splits",
}

__all__ = [
    "CORPORA",
    "EvidenceSplits",
    "DATA_ENV",
    "HUB_EQUIVALENTS",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "SYNTHETIC_CLASSES",
    "check_context_length",
    "classify_words",
    "context_length",
    "data_dir",
    "evidence_splits",
    "load_text_dataset",
    "pack_dataset",
    "read_corpus",
    "synthetic_corpus",
    "synthetic_tokenizer",
    "train_tokenizer",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from .context import check_context_length, context_length
    from .corpora import CORPORA, DATA_ENV, HUB_EQUIVALENTS, data_dir, read_corpus
    from .datasets import IGNORE_INDEX, load_text_dataset, pack_dataset
    from .splits import EvidenceSplits, evidence_splits
    from .synthetic import SYNTHETIC_CLASSES, classify_words, synthetic_corpus, synthetic_tokenizer
    from .tokenizer import SPECIAL_TOKENS, train_tokenizer
