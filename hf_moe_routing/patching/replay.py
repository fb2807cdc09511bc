"""Routing replay for reinforcement learning: ``record_routing`` and ``replay_routing``.

>>> with record_routing(model) as routed:        # the rollout (generate, or a forward)
...     completions = model.generate(**prompts)
>>> with replay_routing(model, routed):           # the training forward: the rollout's experts
...     logits = model(input_ids, attention_mask=mask).logits

Both work on unpatched models (patched for the duration with Top-K, resp. replay, and restored)
and on patched ones (recording reads the current routing; replay swaps in replay layers and puts
the original ones back, state untouched).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..core.experts import SENTINEL_EXPERTS
from ..methods.replay import Recorder, ReplayConfig, Replayer, RoutedExperts
from ..methods.topk import TopKConfig
from .patch import (
    ROUTING_ATTR,
    _set_experts_implementation,
    get_patch_state,
    patch_model,
    unpatch_model,
    unwrap_model,
)


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutedExperts]:
    """Record the experts of every real token in the forwards of ``model`` inside the block.

    Yields a :class:`RoutedExperts` that fills as the model runs: one row per batch row of each
    forward that starts sequences, extended by ``generate``'s cached decode steps; padding
    (``attention_mask == 0``) is skipped. Any routing is recorded as it routes (the model's own
    Top-K for an unpatched model, which is patched with ``TopKConfig()`` meanwhile and restored).

    Raises:
        ValueError: a forward without ``input_ids``, or a cached forward with other rows.
    """
    temporary = get_patch_state(model) is None
    if temporary:
        patch_model(model, TopKConfig())
    try:
        state = get_patch_state(model)
        layers = {b.layer_index: getattr(b.router, ROUTING_ATTR) for b in state.blocks}
        routed = RoutedExperts([b.layer_index for b in state.blocks], state.shape.num_experts)
        recorder = Recorder(unwrap_model(model), layers, routed).attach()
        try:
            yield routed
        finally:
            recorder.detach()
    finally:
        if temporary:
            unpatch_model(model)


@contextlib.contextmanager
def replay_routing(
    model: nn.Module, routed: RoutedExperts, *, max_unrecorded: int = 1
) -> Iterator[nn.Module]:
    """Within the block, forwards of ``model`` route each real token to its recorded experts.

    Row b of each forward's batch replays row b of ``routed`` (same number of rows, same order;
    ``routed.select(rows)`` picks a micro-batch). The weights over the given experts are
    recomputed by the family's own rule from the current router, so gradients reach it. Padding,
    up to ``max_unrecorded`` trailing tokens per row past its record (the rollout's last sampled
    token) and forwards outside the block use the model's own Top-K.

    Raises:
        ValueError: the record does not fit the model (layers, expert ids: named), or a batch
            whose rows, tokens or padding differ from the record (checked by a prefix hash of
            each row's real token ids, before the forward runs).
    """
    state = get_patch_state(model)
    described = state.model if state is not None else None
    if described is None:
        from ..families import describe_model

        described = describe_model(unwrap_model(model))
    routed.check_fits(described)
    sentinel = routed.has_unused_slots or routed.num_slots > described.shape.top_k
    config = ReplayConfig(max_unrecorded=max_unrecorded, sentinel_slots=sentinel)
    with _swapped_routing(model, config) as context:
        replayer = Replayer(
            unwrap_model(model), routed, context, sentinel_slots=sentinel, max_unrecorded=max_unrecorded
        ).attach()
        try:
            yield model
        finally:
            replayer.detach()


@contextlib.contextmanager
def _swapped_routing(model: nn.Module, config: ReplayConfig):
    """Route with ``config``'s layers inside the block; yields the routing context they share."""
    state = get_patch_state(model)
    if state is None:
        patch_model(model, config)
        try:
            yield get_patch_state(model).context
        finally:
            unpatch_model(model)
        return
    config.validate(state.model)
    base = unwrap_model(model)
    originals: dict[str, nn.Module] = {}
    switch = config.variable_k and not state.config.variable_k
    previous = getattr(getattr(base, "config", None), "_experts_implementation", None)
    try:
        for block in state.blocks:
            router = block.router
            old = getattr(router, ROUTING_ATTR)
            new = config.create_layer(block, state.model, state.context)  # no tensors: nothing to move
            new.train(old.training)
            gain = getattr(old, "kept_gain", None)  # the recorded routing's learned weight rule replays too
            if gain is not None:
                new.register_forward_hook(lambda module, args, output, g=gain: g(output, module.num_experts))
            originals[block.name] = old
            router.add_module(ROUTING_ATTR, new)
        if switch:
            _set_experts_implementation(base, SENTINEL_EXPERTS)
        yield state.context
    finally:
        for block in state.blocks:
            if block.name in originals:
                block.router.add_module(ROUTING_ATTR, originals[block.name])
        if switch and previous is not None:
            _set_experts_implementation(base, previous)
