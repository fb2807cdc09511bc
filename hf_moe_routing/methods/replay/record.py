"""``RoutedExperts``: the experts a rollout used, per row, per real token, per MoE layer.

Layout (one entry per batch row / engine completion, in order)::

    experts[r]       (T_r, L, S) int   expert ids of row r's T_r real tokens in the L MoE layers
                                       (``layers``: their decoder-layer indices), S slots each;
                                       an unused slot (variable-k routings) holds num_experts
    token_hashes[r]  (T_r,) int64      prefix hash of the row's real token ids 0..t (see tokens.py)

Tokens are in the row's order, padding excluded: the prompt's real tokens, then one per decode
step of ``generate`` (the last sampled token is never fed to the model, so a finished rollout of
P prompt and C completion tokens holds P + C - 1 tokens, as vLLM's and SGLang's records do).
Saved as one safetensors file (tensors + a JSON header); nothing else is ever loaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...families import MoEModel
from .tokens import duplicate_slots, expert_sets_differ

FORMAT = "hf_moe_routing.routed_experts"
VERSION = 1


@dataclass(frozen=True)
class RoutingChanges:
    """How often the experts of two routings of the same tokens differ.

    Attributes:
        num_tokens: tokens compared (real tokens present in both).
        token_share: share of those tokens whose experts changed in at least one MoE layer.
        decision_share: share of (token, layer) routing decisions whose expert set changed.
        per_layer: ``decision_share`` of each MoE layer, in ``layers`` order.
        layers: decoder-layer indices of the MoE layers.
    """

    num_tokens: int
    token_share: float
    decision_share: float
    per_layer: tuple[float, ...]
    layers: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_tokens": self.num_tokens,
            "token_share": self.token_share,
            "decision_share": self.decision_share,
            "per_layer": list(self.per_layer),
            "layers": list(self.layers),
        }


class RoutedExperts:
    """Recorded routing (see the module docstring for the layout).

    Built by :func:`~hf_moe_routing.record_routing`, :meth:`load`, :meth:`from_vllm` or
    :meth:`from_sglang`; consumed by :func:`~hf_moe_routing.replay_routing`.

    Args:
        layers: decoder-layer indices of the model's MoE layers (the L axis).
        num_experts: m, routed experts per layer (ids 0..m-1; m marks an unused slot).
        experts: per row, an int tensor (T_r, L, S).
        token_hashes: per row, an int64 tensor (T_r,) of prefix hashes.

    Raises:
        ValueError: shapes that do not agree, or expert ids outside 0..m (naming row and layer).
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_experts: int,
        experts: Sequence[torch.Tensor] = (),
        token_hashes: Sequence[torch.Tensor] = (),
        *,
        num_slots: int | None = None,
    ) -> None:
        self.layers = tuple(int(x) for x in layers)
        self.num_experts = int(num_experts)
        if self.num_experts < 1 or not self.layers:
            raise ValueError(
                f"RoutedExperts needs MoE layers and experts, got layers={layers}, m={num_experts}."
            )
        if len(experts) != len(token_hashes):
            raise ValueError(f"{len(experts)} rows of experts but {len(token_hashes)} rows of token hashes.")
        self._num_slots = num_slots
        self._chunks: list[list[torch.Tensor]] = []
        self._hash_chunks: list[list[torch.Tensor]] = []
        for row, (index, hashes) in enumerate(zip(experts, token_hashes, strict=True)):
            self.add_row()
            self.extend_row(row, index, hashes)

    # ---- building (used by the recorder) -------------------------------------------------------
    def add_row(self) -> int:
        """Append an empty row; returns its index."""
        self._chunks.append([])
        self._hash_chunks.append([])
        return len(self._chunks) - 1

    def extend_row(self, row: int, experts: torch.Tensor, hashes: torch.Tensor) -> None:
        """Append tokens to ``row``: ``experts`` (t, L, S) int, ``hashes`` (t,) int64."""
        experts = torch.as_tensor(experts)
        hashes = torch.as_tensor(hashes)
        if experts.dim() != 3 or experts.shape[1] != len(self.layers):
            raise ValueError(
                f"Row {row}: experts must be (tokens, {len(self.layers)} MoE layers, slots), got "
                f"{tuple(experts.shape)}."
            )
        if experts.is_floating_point() or experts.dtype == torch.bool:
            raise ValueError(f"Row {row}: expert ids must be integers, got {experts.dtype}.")
        if hashes.shape != (experts.shape[0],) or hashes.dtype != torch.int64:
            raise ValueError(
                f"Row {row}: token_hashes must be int64 ({experts.shape[0]},), got {hashes.dtype} "
                f"{tuple(hashes.shape)}."
            )
        if self._num_slots is None:
            self._num_slots = experts.shape[2]
        elif experts.shape[2] != self._num_slots:
            raise ValueError(
                f"Row {row}: {experts.shape[2]} slots per token, the record has {self._num_slots}."
            )
        self._check_ids(row, experts)
        dtype = torch.int16 if self.num_experts < 2**15 - 1 else torch.int32
        self._chunks[row].append(experts.detach().to("cpu", dtype))
        self._hash_chunks[row].append(hashes.detach().cpu())

    def _check_ids(self, row: int, experts: torch.Tensor) -> None:
        bad = (experts < 0) | (experts > self.num_experts)
        if bool(bad.any()):
            token, layer, _ = (int(x) for x in bad.nonzero()[0])
            value = int(experts[token, layer][bad[token, layer]][0])
            raise ValueError(
                f"Row {row}, token {token}, MoE layer {self.layers[layer]}: expert id {value} is outside "
                f"0..{self.num_experts - 1} (the record is for {self.num_experts} routed experts; "
                f"{self.num_experts} marks an unused slot). Was it recorded on another model?"
            )
        if experts.shape[0]:
            for layer in range(experts.shape[1]):
                dup = duplicate_slots(experts[:, layer].long(), self.num_experts)
                if bool(dup.any()):
                    token = int(dup.nonzero()[0])
                    raise ValueError(
                        f"Row {row}, token {token}, MoE layer {self.layers[layer]}: the same expert appears twice "
                        f"({experts[token, layer].tolist()}); a token uses each expert at most once."
                    )

    # ---- reading -------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self._chunks)

    def __len__(self) -> int:
        return self.num_rows

    @property
    def num_slots(self) -> int:
        """S, expert slots per token (the recording routing's k, or its maximum)."""
        return self._num_slots or 0

    def experts(self, row: int) -> torch.Tensor:
        """(T_r, L, S) expert ids of ``row`` (int16 / int32, CPU)."""
        chunks = self._chunks[row]
        if len(chunks) != 1:
            dtype = torch.int16 if self.num_experts < 2**15 - 1 else torch.int32
            merged = (
                torch.cat(chunks) if chunks else torch.zeros(0, len(self.layers), self.num_slots, dtype=dtype)
            )
            self._chunks[row] = chunks = [merged]
        return chunks[0]

    def token_hashes(self, row: int) -> torch.Tensor:
        """(T_r,) int64 prefix hashes of ``row``'s real tokens."""
        chunks = self._hash_chunks[row]
        if len(chunks) != 1:
            merged = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64)
            self._hash_chunks[row] = chunks = [merged]
        return chunks[0]

    @property
    def lengths(self) -> list[int]:
        """Recorded tokens of each row."""
        return [sum(c.shape[0] for c in chunks) for chunks in self._chunks]

    @property
    def has_unused_slots(self) -> bool:
        """Whether some token uses fewer than S experts (replay then needs the sentinel-safe experts)."""
        return any(bool((self.experts(r) == self.num_experts).any()) for r in range(self.num_rows))

    def select(self, rows: Sequence[int]) -> RoutedExperts:
        """A record of the given rows, in that order (e.g. one micro-batch of a rollout batch)."""
        rows = [int(r) for r in rows]
        for r in rows:
            if not 0 <= r < self.num_rows:
                raise IndexError(f"Row {r} is outside the record's {self.num_rows} rows.")
        return RoutedExperts(
            self.layers,
            self.num_experts,
            [self.experts(r) for r in rows],
            [self.token_hashes(r) for r in rows],
            num_slots=self._num_slots,
        )

    def __repr__(self) -> str:
        return (
            f"RoutedExperts(rows={self.num_rows}, tokens={sum(self.lengths)}, layers={len(self.layers)}, "
            f"slots={self.num_slots}, experts={self.num_experts})"
        )

    # ---- checks against a model ---------------------------------------------------------------
    def check_fits(self, model: MoEModel) -> None:
        """ValueError unless the record's MoE layers and expert count are the model's (named in the message)."""
        shape = model.shape
        if self.num_experts != shape.num_experts:
            raise ValueError(
                f"The record routes over {self.num_experts} experts per layer, the model has {shape.num_experts} "
                f"(MoE layer {model.blocks[0].layer_index}, {model.blocks[0].name}): it was recorded on another model."
            )
        theirs = tuple(b.layer_index for b in model.blocks)
        if self.layers != theirs:
            extra = sorted(set(self.layers) - set(theirs))
            missing = sorted(set(theirs) - set(self.layers))
            detail = []
            if extra:
                detail.append(f"layer {extra[0]} is not an MoE layer of this model")
            if missing:
                detail.append(f"MoE layer {missing[0]} has no recorded experts")
            raise ValueError(
                f"The record holds {len(self.layers)} MoE layers {list(self.layers)}, the model has "
                f"{len(theirs)} {list(theirs)}: {'; '.join(detail) or 'another order'}."
            )

    # ---- comparison ----------------------------------------------------------------------------
    def compare(self, other: RoutedExperts) -> RoutingChanges:
        """How often ``other`` (e.g. recorded in the training forward) used other experts than this record.

        Rows are compared in order, over the tokens both hold; their token hashes must agree.
        """
        if other.layers != self.layers or other.num_rows != self.num_rows:
            raise ValueError(
                f"Cannot compare a record of {self.num_rows} rows x layers {list(self.layers)} with one of "
                f"{other.num_rows} rows x layers {list(other.layers)}."
            )
        per_layer = torch.zeros(len(self.layers), dtype=torch.float64)
        changed_tokens, tokens = 0, 0
        for row in range(self.num_rows):
            t = min(self.lengths[row], other.lengths[row])
            if t and not torch.equal(self.token_hashes(row)[:t], other.token_hashes(row)[:t]):
                raise ValueError(
                    f"Row {row} holds other tokens in the two records: compare records of the same batch."
                )
            a, b = self.experts(row)[:t].long(), other.experts(row)[:t].long()
            changed = torch.stack(
                [expert_sets_differ(a[:, j], b[:, j], self.num_experts) for j in range(len(self.layers))],
                dim=1,
            )
            per_layer += changed.sum(dim=0).double()
            changed_tokens += int(changed.any(dim=1).sum())
            tokens += t
        per = (per_layer / max(tokens, 1)).tolist()
        return RoutingChanges(
            num_tokens=tokens,
            token_share=changed_tokens / max(tokens, 1),
            decision_share=float(per_layer.sum()) / max(tokens * len(self.layers), 1),
            per_layer=tuple(per),
            layers=self.layers,
        )

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file: ``experts`` (sum T_r, L, S), ``token_hashes``, ``row_lengths``,
        and a JSON header (format, version, layers, num_experts). Returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        rows = range(self.num_rows)
        dtype = torch.int16 if self.num_experts < 2**15 - 1 else torch.int32
        tensors = {
            "experts": torch.cat([self.experts(r) for r in rows])
            if self.num_rows
            else torch.zeros(0, len(self.layers), self.num_slots, dtype=dtype),
            "token_hashes": torch.cat([self.token_hashes(r) for r in rows])
            if self.num_rows
            else torch.zeros(0, dtype=torch.int64),
            "row_lengths": torch.tensor(self.lengths, dtype=torch.int64),
        }
        header = {
            "format": FORMAT,
            "version": str(VERSION),
            "layers": json.dumps(list(self.layers)),
            "num_experts": str(self.num_experts),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutedExperts:
        """Read a file written by :meth:`save` (safetensors only).

        Raises:
            FileNotFoundError: no such file. ValueError: not a routed-experts file, or inconsistent contents.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No routed-experts file at {path}.")
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError(
                    f"{path} is not a routed-experts file (its header names no {FORMAT!r} format)."
                )
            if header.get("version") != str(VERSION):
                raise ValueError(
                    f"{path} has routed-experts format version {header.get('version')}; this reads {VERSION}."
                )
            names = set(f.keys())
            if names != {"experts", "token_hashes", "row_lengths"}:
                raise ValueError(
                    f"{path} holds tensors {sorted(names)}; expected experts, token_hashes, row_lengths."
                )
            experts, hashes, lengths = (f.get_tensor(k) for k in ("experts", "token_hashes", "row_lengths"))
        try:
            layers = json.loads(header["layers"])
            num_experts = int(header["num_experts"])
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}: unreadable header ({error}).") from None
        if not isinstance(layers, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in layers
        ):
            raise ValueError(f"{path}: the header's layers must be a list of ints, got {header['layers']!r}.")
        if lengths.dim() != 1 or bool((lengths < 0).any()) or int(lengths.sum()) != experts.shape[0]:
            raise ValueError(
                f"{path}: row_lengths {lengths.tolist()} do not add up to the {experts.shape[0]} tokens stored."
            )
        bounds = [0, *torch.cumsum(lengths, 0).tolist()]
        return cls(
            layers,
            num_experts,
            [experts[a:b] for a, b in zip(bounds, bounds[1:])],
            [hashes[a:b] for a, b in zip(bounds, bounds[1:])],
            num_slots=experts.shape[2] if experts.dim() == 3 else None,
        )

    # ---- engines --------------------------------------------------------------------------------
    @classmethod
    def from_vllm(cls, outputs: Any, model: Any) -> RoutedExperts:
        """Rows from vLLM's ``enable_return_routed_experts`` output (see :func:`.engines.from_vllm`)."""
        from .engines import from_vllm

        return from_vllm(cls, outputs, model)

    @classmethod
    def from_sglang(cls, responses: Any, model: Any) -> RoutedExperts:
        """Rows from SGLang's ``return_routed_experts`` output (see :func:`.engines.from_sglang`)."""
        from .engines import from_sglang

        return from_sglang(cls, responses, model)
