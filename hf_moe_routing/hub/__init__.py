"""Routing adapters: save/load (JSON + safetensors), one-call loading, Hub upload with model cards."""

from .adapter_io import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_config_dict,
    adapter_state_dict,
    check_fingerprint,
    load_routing_adapter,
    read_adapter_config,
    read_adapter_weights,
    resolve_adapter_folder,
    save_routing_adapter,
)
from .loading import AutoRoutedModelForCausalLM
from .model_card import (
    build_model_card,
    check_model_card,
    normalize_results,
    results_from_lm_eval,
    template_path,
)
from .push import push_to_hub, upload_adapter_folder

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AutoRoutedModelForCausalLM",
    "adapter_config_dict",
    "adapter_state_dict",
    "build_model_card",
    "check_fingerprint",
    "check_model_card",
    "load_routing_adapter",
    "normalize_results",
    "push_to_hub",
    "read_adapter_config",
    "read_adapter_weights",
    "resolve_adapter_folder",
    "results_from_lm_eval",
    "save_routing_adapter",
    "template_path",
    "upload_adapter_folder",
]
