"""Routing statistics: expert loads, MaxVio and activated experts per token, padding excluded.

For MoE layer l with m routed experts, over the real (non-padding) tokens T of a batch::

    load_lj      = #{(t, s) : t in T, index_ts = j}          # sentinel slots (index m) are not counted
    MaxVio_l     = (max_j load_lj - mean_j load_lj) / mean_j load_lj
    activated_l  = sum_j load_lj / |T|                       # mean routed experts per token

``max_vio_global`` applies the MaxVio formula to the loads summed over every batch seen;
``avg_max_vio`` / ``sup_max_vio`` are the mean / max over batches of the batch MaxVio averaged over layers.

:class:`RoutingStats` hooks the output of every MoE router, patched or not (decoded by the block's
router spec, whatever the family returns), and reads the padding mask from the ``attention_mask`` of the model's forward. The hooks only launch
tensor ops (no host synchronisation per layer); one small sync per forward turns the token count into
an int.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.context import flat_token_mask, is_recomputing
from ..core.ops import max_vio, tokens_per_expert
from ..families import MoEBlock
from ..patching import describe


@dataclass
class BatchStats:
    """Statistics of one forward pass (one entry per MoE layer, in :attr:`RoutingStats.layers` order)."""

    loads: torch.Tensor  # (L, m) tokens routed to each expert
    max_vio: torch.Tensor  # (L,)
    activated: torch.Tensor  # (L,) mean routed experts per real token
    num_tokens: int  # real (non-padding) tokens


class RoutingStats:
    """Collect per-layer routing statistics while a (patched or unpatched) MoE model runs.

    >>> with RoutingStats(model) as stats:
    ...     for batch in loader:
    ...         model(**batch)
    ...         print(stats.last.max_vio.mean())
    >>> stats.summary()["max_vio_global"]

    Padding tokens (``attention_mask == 0`` in the model's forward) are excluded from every statistic.
    Only routing inside calls of ``model`` itself is recorded (call the model you pass here, not one of
    its submodules), so the recomputation of gradient checkpointing during backward is not counted twice.
    The hooks stay attached until :meth:`detach` (or the end of the ``with`` block); the collected
    numbers stay readable afterwards.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        described = describe(model)
        blocks: tuple[MoEBlock, ...] = described.blocks
        self.num_experts = described.shape.num_experts
        self._blocks = blocks
        #: Decoder-layer index of each MoE layer (the rows of every statistic).
        self.layers: list[int] = [b.layer_index for b in blocks]
        self._handles: list = []
        self._mask: torch.Tensor | None = None
        self._active = False  # inside a forward of self.model
        self._warned_outside = False
        self.reset()

    # ---- lifecycle ---------------------------------------------------------------------------
    def attach(self) -> RoutingStats:
        """Start recording (idempotent)."""
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_model))
        for row, block in enumerate(self._blocks):
            self._handles.append(block.router.register_forward_hook(self._router_hook(row, block)))
        return self

    def detach(self) -> None:
        """Stop recording; the statistics collected so far remain available."""
        self._finalize()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._mask = None
        self._active = False

    def __enter__(self) -> RoutingStats:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending_replay: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._replay = torch.zeros(
            len(self.layers) + 2, dtype=torch.float64
        )  # per-layer changed, tokens, changed tokens
        self._last: BatchStats | None = None
        self._total_loads: torch.Tensor | None = None
        self._total_tokens = torch.zeros(len(self.layers), dtype=torch.float64)
        self._batch_max_vio: list[torch.Tensor] = []
        self.num_batches = 0
        self.num_tokens = 0

    # ---- hooks -------------------------------------------------------------------------------
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._finalize()
        self._mask = flat_token_mask(args, kwargs)
        self._active = True

    def _after_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._finalize()
        self._mask = None
        self._active = False

    def _router_hook(self, row: int, block: MoEBlock):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._active:  # e.g. gradient-checkpointing recomputation during backward
                if not is_recomputing() and not self._warned_outside:
                    self._warned_outside = True
                    warnings.warn(
                        f"RoutingStats: a router ran outside a call of the {type(self.model).__name__} it "
                        "records; such calls are not counted. Pass the model you call to RoutingStats.",
                        stacklevel=2,
                    )
                return
            index = block.spec.decode(output).index.detach()
            mask = self._mask
            if mask is not None and mask.numel() != index.shape[0]:
                mask = None
            with torch.no_grad():
                loads = tokens_per_expert(index, self.num_experts, mask)
                # a device-side fill, not torch.tensor(n, device=...): no host-to-device copy per layer
                tokens = mask.sum() if mask is not None else index.new_full((), index.shape[0])
            self._pending[row] = (loads, tokens)
            replay = getattr(getattr(module, "routing", None), "last_replay", None)
            if (
                replay is not None
            ):  # routing replay: replayed tokens, and those the router would route elsewhere
                self._pending_replay[row] = replay

        return hook

    def _finalize_replay(self) -> None:
        """Add the forward's replay disagreements: per layer, and per token over all layers."""
        if not self._pending_replay:
            return
        pending, self._pending_replay = self._pending_replay, {}
        replayed = next(iter(pending.values()))[0]
        changed_any = torch.zeros_like(replayed)
        zero = replayed.new_zeros((), dtype=torch.long)
        sums = [zero] * len(self.layers)
        for row, (_, changed) in pending.items():
            sums[row] = changed.sum().to(replayed.device)
            changed_any = changed_any | changed.to(replayed.device)
        counts = torch.stack([*sums, replayed.sum(), changed_any.sum()])
        self._replay += counts.double().cpu()  # one sync per forward

    @property
    def replay_changes(self) -> dict[str, Any] | None:
        """Under ``replay_routing``: how often the router's own choice differs from the replayed experts.

        Keys: ``num_tokens`` (replayed real tokens), ``token_share`` (share of them whose experts
        would change in at least one MoE layer), ``decision_share`` (share of (token, layer)
        decisions that would change), ``per_layer`` (that share per MoE layer). None if no
        replayed forward was seen.
        """
        self._finalize()
        tokens = float(self._replay[-2])
        if tokens == 0:
            return None
        per_layer = (self._replay[:-2] / tokens).tolist()
        return {
            "num_tokens": int(tokens),
            "token_share": float(self._replay[-1]) / tokens,
            "decision_share": float(self._replay[:-2].sum()) / (tokens * len(self.layers)),
            "per_layer": per_layer,
        }

    def _finalize(self) -> None:
        """Turn the per-layer tensors of the forward that just ran into a :class:`BatchStats`."""
        self._finalize_replay()
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        device = next(iter(pending.values()))[0].device
        zeros = torch.zeros(self.num_experts, dtype=torch.float32, device=device)
        no_tokens = torch.zeros((), dtype=torch.long, device=device)
        rows = [pending.get(row, (zeros, no_tokens)) for row in range(len(self.layers))]
        loads = torch.stack([r[0].to(device) for r in rows])
        tokens = torch.stack([r[1].to(device) for r in rows]).double()
        host = torch.stack([tokens, loads.double().sum(dim=-1)]).cpu()  # the one sync per forward
        tokens, routed = host[0], host[1]
        activated = routed / tokens.clamp(min=1)
        batch = BatchStats(
            loads=loads,
            max_vio=max_vio(loads),
            activated=activated,
            num_tokens=int(tokens.max()),
        )
        self._last = batch
        self._total_loads = loads.double() if self._total_loads is None else self._total_loads + loads
        self._total_tokens += tokens
        self._batch_max_vio.append(batch.max_vio)
        self.num_batches += 1
        self.num_tokens += batch.num_tokens

    # ---- results -----------------------------------------------------------------------------
    @property
    def last(self) -> BatchStats | None:
        """Statistics of the most recent forward pass (None before the first one)."""
        self._finalize()
        return self._last

    @property
    def total_loads(self) -> torch.Tensor:
        """(L, m) tokens per expert summed over every forward seen."""
        self._finalize()
        if self._total_loads is None:
            return torch.zeros(len(self.layers), self.num_experts, dtype=torch.float64)
        return self._total_loads

    def summary(self) -> dict[str, Any]:
        """Everything seen since the last :meth:`reset`, as plain Python numbers (JSON-ready).

        Keys: ``layers``, ``loads`` (L x m totals), ``max_vio_global`` (per layer, over all tokens),
        ``avg_max_vio`` / ``sup_max_vio`` (mean / max over batches of the layer-averaged batch MaxVio),
        ``mean_activated``, ``activated_per_layer``, ``num_tokens``, ``num_batches``, ``replay_changes``
        (see :attr:`replay_changes`; None without routing replay).
        """
        loads = self.total_loads.cpu()
        per_batch = (
            torch.stack([v.cpu() for v in self._batch_max_vio]).mean(dim=1)
            if self._batch_max_vio
            else torch.zeros(0, dtype=torch.float64)
        )
        activated = loads.sum(dim=-1) / self._total_tokens.clamp(min=1)
        seen = self._total_tokens > 0
        return {
            "layers": list(self.layers),
            "loads": [[int(x) for x in row] for row in loads.round().long().tolist()],
            "max_vio_global": max_vio(loads).tolist(),
            "avg_max_vio": float(per_batch.mean()) if len(per_batch) else 0.0,
            "sup_max_vio": float(per_batch.max()) if len(per_batch) else 0.0,
            "mean_activated": float(activated[seen].mean()) if seen.any() else 0.0,
            "activated_per_layer": activated.tolist(),
            "num_tokens": self.num_tokens,
            "num_batches": self.num_batches,
            "replay_changes": self.replay_changes,
        }

    def __repr__(self) -> str:
        return (
            f"RoutingStats(layers={len(self.layers)}, experts={self.num_experts}, "
            f"batches={self.num_batches}, tokens={self.num_tokens}, attached={bool(self._handles)})"
        )
