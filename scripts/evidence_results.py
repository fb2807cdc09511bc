"""The results folder of an evidence protocol: rows as JSON lines, the protocol and build hashes they came from.

Shared by ``scripts/evidence_protocol.py`` (Ada-K against baselines), ``scripts/evidence_variants.py`` and
``scripts/bip_evidence.py``: ``<out>/runs.jsonl`` holds one line per finished row (a rerun skips them),
``<out>/protocol.json`` the settings (rows of two protocols never mix: :class:`ProtocolMismatch`) and
``<out>/reference.json`` each base's weights SHA-256 (rows of two builds never mix: ``ReferenceHashMismatch``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hf_moe_routing.evaluation.paired import RowScores
from hf_moe_routing.training.reference import (
    ReferenceHashMismatch,
    check_build_hash,
    reference_model,
    reference_path,
)


@dataclasses.dataclass(kw_only=True)
class RowsSettings:
    """What every protocol shares: its row counts and shapes, the reference builds' steps and where files are."""

    test_rows: int = 256
    validation_rows: int = 128
    batch_size: int = 8
    seq_len: int = 128
    reference_steps: int | None = None  # override the reference build's steps (smoke runs only)
    threads: int = 1  # torch threads: results depend on them
    cache_dir: str | None = None
    data_dir: str | None = None


class ProtocolMismatch(RuntimeError):
    """The rows in an output folder were made with another protocol (they would mix in one table)."""


#: protocol fields that do not change a result (where files are)
_LOCATION_FIELDS = ("cache_dir", "data_dir")


def check_protocol(protocol: Any, path: Path) -> None:
    """Refuse to add rows of ``protocol`` to a folder whose ``protocol.json`` records another one.

    Raises:
        ProtocolMismatch: naming the fields that differ, with both values.
    """
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(protocol)})
    if unknown:  # another table's folder (e.g. bip-frozen's rows where adak-evidence's are wanted)
        raise ProtocolMismatch(
            f"{path.parent} holds rows of another protocol (its protocol.json has {', '.join(unknown)}, which "
            f"{type(protocol).__name__} has not): choose another --out."
        )
    recorded = dataclasses.asdict(type(protocol)(**data))  # older files: defaults
    wanted = dataclasses.asdict(protocol)
    differ = [k for k in wanted if k not in _LOCATION_FIELDS and wanted[k] != recorded[k]]
    if differ:
        what = ", ".join(f"{k}: {recorded[k]!r} there, {wanted[k]!r} now" for k in differ)
        raise ProtocolMismatch(
            f"{path.parent} holds rows of another protocol ({what}); rows of two protocols never mix in one "
            "table: choose another --out, or repeat the recorded settings."
        )


def rows_sha256(rows: Any) -> str:
    """SHA-256 of the token ids of packed ``rows``: two bases' rows can be paired only where it is equal."""
    digest = hashlib.sha256()
    for ids in rows["input_ids"]:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def scores_row(scores: RowScores) -> dict[str, Any]:
    row = {
        "nll": scores.nll.tolist(),
        "tokens": scores.tokens.tolist(),
        "mean_experts": scores.mean_experts,
        "experts_per_layer": scores.experts_per_layer,
        "perplexity": scores.perplexity,
    }
    if scores.class_nll is not None:  # (R, C) per token class (hf_moe_routing.evaluation.token_classes)
        row |= {
            "class_nll": scores.class_nll.tolist(),
            "class_tokens": scores.class_tokens.tolist(),
            "class_correct": scores.class_correct.tolist(),
        }
    return row


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ("base", "kind", "method", "fraction", "seed", "k"))


def checked_reference(
    protocol: RowsSettings, base: str, hashes: dict[str, str], hashes_path: Path, rows_path: Path
) -> tuple[Any, Any, str]:
    """Build (or load) the reference model ``base``; returns ``(model, tokenizer, weights sha256)``.

    The hash must equal ``hashes[base]`` (the one the rows in ``rows_path`` were made with) where there is
    one; a new base's hash is added to ``hashes`` and saved to ``hashes_path``. Raises ReferenceHashMismatch.
    """
    model, tokenizer = reference_model(
        base,
        protocol.cache_dir,
        data_dir=protocol.data_dir,
        max_steps=protocol.reference_steps,
        progress=False,
    )
    sha = check_build_hash(
        reference_path(base, protocol.cache_dir), hashes.get(base), f"the rows in {rows_path}"
    )
    if base not in hashes:
        hashes[base] = sha
        hashes_path.write_text(json.dumps(hashes, indent=2) + "\n")
    return model, tokenizer, sha


class Results:
    """One output folder of a protocol: ``runs.jsonl`` (a line per finished row; ``done`` holds their keys, so a
    rerun skips them), ``protocol.json`` (checked: rows of two protocols never mix) and ``reference.json`` (each
    base's weights SHA-256). ``key`` maps a row to its identity, ``describe`` to its log line.

    Raises ProtocolMismatch where ``out`` holds rows of another protocol.
    """

    def __init__(self, protocol: Any, out: Path, key: Callable, describe: Callable, log=print) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.protocol, self.path, self.hashes_path = protocol, out / "runs.jsonl", out / "reference.json"
        if read_jsonl(self.path):  # a folder without rows (a run stopped before its first) takes any protocol
            check_protocol(protocol, out / "protocol.json")
        (out / "protocol.json").write_text(json.dumps(dataclasses.asdict(protocol), indent=2) + "\n")
        self.hashes = json.loads(self.hashes_path.read_text()) if self.hashes_path.is_file() else {}
        self.key, self.describe, self.log = key, describe, log
        self.done = {key(r) for r in read_jsonl(self.path)}

    def reference(self, base: str) -> tuple[Any, Any, str]:
        """The checked reference build ``base`` (see :func:`checked_reference`)."""
        return checked_reference(self.protocol, base, self.hashes, self.hashes_path, self.path)

    def record(self, row: dict[str, Any], started: float) -> None:
        """Append ``row`` with its base's weights hash and the CPU seconds since ``started``, and log it."""
        row = {
            "weights_sha256": self.hashes[row["base"]],
            "cpu_seconds": time.process_time() - started,
            **row,
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.done.add(self.key(row))
        self.log(self.describe(row))

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)


__all__ = [
    "ProtocolMismatch",
    "ReferenceHashMismatch",
    "Results",
    "RowsSettings",
    "check_protocol",
    "checked_reference",
    "key",
    "read_jsonl",
    "rows_sha256",
    "scores_row",
]
