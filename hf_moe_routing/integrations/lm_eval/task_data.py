"""Offline datasets for the lm-eval tasks shipped in ``tasks/`` (``custom_dataset`` functions).

lm-eval calls them with the task's ``dataset_kwargs`` and its metadata (``--metadata`` on the command
line, ``TaskManager(metadata=...)`` in Python, merged with the model_args). The data folder is the
``data_dir`` metadata entry if given, else ``$HF_MOE_ROUTING_DATA``, else ``../shared/data`` beside the
checkout (:func:`hf_moe_routing.data.data_dir`). Files are read with the local ``json`` / ``text``
builders of ``datasets``: nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import datasets

from ...data import data_dir as resolve_data_dir

#: Names of the tasks that read their data here.
TASK_PREFIXES = ("blimp_local", "wikitext2_local")


class _QuietCustomDatasetNotice(logging.Filter):
    """Drop lm-eval's per-task notice on ``custom_dataset`` kwargs for our tasks (67 of them for BLiMP).

    Their one kwarg, ``data_dir``, is documented in this module and in the CLI's ``--help``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(TASK_PREFIXES) and "Custom kwargs can be passed" in message)


_task_logger = logging.getLogger("lm_eval.api.task")
if not any(isinstance(f, _QuietCustomDatasetNotice) for f in _task_logger.filters):
    _task_logger.addFilter(_QuietCustomDatasetNotice())

#: A WikiText article starts at a top-level heading line `` = Title = `` (sections are `` = = ... = = ``).
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def _data_file(data_dir: str | os.PathLike | None, *parts: str) -> Path:
    path = resolve_data_dir(data_dir).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist. Point the lm-eval tasks at the data folder with --metadata "
            f"data_dir=DIR (Python: TaskManager(metadata={{'data_dir': DIR}})) or HF_MOE_ROUTING_DATA."
        )
    return path


def blimp_dataset(
    phenomenon: str, data_dir: str | os.PathLike | None = None, **_metadata: Any
) -> datasets.DatasetDict:
    """The 1000 minimal pairs of one BLiMP paradigm (``<data>/blimp/<phenomenon>.jsonl``) as split ``test``."""
    path = _data_file(data_dir, "blimp", f"{phenomenon}.jsonl")
    return datasets.load_dataset("json", data_files={"test": str(path)})


def split_articles(lines: list[str]) -> list[str]:
    """Group WikiText lines (with their line breaks) into articles, each starting at its `` = Title = ``."""
    articles: list[list[str]] = []
    for line in lines:
        if _ARTICLE_HEADING.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return [text for text in ("".join(article).strip() for article in articles) if text]


def wikitext_dataset(
    split: str = "test", data_dir: str | os.PathLike | None = None, **_metadata: Any
) -> datasets.DatasetDict:
    """WikiText-2 ``<data>/wikitext-2/<split>.txt`` as one document (field ``page``) per article.

    The same layout as ``EleutherAI/wikitext_document_level``, so lm-eval's own WikiText detokenizer and
    word / byte perplexity apply unchanged.
    """
    path = _data_file(data_dir, "wikitext-2", f"{split}.txt")
    lines = datasets.load_dataset("text", data_files={split: str(path)}, keep_linebreaks=True)[split]["text"]
    pages = split_articles(lines)
    if not pages:
        raise ValueError(f"{path} holds no text.")
    return datasets.DatasetDict({split: datasets.Dataset.from_dict({"page": pages})})
