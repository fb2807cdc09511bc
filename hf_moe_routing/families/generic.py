"""Any other transformers MoE family: detect its router kind by probing the real router.

The generic family knows no model type. For each block it finds the router (an attribute in
:attr:`MoEFamily.router_attrs` holding an (m, d) weight, directly or in a linear child), then
searches the :class:`RouterKind` space against the router's own outputs on random hidden states,
one step at a time (what it returns, which experts it selects, how it weighs them, its dtypes),
and accepts a kind only when :func:`~hf_moe_routing.families.verify.verify_spec` reproduces the
router bit for bit. A router no kind reproduces is refused with the step that failed.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch
from torch import nn

from .base import BIAS_NAMES, MoEFamily, peft_base_layer
from .kinds import LOGITS, WEIGHTS_DTYPES, RouterKind
from .spec import RouterSpec
from .verify import ProbeError, _same, original_forward, probe_outputs, verify_spec


class GenericFamily(MoEFamily):
    """Detects the router kind of a family without a family file (one instance per model)."""

    name = "generic"

    def __init__(self, model_type: str = "generic") -> None:
        self.name = model_type
        self._detected: dict[type, tuple[RouterKind, str, str | None, tuple[str, ...]]] = {}

    # ---- structure: also routers that keep their weight in a linear child -----------------------
    def router_attr(self, module: nn.Module) -> str | None:
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or not hasattr(peft_base_layer(experts), "num_experts"):
            return None
        for attr in (*self.router_attrs, "router_gate", "moe_gate", "wg"):
            router = getattr(module, attr, None)
            if isinstance(router, nn.Module) and _weight_path(peft_base_layer(router)) is not None:
                return attr
        return None

    def spec(self, block_name: str, block: nn.Module, attr: str, config: Any) -> RouterSpec:
        router = peft_base_layer(getattr(block, attr))
        cls = getattr(type(router), "_original_class", type(router))
        if cls not in self._detected:
            self._detected[cls] = detect_kind(self, block_name, block, attr, router, config)
        kind, weight_name, bias_name, args = self._detected[cls]
        return self._spec_with(kind, weight_name, bias_name, args, block_name, block, attr, config)

    def _spec_with(self, kind, weight_name, bias_name, args, block_name, block, attr, config) -> RouterSpec:
        self.kind, self.weight_name, self.bias_name, self.router_args = kind, weight_name, bias_name, args
        return MoEFamily.spec(self, block_name, block, attr, config)

    def describe(self) -> str:
        kinds = {k.describe() for k, *_ in self._detected.values()}
        return "; ".join(sorted(kinds)) or "not detected yet"


def _weight_path(router: nn.Module) -> str | None:
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return "weight"
    linears = [(n, m) for n, m in router.named_children() if isinstance(m, nn.Linear)]
    return f"{linears[0][0]}.weight" if len(linears) == 1 else None


def _router_args(router: nn.Module, block: nn.Module) -> tuple[str, ...]:
    """Names of block attributes the router's forward takes after the hidden states."""
    parameters = list(inspect.signature(original_forward(router)).parameters.values())[2:]
    names = []
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not inspect.Parameter.empty:
            continue
        if not isinstance(getattr(block, p.name, None), torch.Tensor):
            raise TypeError(
                f"its forward needs {p.name!r}, which the block does not hold (not a plain router)"
            )
        names.append(p.name)
    return tuple(names)


def detect_kind(
    family: GenericFamily, block_name: str, block: nn.Module, attr: str, router: nn.Module, config: Any
) -> tuple[RouterKind, str, str | None, tuple[str, ...]]:
    """``(kind, weight_name, linear_bias_name, router_args)`` reproducing ``router`` bit for bit.

    Raises TypeError naming the first step no kind reproduces.
    """
    where = f"{block_name}.{attr} ({type(router).__name__})"
    weight_name = _weight_path(router)
    if weight_name is None:
        raise TypeError(f"{where} has no (num_experts, hidden) weight: not a learned top-k router")
    try:
        args = _router_args(router, block)
    except TypeError as error:
        raise TypeError(f"{where}: {error}") from None
    owner = router.get_submodule(weight_name.rsplit(".", 1)[0]) if "." in weight_name else router
    bias = getattr(owner, "bias", None)
    bias_name = (
        (weight_name.rsplit(".", 1)[0] + ".bias" if "." in weight_name else "bias")
        if (isinstance(bias, torch.Tensor) and bias.dim() == 1)
        else None
    )
    has_bias = any(
        isinstance(getattr(o, n, None), torch.Tensor)
        for o in (router, block, getattr(router, "moe_statics", None))
        for n in BIAS_NAMES
    )
    has_groups = family.read(router, block, config, "num_group", "n_group") is not None
    has_scale = family.read(router, block, config, "routed_scaling_factor") is not None
    has_norm_flag = family.read(router, block, config, "norm_topk_prob") is not None
    has_norm_min = family.read(router, block, config, "norm_min") is not None

    block_args = tuple(getattr(block, a) for a in args)
    codec = _codec(family, weight_name, bias_name, args, block_name, block, attr, config, router, block_args)

    selections = itertools.product(
        ("softmax", "sigmoid", "softmax_topk", "sigmoid_topk"),
        (False, True) if has_bias else (False,),
        (None, "top2", "max") if has_groups else (None,),
        (True, False),
    )
    candidates = []
    for score, sel_bias, group, is_sorted in selections:
        kind = RouterKind(
            score=score,
            selection_bias=sel_bias,
            group_score=group,
            sorted=is_sorted,
            codec=codec,
            linear_bias=bias_name is not None,
        )
        spec = _try_spec(family, kind, weight_name, bias_name, args, block_name, block, attr, config)
        if spec is not None and _matches(spec, router, block_args, index_only=True):
            candidates.append(kind)
    if not candidates:
        raise TypeError(
            f"{where}: no top-k rule (softmax, sigmoid, over all or the chosen logits, with or without a "
            "selection bias or expert groups) selects the experts it selects"
        )
    renorms = ("never", "attr", "always") if has_norm_flag else ("never", "always")
    norms = ("plain", "eps", "clamp") if has_norm_min else ("plain", "eps")
    for kind, renorm, norm, scaling, logits, dtype in itertools.product(
        candidates, renorms, norms, (False, True) if has_scale else (False,), LOGITS, WEIGHTS_DTYPES
    ):
        if renorm == "never" and norm != "plain":
            continue
        full = kind.replace(
            renormalize=renorm, norm=norm, scaling=scaling, logits=logits, weights_dtype=dtype
        )
        spec = _try_spec(family, full, weight_name, bias_name, args, block_name, block, attr, config)
        if spec is None or not _matches(spec, router, block_args, index_only=False):
            continue
        if verify_spec(spec, router, block_args)[0]:
            return full, weight_name, bias_name, args
    raise TypeError(
        f"{where}: it selects experts like a {candidates[0].describe()} router, but no known rule "
        "reproduces its weights and dtypes bit for bit"
    )


def eval_path(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _codec(family, weight_name, bias_name, args, block_name, block, attr, config, router, block_args) -> str:
    """``"triple"`` or ``"dense_scores"`` from the shape of what the router returns."""
    spec = _try_spec(family, RouterKind(), weight_name, bias_name, args, block_name, block, attr, config)
    where = f"{block_name}.{attr} ({type(router).__name__})"
    if spec is None:
        raise TypeError(f"{where}: cannot read its number of experts and top-k")
    try:
        reference, _ = probe_outputs(spec, router, block_args, torch.float32, True, seed=1)
    except ProbeError as error:
        raise TypeError(f"{where}: {error}") from None
    tensors = isinstance(reference, tuple) and all(isinstance(t, torch.Tensor) for t in reference)
    if tensors and len(reference) == 3 and reference[2].dtype in (torch.int64, torch.int32):
        return "triple"
    if tensors and len(reference) == 2 and reference[0].shape == reference[1].shape:
        return "dense_scores"
    raise TypeError(
        f"{where} returns {_describe_output(reference)}, not (logits, weights, index) or (scores, logits)"
    )


def _describe_output(output: object) -> str:
    if isinstance(output, tuple):
        return "(" + ", ".join(type(t).__name__ for t in output) + ")"
    return type(output).__name__


def _try_spec(
    family, kind, weight_name, bias_name, args, block_name, block, attr, config
) -> RouterSpec | None:
    try:
        return family._spec_with(kind, weight_name, bias_name, args, block_name, block, attr, config)
    except (TypeError, ValueError, AttributeError):
        return None


def _matches(spec: RouterSpec, router: nn.Module, block_args: tuple, index_only: bool) -> bool:
    """Whether ``spec`` selects (``index_only``) or returns exactly what the float32 probe does."""
    try:
        reference, ours = probe_outputs(spec, router, block_args, torch.float32, True, seed=1)
        if index_only:
            theirs, mine = spec.decode(reference).index, spec.decode(spec.encode(ours)).index
            return theirs.shape == mine.shape and torch.equal(theirs, mine)
        return _same(reference, spec.encode(ours))[0]
    except (ProbeError, RuntimeError, TypeError, IndexError, ValueError):
        return False
