"""Provenance of reference builds: the weights' SHA-256, the package versions that shaped them, and the
recorded hashes a reproduce run checks a build against (``docs/evidence.md``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..core.config import read_json
from ..core.version import shaping_versions

_INFO_FILE = "build_info.json"
RECORDED_HASHES_FILE = Path(__file__).with_name("reference_hashes.json")
#: packages whose version shapes a build's weights, beyond ``core.version.shaping_versions()``'s
_EXTRA_PACKAGES = ("safetensors",)


def package_versions() -> dict[str, str | None]:
    """``{package: installed version or None}`` of every package that shapes a build (plus ``python``).

    :func:`hf_moe_routing.core.version.shaping_versions` (torch, transformers, tokenizers, datasets,
    numpy, accelerate, python) and safetensors, read from the installed metadata.
    """
    from importlib import metadata

    out = shaping_versions()
    for name in _EXTRA_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def build_key(torch_version: str, threads: int) -> str:
    """The key a build hash is recorded under: the hash holds for one torch version and thread count."""
    return f"torch {torch_version}, {threads} threads"


def recorded_hash(name: str, torch_version: str, threads: int) -> str | None:
    """The recorded weights SHA-256 of reference build ``name`` for this torch version and threads, if any."""
    if not RECORDED_HASHES_FILE.is_file():
        return None
    table = json.loads(RECORDED_HASHES_FILE.read_text())
    return table.get(name, {}).get(build_key(torch_version, threads))


class ReferenceHashMismatch(RuntimeError):
    """A reference build's weights differ from the build a result was recorded with."""


def check_build_hash(
    folder: str | os.PathLike, expected: str | None, what: str = "the recorded results"
) -> str:
    """The build's recorded weights hash; raises :class:`ReferenceHashMismatch` naming both if it differs.

    ``expected`` None accepts any build (the first run of a results folder records its hash).
    """
    info = read_json(Path(folder) / _INFO_FILE, "Reference model build info")
    actual = info.get("weights_sha256")
    if actual is None:
        raise ReferenceHashMismatch(
            f"The reference build in {folder} records no weights_sha256 (built by an older version): rebuild it "
            "with scripts/build_reference_models.py --rebuild."
        )
    if expected is not None and actual != expected:
        raise ReferenceHashMismatch(
            f"The reference build in {folder} has weights SHA-256 {actual}, but {what} were made with "
            f"{expected}. Rows of two builds are never mixed: use a new results folder, or rebuild the "
            f"reference model with the recorded torch version and threads ({info.get('machine', {})})."
        )
    return actual
