"""What a model family tells the rest of the package: where its MoE blocks and routers are, and how
each router routes (a :class:`~hf_moe_routing.families.spec.RouterSpec`).

transformers 5.x gives every MoE family one plug point::

    router_output = block.<router>(hidden, *extra)     # e.g. (logits, weights, index)
    out = block.experts(hidden, index, weights)

A :class:`MoEFamily` finds the blocks, names the router attribute and its extra arguments, and
builds a verified ``RouterSpec`` per block from its :class:`~hf_moe_routing.families.kinds.RouterKind`.
A family whose router is of a known kind is a subclass that sets a few class attributes.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .kinds import RouterKind
from .spec import RouterSpec, TensorSlot
from .verify import verify_spec

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
#: Names a selection bias goes by, and where it may live (the router, a submodule, the block).
BIAS_NAMES = ("e_score_correction_bias", "expert_bias")
BIAS_OWNERS = ("", "moe_statics")


class UnsupportedFamilyError(TypeError):
    """A Mixture-of-Experts model whose routing hf-moe-routing cannot reproduce exactly.

    Attributes:
        model_type: the model's ``config.model_type``.
        reason: why, in one sentence (what is not a learned top-k, or which step no kind reproduces).
    """

    def __init__(self, message: str, model_type: str, reason: str) -> None:
        super().__init__(message)
        self.model_type = model_type
        self.reason = reason


def peft_base_layer(module: nn.Module) -> nn.Module:
    """The module a PEFT tuner layer wraps, else ``module`` (routing is patched on the wrapped one)."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


def text_config(model: nn.Module) -> Any:
    """The text config of a (possibly multimodal) model, or None."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def keep_fp32_pattern(model: nn.Module) -> re.Pattern | None:
    """The tensors ``from_pretrained(dtype=bfloat16)`` keeps in float32 (``_keep_in_fp32_modules_strict``).

    Matched as transformers' loader does: ``pattern.search(full_tensor_name)``, ``*`` a wildcard.
    """
    names = sorted(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return re.compile("|".join(n.replace("*", ".*") for n in names)) if names else None


def model_type_of(model: nn.Module) -> str:
    """``config.model_type`` of the model's text part (``"unknown"`` without a config)."""
    config = text_config(model)
    return str(getattr(config, "model_type", None) or "unknown")


@dataclass(frozen=True)
class MoEBlock:
    """One MoE block of a model: where it is, its router and how that router routes."""

    name: str  # module path of the block, e.g. "model.layers.3.mlp"
    layer_index: int  # decoder layer index
    block: nn.Module
    router_attr: str  # attribute of the router in the block: "gate", "router", ...
    spec: RouterSpec

    @property
    def router(self) -> nn.Module:
        """The router module (inside a PEFT wrapper, the wrapped one)."""
        return peft_base_layer(getattr(self.block, self.router_attr))

    @property
    def experts(self) -> nn.Module:
        return peft_base_layer(self.block.experts)

    @property
    def router_name(self) -> str:
        return f"{self.name}.{self.router_attr}"


@dataclass(frozen=True)
class MoEShape:
    """The MoE shape of a model: enough to check that a routing adapter or allocator fits it."""

    family: str
    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    hidden_size: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_intermediate_size: int  # summed over shared experts, 0 if none

    def fingerprint(self) -> dict:
        """JSON-serialisable identity of the shape (stored with routing adapters)."""
        out = asdict(self)
        out["moe_layers"] = list(self.moe_layers)
        return out


class MoEFamily:
    """Family knowledge: the MoE blocks of a model and the :class:`RouterSpec` of each router.

    Subclasses set the class attributes; the defaults read the numbers a router needs from the
    usual transformers attribute names (router first, then block, then config).
    """

    name: ClassVar[str] = "generic"
    #: ``config.model_type`` values served by this family.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Router class names of the family (a model with another router class gets a clear error).
    router_classes: ClassVar[tuple[str, ...]] = ()
    #: Attribute names under which a block holds its router, in order of preference.
    router_attrs: ClassVar[tuple[str, ...]] = ("gate", "router")
    #: How the router routes.
    kind: ClassVar[RouterKind] = RouterKind()
    #: Block attributes the block passes to its router after the hidden states (MiniMax-M2's bias).
    router_args: ClassVar[tuple[str, ...]] = ()
    #: Attribute paths of the router's weight and linear bias.
    weight_name: ClassVar[str] = "weight"
    bias_name: ClassVar[str | None] = None
    #: The renormalisation epsilon / minimum (RouterKind.norm "eps" / "clamp").
    norm_value: ClassVar[float] = 0.0
    #: Names of the numbers a router reads: experts per token, the routed scaling factor.
    top_k_names: ClassVar[tuple[str, ...]] = ("top_k", "num_experts_per_tok", "moe_topk", "top_k_experts")
    scaling_names: ClassVar[tuple[str, ...]] = (
        "routed_scaling_factor",
        "route_scale",
        "router_scaling_factor",
    )
    #: ``kind.input_norm``: the router's input norm module and the scales applied after it, in order.
    input_norm_name: ClassVar[str | None] = None
    input_scale_names: ClassVar[tuple[str, ...]] = ()
    #: ``kind.expert_scale``: the router's (m,) per-expert weight scale.
    expert_scale_name: ClassVar[str | None] = None
    #: 3 if the router takes (batch, seq, d) hidden states rather than (n, d).
    input_rank: ClassVar[int] = 2
    #: Why the family cannot be patched (its routing is not a learned top-k), or None.
    refusal: ClassVar[str | None] = None
    #: Attribute names of the block's always-on shared expert(s).
    shared_expert_attrs: ClassVar[tuple[str, ...]] = ("shared_expert", "shared_experts", "shared_mlp")

    # ---- structure ------------------------------------------------------------------------------
    def router_attr(self, module: nn.Module) -> str | None:
        """The attribute holding ``module``'s router if ``module`` is an MoE block of this family."""
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or not hasattr(peft_base_layer(experts), "num_experts"):
            return None
        for attr in self.router_attrs:
            router = getattr(module, attr, None)
            if isinstance(router, nn.Module) and _has_path(peft_base_layer(router), self.weight_name):
                return attr
        return None

    def find_blocks(self, model: nn.Module) -> list[tuple[str, int, nn.Module, str]]:
        """``(name, layer_index, block, router_attr)`` of every MoE block, in layer order."""
        found = []
        for name, module in model.named_modules():
            attr = self.router_attr(module)
            if attr is not None:
                match = _LAYER_INDEX.search(name + ".")
                found.append((name, int(match.group(1)) if match else len(found), module, attr))
        return found

    def check_router(self, name: str, router: nn.Module) -> None:
        """TypeError if ``router`` is not of a class this family knows."""
        cls = getattr(type(router), "_original_class", type(router)).__name__
        if self.router_classes and cls not in self.router_classes:
            raise TypeError(
                f"{name} is a {cls}, but the {self.name!r} family expects one of {list(self.router_classes)}. "
                "The model was modified or is another family; pass family='generic' to detect its router kind."
            )

    # ---- the numbers a router needs -------------------------------------------------------------
    def read(self, router: nn.Module, block: nn.Module, config: Any, *names: str, default: Any = None) -> Any:
        """The first of ``names`` found on the router, then the block, then the config."""
        for source in (router, block, config):
            for attr in names:
                value = getattr(source, attr, None) if source is not None else None
                if value is not None and not isinstance(value, (nn.Module, torch.Tensor)):
                    return value
        return default

    def top_k(self, router: nn.Module, block: nn.Module, config: Any) -> int:
        return int(self.read(router, block, config, *self.top_k_names))

    def renorm(self, router: nn.Module, block: nn.Module, config: Any) -> bool:
        if self.kind.renormalize == "attr":
            return bool(self.read(router, block, config, "norm_topk_prob", default=True))
        return self.kind.renormalize == "always"

    def scaling(self, router: nn.Module, block: nn.Module, config: Any) -> float | None:
        if not self.kind.scaling:
            return None
        return float(self.read(router, block, config, *self.scaling_names, default=1.0))

    def groups(self, router: nn.Module, block: nn.Module, config: Any) -> tuple[int | None, int | None]:
        if not self.kind.group_score:
            return None, None
        groups = self.read(router, block, config, "num_group", "n_group")
        topk = self.read(router, block, config, "topk_group")
        return (int(groups), int(topk)) if groups and topk else (None, None)

    def selection_bias(
        self, router: nn.Module, block: nn.Module, block_name: str, attr: str
    ) -> TensorSlot | None:
        """Where the selection bias lives (router, ``router.moe_statics``, or block), or None."""
        if not self.kind.selection_bias:
            return None
        for owner_path in BIAS_OWNERS:
            owner = getattr(router, owner_path, None) if owner_path else router
            for name in BIAS_NAMES:
                if isinstance(getattr(owner, name, None), torch.Tensor):
                    where = ".".join(p for p in (block_name, attr, owner_path, name) if p)
                    return TensorSlot(owner, name, where)
        for name in BIAS_NAMES:
            if isinstance(getattr(block, name, None), torch.Tensor):
                return TensorSlot(block, name, f"{block_name}.{name}")
        raise TypeError(
            f"{block_name}.{attr}: the {self.name!r} router kind selects with a bias, found none."
        )

    def spec(self, block_name: str, block: nn.Module, attr: str, config: Any) -> RouterSpec:
        """The :class:`RouterSpec` of one block's router."""
        router = peft_base_layer(getattr(block, attr))
        weight = _get(router, self.weight_name)
        groups, topk_groups = self.groups(router, block, config)
        return RouterSpec(
            kind=self.kind,
            num_experts=int(weight.shape[0]),
            top_k=self.top_k(router, block, config),
            hidden_size=int(weight.shape[-1]),
            weight_name=self.weight_name,
            bias_name=self.bias_name,
            renorm=self.renorm(router, block, config),
            norm_value=float(self.read(router, block, config, "norm_min", default=self.norm_value)),
            scaling=self.scaling(router, block, config),
            num_groups=groups,
            topk_groups=topk_groups,
            selection_bias=self.selection_bias(router, block, block_name, attr),
            jitter_eps=float(self.read(router, block, config, "router_jitter_noise", default=0.0)),
            input_norm_name=self.input_norm_name if self.kind.input_norm else None,
            input_scale_names=self.input_scale_names if self.kind.input_norm else (),
            expert_scale=(
                TensorSlot(router, self.expert_scale_name, f"{block_name}.{attr}.{self.expert_scale_name}")
                if self.kind.expert_scale
                else None
            ),
            input_rank=self.input_rank,
        )

    def router_inputs(self, block: nn.Module) -> tuple[torch.Tensor, ...]:
        """The extra arguments the block passes to its router (read from the block)."""
        return tuple(getattr(block, name) for name in self.router_args)

    #: Set by ``describe_model``: the tensors a bfloat16 checkpoint of the model keeps in float32.
    keep_fp32: re.Pattern | None = None

    def verify(self, spec: RouterSpec, block: MoEBlock) -> None:
        """TypeError unless ``spec`` reproduces ``block``'s router bit for bit (see ``verify.py``)."""
        ok, why = verify_spec(
            spec, block.router, self.router_inputs(block.block), self.keep_fp32, block.router_name
        )
        if not ok:
            raise TypeError(
                f"{block.router_name} ({type(block.router).__name__}) does not route like a {self.name!r} "
                f"router ({spec.kind.describe()}): {why}. Refusing to patch rather than approximate it."
            )

    # ---- shape ----------------------------------------------------------------------------------
    def shared_intermediate_size(self, block: nn.Module) -> int:
        """Intermediate size of the block's always-on shared expert(s), 0 if none."""
        for attr in self.shared_expert_attrs:
            shared = getattr(block, attr, None)
            if isinstance(shared, nn.Module):
                size = getattr(shared, "intermediate_size", None)
                if size is None:
                    linears = [m for m in shared.modules() if isinstance(m, nn.Linear)]
                    size = linears[0].out_features if linears else 0
                return int(size)
        return 0

    def describe(self) -> str:
        return self.kind.describe()


def _has_path(module: nn.Module, path: str) -> bool:
    try:
        return isinstance(_get(module, path), torch.Tensor)
    except AttributeError:
        return False


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module
