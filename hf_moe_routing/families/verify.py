"""Bit-exact verification of a :class:`RouterSpec` against the real router.

A spec is accepted only if, on random hidden states, ``spec.route`` returns exactly what the
router's own ``forward`` returns (same indices in the same order, same weights in the same dtype,
same logits): on the router as loaded, and on copies with random weights in float32 and bfloat16
(so a rule that only agrees on this checkpoint's values, e.g. an all-zero selection bias, is not
taken for the family's rule). The bfloat16 copy keeps in float32 what a bfloat16 checkpoint of the
model keeps there (``_keep_in_fp32_modules_strict``). The token count is odd, so that CPU kernels
run both their vectorised body and their tail (which round differently) on the probe as they do on
real batches. The user's router is never modified: the probes run on copies.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch
from torch import nn

from .spec import RouterOutput, RouterSpec, TensorSlot

#: Tokens per probe (odd: see the module docstring).
PROBE_TOKENS = 61


def original_forward(router: nn.Module):
    """The router class's own ``forward`` (the unpatched one if the router is patched)."""
    return getattr(type(router), "_original_class", type(router)).forward


def verify_spec(
    spec: RouterSpec,
    router: nn.Module,
    router_args: tuple[torch.Tensor, ...] = (),
    keep_fp32: re.Pattern | None = None,
    router_name: str = "",
) -> tuple[bool, str]:
    """``(True, "")`` if ``spec`` reproduces ``router`` bit for bit, else ``(False, reason)``.

    Args:
        keep_fp32: full tensor names a bfloat16 checkpoint keeps in float32 (see ``keep_fp32_pattern``).
        router_name: the router's module path (to match ``keep_fp32``).

    Routers whose weights are not materialised (meta device: offloaded, or built from a config
    only) are checked on CPU copies with random weights only.
    """
    meta = spec.weight(router).device.type == "meta" or any(t.device.type == "meta" for t in router_args)
    for dtype, randomize, hidden_dtype in PROBES[1:] if meta else PROBES:
        ok, why = _probe(spec, router, router_args, dtype, randomize, keep_fp32, router_name, hidden_dtype)
        if not ok:
            label = "as loaded" if dtype is None else f"in {str(dtype).replace('torch.', '')}"
            if hidden_dtype is not None:
                label += f" with {str(hidden_dtype).replace('torch.', '')} hidden states"
            return False, f"{why} ({label})"
    return True, ""


#: ``(router dtype, random weights, hidden states dtype)`` of each probe (None: as loaded / as the
#: router's weight). The last one, a float32 router fed bfloat16 activations (a router its family
#: keeps in float32, or created in float32, inside a bfloat16 model), counts only if the router runs.
PROBES = (
    (None, False, None),
    (torch.float32, True, None),
    (torch.bfloat16, True, None),
    (torch.float32, True, torch.bfloat16),
)


def _probe(
    spec: RouterSpec,
    router: nn.Module,
    router_args: tuple[torch.Tensor, ...],
    dtype: torch.dtype | None,
    randomize: bool,
    keep_fp32: re.Pattern | None = None,
    router_name: str = "",
    hidden_dtype: torch.dtype | None = None,
) -> tuple[bool, str]:
    try:
        reference, ours = probe_outputs(
            spec, router, router_args, dtype, randomize, 0, keep_fp32, router_name, hidden_dtype
        )
    except ReferenceFailed as error:
        return (True, "") if hidden_dtype is not None else (False, str(error))
    except ProbeError as error:
        return False, str(error)
    return _same(reference, spec.encode(ours))


class ProbeError(RuntimeError):
    """The probe failed: the router's own forward, or the rule."""


class ReferenceFailed(ProbeError):
    """The router's own forward failed on the probe."""


def probe_outputs(
    spec: RouterSpec,
    router: nn.Module,
    router_args: tuple[torch.Tensor, ...],
    dtype: torch.dtype | None,
    randomize: bool,
    seed: int = 0,
    keep_fp32: re.Pattern | None = None,
    router_name: str = "",
    hidden_dtype: torch.dtype | None = None,
) -> tuple[object, RouterOutput]:
    """``(router's own output, spec.route's decision)`` on a copy of the router and random hidden states.

    ``dtype`` casts the copy (None: as loaded) except the tensors ``keep_fp32`` matches;
    ``randomize`` draws its weights and buffers (the selection bias included) from a seeded normal
    distribution; ``hidden_dtype`` is the hidden states' dtype (None: ``dtype``, else the weight's).

    Raises ReferenceFailed if the router's forward fails, ProbeError if the rule does.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    keep = (lambda name: bool(keep_fp32.search(name))) if keep_fp32 is not None else (lambda name: False)
    probe = _copy_router(router, dtype, lambda local: keep(f"{router_name}.{local}"))
    probe_spec, args = spec, router_args
    device = spec.weight(probe).device
    with torch.no_grad():
        if randomize:
            for param in list(probe.parameters()) + list(probe.buffers()):
                if param.is_floating_point() and param.numel() > 0:
                    values = torch.randn(param.shape, generator=generator) * (4.0 / spec.hidden_size**0.5)
                    param.copy_(values.to(param.device, param.dtype))
        if spec.expert_scale is not None:
            probe_spec = dataclasses.replace(
                probe_spec, expert_scale=_rebind(spec.expert_scale, router, probe)
            )
        bias = spec.selection_bias
        args = tuple(
            _copy_arg(
                a, dtype, randomize, generator, bias is not None and a is bias.get() and keep(bias.path)
            )
            for a in router_args
        )
        if bias is not None:
            probe_spec = dataclasses.replace(
                probe_spec, selection_bias=_probe_bias(bias, router, probe, router_args, args)
            )
        hidden_dtype = hidden_dtype or dtype or spec.weight(router).dtype
        if hidden_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            hidden_dtype = torch.float32
        shape = (
            (PROBE_TOKENS, spec.hidden_size) if spec.input_rank == 2 else (1, PROBE_TOKENS, spec.hidden_size)
        )
        hidden = torch.randn(shape, generator=generator).to(device, hidden_dtype)
        try:
            reference = original_forward(probe)(probe, hidden.clone(), *args)
        except Exception as error:  # noqa: BLE001 - any failure means "not a router we can run alone"
            raise ReferenceFailed(
                f"its forward failed on ({PROBE_TOKENS}, {spec.hidden_size}) hidden states: {error}"
            ) from None
        try:
            ours = probe_spec.route(probe, hidden.clone())
        except (RuntimeError, TypeError, IndexError, ValueError) as error:  # the rule does not apply
            raise ProbeError(f"the rule fails on it: {error}") from None
        return reference, ours


def _copy_router(router: nn.Module, dtype: torch.dtype | None, keep=lambda name: False) -> nn.Module:
    """A detached copy of the router (without a patched routing submodule), optionally cast to
    ``dtype`` except the floating tensors whose local name ``keep`` accepts."""
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
    if dtype is not None:
        for name, tensor in [*probe.named_parameters(), *probe.named_buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.float32 if keep(name) else dtype)
    return probe


def _rebind(slot: TensorSlot, router: nn.Module, probe: nn.Module) -> TensorSlot:
    """``slot`` of ``router`` (or one of its submodules), pointing into the probe copy instead."""
    owner = probe if slot.owner is router else _find_same(router, probe, slot.owner)
    return TensorSlot(owner, slot.name, slot.path)


def _copy_arg(
    value: torch.Tensor,
    dtype: torch.dtype | None,
    randomize: bool,
    generator: torch.Generator,
    keep_fp32: bool,
) -> torch.Tensor:
    """A probe copy of a tensor the block passes to its router (cast, and drawn at random if asked)."""
    meta = value.device.type == "meta"
    value = torch.zeros(value.shape, dtype=value.dtype) if meta else value.detach().clone()
    if not value.is_floating_point():
        return value
    if dtype is not None:
        value = value.to(torch.float32 if keep_fp32 else dtype)
    if randomize or meta:
        value = (torch.randn(value.shape, generator=generator) * 0.5).to(value.device, value.dtype)
    return value


def _probe_bias(
    slot: TensorSlot, router: nn.Module, probe: nn.Module, router_args: tuple, probe_args: tuple
) -> TensorSlot:
    """The selection bias slot of the probe: in the router copy, or the copy of the block's tensor."""
    if slot.owner is router or _is_submodule(router, slot.owner):
        return _rebind(slot, router, probe)
    value = next((c for a, c in zip(router_args, probe_args, strict=True) if a is slot.get()), None)
    if value is None:
        raise ProbeError(f"{slot.path} is held by the block but not passed to the router")
    holder = nn.Module()
    holder.register_buffer(slot.name, value)
    return TensorSlot(holder, slot.name, slot.path)


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
