"""A generated language that mixes trivially predictable tokens with tokens that need computation.

Every text is a run of sentences of three kinds (words separated by spaces)::

    add n3 n5 is n8 .              modular sum: the result n8 = (3 + 5) mod 10 must be computed
    rev c a d to d a c .           reversal: the second half must be recalled in reverse order
    say red fox runs far .         fixed phrase: after its first word, every word is determined

Each word has a class: ``"random"`` (drawn at random, irreducible: sentence keywords, operands, a phrase's
first word), ``"predictable"`` (fully determined by the previous word: ``is``, ``to``, ``.``, the rest of a
phrase) and ``"computed"`` (determined, but only through computation over earlier words: sums and
reversals). A model that routes adaptively can spend fewer experts on predictable words than on computed
ones. The vocabulary is fixed, so :func:`synthetic_tokenizer` gives the same ids on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .tokenizer import SPECIAL_TOKENS, wrap_tokenizer

SYNTHETIC_CLASSES = ("random", "predictable", "computed")
_DIGITS = tuple(f"n{i}" for i in range(10))
_LETTERS = tuple("abcdefgh")
_PHRASES = (
    ("red", "fox", "runs", "far"),
    ("old", "king", "sleeps", "late"),
    ("blue", "sea", "grows", "calm"),
    ("wise", "owl", "sings", "low"),
    ("cold", "wind", "blows", "north"),
    ("tall", "tree", "bends", "slowly"),
)
_KEYWORDS = ("add", "rev", "say")
_GLUE = ("is", "to", ".")
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(_KEYWORDS + _GLUE + _DIGITS + _LETTERS + tuple(w for p in _PHRASES for w in p))
)


def _sentence(rng: random.Random, reverse_length: int) -> tuple[list[str], list[str]]:
    kind = rng.choice(_KEYWORDS)
    if kind == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        words = ["add", _DIGITS[a], _DIGITS[b], "is", _DIGITS[(a + b) % 10], "."]
        classes = ["random", "random", "random", "predictable", "computed", "predictable"]
    elif kind == "rev":
        letters = [rng.choice(_LETTERS) for _ in range(reverse_length)]
        words = ["rev", *letters, "to", *reversed(letters), "."]
        n = reverse_length
        classes = ["random"] * (1 + n) + ["predictable"] + ["computed"] * n + ["predictable"]
    else:
        phrase = rng.choice(_PHRASES)
        words = ["say", *phrase, "."]
        classes = ["random", "random"] + ["predictable"] * (len(phrase) - 1) + ["predictable"]
    return words, classes


def synthetic_corpus(
    num_texts: int = 1000,
    sentences_per_text: int = 8,
    *,
    seed: int = 0,
    reverse_length: int = 3,
    with_classes: bool = False,
) -> list[str] | tuple[list[str], list[list[str]]]:
    """``num_texts`` texts of ``sentences_per_text`` random sentences (see the module docstring).

    With ``with_classes=True`` also returns, per text, the class of every word (``SYNTHETIC_CLASSES``).
    The same seed gives the same texts.
    """
    if num_texts < 1 or sentences_per_text < 1:
        raise ValueError("num_texts and sentences_per_text must be >= 1.")
    if reverse_length < 1:
        raise ValueError(f"reverse_length must be >= 1, got {reverse_length}.")
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(num_texts):
        words: list[str] = []
        classes: list[str] = []
        for _ in range(sentences_per_text):
            w, c = _sentence(rng, reverse_length)
            words += w
            classes += c
        texts.append(" ".join(words))
        labels.append(classes)
    return (texts, labels) if with_classes else texts


def classify_words(words: Sequence[str]) -> list[str]:
    """The class of each word of a synthetic word sequence (e.g. decoded tokens of a packed block).

    Words before the first sentence keyword (a block cut mid-sentence) and special tokens get
    ``"other"``.
    """
    out = ["other"] * len(words)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "add":
            pattern = ["random", "random", "random", "predictable", "computed", "predictable"]
        elif word == "say":
            pattern = ["random", "random", "predictable", "predictable", "predictable", "predictable"]
        elif word == "rev":
            n = next((j - i - 1 for j in range(i + 1, len(words)) if words[j] == "to"), len(words) - i - 1)
            pattern = ["random"] * (1 + n) + ["predictable"] + ["computed"] * n + ["predictable"]
        else:
            i += 1
            continue
        for j, label in enumerate(pattern):
            if i + j < len(words) and words[i + j] not in SPECIAL_TOKENS:
                out[i + j] = label
        i += len(pattern)
    return out


def synthetic_tokenizer(model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer of the synthetic language: ``<pad> <s> </s> <unk>`` then ``VOCABULARY``."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *VOCABULARY))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return wrap_tokenizer(tokenizer, model_max_length)
