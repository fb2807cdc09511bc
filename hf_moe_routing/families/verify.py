"""Bit-exact verification of a :class:`RouterSpec` against the real router.

A spec is accepted only if, on random hidden states, ``spec.route`` returns exactly what the
router's own ``forward`` returns (same indices in the same order, same weights in the same dtype,
same logits): on the router as loaded, and on copies with random weights in float32 and bfloat16
(so a rule that only agrees on this checkpoint's values, e.g. an all-zero selection bias, is not
taken for the family's rule). The user's router is never modified: the probes run on copies.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from .spec import RouterOutput, RouterSpec, TensorSlot

#: Tokens per probe.
PROBE_TOKENS = 64


def original_forward(router: nn.Module):
    """The router class's own ``forward`` (the unpatched one if the router is patched)."""
    return getattr(type(router), "_original_class", type(router)).forward


def verify_spec(
    spec: RouterSpec, router: nn.Module, router_args: tuple[torch.Tensor, ...] = ()
) -> tuple[bool, str]:
    """``(True, "")`` if ``spec`` reproduces ``router`` bit for bit, else ``(False, reason)``.

    Routers whose weights are not materialised (meta device: offloaded, or built from a config
    only) are checked on CPU copies with random weights only.
    """
    meta = spec.weight(router).device.type == "meta" or any(t.device.type == "meta" for t in router_args)
    probes = ((torch.float32, True), (torch.bfloat16, True))
    for dtype, randomize in probes if meta else ((None, False), *probes):
        ok, why = _probe(spec, router, router_args, dtype, randomize)
        if not ok:
            label = "as loaded" if dtype is None else f"in {str(dtype).replace('torch.', '')}"
            return False, f"{why} ({label})"
    return True, ""


def _probe(
    spec: RouterSpec,
    router: nn.Module,
    router_args: tuple[torch.Tensor, ...],
    dtype: torch.dtype | None,
    randomize: bool,
) -> tuple[bool, str]:
    try:
        reference, ours = probe_outputs(spec, router, router_args, dtype, randomize)
    except ProbeError as error:
        return False, str(error)
    return _same(reference, spec.encode(ours))


class ProbeError(RuntimeError):
    """The router's own forward failed on the probe."""


def probe_outputs(
    spec: RouterSpec,
    router: nn.Module,
    router_args: tuple[torch.Tensor, ...],
    dtype: torch.dtype | None,
    randomize: bool,
    seed: int = 0,
) -> tuple[object, RouterOutput]:
    """``(router's own output, spec.route's decision)`` on a copy of the router and random hidden states.

    ``dtype`` casts the copy (None: as loaded); ``randomize`` draws its weights and buffers (the
    selection bias included) from a seeded normal distribution.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    probe = _copy_router(router, dtype)
    probe_spec, args = spec, router_args
    device = spec.weight(probe).device
    with torch.no_grad():
        if randomize:
            for param in list(probe.parameters()) + list(probe.buffers()):
                if param.is_floating_point() and param.numel() > 0:
                    values = torch.randn(param.shape, generator=generator) * (4.0 / spec.hidden_size**0.5)
                    param.copy_(values.to(param.device, param.dtype))
        if spec.selection_bias is not None:
            slot = spec.selection_bias
            probe_spec, args = _probe_bias(
                spec, slot, router, probe, router_args, dtype, randomize, generator
            )
        hidden_dtype = dtype or spec.weight(router).dtype
        if hidden_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            hidden_dtype = torch.float32
        hidden = torch.randn(PROBE_TOKENS, spec.hidden_size, generator=generator).to(device, hidden_dtype)
        try:
            reference = original_forward(probe)(probe, hidden.clone(), *args)
        except Exception as error:  # noqa: BLE001 - any failure means "not a router we can run alone"
            raise ProbeError(
                f"its forward failed on ({PROBE_TOKENS}, {spec.hidden_size}) hidden states: {error}"
            ) from None
        return reference, probe_spec.route(probe, hidden.clone())


def _copy_router(router: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A detached copy of the router (without a patched routing submodule), optionally cast."""
    routing = router._modules.get("routing") if hasattr(router, "_original_class") else None
    if routing is not None:
        del router._modules["routing"]
    try:
        probe = copy.deepcopy(router)
    finally:
        if routing is not None:
            router._modules["routing"] = routing
    if hasattr(probe, "_original_class"):
        probe.__class__ = probe._original_class
    if any(t.device.type == "meta" for t in (*probe.parameters(), *probe.buffers())):
        probe.to_empty(device="cpu")  # random values are drawn by the probe
    probe.eval()
    return probe.to(dtype) if dtype is not None else probe


def _probe_bias(spec, slot, router, probe, router_args, dtype, randomize, generator):
    """The spec and router arguments of the probe copy, with the selection bias of the copy."""
    if slot.owner is router or _is_submodule(router, slot.owner):
        owner = probe if slot.owner is router else _find_same(router, probe, slot.owner)
        new_slot = TensorSlot(owner, slot.name, slot.path)
    else:  # the block holds it (and passes it to the router): copy it into a holder
        holder = nn.Module()
        value = slot.get().detach()
        value = torch.zeros(value.shape, dtype=value.dtype) if value.device.type == "meta" else value.clone()
        if dtype is not None:
            value = value.to(dtype)
        if randomize or slot.get().device.type == "meta":
            value = (torch.randn(value.shape, generator=generator) * 0.5).to(value.device, value.dtype)
        holder.register_buffer(slot.name, value)
        new_slot = TensorSlot(holder, slot.name, slot.path)
        router_args = tuple(value if a is slot.get() else a for a in router_args)
    return dataclasses.replace(spec, selection_bias=new_slot), router_args


def _is_submodule(root: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in root.modules())


def _find_same(original: nn.Module, probe: nn.Module, target: nn.Module) -> nn.Module:
    names = {id(m): n for n, m in original.named_modules()}
    return probe.get_submodule(names[id(target)])


def _same(reference: object, ours: tuple) -> tuple[bool, str]:
    if not isinstance(reference, tuple) or len(reference) != len(ours):
        got = type(reference).__name__ if not isinstance(reference, tuple) else f"a {len(reference)}-tuple"
        return False, f"it returns {got}, expected a {len(ours)}-tuple"
    names = ("first output", "second output", "third output", "fourth output")
    for i, (a, b) in enumerate(zip(reference, ours, strict=True)):
        if not isinstance(a, torch.Tensor):
            return False, f"its {names[i]} is a {type(a).__name__}, not a tensor"
        if a.shape != b.shape or a.dtype != b.dtype:
            return (
                False,
                f"its {names[i]} has shape {tuple(a.shape)} {a.dtype}, the rule gives {tuple(b.shape)} {b.dtype}",
            )
        if not torch.equal(a, b):
            return False, f"its {names[i]} differs from the rule's"
    return True, ""
