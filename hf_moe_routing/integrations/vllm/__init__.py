"""vLLM plugin: serve a routing adapter inside vLLM's Transformers backend.

Installed as the ``vllm.general_plugins`` entry point ``hf_moe_routing`` (``pip install
'hf-moe-routing[vllm]'``); vLLM calls :func:`register` in each of its processes. When the served
model folder holds a routing adapter (``routing_config.json``), or ``$HF_MOE_ROUTING_ADAPTER``
names one, the plugin

1. makes the model run on the Transformers backend (``model_impl="auto"`` becomes ``"transformers"``;
   ``"vllm"`` is refused: native model classes never call the HF router);
2. patches vLLM's HF model with the adapter (``patch_model``) before vLLM swaps its experts for
   fused kernels, with vLLM's router fusion disabled, so the patched router routes (vLLM's log:
   ``Fused: experts (...) -> MoERunner (external routing)``); the plugin checks every MoE block took
   that path and fails otherwise;
3. writes the routing state again after vLLM loaded the weights (Loss-Free's bias lives in the
   model's own selection bias);
4. for routings that drop slots (Ada-K, top-p, dynamic skipping), sends a dropped slot to a real
   expert with weight 0 (``HF_MOE_ROUTING_VLLM_DROPPED=zero``, default) or to expert id -1
   (``=skip``, for GPU kernels that skip invalid ids; the CPU kernel crashes on it).

A checkpoint written by ``hf-moe-routing export`` needs none of this: vLLM's native kernels route it
with its own selection bias and top-k. An adapter for another model stops the engine with one line
naming both models; a vLLM outside :data:`~.routing.SUPPORTED_VLLM` stops it with the range.
"""

from __future__ import annotations

import functools
import logging

from .routing import (
    ADAPTER_ENV,
    DROPPED_ENV,
    SUPPORTED_VLLM,
    apply_adapter,
    check_vllm_version,
    dropped_mode,
    find_adapter,
    install_dropped_slot_hooks,
    is_exported,
    reload_states,
    remap_dropped,
    supported_range,
)

__all__ = [
    "ADAPTER_ENV",
    "DROPPED_ENV",
    "SUPPORTED_VLLM",
    "check_vllm_version",
    "find_adapter",
    "register",
    "remap_dropped",
    "supported_range",
]

logger = logging.getLogger("vllm.hf_moe_routing")  # vLLM configures its "vllm" loggers
_REGISTERED = False


def register() -> None:
    """vLLM's entry point (called once per vLLM process; idempotent).

    Raises RuntimeError naming the supported range when the installed vLLM is outside it and an
    adapter is configured through ``$HF_MOE_ROUTING_ADAPTER``; with the adapter in the model folder,
    the same error comes at engine start.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    import vllm

    version = getattr(vllm, "__version__", "0")
    try:
        check_vllm_version(version)
    except RuntimeError:
        if find_adapter(None) is not None:
            raise
        _refuse_adapters_at_start(version)  # an adapter in the served folder must not be ignored
        _REGISTERED = True
        return
    _hook_model_config()
    _hook_recursive_replace()
    _REGISTERED = True


def _hook_model_config() -> None:
    """Adapter in the served folder: the Transformers backend, or an error for ``model_impl="vllm"``."""
    from vllm.config.model import ModelConfig

    original = ModelConfig.__post_init__
    if getattr(original, "_hf_moe_routing", False):
        return

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        adapter = find_adapter(self.model)
        if adapter is not None:
            impl = str(getattr(self.model_impl, "value", self.model_impl))
            if impl == "auto":
                self.model_impl = "transformers"
                logger.info("hf-moe-routing: routing adapter %s -> model_impl='transformers'", adapter)
            elif impl != "transformers":
                raise ValueError(
                    f"hf-moe-routing: the routing adapter {adapter} needs model_impl='transformers' "
                    f"(--model-impl transformers); {impl!r} runs vLLM's own router, which ignores it."
                )
        return original(self, *args, **kwargs)

    post_init._hf_moe_routing = True
    ModelConfig.__post_init__ = post_init


def _hook_recursive_replace() -> None:
    """Patch the HF model before vLLM fuses its MoE blocks; reload the state after the weights."""
    from vllm.model_executor.models.transformers import moe as vllm_moe
    from vllm.model_executor.models.transformers.fusers import moe as fusers

    mixin = vllm_moe.MoEMixin
    original = mixin.recursive_replace
    if getattr(original, "_hf_moe_routing", False):
        return

    @functools.wraps(original)
    def recursive_replace(self):
        served_name = str(self.model_config.model)
        folder = find_adapter(served_name)
        if folder is None:
            if is_exported(served_name):
                logger.info(
                    "hf-moe-routing: %s is an exported routing checkpoint (native routing)", served_name
                )
            return original(self)
        served = apply_adapter(self.model, folder, served_name)
        self._hf_moe_routing = served
        _set_engine_top_k(self.text_config, served.slots)
        match = fusers.MoEBlockFuser.__dict__["match"]
        fusers.MoEBlockFuser.match = classmethod(lambda cls, *a, **k: None)  # keep the HF router
        try:
            original(self)
        finally:
            fusers.MoEBlockFuser.match = match
        _check_external_routing(self.model)
        hooked = install_dropped_slot_hooks(self.model, served, dropped_mode())
        logger.info(
            "hf-moe-routing: %s routing from %s on %d MoE layers (external routing%s)",
            served.config.routing_type,
            folder,
            len(served.states),
            f", dropped slots: {dropped_mode()}" if hooked else "",
        )

    recursive_replace._hf_moe_routing = True
    mixin.recursive_replace = recursive_replace

    if "load_weights" in mixin.__dict__:
        raise RuntimeError(
            f"hf-moe-routing: this vLLM's MoEMixin defines load_weights; the plugin supports vllm {supported_range()}."
        )

    def load_weights(self, weights):
        served = getattr(self, "_hf_moe_routing", None)
        if served is not None:  # vLLM reads every *.safetensors of the folder, the adapter's included
            adapter_keys = served.weight_keys()
            weights = ((name, tensor) for name, tensor in weights if name not in adapter_keys)
        loaded = super(mixin, self).load_weights(weights)  # the next class in the MRO (CausalMixin, ...)
        if served is not None:
            reload_states(self.model, served, self.device_config.device)
        return loaded

    mixin.load_weights = load_weights


def _set_engine_top_k(text_config, slots: int) -> None:
    """The fused experts' top-k (vLLM reads ``num_experts_per_tok`` or ``top_k``) = the routing's width."""
    for name in ("num_experts_per_tok", "top_k"):
        if getattr(text_config, name, None) is not None:
            setattr(text_config, name, slots)
            return


def _check_external_routing(model) -> None:
    """RuntimeError unless every patched router is still called by its block (vLLM did not fuse it)."""
    from ...patching import get_patch_state

    state = get_patch_state(model)
    for block in state.blocks:
        router = getattr(block.block, block.router_attr, None)
        if router is not block.router or not hasattr(router, "routing"):
            raise RuntimeError(
                f"hf-moe-routing: vLLM replaced the router of {block.name}; the routing adapter would not run. "
                f"This vLLM ({supported_range()} expected) fuses routers in a way the plugin does not handle."
            )


def _refuse_adapters_at_start(version: str) -> None:
    """Outside the supported range: stop any engine whose model folder holds an adapter."""
    try:
        from vllm.config.model import ModelConfig
    except ImportError:
        return
    original = ModelConfig.__post_init__

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        if find_adapter(self.model) is not None:
            check_vllm_version(version)
        return original(self, *args, **kwargs)

    ModelConfig.__post_init__ = post_init
