"""Integrations with other tools of the Hugging Face ecosystem.

``lm_eval``: the ``hf-moe-routing`` model type of the LM Evaluation Harness (see
:mod:`hf_moe_routing.integrations.lm_eval`). ``import hf_moe_routing`` registers it when lm-eval is
installed (the optional extra ``eval``): importing this module registers it; the model class itself is
imported only when lm-eval asks for it.
"""

from __future__ import annotations

import importlib.util
import warnings

#: The name of our model type in lm-eval (``--model hf-moe-routing``).
LM_EVAL_MODEL_NAME = "hf-moe-routing"
_LM_EVAL_TARGET = "hf_moe_routing.integrations.lm_eval.model:HFMoERoutingLM"


def register_lm_eval() -> bool:
    """Register ``hf-moe-routing`` with lm-eval's model registry, lazily; False if lm-eval is not installed.

    Only a placeholder (``"module:Class"``) is registered, so this costs the import of lm-eval's registry
    (a few milliseconds), not of torch-heavy model code. lm-eval's own models are registered first: its
    ``get_model`` only imports them while the registry is empty.
    """
    if importlib.util.find_spec("lm_eval") is None:
        return False
    try:
        import lm_eval.models  # noqa: F401  (registers lm-eval's own placeholders: hf, vllm, ...)
        from lm_eval.api.registry import model_registry
    except (ImportError, AttributeError) as error:  # a broken optional extra must not break this package
        warnings.warn(
            f"lm-eval is installed but cannot be imported ({error}); --model {LM_EVAL_MODEL_NAME} is not "
            "registered. Reinstall it with pip install 'hf-moe-routing[eval]'.",
            stacklevel=2,
        )
        return False

    if LM_EVAL_MODEL_NAME not in model_registry:
        model_registry.register(LM_EVAL_MODEL_NAME, target=_LM_EVAL_TARGET)
    return True


register_lm_eval()

__all__ = ["LM_EVAL_MODEL_NAME", "register_lm_eval"]
