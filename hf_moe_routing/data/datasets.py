"""Any text dataset through `datasets` (a Hub name, local files or a local corpus), tokenised and packed.

>>> ds = load_text_dataset("tinyshakespeare")                        # local corpus by name
>>> ds = load_text_dataset("data/train.jsonl", text_field="body")     # local json/jsonl/csv/parquet/txt
>>> ds = load_text_dataset("HuggingFaceFW/fineweb-edu", "train")      # Hub dataset
>>> packed = pack_dataset(ds, tokenizer, seq_len=256)                 # input_ids / attention_mask / labels

Chat/SFT records (a ``messages`` list of ``{"role", "content"}`` or ``prompt``/``completion`` fields)
are packed with their prompts masked: labels are -100 on every token that is not an assistant reply.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from .corpora import CORPORA, read_corpus

#: label value ignored by the loss (transformers / PyTorch convention)
IGNORE_INDEX = -100
_LOCAL_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
_CHAT_FIELDS = ("messages", "conversations")


def load_text_dataset(
    name_or_path: str | os.PathLike,
    split: str = "train",
    text_field: str = "text",
    *,
    config_name: str | None = None,
    data_dir: str | os.PathLike | None = None,
    **load_kwargs: Any,
) -> datasets.Dataset:
    """Load a text dataset and check that it is usable.

    Args:
        name_or_path: a local corpus name (``"tinyshakespeare"``, ``"wikitext-2/valid"``,
            ``"wikitext-2/test"``, read from ``data_dir``), a local file or folder (``.txt`` one text per
            line, ``.json``/``.jsonl``, ``.csv``, ``.parquet``), or a Hub dataset id.
        split: the split to load (for a local file, the split name the rows get).
        text_field: the column holding the text. Chat/SFT records (``messages`` or
            ``prompt``/``completion`` columns) are accepted too.
        config_name: the Hub dataset's configuration (e.g. ``"wikitext-2-raw-v1"``).
        load_kwargs: passed to ``datasets.load_dataset`` (``revision``, ``token``, ...).

    Raises ValueError for an empty dataset or a missing text field, FileNotFoundError when the dataset
    cannot be found or reached.
    """
    name = os.fspath(name_or_path)
    if name in CORPORA:
        ds = datasets.Dataset.from_dict({"text": read_corpus(name, data_dir)})
        return _check_dataset(ds, name, "text")
    path = Path(name).expanduser()
    try:
        if path.is_file():
            if path.stat().st_size == 0:
                raise ValueError(f"Dataset file {path} is empty: give a file with text in it.")
            builder = _LOCAL_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"Cannot read {path}: unknown file type {path.suffix!r}; use one of "
                    f"{', '.join(sorted(_LOCAL_BUILDERS))}."
                )
            ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **load_kwargs)
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), config_name, split=split, **load_kwargs)
        else:
            ds = datasets.load_dataset(name, config_name, split=split, **load_kwargs)
    except (ValueError, TypeError):
        raise
    except Exception as error:  # DatasetNotFoundError, ConnectionError, HfHubHTTPError, ...
        raise FileNotFoundError(
            f"Could not load dataset {name!r} (split {split!r}): {type(error).__name__}: {error}. If it is "
            "a Hub dataset, check the id, your network connection and your Hugging Face token "
            "(HF_TOKEN / `hf auth login`); a local path must be an existing file or folder."
        ) from error
    if isinstance(ds, datasets.DatasetDict):  # load_dataset(split=...) normally gives a Dataset
        ds = ds[split]
    return _check_dataset(ds, name, text_field)


def _record_kind(columns: Sequence[str], text_field: str) -> str:
    """'text', 'chat' (messages list) or 'prompt' (prompt/completion), or ValueError."""
    if text_field in columns:
        return "text"
    if any(c in columns for c in _CHAT_FIELDS):
        return "chat"
    if "prompt" in columns and ("completion" in columns or "response" in columns):
        return "prompt"
    raise ValueError(
        f"The dataset has no text field {text_field!r}; its columns are {list(columns)}. Pass "
        "text_field=<column> (CLI: --text-field), or give chat records a 'messages' column or "
        "'prompt'/'completion' columns."
    )


def _check_dataset(ds: datasets.Dataset, name: str, text_field: str) -> datasets.Dataset:
    if len(ds) == 0:
        raise ValueError(f"Dataset {name!r} is empty (0 rows): give a dataset or split with text in it.")
    _record_kind(ds.column_names, text_field)
    return ds


def _segments(
    record: dict[str, Any], kind: str, text_field: str, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, bool]]:
    """The record as (text, trained-on) segments; prompts and non-assistant turns are not trained on."""
    if kind == "text":
        text = record[text_field]
        if text is not None and not isinstance(text, str):
            raise TypeError(f"Field {text_field!r} must hold strings, got {type(text).__name__}.")
        return [(text, True)] if text else []
    if kind == "prompt":
        answer = record.get("completion", record.get("response"))
        return [(record["prompt"] or "", False), (answer or "", True)]
    messages = next(record[c] for c in _CHAT_FIELDS if c in record)
    messages = [_normalise_message(m) for m in messages or []]
    if getattr(tokenizer, "chat_template", None):
        # render growing prefixes; each message's segment is what its turn adds to the rendering
        segments, previous = [], ""
        for i, message in enumerate(messages):
            rendered = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not rendered.startswith(previous):
                raise ValueError("The tokenizer's chat template does not render conversations prefix-stably.")
            segments.append((rendered[len(previous) :], message["role"] == "assistant"))
            previous = rendered
        return segments
    # no chat template: "role: content" lines; the role header is never trained on
    return [
        segment
        for m in messages
        for segment in ((f"{m['role']}: ", False), (f"{m['content']}\n", m["role"] == "assistant"))
    ]


def _normalise_message(message: dict[str, Any]) -> dict[str, str]:
    """``{"role", "content"}`` (also accepts ShareGPT's ``{"from", "value"}``)."""
    if "role" in message:
        return {"role": message["role"], "content": message.get("content") or ""}
    if "from" in message:
        role = {"human": "user", "gpt": "assistant"}.get(message["from"], message["from"])
        return {"role": role, "content": message.get("value") or ""}
    raise ValueError(f"A chat message needs 'role' and 'content' keys, got {sorted(message)}.")


def _tokenise(
    records: Iterable[dict[str, Any]], kind: str, text_field: str, tokenizer: PreTrainedTokenizerBase
) -> Iterable[tuple[list[int], list[int]]]:
    """(ids, labels) per record, EOS appended (trained on if the record's last segment is)."""
    eos = tokenizer.eos_token_id
    if kind == "text":  # fast path: batched tokenisation
        chunk: list[str] = []
        for record in records:
            chunk += [text for text, _ in _segments(record, kind, text_field, tokenizer)]
            if len(chunk) >= 1000:
                yield from _tokenise_texts(chunk, tokenizer, eos)
                chunk = []
        yield from _tokenise_texts(chunk, tokenizer, eos)
        return
    for record in records:
        ids: list[int] = []
        labels: list[int] = []
        trained = False
        for text, trained in _segments(record, kind, text_field, tokenizer):
            piece = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        if not ids:
            continue
        if eos is not None:
            ids.append(eos)
            labels.append(eos if trained else IGNORE_INDEX)
        yield ids, labels


def _tokenise_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, eos: int | None
) -> Iterable[tuple[list[int], list[int]]]:
    if not texts:
        return
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        if ids:
            ids = ids + ([eos] if eos is not None else [])
            yield ids, list(ids)


def pack_dataset(
    dataset: datasets.Dataset | Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    text_field: str = "text",
    packing: bool = True,
    truncate: bool = False,
    max_length: int | None = None,
) -> datasets.Dataset:
    """Tokenise ``dataset`` and cut it into rows of exactly ``seq_len`` tokens.

    With ``packing=True`` the records (each followed by EOS) are concatenated and cut into blocks;
    the last block is padded (attention_mask 0, labels -100). With ``packing=False`` every record is
    one row, padded to ``seq_len``; a longer record raises ValueError unless ``truncate=True``.

    Labels equal ``input_ids`` on trained tokens and -100 on padding and on chat/SFT prompts (the model
    shifts them itself). Chat records are rendered with the tokenizer's chat template if it has one
    (each turn is what it adds to the rendering, so an assistant turn's own role markers are trained on
    too), else as ``role: content`` lines whose ``role:`` header is never trained on. ``max_length`` (default: the tokenizer's ``model_max_length`` if set) is the
    model's context: a longer ``seq_len`` is an error.

    Returns a ``datasets.Dataset`` with torch-formatted ``input_ids``, ``attention_mask``, ``labels``.
    """
    if isinstance(dataset, str):
        raise TypeError("dataset must be a datasets.Dataset or a list of strings, not one string.")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
    limit = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < 10**9 and seq_len > limit:
        raise ValueError(
            f"seq_len={seq_len} is longer than the model context ({limit} tokens): use seq_len <= {limit}."
        )
    if not isinstance(dataset, datasets.Dataset):
        dataset = datasets.Dataset.from_dict({text_field: list(dataset)})
    if len(dataset) == 0:
        raise ValueError("Cannot pack an empty dataset (0 rows).")
    kind = _record_kind(dataset.column_names, text_field)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token: set tokenizer.pad_token first.")

    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}

    def emit(ids: list[int], labels: list[int]) -> None:
        missing = seq_len - len(ids)
        rows["input_ids"].append(ids + [pad] * missing)
        rows["attention_mask"].append([1] * len(ids) + [0] * missing)
        rows["labels"].append(labels + [IGNORE_INDEX] * missing)

    buffer_ids: list[int] = []
    buffer_labels: list[int] = []
    for index, (ids, labels) in enumerate(_tokenise(dataset, kind, text_field, tokenizer)):
        if not packing:
            if len(ids) > seq_len:
                if not truncate:
                    raise ValueError(
                        f"Record {index} has {len(ids)} tokens, more than seq_len={seq_len}: raise seq_len, "
                        "pass truncate=True, or use packing=True."
                    )
                ids, labels = ids[:seq_len], labels[:seq_len]
            emit(ids, labels)
            continue
        buffer_ids += ids
        buffer_labels += labels
        while len(buffer_ids) >= seq_len:
            emit(buffer_ids[:seq_len], buffer_labels[:seq_len])
            buffer_ids, buffer_labels = buffer_ids[seq_len:], buffer_labels[seq_len:]
    if packing and len(buffer_ids) > 1:
        emit(buffer_ids, buffer_labels)
    if not rows["input_ids"]:
        raise ValueError("The dataset holds no text to train on (every record is empty).")
    if all(label == IGNORE_INDEX for row in rows["labels"] for label in row):
        raise ValueError("Every token is masked out of the labels (no assistant/completion text).")
    return datasets.Dataset.from_dict(rows).with_format("torch")
