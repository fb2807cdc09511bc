"""Train a small tokenizer with `tokenizers` and wrap it as a transformers ``PreTrainedTokenizerFast``."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

#: Special tokens of every tokenizer trained here, in id order (pad = 0, bos = 1, eos = 2, unk = 3).
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
_BYTE_ALPHABET = 256


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    *,
    kind: str = "bpe",
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """A tokenizer trained on ``texts``.

    Args:
        texts: training text (e.g. ``read_corpus("tinyshakespeare")``).
        vocab_size: size of the vocabulary including the special tokens ``<pad> <s> </s> <unk>``
            (ids 0-3, matching the project's tiny model configs).
        kind: ``"bpe"`` (byte-level BPE: never produces ``<unk>``, needs ``vocab_size > 260``) or
            ``"word"`` (whitespace-separated words, for synthetic languages; unknown words -> ``<unk>``).
        min_frequency: merges / words seen fewer times are dropped.
        model_max_length: stored on the tokenizer (the model context it is meant for).

    Returns a ``PreTrainedTokenizerFast`` that saves with ``save_pretrained`` like any other.
    No BOS/EOS is added by ``__call__``; :func:`~hf_moe_routing.data.pack_dataset` appends EOS.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings (e.g. a list of paragraphs), not one string.")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("Cannot train a tokenizer on no text: texts is empty or holds only blank strings.")
    if kind == "bpe":
        minimum = _BYTE_ALPHABET + len(SPECIAL_TOKENS) + 1
        if vocab_size < minimum:
            raise ValueError(f"A byte-level BPE tokenizer needs vocab_size >= {minimum}, got {vocab_size}.")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "word":
        if vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}.")
        tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
    else:
        raise ValueError(f"kind must be 'bpe' or 'word', got {kind!r}.")
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tokenizer, model_max_length)


def wrap_tokenizer(tokenizer: Tokenizer, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A ``tokenizers`` tokenizer as a transformers ``PreTrainedTokenizerFast`` with our special tokens."""
    pad, bos, eos, unk = SPECIAL_TOKENS
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
