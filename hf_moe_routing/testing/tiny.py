"""Tiny random models of every MoE causal-LM family of the installed transformers (no download).

:func:`tiny_config` builds a small config of any family: a hand-tuned one for the families the
package's other tests use (:data:`TINY_CONFIGS`), else the family's default config shrunk by
attribute name (hidden 64, 8 experts, top-2, vocab 128, a few layers that cover every distinct
per-layer type of the default) plus the few per-family fixes in :data:`FAMILY_OVERRIDES`.
:func:`tiny_model` builds it with spread-out router weights, random selection biases and per-expert
scales (so routing is far from uniform), and emulates ``from_pretrained(dtype=torch.bfloat16)`` for
bfloat16 (tensors the family keeps in float32 stay float32).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..families import describe_model, keep_fp32_pattern
from .catalog import causal_lm_class

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

#: Hand-tuned configs (on top of _COMMON) of the families the rest of the test suite uses.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        head_dim=16,
    ),
    "deepseek_v2": dict(
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=0,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        num_key_value_heads=4,
        qk_rope_head_dim=8,
        v_head_dim=16,
    ),
    "deepseek_v3": dict(
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        num_key_value_heads=4,
        v_head_dim=16,
        num_hidden_layers=3,
    ),
    "olmoe": dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "minimax": dict(
        intermediate_size=64,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        layer_types=["full_attention", "full_attention"],
    ),
}

REQUIRED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
GENERIC_FAMILIES = ("olmoe", "minimax")

#: Shrinking by attribute name: applied where the default config has a number there.
SHRINK: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "d_model"), 64),
    **dict.fromkeys(("num_attention_heads", "n_heads", "num_heads"), 4),
    "vocab_size": 128,
    "head_dim": 16,
    **dict.fromkeys(("intermediate_size", "ffn_hidden_size", "intermediate_size_mlp"), 96),
    **dict.fromkeys(("dense_intermediate_size", "prefix_dense_intermediate_size"), 96),
    **dict.fromkeys(("moe_intermediate_size", "expert_ffn_hidden_size"), 32),
    **dict.fromkeys(
        (
            "shared_expert_intermediate_size",
            "shared_intermediate_size",
            "moe_shared_expert_intermediate_size",
            "shared_experts_intermediate_size",
        ),
        48,
    ),
    **dict.fromkeys(("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts"), 8),
    **dict.fromkeys(
        ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts"), 2
    ),
    **dict(kv_lora_rank=16, q_lora_rank=24, o_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8),
    **dict(v_head_dim=16, index_head_dim=16, index_n_heads=2, index_topk=8, indexer_head_dim=16),
    **dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2),
    **dict(linear_num_value_heads=4, linear_head_dim=16, linear_num_heads=4),
    **dict(mamba_num_heads=8, mamba_head_dim=16, mamba_d_state=16, mamba_n_heads=8, mamba_d_head=16),
    **dict(mamba_dt_rank=8, mamba_expand=2, ssm_state_size=16),
    **dict(max_position_embeddings=256, sliding_window=16, attention_chunk_size=16),
    **dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=16, router_hidden_size=16),
    **dict(gated_norm_rank=4, loop_gate_rank=8, hc_lowrank=8),
}
#: Expert counts are set even where the default leaves them None.
_ALWAYS = (
    "n_routed_experts",
    "num_experts",
    "num_local_experts",
    "moe_num_experts",
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "moe_k",
    "top_k_experts",
    "moe_intermediate_size",
)
#: Per-family fixes where the shrunk default does not build, has no MoE layer or no attention layer.
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    "dbrx": {
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
    },
    "dots1": {"n_shared_experts": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "zaya": {"num_experts_per_tok": 1},  # ZAYA supports top-1 only
    "longcat_flash": {"zero_expert_num": 4},
    "qwen4_exp_text": {
        **dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16),
        **dict(indexer_budget=8, indexer_compress_ratio=4),
    },
    "gemma4_text": {"enable_moe_block": True, "global_head_dim": 32, "num_kv_shared_layers": 0},
    "doge": {"is_moe": True, "num_experts": 16},
    "dots3_note_text": {
        **dict(swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=24),
        **dict(swa_kv_lora_rank=16, swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=16),
    },
    "laguna": {"num_attention_heads_per_layer": [4, 4, 4, 4]},
    "jamba": {"attn_layer_period": 4, "attn_layer_offset": 2},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"] * 2},
}


def _value(config: PretrainedConfig, name: str) -> Any:
    try:
        return getattr(config, name)
    except Exception:  # noqa: BLE001 - per-layer or computed attributes may refuse global access
        return vars(config).get(name)


def _has(config: PretrainedConfig, name: str) -> bool:
    try:
        getattr(config, name)
    except AttributeError:
        return False
    except Exception:  # noqa: BLE001 - it exists, but refuses global access
        return True
    return True


def _cover_layers(lists: dict[str, list], num_layers: int, at_most: int = 6) -> list[int]:
    """The first layer of every distinct combination of per-layer settings, padded to 4 layers."""
    seen, chosen = set(), []
    for i in range(num_layers):
        key = tuple(str(lists[name][i]) for name in sorted(lists))
        if key not in seen:
            seen.add(key)
            chosen.append(i)
    chosen = chosen[:at_most]
    for i in range(num_layers):
        if len(chosen) >= 4:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def shrunk_config_kwargs(model_type: str) -> dict[str, Any]:
    """Config keyword arguments that shrink ``model_type``'s default config (see the module docstring)."""
    base = CONFIG_MAPPING[model_type]()
    kwargs: dict[str, Any] = {}
    for name, value in SHRINK.items():
        current = _value(base, name)
        if isinstance(current, (int, float)) and not isinstance(current, bool) and current:
            kwargs[name] = value
    if _has(base, "head_dim") and _value(base, "head_dim") is None:
        kwargs["head_dim"] = SHRINK["head_dim"]
    for name in _ALWAYS:
        if _has(base, name):
            kwargs.setdefault(name, SHRINK[name])
    for name, token in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        if isinstance(_value(base, name), int):
            kwargs[name] = token
    rope = _value(base, "qk_rope_head_dim")
    if isinstance(rope, int) and _value(base, "head_dim") == rope:
        kwargs["head_dim"] = SHRINK["qk_rope_head_dim"]
    kv_heads = _value(base, "num_key_value_heads")
    if isinstance(kv_heads, int):
        same = kv_heads == _value(base, "num_attention_heads")
        kwargs["num_key_value_heads"] = (
            1 if kv_heads == 1 else (kwargs.get("num_attention_heads", 4) if same else 2)
        )
    for name in ("n_group", "num_expert_group"):  # keep group-limited routing group-limited
        if isinstance(_value(base, name), int) and _value(base, name) > 1:
            kwargs.update({name: 4, "topk_group": 2})
    for name in ("first_k_dense_replace", "num_dense_layers"):
        if isinstance(_value(base, name), int) and _value(base, name) > 0:
            kwargs[name] = 1
    layers_attr = next((a for a in ("num_hidden_layers", "n_layers", "num_layers") if _has(base, a)), None)
    num_layers = _value(base, layers_attr) if layers_attr else None
    lists = {
        k: v
        for k, v in vars(base).items()
        if isinstance(v, list)
        and isinstance(num_layers, int)
        and len(v) == num_layers > 4
        and not k.startswith("_")
    }
    if lists:
        chosen = _cover_layers(lists, num_layers)
        kwargs[layers_attr] = len(chosen)
        kwargs.update({k: [v[i] for i in chosen] for k, v in lists.items()})
    elif layers_attr:
        kwargs[layers_attr] = 4
    if isinstance(_value(base, "mlp_only_layers"), list) and _value(base, "mlp_only_layers"):
        kwargs["mlp_only_layers"] = [0]
    kwargs.update(FAMILY_OVERRIDES.get(model_type, {}))
    return kwargs


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """A small config of ``family`` (a transformers model type) with eager attention.

    Raises ValueError if ``family`` is neither in :data:`TINY_CONFIGS` nor an MoE causal-LM family
    of the installed transformers.
    """
    if family in TINY_CONFIGS:
        base = {**_COMMON, **TINY_CONFIGS[family]}
    else:
        causal_lm_class(family)  # ValueError for a non-MoE family
        base = shrunk_config_kwargs(family)
    # an override wins over a base value of the same attribute under another name (num_experts vs
    # num_local_experts: the config's attribute_map)
    aliases = getattr(CONFIG_MAPPING[family], "attribute_map", {})
    overridden = {aliases.get(key, key) for key in overrides}
    kwargs = {k: v for k, v in base.items() if aliases.get(k, k) not in overridden} | overrides
    config = _build_within_validators(CONFIG_MAPPING[family], kwargs, fixed=set(overrides))
    config._attn_implementation = "eager"  # FlopCounterMode counts eager attention's matmuls
    return config


#: Values tried, largest first, for an integer setting that a config validator names.
_VALIDATOR_CANDIDATES = (64, 32, 16, 8, 4, 2, 1)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _build_within_validators(
    cls: type[PretrainedConfig], kwargs: dict[str, Any], fixed: set[str], rounds: int = 6
) -> PretrainedConfig:
    """``cls(**kwargs)``, adjusting settings that the config class's own validators reject.

    transformers' ``@strict`` configs check their constraints in validators (e.g. Kolibri 1.1:
    "`index_num_heads` must be between 1 and the number of query heads of key head 0"), which the
    shrinking by attribute name does not know. When the build fails, each integer setting that the
    error message names (other than ``fixed``, the caller's explicit overrides) is tried at its
    default value, then at the largest of :data:`_VALIDATOR_CANDIDATES` below its current value: the
    first value that builds, or that moves the failure to another constraint, is kept. At most
    ``rounds`` constraints are resolved; otherwise the original error is raised.
    """
    original: Exception | None = None
    for _ in range(rounds):
        try:
            return cls(**kwargs)
        except Exception as error:  # noqa: BLE001 - validators raise several error types
            original = original or error
            change = _satisfy(cls, kwargs, fixed, str(error))
            if change is None:
                raise original from None
            kwargs = {**kwargs, **change}
    raise original  # type: ignore[misc]


def _satisfy(cls: type[PretrainedConfig], kwargs: dict[str, Any], fixed: set[str], message: str):
    """One change ``{name: value}`` of a setting named in ``message`` that gets past that failure, or None."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    for name in dict.fromkeys(_WORD.findall(message)):
        current = kwargs.get(name, defaults.get(name))
        if name in fixed or not isinstance(current, int) or isinstance(current, bool):
            continue
        default = defaults.get(name)
        tries = [default] if isinstance(default, int) and default != current else []
        tries += [c for c in _VALIDATOR_CANDIDATES if c < current]
        for value in tries:
            try:
                cls(**{**kwargs, name: value})
            except Exception as error:  # noqa: BLE001
                if str(error) == message:
                    continue
            return {name: value}
    return None


def tiny_model(
    family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of ``family`` in eval mode.

    Router weights are drawn with a larger spread than the default init, selection biases and
    per-expert scales at random, so that routing scores differ clearly between experts (as in
    trained models). ``dtype=torch.bfloat16`` gives what ``from_pretrained(..., dtype=torch.bfloat16)``
    of the float32 model would (tensors the family keeps in float32 stay float32).
    """
    config = tiny_config(family, **overrides)
    cls = causal_lm_class(family) if family not in TINY_CONFIGS else None
    torch.manual_seed(seed)
    model = cls(config) if cls is not None else _auto_model(config)
    spread_router_weights(model, seed=seed)
    if dtype != torch.float32:
        model = _as_checkpoint_in(model, dtype)
    return model.eval()


def _auto_model(config: PretrainedConfig) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def _as_checkpoint_in(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The float32 ``model`` as ``from_pretrained(dtype=dtype)`` of its checkpoint would load it."""
    converted = type(model)._from_config(model.config, dtype=dtype)
    keep = keep_fp32_pattern(converted)
    for name, tensor in converted.state_dict(keep_vars=True).items():
        if tensor.is_floating_point() and keep is not None and keep.search(name):
            tensor.data = tensor.data.float()
    converted.load_state_dict(model.state_dict())
    return converted


def spread_router_weights(model: nn.Module, std: float = 0.5, seed: int = 0) -> nn.Module:
    """Draw every router weight from N(0, std^2), selection biases from U(0, 0.2) and per-expert
    scales from U(0.5, 1.5) (a freshly initialised router scores experts alike).

    Models whose routers the package refuses are left as they are.
    """
    try:
        blocks = describe_model(model, verify=False).blocks
    except (TypeError, ValueError):
        return model
    generator = torch.Generator().manual_seed(seed + 1234)
    with torch.no_grad():
        for block in blocks:
            block.spec.weight(block.router).normal_(0.0, std)
            if block.spec.selection_bias is not None:
                bias = block.spec.selection_bias.get()
                bias.copy_(torch.rand(bias.shape, generator=generator) * 0.2)
            if block.spec.expert_scale is not None:
                scale = block.spec.expert_scale.get()
                scale.copy_(0.5 + torch.rand(scale.shape, generator=generator))
    return model
