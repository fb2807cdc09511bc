"""Routing adapters: save/load (JSON + safetensors), one-call loading, Hub upload with model cards."""

from .adapter_io import (
    adapter_config_dict,
    adapter_state_dict,
    check_fingerprint,
    load_routing_adapter,
    read_adapter,
    read_adapter_config,
    read_adapter_weights,
    save_routing_adapter,
)
from .base_model import base_model_record, is_hub_id
from .download import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, resolve_adapter_folder
from .loading import AutoRoutedModelForCausalLM
from .model_card import (
    build_model_card,
    check_model_card,
    normalize_results,
    results_from_lm_eval,
    template_path,
)
from .output_dir import OutputDirBusyError, output_dir_lock
from .paths import safe_relative_path
from .push import push_to_hub, stage_adapter_files, upload_adapter_folder

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AutoRoutedModelForCausalLM",
    "OutputDirBusyError",
    "adapter_config_dict",
    "adapter_state_dict",
    "base_model_record",
    "build_model_card",
    "check_fingerprint",
    "check_model_card",
    "is_hub_id",
    "load_routing_adapter",
    "normalize_results",
    "output_dir_lock",
    "push_to_hub",
    "read_adapter",
    "read_adapter_config",
    "read_adapter_weights",
    "resolve_adapter_folder",
    "results_from_lm_eval",
    "safe_relative_path",
    "save_routing_adapter",
    "stage_adapter_files",
    "template_path",
    "upload_adapter_folder",
]
