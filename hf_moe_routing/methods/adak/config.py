"""Ada-K routing config: learned per-token expert counts (Yue et al., ICLR 2025, arXiv 2410.10456)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...core.config import check_choice, check_range
from ...core.context import RoutingContext
from ...families import MoEBlock, MoEModel, RouterSpec
from ..base import Requirement, RoutingConfig, RoutingLayer, TopKLayer
from ..routing import selectable_experts
from .allocator import ALLOCATOR_INPUTS
from .layer import AdaKLayer

DECISIONS = ("greedy", "sample")


@dataclass
class AdaKConfig(RoutingConfig):
    """Ada-K routing: an allocator per MoE layer picks how many experts each token gets.

    Args:
        k_max: the most experts a token may get (the allocator chooses k in ``1..k_max``, in training
            and at inference). Default None: the model's top-k, so Ada-K never costs more than the
            model. Set it above top-k to let some tokens use more experts (the paper allows all).
        decision: how k is chosen at inference (``"greedy"``: the most probable k, ``"sample"``).
            In training mode (``layer.train()``) k is always sampled.
        layers: decoder-layer indices that get allocators (default: every MoE layer); the other MoE
            layers keep the model's own Top-K routing.
        renormalize: None (default) follows the family's own weighting rule over the kept experts
            (e.g. Mixtral renormalises, Qwen1.5-MoE's ``norm_topk_prob=False`` does not), so a token
            given the model's k is routed exactly as before; True always divides the kept experts'
            probabilities by their sum (the paper's rule); False never does. The family's scaling
            (e.g. DeepSeek's ``routed_scaling_factor``) is kept in every case.
        allocator_input: what the allocator sees: ``"hidden"`` (the paper: a linear map of the hidden
            state the router sees) or ``"hidden+router"`` (default: also the router's k_max largest
            log-probabilities, the confidence signal dynamic skipping uses).
        allocator_bias: give the allocator a bias (default True; the paper's has none). K-Warm and
            Skip-Warm then start exactly from Top-K / dynamic skipping.
        weight_gain: give every Ada-K layer a learned gain per number of kept experts
            (:class:`~hf_moe_routing.methods.kept_gain.KeptWeightGain`: a token that keeps c experts has its
            weights times g_c, and g_top_k = 1), fitted by ``AdaKTrainer`` after PPO and the budget
            calibration (``AdaKTrainingConfig.weight_gain_steps``; or on their own by
            :func:`~hf_moe_routing.methods.kept_gain.fit_kept_weight_gains`) and saved in the routing adapter.
            The fit shifts later layers' choices slightly (the budget is calibrated before it: about 1% off on
            tiny models). Default False (the weight rule of ``renormalize`` only).

    Adapter configs saved before ``allocator_input`` existed describe the paper's allocator
    (``"hidden"``, no bias) and load as such.
    """

    routing_type: ClassVar[str] = "adak"
    display_name: ClassVar[str] = "Ada-K adaptive"
    variable_k: ClassVar[bool] = True
    requires: ClassVar[Requirement] = "training"

    k_max: int | None = field(default=None, metadata={"help": "most experts per token (default: top-k)"})
    decision: str = field(default="greedy", metadata={"help": "k at inference: greedy or sample"})
    layers: list[int] | None = field(default=None, metadata={"help": "MoE layers with allocators"})
    renormalize: bool | None = field(
        default=None, metadata={"help": "None: family rule; True: paper (renormalise); False: never"}
    )
    allocator_input: str = field(
        default="hidden+router", metadata={"help": "allocator input: hidden (paper) or hidden+router"}
    )
    allocator_bias: bool = field(default=True, metadata={"help": "allocator bias (the paper has none)"})
    weight_gain: bool = field(
        default=False, metadata={"help": "a learned weight gain per layer and number of kept experts"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("AdaKConfig", "decision", self.decision, DECISIONS)
        check_choice("AdaKConfig", "allocator_input", self.allocator_input, ALLOCATOR_INPUTS)
        check_range("AdaKConfig", "k_max", self.k_max, low=1)
        if self.layers is not None:
            if not self.layers or min(self.layers) < 0:
                raise ValueError(
                    f"AdaKConfig(layers={self.layers}) must list decoder-layer indices >= 0 (or be None for "
                    "every MoE layer)."
                )
            self.layers = sorted(set(self.layers))

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> AdaKConfig:
        """As :meth:`JSONConfig.from_fields`; configs without ``allocator_input`` are the paper's allocator."""
        if isinstance(data, dict) and "allocator_input" not in data:
            data = {**data, "allocator_input": "hidden", "allocator_bias": data.get("allocator_bias", False)}
        return super().from_fields(data)

    @classmethod
    def paper(cls, **overrides: Any) -> AdaKConfig:
        """The paper's allocator: bias-free, linear on the hidden state, renormalised weights.

        The paper lets k range over every expert: pass ``k_max=<number of experts>`` for that.
        """
        return cls(**{"allocator_input": "hidden", "allocator_bias": False, "renormalize": True, **overrides})

    def resolved_k_max(self, block: MoEBlock) -> int:
        """The allocator's number of choices on ``block``: ``k_max`` or the block's top-k."""
        return block.spec.top_k if self.k_max is None else self.k_max

    def validate(self, model: MoEModel) -> None:
        self.check_k("k_max", self.k_max, model, selectable=False)  # checked per block in create_layer
        if self.layers is not None:
            unknown = sorted(set(self.layers) - set(model.shape.moe_layers))
            if unknown or not self.layers:
                raise ValueError(
                    f"AdaKConfig(layers={self.layers}) names layers without MoE block {unknown}: the MoE "
                    f"layers of this model are {list(model.shape.moe_layers)} (or pass layers=None for all)."
                )
        if self.renormalize is False and model.spec.kind.score in ("softmax_topk", "sparsemixer"):
            raise ValueError(
                f"AdaKConfig(renormalize=False) has no meaning for {model.shape.family} routers, whose weights "
                "are a softmax over the chosen experts' logits (always renormalised): use None or True."
            )

    def create_layer(self, block: MoEBlock, model: MoEModel, context: RoutingContext) -> RoutingLayer:
        if self.layers is not None and block.layer_index not in self.layers:
            return TopKLayer(block, context, None)
        selectable = selectable_experts(block.spec)
        k_max = self.resolved_k_max(block)
        if k_max > selectable:
            raise ValueError(
                f"AdaKConfig(k_max={k_max}) is larger than the {selectable} experts the router of "
                f"{block.name} lets a token choose from (group-limited routing): use k_max <= {selectable}."
            )
        return AdaKLayer(
            block,
            context,
            k_max,
            self.decision,
            self.renormalize,
            allocator_input=self.allocator_input,
            allocator_bias=self.allocator_bias,
            weight_gain=self.weight_gain,
        )

    @classmethod
    def example_settings(cls, spec: RouterSpec) -> dict[str, Sequence[Any]]:
        no_false = spec.kind.score in ("softmax_topk", "sparsemixer")
        return {
            "k_max": (None, 1, selectable_experts(spec)),
            "decision": ("greedy", "sample"),
            "renormalize": (None, True) if no_false else (None, True, False),
            "weight_gain": (False, True),
        }

    @classmethod
    def bad_settings(cls) -> Sequence[tuple[str, Any, type[Exception], str]]:
        return [
            ("k_max", 2.5, TypeError, "integer"),
            ("k_max", True, TypeError, "integer"),
            ("k_max", 0, ValueError, "must lie in"),
            ("decision", "beam", ValueError, "choose one of 'greedy', 'sample'"),
            ("layers", [1.5], TypeError, "integer"),
            ("layers", "0", TypeError, "list"),
            ("layers", [], ValueError, "indices >= 0"),
            ("layers", [-1], ValueError, "indices >= 0"),
            ("renormalize", "false", TypeError, "true or false"),
            ("allocator_input", "router", ValueError, "choose one of 'hidden', 'hidden\\+router'"),
            ("allocator_input", 1, TypeError, "string"),
            ("allocator_bias", "no", TypeError, "true or false"),
            ("weight_gain", "yes", TypeError, "true or false"),
        ]
