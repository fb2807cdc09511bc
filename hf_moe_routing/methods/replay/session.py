"""The model hooks of recording and replay: which rows and tokens each forward call covers.

A forward call without a filled KV cache starts rows (one per batch row); a call that continues a
cache (``generate``'s decode steps) appends one token per row to the same rows. Real tokens are
those of ``attention_mask`` (its last ``seq_len`` columns); padding is neither recorded nor replayed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.context import RoutingContext, is_recomputing
from .layer import PLAN_KEY, ReplayPlan
from .record import RoutedExperts
from .tokens import prefix_hashes


def forward_tokens(args: tuple, kwargs: dict, where: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(input_ids (B, T), real (B, T) bool, continues_cache)`` of a causal-LM forward call.

    Raises ValueError without ``input_ids`` (replay needs token ids to check the rows).
    """
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(
            f"{where} needs the forward's input_ids (batch, seq); this call passed "
            f"{'inputs_embeds' if 'inputs_embeds' in kwargs else 'no input_ids'}. Call the model with input_ids."
        )
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        real = mask[:, -ids.shape[1] :].bool()
    else:
        real = torch.ones_like(ids, dtype=torch.bool)
    cache = next(
        (kwargs[k] for k in ("cache", "past_key_values", "cache_params") if kwargs.get(k) is not None), None
    )
    length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    return ids, real, int(length) > 0


class Recorder:
    """Fills a :class:`RoutedExperts` from the routing layers' decisions in calls of ``model``."""

    def __init__(self, model: nn.Module, layers: dict[int, nn.Module], routed: RoutedExperts) -> None:
        self.model, self.layers, self.routed = model, layers, routed
        self._handles: list = []
        self._active = False
        self._pending: dict[int, torch.Tensor] = {}
        self._rows: list[int] = []
        self._states: list[int] = []
        self._forward: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(self) -> Recorder:
        self._handles = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after),
        ]
        for layer_index, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._layer_hook(layer_index)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._active:  # a nested call of the same model
            return
        ids, real, continues = forward_tokens(args, kwargs, "record_routing")
        if not continues:
            self._rows = [self.routed.add_row() for _ in range(ids.shape[0])]
            self._states = [0] * ids.shape[0]
        elif len(self._rows) != ids.shape[0]:
            raise ValueError(
                f"record_routing: a cached forward of {ids.shape[0]} rows continues a batch of {len(self._rows)}; "
                "record each generate() call of a batch without changing its rows."
            )
        self._forward = (ids.detach().cpu(), real.detach().cpu())
        self._pending = {}
        self._active = True

    def _layer_hook(self, layer_index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._active and not is_recomputing():
                self._pending[layer_index] = output.index.detach()

        return hook

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._active:
            return
        self._active = False
        ids, real = self._forward
        missing = [i for i in self.routed.layers if i not in self._pending]
        if missing:
            raise ValueError(
                f"record_routing: MoE layer {missing[0]} routed no tokens in this forward (inside original_routing(), "
                "or a router that bypasses its routing layer?); nothing can be recorded for it."
            )
        batch, seq = ids.shape
        index = torch.stack([self._pending[i].cpu() for i in self.routed.layers], dim=1)  # (B*T, L, S)
        if index.shape[0] != batch * seq:
            raise ValueError(
                f"record_routing: the routers saw {index.shape[0]} tokens for a batch of {batch} x {seq}."
            )
        index = index.view(batch, seq, *index.shape[1:])
        for b, row in enumerate(self._rows):
            keep = real[b]
            tokens = ids[b][keep].tolist()
            hashes = prefix_hashes(tokens, self._states[b])
            if hashes:
                self._states[b] = hashes[-1]
            self.routed.extend_row(row, index[b][keep], torch.tensor(hashes, dtype=torch.int64))
        self._pending = {}


class Replayer:
    """Builds the :class:`ReplayPlan` of each forward call of ``model`` from a :class:`RoutedExperts`.

    Row b of every fresh forward is the record's row b (the batch must have as many rows); a
    row's real tokens take the recorded tokens in order (a cached forward continues where the last
    one ended). The prefix hash of the row's real token ids must match the record's.
    """

    def __init__(
        self,
        model: nn.Module,
        routed: RoutedExperts,
        context: RoutingContext,
        *,
        sentinel_slots: bool,
        max_unrecorded: int,
    ) -> None:
        self.model, self.routed, self.context = model, routed, context
        self.sentinel_slots, self.max_unrecorded = sentinel_slots, max_unrecorded
        self._handles: list = []
        self._cursors: list[int] = []
        self._states: list[int] = []
        self._layers = {layer: j for j, layer in enumerate(routed.layers)}

    def attach(self) -> Replayer:
        self._handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True)]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.context.extras.pop(PLAN_KEY, None)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids, real, continues = forward_tokens(args, kwargs, "replay_routing")
        batch, seq = ids.shape
        if not continues:
            if batch != self.routed.num_rows:
                raise ValueError(
                    f"replay_routing: the batch has {batch} rows, the record {self.routed.num_rows}. Replay a record of "
                    "exactly the batch's rows, in order (routed.select(rows) picks them)."
                )
            self._cursors, self._states = [0] * batch, [0] * batch
        elif batch != len(self._cursors):
            raise ValueError(
                f"replay_routing: a cached forward of {batch} rows continues a batch of {len(self._cursors)}."
            )
        ids, real = ids.detach().cpu(), real.detach().cpu()
        positions, experts = [], []
        for b in range(batch):
            where = real[b].nonzero().squeeze(-1)
            tokens = ids[b][where].tolist()
            start, length = self._cursors[b], self.routed.lengths[b]
            use = max(0, min(len(tokens), length - start))
            unrecorded = start + len(tokens) - max(length, start)
            if unrecorded > self.max_unrecorded:
                raise ValueError(
                    f"replay_routing: batch row {b} has {start + len(tokens)} real tokens, its record {length} "
                    f"(+ at most {self.max_unrecorded} unrecorded at the end). It is not the recorded sequence, or "
                    "its attention_mask counts padding as real tokens."
                )
            hashes = prefix_hashes(tokens, self._states[b])
            if use:
                recorded = self.routed.token_hashes(b)
                if hashes[use - 1] != int(recorded[start + use - 1]):
                    raise ValueError(self._mismatch(b, start, tokens, hashes, recorded))
                positions.append(b * seq + where[:use])
                experts.append(self.routed.experts(b)[start : start + use])
            self._cursors[b] = start + len(tokens)
            if hashes:
                self._states[b] = hashes[-1]
        layers, slots = len(self.routed.layers), self.routed.num_slots
        self.context.extras[PLAN_KEY] = ReplayPlan(
            num_tokens=batch * seq,
            positions=torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long),
            experts=torch.cat(experts) if experts else torch.zeros(0, layers, slots, dtype=torch.int16),
            layers=self._layers,
            sentinel_slots=self.sentinel_slots,
        )

    def _mismatch(
        self, b: int, start: int, tokens: list[int], hashes: list[int], recorded: torch.Tensor
    ) -> str:
        first = next(
            (
                t
                for t in range(min(len(hashes), recorded.shape[0] - start))
                if hashes[t] != int(recorded[start + t])
            ),
            0,
        )
        use = min(len(tokens), recorded.shape[0] - start)
        other = [
            r
            for r in range(self.routed.num_rows)
            if r != b
            and start == 0
            and self.routed.lengths[r] >= use
            and int(self.routed.token_hashes(r)[use - 1]) == hashes[use - 1]
        ]
        hint = (
            f"they are the tokens of record row {other[0]}: the batch is in another order (reorder it, or "
            f"replay routed.select([...]) in the batch's order)"
            if other
            else "the batch holds other tokens or other padding (check attention_mask: padding must be 0)"
        )
        return (
            f"replay_routing: batch row {b} differs from its record from real token {start + first} on; {hint}. "
            "Replaying would put recorded experts on the wrong tokens."
        )
