"""The evidence splits: which local text is used for what, so that the headline is scored on untouched rows.

Deterministic (no randomness, no hashing of the text): WikiText-2 files are cut into *articles* at their
top-level headings (``= Title =``; a file without headings is cut by paragraph) and assigned by position, so a paragraph never lands in two
splits and neighbouring paragraphs of one article stay together.

================  ======================================================================  =====================
split             text                                                                    used for
================  ======================================================================  =====================
``pretrain``      tinyshakespeare + the first 3/4 of WikiText-2 *valid*'s articles        pre-training the
                                                                                          reference models;
                                                                                          allocator training;
                                                                                          calibration
``validation``    the last 1/4 of WikiText-2 *valid*'s articles                           every design choice,
                                                                                          threshold, lambda and
                                                                                          per-layer budget search
``heldout_train`` the first half of WikiText-2 *test*'s articles                           optional allocator
                                                                                          training on text the
                                                                                          base never saw
``test``          the second half of WikiText-2 *test*'s articles                          the headline only
================  ======================================================================  =====================

``validation`` is excluded from pre-training (the reference builds use ``pretrain``), and ``test`` is used
for nothing but the final scores (and for measuring each method's compute on those same rows, so that
methods are compared at equal routed experts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

from .corpora import read_corpus

#: A top-level WikiText heading after stripping: ``= Title =`` (sub-headings have ``= =``).
_ARTICLE_HEADING = re.compile(r"^= [^=].* =$")
#: Share of WikiText-2 valid's articles (from the start) that pre-training may use.
PRETRAIN_SHARE = 0.75
#: Share of WikiText-2 test's articles (from the start) that may train allocators; the rest is the test.
HELDOUT_TRAIN_SHARE = 0.5


def articles(paragraphs: list[str]) -> list[list[str]]:
    """WikiText paragraphs grouped into articles, each starting at a top-level ``= Title =`` heading.

    Paragraphs before the first heading form an article of their own. Raises ValueError on an empty list.
    """
    if not paragraphs:
        raise ValueError("No paragraphs to split into articles.")
    out: list[list[str]] = []
    for paragraph in paragraphs:
        if _ARTICLE_HEADING.match(paragraph) or not out:
            out.append([])
        out[-1].append(paragraph)
    return out


def _cut(paragraphs: list[str], share: float) -> tuple[list[str], list[str]]:
    groups = articles(paragraphs)
    if len(groups) < 2:  # a corpus without article headings (e.g. a custom data folder): cut by paragraph
        groups = [[p] for p in paragraphs]
    if len(groups) < 2:
        raise ValueError("The corpus holds a single paragraph: it cannot be split.")
    cut = min(len(groups) - 1, max(1, round(share * len(groups))))
    return [p for g in groups[:cut] for p in g], [p for g in groups[cut:] for p in g]


@dataclasses.dataclass(frozen=True)
class EvidenceSplits:
    """The four text splits (lists of paragraphs); see the module docstring for what each is used for."""

    pretrain: list[str]
    validation: list[str]
    heldout_train: list[str]
    test: list[str]

    def fingerprint(self) -> dict[str, str]:
        """SHA-256 of each split's text (paragraphs joined by newlines), to record which rows a result used."""
        return {
            name: hashlib.sha256("\n".join(getattr(self, name)).encode("utf-8")).hexdigest()
            for name in ("pretrain", "validation", "heldout_train", "test")
        }

    def summary(self) -> str:
        return json.dumps({k: len(getattr(self, k)) for k in self.fingerprint()})


def evidence_splits(data_dir: str | os.PathLike | None = None) -> EvidenceSplits:
    """The deterministic evidence splits of the local corpora (see the module docstring).

    Raises FileNotFoundError if a corpus file is missing (see :func:`hf_moe_routing.data.data_dir`).
    """
    valid_pre, validation = _cut(read_corpus("wikitext-2/valid", data_dir), PRETRAIN_SHARE)
    heldout, test = _cut(read_corpus("wikitext-2/test", data_dir), HELDOUT_TRAIN_SHARE)
    return EvidenceSplits(
        pretrain=read_corpus("tinyshakespeare", data_dir) + valid_pre,
        validation=validation,
        heldout_train=heldout,
        test=test,
    )
