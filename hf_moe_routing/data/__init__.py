"""Text data: local corpora, tokenizer training, any `datasets` dataset tokenised and packed, synthetic text."""

from .corpora import CORPORA, DATA_ENV, data_dir, read_corpus
from .datasets import IGNORE_INDEX, check_context_length, load_text_dataset, pack_dataset
from .synthetic import SYNTHETIC_CLASSES, classify_words, synthetic_corpus, synthetic_tokenizer
from .tokenizer import SPECIAL_TOKENS, train_tokenizer

__all__ = [
    "CORPORA",
    "DATA_ENV",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "SYNTHETIC_CLASSES",
    "check_context_length",
    "classify_words",
    "data_dir",
    "load_text_dataset",
    "pack_dataset",
    "read_corpus",
    "synthetic_corpus",
    "synthetic_tokenizer",
    "train_tokenizer",
]
