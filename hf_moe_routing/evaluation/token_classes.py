"""Token classes for per-class scores: punctuation, function words, content words, numbers, other.

A proxy for accuracy on linguistic phenomena while the reference models do not beat word n-grams on BLiMP
(docs/evidence.md): a routing that costs perplexity on content words but not on punctuation shows it. Each
*token* is classed by its decoded text (surrounding whitespace ignored), so a content word's word pieces are
``content``:

* ``punctuation``: only punctuation (WikiText's ``@-@`` and ``@,@`` included);
* ``function``: closed-class English words (articles, prepositions, pronouns, auxiliaries, conjunctions);
* ``content``: other alphabetic tokens (content words and their word pieces);
* ``number`` and ``other`` (special tokens, ``<unk>``, mixed).
"""

from __future__ import annotations

import string
from typing import Any

import torch

FUNCTION_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "this",
        "that",
        "these",
        "those",
        "some",
        "any",
        "each",
        "every",
        "no",
        "of",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "to",
        "into",
        "onto",
        "over",
        "under",
        "about",
        "after",
        "before",
        "between",
        "through",
        "during",
        "against",
        "among",
        "within",
        "without",
        "upon",
        "across",
        "along",
        "behind",
        "beyond",
        "near",
        "off",
        "out",
        "up",
        "down",
        "since",
        "until",
        "and",
        "or",
        "but",
        "nor",
        "so",
        "yet",
        "if",
        "than",
        "then",
        "because",
        "while",
        "although",
        "though",
        "as",
        "whether",
        "i",
        "me",
        "my",
        "mine",
        "you",
        "your",
        "yours",
        "he",
        "him",
        "his",
        "she",
        "her",
        "hers",
        "it",
        "its",
        "we",
        "us",
        "our",
        "ours",
        "they",
        "them",
        "their",
        "theirs",
        "who",
        "whom",
        "whose",
        "which",
        "what",
        "where",
        "when",
        "why",
        "how",
        "there",
        "here",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "has",
        "have",
        "had",
        "having",
        "do",
        "does",
        "did",
        "will",
        "would",
        "shall",
        "should",
        "can",
        "could",
        "may",
        "might",
        "must",
        "not",
        "also",
        "only",
        "very",
        "too",
        "just",
    ]
)
CLASSES = ("punctuation", "function", "content", "number", "other")
_PUNCT = set(string.punctuation) | set("–—‘’“”…")


def token_class(text: str) -> str:
    """The class of one decoded token (surrounding whitespace ignored)."""
    word = text.strip()
    if not word:
        return "other"
    if all(ch in _PUNCT for ch in word):
        return "punctuation"
    if word.lower() in FUNCTION_WORDS:
        return "function"
    if word.isalpha():
        return "content"
    if word.replace(".", "").replace(",", "").isdigit():
        return "number"
    return "other"


def vocab_classes(tokenizer: Any) -> torch.Tensor:
    """(V,) int64: the index in :data:`CLASSES` of every token id of ``tokenizer`` (``len(tokenizer)`` ids)."""
    ids = range(len(tokenizer))
    return torch.tensor([CLASSES.index(token_class(tokenizer.decode([i]))) for i in ids], dtype=torch.long)


__all__ = ["CLASSES", "FUNCTION_WORDS", "token_class", "vocab_classes"]
