"""Local text corpora from the shared data folder (WikiText-2, tinyshakespeare).

The folder is ``../shared/data`` beside the repository checkout, overridden by an explicit path or the
``HF_MOE_ROUTING_DATA`` environment variable. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that points at the data folder.
DATA_ENV = "HF_MOE_ROUTING_DATA"

#: corpus name -> file inside the data folder
CORPORA: dict[str, str] = {
    "wikitext-2/valid": "wikitext-2/valid.txt",
    "wikitext-2/test": "wikitext-2/test.txt",
    "tinyshakespeare": "tinyshakespeare/input.txt",
}


#: corpus name -> (Hub dataset id, configuration, split) of the same text, for model cards
HUB_EQUIVALENTS: dict[str, tuple[str, str | None, str]] = {
    "wikitext-2/valid": ("Salesforce/wikitext", "wikitext-2-v1", "validation"),
    "wikitext-2/test": ("Salesforce/wikitext", "wikitext-2-v1", "test"),
    "tinyshakespeare": ("karpathy/tiny_shakespeare", None, "train"),
}


def _default_data_dir() -> Path:
    """``<repo root>/../shared/data`` (the repository root is two levels above this package)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data folder: ``path`` if given, else ``$HF_MOE_ROUTING_DATA``, else ``../shared/data``.

    Raises FileNotFoundError (saying how to point at the folder) if it does not exist.
    """
    if path is not None:
        where, how = Path(path), "the given data_dir"
    elif os.environ.get(DATA_ENV):
        where, how = Path(os.environ[DATA_ENV]), f"${DATA_ENV}"
    else:
        where, how = _default_data_dir(), "the default ../shared/data beside the checkout"
    where = where.expanduser()
    if not where.is_dir():
        raise FileNotFoundError(
            f"Data folder {where} ({how}) does not exist. Pass data_dir=... (CLI: --data-dir) or set "
            f"{DATA_ENV} to the folder holding wikitext-2/ and tinyshakespeare/."
        )
    return where


def read_corpus(name: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The paragraphs of a local corpus, stripped, without empty ones.

    ``"wikitext-2/valid"`` / ``"wikitext-2/test"``: one paragraph (or ``= heading =``) per line, in
    WikiText's tokenised form. ``"tinyshakespeare"``: one speech (speaker line plus text) per item.
    """
    if name not in CORPORA:
        raise ValueError(f"Unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}.")
    path = globals()["data_dir"](data_dir) / CORPORA[name]
    if not path.is_file():
        raise FileNotFoundError(f"Corpus {name!r} is missing: expected the file {path}.")
    text = path.read_text(encoding="utf-8")
    if name == "tinyshakespeare":
        items = [block.strip() for block in text.split("\n\n")]
    else:
        items = [line.strip() for line in text.splitlines()]
    items = [item for item in items if item]
    if not items:
        raise ValueError(f"Corpus file {path} holds no text.")
    return items
