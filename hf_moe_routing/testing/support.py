"""The support table: which MoE families of the installed transformers hf-moe-routing patches exactly.

Each family of the :mod:`~hf_moe_routing.testing.catalog` is checked on a tiny random model of it
(:func:`~hf_moe_routing.testing.tiny.tiny_model`): ``describe_model`` must find and verify every
router, and ``patch_model(model, TopKConfig())`` must leave the logits bit-identical (and
``unpatch_model`` restore them). A family is "supported" if both hold, "refused" if
``describe_model`` refuses it (the reason says why), "mismatch" if patching changed the logits (a
bug: please report it) and "not testable" if no tiny model of it could be built here (its reason says
why; such a family is never reported as supported).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from ..families import GenericFamily, MoEBlock, UnsupportedFamilyError, describe_model
from ..methods import TopKConfig
from ..patching import patch_model, unpatch_model
from .catalog import catalog_entry, moe_families
from .tiny import tiny_model

STATUSES = ("supported", "refused", "mismatch", "not testable")


@dataclass(frozen=True)
class FamilySupport:
    """One row of the support table.

    Attributes:
        model_type: the family's ``config.model_type``.
        causal_lm_class: its ``*ForCausalLM`` class.
        status: one of :data:`STATUSES`.
        family: the family module that serves it (``"detected"``: the generic family probed it).
        router_kind: the router kind (``RouterKind.describe()``), empty unless supported.
        reason: why it is refused / mismatched / not testable; empty if supported.
        kind_key: the router kind in full (every :class:`RouterKind` field, where the selection bias
            lives, the rank of the hidden states it takes), to pick one family per kind.
    """

    model_type: str
    causal_lm_class: str
    status: str
    family: str = ""
    router_kind: str = ""
    reason: str = ""
    kind_key: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def probe_ids(batch: int = 2, seq_len: int = 13) -> torch.Tensor:
    """Deterministic token ids (batch, seq_len) in 3..127 (tiny models have 128 tokens)."""
    return torch.randint(3, 128, (batch, seq_len), generator=torch.Generator().manual_seed(0))


def check_family(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> FamilySupport:
    """Check one family on a tiny random model (see the module docstring)."""
    entry = catalog_entry(model_type)
    row = FamilySupport(model_type, entry.causal_lm_class, "not testable")
    try:
        model = tiny_model(model_type, seed=seed, dtype=dtype)
    except Exception as error:  # noqa: BLE001 - any build failure is reported, not raised
        return _replace(row, reason=untestable_reason(error))
    try:
        described = describe_model(model)
    except UnsupportedFamilyError as error:
        return _replace(row, status="refused", reason=error.reason)
    family = "detected" if isinstance(described.family, GenericFamily) else type(described.family).__module__
    row = _replace(
        row,
        family=family.rsplit(".", 1)[-1],
        router_kind=described.family.describe(),
        status="supported",
        kind_key=kind_key(described.blocks[0]),
    )
    ids = probe_ids()
    with torch.no_grad():
        reference = model(ids).logits
        patch_model(model, TopKConfig())
        patched = model(ids).logits
        unpatch_model(model)
        restored = model(ids).logits
    if not torch.equal(reference, patched):
        diff = float((reference.float() - patched.float()).abs().max())
        return _replace(
            row, status="mismatch", reason=f"TopKConfig() changes the logits (max |diff| {diff:.3g})"
        )
    if not torch.equal(reference, restored):
        return _replace(row, status="mismatch", reason="unpatch_model does not restore the logits")
    return row


def untestable_reason(error: Exception) -> str:
    """The reason of a "not testable" row: ``"not testable here: no tiny model: <error>"`` (one line)."""
    text = " ".join(str(error).split())
    return f"not testable here: no tiny model: {type(error).__name__}: {text}"


def support_table(
    model_types: Iterable[str] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> list[FamilySupport]:
    """:func:`check_family` of every MoE causal-LM family of the installed transformers (or of ``model_types``)."""
    names = list(model_types) if model_types is not None else [e.model_type for e in moe_families()]
    rows = []
    for name in names:
        if progress is not None:
            progress(name)
        rows.append(check_family(name, dtype=dtype))
    return rows


def kind_key(block: MoEBlock) -> str:
    """The full router kind of ``block`` as a canonical JSON string (see :class:`FamilySupport`)."""
    spec = block.spec
    bias = spec.selection_bias
    where = None if bias is None else ("block" if bias.owner is block.block else "router")
    extra = {"bias_in": where, "input_rank": spec.input_rank}
    return json.dumps({**dataclasses.asdict(spec.kind), **extra}, sort_keys=True)


def router_kinds(model_type: str, seed: int = 0) -> list[dict] | None:
    """Every distinct full router kind (see :func:`kind_key`) of a tiny ``model_type`` model, in block order.

    Returns None if ``describe_model`` refuses the family. Raises whatever building its tiny model raises.
    """
    try:
        described = describe_model(tiny_model(model_type, seed=seed))
    except UnsupportedFamilyError:
        return None
    keys = list(dict.fromkeys(kind_key(block) for block in described.blocks))
    return [json.loads(key) for key in keys]


def _replace(row: FamilySupport, **changes: str) -> FamilySupport:
    return FamilySupport(**{**asdict(row), **changes})
