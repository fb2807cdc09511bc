"""The interface every routing method implements, and the registry that finds methods by name.

A method is a config dataclass (strict types, JSON round trip) plus a per-block
:class:`RoutingLayer`: an ``nn.Module`` stored as ``router.routing`` that maps the router's
hidden states to a :class:`~hf_moe_routing.families.RouterOutput` through the block's
:class:`~hf_moe_routing.families.RouterSpec`. A built-in method is one folder
``methods/<name>/`` (``__init__.py``, ``config.py``, ``layer.py``) plus one line in the
:data:`ROUTING_METHODS` table below; a third-party method registers with :func:`register_routing`
or an entry point (``core/registry.py``)::

    @dataclass
    class BIPConfig(RoutingConfig):
        routing_type: ClassVar[str] = "bip"
        requires: ClassVar[Requirement] = "fitting"      # what it needs before use (one trait)
        capacity_factor: float = 2.0

        def create_layer(self, block, model, context):    # the layer gets its settings as arguments
            return BIPLayer(block, context, capacity_factor=self.capacity_factor)

One config -> layer convention for every method: ``create_layer`` passes the settings the layer
uses as arguments, and the layer keeps them as attributes; a layer never holds its config (so a
config changed after patching changes nothing until the model is patched again).

Non-finite values (the policy every method follows; the README's reliability section lists the tests):

* **Settings** are refused where they are written: config fields are type-checked (a float field
  refuses NaN and infinity, an int field refuses 2.5 and True, a bool field refuses "false") and
  range-checked at construction, at JSON load (:meth:`RoutingConfig.from_dict`) and again by
  ``patch_model`` (a field changed after construction); model-dependent limits (k <= m, options
  that would do nothing on the family) are refused by :meth:`RoutingConfig.validate` before the
  model changes.
* **Saved state** (a routing adapter, a checkpoint) holding NaN or infinity is refused at load
  (:meth:`RoutingLayer.load_routing_state`), naming the layer and the tensor.
* **At run time** a layer raises ValueError naming itself (:attr:`RoutingLayer.where`) as soon as a
  non-finite router input would reach persistent state or a random draw: BIP's prices and
  Loss-Free's bias (updates in training / fitting), dynamic skipping's calibration, Ada-K's
  sampled expert counts and recorded PPO states. A forward that learns nothing and draws nothing
  (Top-K, Loss-Controlled, top-p, dynamic skipping with a fixed beta, Ada-K's greedy inference,
  BIP / Loss-Free in eval) routes a non-finite token as the model would and adds no host
  synchronisation: the NaN stays visible in the model's output (never hidden, never invented).
* **Never invented**: weights renormalised over a chosen set whose probabilities sum to 0 are 0,
  not 0/0 (:func:`~hf_moe_routing.core.ops.renormalize`); unused (sentinel) slots always carry
  index m and weight exactly 0, whatever the inputs.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..core.config import JSONConfig
from ..core.context import RoutingContext, is_recomputing
from ..core.registry import Registry
from ..families import MoEBlock, MoEModel, RouterOutput, RouterSpec
from .exported import ExportedRouting, NotExportableError  # noqa: F401 - re-exported
from .routing import original_router_output, selectable_experts

#: What a routing needs before its results mean anything (:attr:`RoutingConfig.requires`):
#: ``"nothing"`` (routes by fixed rules: Top-K, top-p), ``"fitting"`` (state fitted on data without
#: gradients by ``fit_routing``: BIP, Loss-Free, dynamic skipping), ``"training"`` (state trained by
#: its own trainer: Ada-K's allocators) or ``"router_training"`` (the router weights themselves are
#: fine-tuned: Loss-Controlled).
Requirement = Literal["nothing", "fitting", "training", "router_training"]

#: routing_type -> config class; the built-ins (this table is the only list of them) load on first
#: lookup. A new built-in method adds one line here (see ``core/registry.py``).
ROUTING_METHODS: Registry[type[RoutingConfig]] = Registry(
    "routing method",
    None,  # the base, RoutingConfig, is set below (it is defined after this table)
    {
        "topk": "hf_moe_routing.methods.topk.config:TopKConfig",
        "top_p": "hf_moe_routing.methods.top_p.config:TopPConfig",
        "dynamic_skip": "hf_moe_routing.methods.dynamic_skip.config:DynamicSkipConfig",
        "bip": "hf_moe_routing.methods.bip.config:BIPConfig",
        "loss_free": "hf_moe_routing.methods.loss_free.config:LossFreeConfig",
        "loss_controlled": "hf_moe_routing.methods.loss_controlled.config:LossControlledConfig",
        "adak": "hf_moe_routing.methods.adak.config:AdaKConfig",
        "replay": "hf_moe_routing.methods.replay.config:ReplayConfig",
    },
    entry_point_group="hf_moe_routing.methods",
)


def register_routing(cls: type[RoutingConfig]) -> type[RoutingConfig]:
    """Class decorator for third-party methods: make a routing config available by its ``routing_type``
    name (built-ins are listed in :data:`ROUTING_METHODS`' table instead).

    Raises ValueError if another config already has that name, TypeError if ``cls`` is not a
    :class:`RoutingConfig` subclass.
    """
    ROUTING_METHODS.register(cls.routing_type, cls)
    return cls


def get_routing_class(name: str) -> type[RoutingConfig]:
    """The config class registered as ``name`` (ValueError listing the known names otherwise)."""
    return ROUTING_METHODS[name]


@dataclasses.dataclass
class RoutingConfig(JSONConfig, abc.ABC):
    """Base class of routing configs (PEFT-style dataclasses that round-trip through JSON).

    Field types are checked at construction (see :class:`~hf_moe_routing.core.config.JSONConfig`);
    subclasses check ranges in ``__post_init__`` and model-dependent limits in :meth:`validate`.
    """

    routing_type: ClassVar[str] = ""
    #: The method's name in prose (model cards), e.g. ``"BIP-balanced"``; empty: ``routing_type``.
    display_name: ClassVar[str] = ""
    #: True if tokens may use fewer experts than the model's top-k (needs sentinel-safe experts).
    variable_k: ClassVar[bool] = False
    #: What the routing needs before use (see :data:`Requirement`); the one trait callers read.
    requires: ClassVar[Requirement] = "nothing"

    def validate(self, model: MoEModel) -> None:
        """Raise ValueError if the config cannot be applied to this model (e.g. k out of range)."""

    def validate_settings(self) -> None:
        """Re-run the construction checks (types and ranges): a field may have been set since.

        Raises TypeError / ValueError as the constructor does. ``patch_model`` calls it first.
        """
        self.__post_init__()

    @abc.abstractmethod
    def create_layer(self, block: MoEBlock, model: MoEModel, context: RoutingContext) -> RoutingLayer:
        """The routing module for one MoE block."""

    def to_dict(self) -> dict[str, Any]:
        return {"routing_type": self.routing_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingConfig:
        """Build the right config subclass from :meth:`to_dict` output (strict: unknown keys raise)."""
        if not isinstance(data, dict):
            raise TypeError(f"A routing config must be a JSON object, got {type(data).__name__}.")
        data = dict(data)
        name = data.pop("routing_type", cls.routing_type)
        if not isinstance(name, str):
            raise TypeError(f"routing_type must be a string, got {name!r}.")
        return get_routing_class(name).from_fields(data)

    # ---- test hooks: every registered method is run by the method-parametrised tests -------------
    @classmethod
    def example(cls) -> RoutingConfig:
        """A config that routes right after ``patch_model`` (no fitting needed to run a forward).

        Tests patch every registered method with it (compile, adapters); override when the defaults
        cannot route unfitted (e.g. dynamic skipping without a ``beta``).
        """
        return cls()

    @classmethod
    def example_settings(cls, spec: RouterSpec) -> dict[str, Sequence[Any]]:
        """Valid values per field on a router of ``spec``, for the fuzz test (``tests/test_fuzz.py``).

        It builds configs from one value of each listed field (others keep their defaults) and checks
        the routing's invariants on random routers. List the values that reach different code paths.
        """
        return {}

    @classmethod
    def bad_settings(cls) -> Sequence[tuple[str, Any, type[Exception], str]]:
        """``(field, value, error type, message regex)`` rows: values the config must refuse, with the
        error it raises (``tests/test_reliability_configs.py``; every field needs a row)."""
        return ()

    def check_k(self, name: str, k: int | None, model: MoEModel, *, selectable: bool = True) -> None:
        """ValueError unless ``k`` (a setting named ``name``) is None or in ``1..num_experts``.

        With ``selectable`` (fixed-k routings), k must also fit the experts a token can choose
        from: group-limited routers (DeepSeek, GLM-4.5) offer ``topk_group * m / n_group``; more
        would route tokens to experts outside their groups.
        """
        m = model.shape.num_experts
        if k is not None and not 1 <= k <= m:
            raise ValueError(
                f"{type(self).__name__}({name}={k}) is outside 1..{m}: the model has {m} routed experts "
                "per layer. Pick a value in that range (or None for the model's own top-k)."
            )
        limit = min(selectable_experts(block.spec) for block in model.blocks) if model.blocks else m
        if selectable and k is not None and k > limit:
            raise ValueError(
                f"{type(self).__name__}({name}={k}) is more than the {limit} experts a token can choose from: "
                f"the {model.shape.family} router limits each token to its best expert groups "
                f"(topk_group of n_group). Use {name} <= {limit}."
            )


class RoutingLayer(nn.Module, metaclass=abc.ABCMeta):
    """Routes the tokens of one MoE block. Subclasses implement :meth:`forward`.

    The router spec, block name and shared context are plain attributes (not submodules), so the
    layer's state dict holds only the method's own state (allocator weights, BIP prices, ...).

    Two properties every layer keeps (the base class provides them):

    * **state stays float32**: ``model.to(torch.bfloat16)`` / ``.half()`` move the layer's state
      to the new device but keep float32 tensors float32 (:meth:`_apply`);
    * **activation checkpointing replays**: while autograd recomputes a checkpointed forward,
      :meth:`replay` returns the state the original forward routed with, and layers make no
      updates and record no losses (:meth:`replaying`).
    """

    #: The method's name in messages (default: the class name without "Layer").
    display_name: ClassVar[str] = ""

    def __init__(self, block: MoEBlock, context: RoutingContext) -> None:
        super().__init__()
        self.spec = block.spec
        self.block_name = block.name
        self.layer_index = block.layer_index
        self.context = context
        self._replay_state: Any = None

    @abc.abstractmethod
    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args: Any) -> RouterOutput:
        """Route ``hidden_states`` (n, d) (or (..., d)); returns ``(logits (n, m), weights (n, S), index (n, S))``.

        ``router`` is the patched router module (its weight is read through ``self.spec``);
        ``router_args`` are the extra arguments its block passed (the spec already knows where
        they live). Unused slots hold the sentinel index m and weight 0.
        """

    @property
    def num_experts(self) -> int:
        """m, the routed experts of this block (the sentinel index)."""
        return self.spec.num_experts

    @property
    def output_slots(self) -> int:
        """S, the width of the (n, S) index and weights this layer returns (a serving engine's fixed top-k)."""
        return int(getattr(self, "top_k", None) or self.spec.top_k)

    @property
    def where(self) -> str:
        """This layer in messages, e.g. ``"BIP routing of layer 3 (model.layers.3.mlp)"``."""
        method = self.display_name or type(self).__name__.removesuffix("Layer")
        return f"{method} routing of layer {self.layer_index} ({self.block_name})"

    def check_finite(self, values: torch.Tensor, what: str) -> None:
        """ValueError naming this layer if ``values`` holds NaN or infinity (the run-time policy above).

        ``what`` says what the values are and why they matter, e.g. "router scores (BIP updates its
        prices from them)". Under ``torch.compile`` the check is an asynchronous device assertion.
        """
        finite = torch.isfinite(values.detach()).all()
        message = (
            f"{self.where}: the {what} hold NaN or infinite values. The hidden states reaching this layer "
            "are not finite (a diverged training step, fp16 overflow, or bad inputs): check the loss "
            "scale / dtype and the inputs, or restore the last good checkpoint."
        )
        if torch.compiler.is_compiling():
            torch._assert_async(finite, message)
        elif not bool(finite):
            raise ValueError(message)

    # ---- checkpoint replay -------------------------------------------------------------------------
    def replaying(self) -> bool:
        """True while autograd recomputes this layer's forward (activation checkpointing)."""
        return self.training and is_recomputing()

    def replay(self, current: Any) -> Any:
        """The state to route with: ``current``, or the one the original forward used when replaying.

        In training mode the state of each original forward is remembered (cloned tensors).
        """
        if not self.training:
            return current
        if is_recomputing():
            return current if self._replay_state is None else self._replay_state
        self._replay_state = _clone(current)
        return current

    # ---- state -------------------------------------------------------------------------------------
    def routing_state(self) -> dict[str, torch.Tensor]:
        """The state a routing adapter file stores for this layer (default: the layer's state dict)."""
        return dict(self.state_dict())

    def load_routing_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`routing_state` (strict: every key must match; values must be finite)."""
        for key, value in state.items():
            if value.is_floating_point() and (
                bool(torch.isinf(value).any())
                or (bool(torch.isnan(value).any()) and not self.allows_nonfinite(key))
            ):
                raise ValueError(
                    f"The routing state {key!r} of {self.where} holds NaN or infinite values: the adapter "
                    "or checkpoint is corrupt (or was trained on diverged losses). Retrain or re-fit it."
                )
        self.load_state_dict(state, strict=True)

    def allows_nonfinite(self, key: str) -> bool:
        """Whether state ``key`` may hold NaN (e.g. a threshold that is not calibrated yet); never inf."""
        return False

    def is_fitted(self) -> bool:
        """False if the layer's state was never fitted or trained (evaluating it would be misleading)."""
        return True

    # ---- fitting (``fit_routing``; layers of configs with ``requires = "fitting"`` override) -------
    def begin_fit(self) -> None:
        """Start fitting: the next forwards (model in eval mode, no gradients) fit the layer's state."""

    def end_fit(self) -> Any:
        """Finish fitting and return a JSON-able summary of what was fitted (default: ``{}``)."""
        return {}

    def abort_fit(self) -> None:
        """Fitting failed part way: leave the layer as it was before :meth:`begin_fit` (or usable)."""

    def exported_routing(self) -> ExportedRouting:
        """This layer's routing as changes to the family's own parameters and config (for ``export``).

        Raises:
            NotExportableError: the routing cannot be written into a standard checkpoint exactly
                (the default: methods that can override this).
        """
        raise NotExportableError(
            f"{self.where} cannot be written into a standard transformers checkpoint: no parameter or "
            "config field of the family expresses it exactly. Serve it with the vLLM plugin instead "
            "(pip install 'hf-moe-routing[vllm]'; the model folder holds the routing adapter), see docs/serving.md."
        )

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        """``module._apply`` with float32 tensors kept float32: a dtype cast is refused, a move kept.

        The float32 original is moved itself (never cast down and back), so its values stay exact.
        """

        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            new = fn(t)
            if t.dtype == torch.float32 and new.dtype != torch.float32:
                return t.to(device=new.device)
            return new

        return super()._apply(keep_float32, recurse)

    def extra_repr(self) -> str:
        return f"layer={self.layer_index}, router={self.spec.kind.describe()}"


ROUTING_METHODS.base = RoutingConfig


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value


class TopKLayer(RoutingLayer):
    """``index = topk(choice, k)``, weights by the family's rules (``k = top_k`` or the model's own).

    The ``topk`` method's layer, and every method's layer for the MoE layers it leaves alone (e.g.
    ``AdaKConfig(layers=[...])``): with ``top_k=None`` it routes exactly as the unpatched router.
    """

    display_name = "Top-K"

    def __init__(self, block: MoEBlock, context: RoutingContext, top_k: int | None) -> None:
        super().__init__(block, context)
        self.top_k = top_k

    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args: Any) -> RouterOutput:
        """Route ``hidden_states`` (n, d) with the family's top-k: ``RouterOutput`` of (n, k) weights / index."""
        if self.top_k is None and self.training and self.spec.kind.score == "sparsemixer":
            # SparseMixer samples in training: only the router's own forward reproduces it
            return original_router_output(self.spec, router, hidden_states, router_args)
        return self.spec.route(router, hidden_states, self.top_k)

    def exported_routing(self) -> ExportedRouting:
        """A fixed k: the config's top-k field (the family's own rules select and weigh)."""
        return ExportedRouting(top_k=self.top_k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k or 'model default'}"
