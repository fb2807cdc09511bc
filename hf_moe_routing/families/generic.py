"""Any other transformers MoE family: detect its router kind by probing the real router.

The generic family knows no model type. For each block it finds the router (an attribute in
:attr:`MoEFamily.router_attrs` holding an (m, d) weight, directly or in a linear child), then
searches the :class:`RouterKind` space against the router's own outputs on random hidden states,
one step at a time (what it returns, which experts it selects, how it weighs them, its dtypes),
and accepts a kind only when :func:`~hf_moe_routing.families.verify.verify_spec` reproduces the
router bit for bit. A router no kind reproduces is refused with the step that failed.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import BIAS_NAMES, MoEFamily, peft_base_layer
from .kinds import LOGITS, WEIGHTS_DTYPES, RouterKind
from .spec import RouterSpec
from .verify import ProbeError, _same, original_forward, probe_outputs, verify_spec

#: Epsilons routers add to the renormalisation denominator (``sum + eps``), tried in order.
NORM_EPS = (1e-20, 1e-6)
#: Router forward arguments that make it something else than a learned top-k router.
NOT_LEARNED_TOPK = {
    "input_ids": "it routes by token id (a hash router keyed on input_ids)",
    "router_states": "it reads a router state carried over from the previous layer",
}


@dataclass(frozen=True)
class Detected:
    """What probing found out about a router class."""

    kind: RouterKind
    weight_name: str
    bias_name: str | None
    args: tuple[str, ...]
    input_rank: int = 2
    norm_value: float = 0.0

    def replace(self, **changes: Any) -> Detected:
        return dataclasses.replace(self, **changes)


class GenericFamily(MoEFamily):
    """Detects the router kind of a family without a family file (one instance per model)."""

    name = "generic"

    def __init__(self, model_type: str = "generic") -> None:
        self.name = model_type
        self._detected: dict[type, Detected] = {}

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
        return self._spec_with(self._detected[cls], block_name, block, attr, config)

    def _spec_with(self, found: Detected, block_name, block, attr, config) -> RouterSpec:
        self.kind, self.weight_name, self.bias_name = found.kind, found.weight_name, found.bias_name
        self.router_args, self.input_rank, self.norm_value = found.args, found.input_rank, found.norm_value
        return MoEFamily.spec(self, block_name, block, attr, config)

    def describe(self) -> str:
        kinds = {found.kind.describe() for found in self._detected.values()}
        return "; ".join(sorted(kinds)) or "not detected yet"


def _weight_path(router: nn.Module) -> str | None:
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return "weight"
    linears = [(n, m) for n, m in router.named_children() if isinstance(m, nn.Linear)]
    return f"{linears[0][0]}.weight" if len(linears) == 1 else None


def _router_args(router: nn.Module, block: nn.Module) -> tuple[str, ...]:
    """Names of block attributes the router's forward takes after the hidden states.

    An optional argument counts when the block holds a tensor of that name (LFM2-MoE's
    ``expert_bias``); a required one must be held by the block.
    """
    parameters = list(inspect.signature(original_forward(router)).parameters.values())[2:]
    names = []
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in NOT_LEARNED_TOPK:
            raise TypeError(f"{NOT_LEARNED_TOPK[p.name]}: not a learned top-k router")
        held = isinstance(getattr(block, p.name, None), torch.Tensor)
        if held:
            names.append(p.name)
        elif p.default is inspect.Parameter.empty:
            raise TypeError(
                f"its forward needs {p.name!r}, which the block does not hold (not a plain router)"
            )
        else:
            break  # later arguments would be passed by keyword; the block uses the default here
    return tuple(names)


def detect_kind(
    family: GenericFamily, block_name: str, block: nn.Module, attr: str, router: nn.Module, config: Any
) -> Detected:
    """The :class:`Detected` kind and names that reproduce ``router`` bit for bit.

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
    has_scale = family.read(router, block, config, *family.scaling_names) is not None
    has_norm_flag = family.read(router, block, config, "norm_topk_prob") is not None
    norm_min = family.read(router, block, config, "norm_min")

    block_args = tuple(getattr(block, a) for a in args)
    found = _input_and_codec(
        family, Detected(RouterKind(), weight_name, bias_name, args), block_name, block, attr, config, router
    )

    selections = itertools.product(
        ("softmax", "sigmoid", "softmax_topk", "sigmoid_topk"),
        (False, True) if has_bias else (False,),
        (None, "top2", "max") if has_groups else (None,),
        (True, False),
    )
    candidates = []
    for score, sel_bias, group, is_sorted in selections:
        kind = found.kind.replace(
            score=score,
            selection_bias=sel_bias,
            group_score=group,
            sorted=is_sorted,
            linear_bias=bias_name is not None,
        )
        spec = _try_spec(family, found.replace(kind=kind), block_name, block, attr, config)
        if spec is not None and _matches(spec, router, block_args, index_only=True):
            candidates.append(kind)
    if not candidates:
        raise TypeError(
            f"{where}: no top-k rule (softmax, sigmoid, over all or the chosen logits, with or without a "
            "selection bias or expert groups) selects the experts it selects"
        )
    renorms = ("never", "attr", "always") if has_norm_flag else ("never", "always")
    norms = [("plain", 0.0)] + [("eps", eps) for eps in NORM_EPS]
    if norm_min is not None:
        norms.append(("clamp", float(norm_min)))
    for kind, renorm, (norm, norm_value), scaling, score_dtype, logits, dtype in itertools.product(
        candidates,
        renorms,
        norms,
        (False, True) if has_scale else (False,),
        ("float32", "logits"),
        LOGITS,
        WEIGHTS_DTYPES,
    ):
        if renorm == "never" and norm != "plain":
            continue
        if score_dtype == "logits" and kind.selects_on_logits:
            continue
        full = kind.replace(
            renormalize=renorm,
            norm=norm,
            scaling=scaling,
            score_dtype=score_dtype,
            logits=logits,
            weights_dtype=dtype,
        )
        detected = found.replace(kind=full, norm_value=norm_value)
        spec = _try_spec(family, detected, block_name, block, attr, config)
        if spec is None or not _matches(spec, router, block_args, index_only=False):
            continue
        if verify_spec(spec, router, block_args, family.keep_fp32, f"{block_name}.{attr}")[0]:
            return detected
    raise TypeError(
        f"{where}: it selects experts like a {candidates[0].describe()} router, but no known rule "
        "reproduces its weights and dtypes bit for bit"
    )


def _input_and_codec(family, found: Detected, block_name, block, attr, config, router) -> Detected:
    """``found`` with the router's input rank and output codec, read from a probe of its forward."""
    where = f"{block_name}.{attr} ({type(router).__name__})"
    block_args = tuple(getattr(block, a) for a in found.args)
    error = None
    for rank in (2, 3):  # (n, d) hidden states, else (batch, seq, d)
        spec = _try_spec(family, found.replace(input_rank=rank), block_name, block, attr, config)
        if spec is None:
            raise TypeError(f"{where}: cannot read its number of experts and top-k")
        try:
            reference, _ = probe_outputs(spec, router, block_args, torch.float32, True, seed=1)
            break
        except ProbeError as failure:
            error = error or failure
    else:
        raise TypeError(f"{where}: {error}") from None
    tensors = isinstance(reference, tuple) and all(isinstance(t, torch.Tensor) for t in reference)
    m = spec.num_experts
    if tensors and len(reference) == 3 and reference[2].dtype in (torch.int64, torch.int32):
        first = reference[0]
        codec = "scores_triple" if _is_softmax_output(first) and first.shape[-1] == m else "triple"
        return found.replace(input_rank=rank, kind=found.kind.replace(codec=codec))
    if tensors and len(reference) == 2 and reference[0].shape == reference[1].shape:
        return found.replace(input_rank=rank, kind=found.kind.replace(codec="dense_scores"))
    raise TypeError(
        f"{where} returns {_describe_output(reference)}, not (logits, weights, index) or (scores, logits)"
    )


def _is_softmax_output(values: torch.Tensor) -> bool:
    """Whether a router's first output looks like softmax probabilities (rows of non-negatives summing to 1)."""
    values = values.float()
    return bool((values >= 0).all() and torch.allclose(values.sum(-1), torch.ones(()), atol=1e-3))


def _describe_output(output: object) -> str:
    if isinstance(output, tuple):
        return "(" + ", ".join(type(t).__name__ for t in output) + ")"
    return type(output).__name__


def _try_spec(family, found: Detected, block_name, block, attr, config) -> RouterSpec | None:
    try:
        return family._spec_with(found, block_name, block, attr, config)
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
