"""Small MoE models built from scratch, and pre-trained reference models cached on disk.

:data:`MOE_SHAPES` are CPU-sized shapes of real families (the shapes the BIP comparison and Ada-K
benchmarks use); :func:`build_moe_model` makes a randomly initialised one. :func:`reference_model` returns a
small MoE *pre-trained on real text* (the ``pretrain`` evidence split: tinyshakespeare + 3/4 of WikiText-2
valid, see :mod:`hf_moe_routing.data.splits`; the project's own BPE tokenizer), whose routing means something;
it is built once per machine and cached as safetensors under ``~/.cache/hf_moe_routing/reference/<name>``
(the cache root is ``$HF_MOE_ROUTING_CACHE`` if set). Builds are deterministic (fixed threads, deterministic
algorithms) and record a SHA-256 of the weights, bit-reproducible for one torch version and thread count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from ..core.config import read_json
from ..data import pack_dataset, train_tokenizer
from ..data.splits import evidence_splits
from ..patching import is_patched, unpatch_model
from .pretrain import PretrainConfig, pretrain
from .provenance import (  # noqa: F401 - re-exported: reproduce.py and the tests import them from here
    RECORDED_HASHES_FILE,
    ReferenceHashMismatch,
    build_key,
    check_build_hash,
    package_versions,
    recorded_hash,
    weights_sha256,
)

#: Environment variable: root of the cache (default ``~/.cache/hf_moe_routing``).
CACHE_ENV = "HF_MOE_ROUTING_CACHE"

_BASE: dict[str, Any] = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MLA = dict(  # DeepSeek multi-head latent attention, scaled down
    num_key_value_heads=4,
    kv_lora_rank=32,
    q_lora_rank=64,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=32,
)

#: shape name -> (transformers model type, config overrides on top of a 4-layer, hidden-128 base)
MOE_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    # the BIP comparison (arXiv 2502.15451 scaled down): Mixtral-style 16 experts top-2
    "mixtral-16x2": ("mixtral", dict(intermediate_size=128, num_local_experts=16, num_experts_per_tok=2)),
    # ... and DeepSeek-V3-style 64 experts top-6, sigmoid router, group-limited, one shared expert
    "deepseek-v3-64x6": (
        "deepseek_v3",
        dict(
            intermediate_size=256,
            moe_intermediate_size=32,
            n_routed_experts=64,
            num_experts_per_tok=6,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=8,
            topk_group=4,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            **_MLA,
        ),
    ),
    # reference models (Ada-K experiments): Mixtral-style 8 experts top-2
    "mixtral-8x2": ("mixtral", dict(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2)),
    # Qwen1.5-MoE-style: more, finer experts (16 top-4) plus an always-on shared expert
    "qwen-moe": (
        "qwen2_moe",
        dict(
            intermediate_size=256,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=False,
        ),
    ),
    # the smallest reference shape (evidence runs on a shared CPU, the rebuild-hash test): Qwen-MoE-style,
    # 2 layers, hidden 64, 8 experts (FFN 32) top-4 plus a shared expert (FFN 64)
    "tiny-moe": (
        "qwen2_moe",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=False,
        ),
    ),
    # a larger Mixtral-style reference model: 6 layers, hidden 256, 8 experts (FFN 512) top-2
    "mixtral-8x2-large": (
        "mixtral",
        dict(
            hidden_size=256,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=512,
            num_local_experts=8,
            num_experts_per_tok=2,
        ),
    ),
}


def moe_config(shape: str, vocab_size: int, **overrides: Any) -> PretrainedConfig:
    """The transformers config of a :data:`MOE_SHAPES` shape for a tokenizer of ``vocab_size``."""
    if shape not in MOE_SHAPES:
        raise ValueError(f"Unknown MoE shape {shape!r}; known shapes: {', '.join(MOE_SHAPES)}.")
    model_type, shape_overrides = MOE_SHAPES[shape]
    config = AutoConfig.for_model(
        model_type, **{**_BASE, **shape_overrides, "vocab_size": vocab_size, **overrides}
    )
    config._attn_implementation = "sdpa"
    return config


def build_moe_model(shape: str, vocab_size: int, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised causal LM of a :data:`MOE_SHAPES` shape (float32, train mode)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(moe_config(shape, vocab_size, **overrides), dtype=torch.float32)


@dataclasses.dataclass(frozen=True)
class ReferenceSpec:
    """How a reference model is built.

    Defaults: 300 steps of 16 x 128 tokens (~0.8 epoch of the 768k training tokens): ~15 minutes per model
    measured on 2 CPU cores shared with other jobs (1 torch thread, nice 5), see ``build_info.json``.
    """

    shape: str
    max_steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    vocab_size: int = 2048
    seed: int = 0
    eval_every: int = 0  # also evaluate on the validation split every n steps (0: only at the end)
    threads: int = (
        1  # torch threads of the build: the weights are bit-reproducible per torch version and threads
    )


#: reference model name -> how it is built
REFERENCE_MODELS: dict[str, ReferenceSpec] = {
    "mixtral-8x2": ReferenceSpec("mixtral-8x2"),
    "qwen-moe": ReferenceSpec("qwen-moe"),
    # 900 steps of 16 x 256 tokens (~4.8 epochs) with the same 2048-token tokenizer, so its held-out
    # perplexity compares with the small models'; the mid-training evaluation is in pretrain_log.json
    "mixtral-8x2-large": ReferenceSpec(
        "mixtral-8x2-large", max_steps=900, seq_len=256, learning_rate=2e-3, eval_every=450
    ),
    # ~1 CPU-minute: 400 steps of 16 x 128 tokens (~0.85 epoch, like the small models), 1024-token tokenizer
    "tiny-moe": ReferenceSpec("tiny-moe", max_steps=400, vocab_size=1024),
}
#: what the builds train on and report: the evidence splits (``hf_moe_routing.data.splits``)
_TRAIN_SPLIT = "pretrain"
_HELDOUT_SPLIT = "validation"
_INFO_FILE = "build_info.json"


#: recorded SHA-256 of reference builds: {"<name>[-seed<N>]": {"torch <version>, <threads> threads": hash}}
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$HF_MOE_ROUTING_CACHE``, else ``~/.cache/hf_moe_routing``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "hf_moe_routing"


def reference_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the cached reference model ``name`` (``<cache root>/reference/<name>``)."""
    _spec(name)
    return cache_root(cache_dir) / "reference" / name


def _spec(name: str) -> ReferenceSpec:
    """The spec of ``name``; ``"<name>-seed<N>"`` is the same build pre-trained with seed N (another base)."""
    base, _, seed = name.rpartition("-seed")
    if base in REFERENCE_MODELS and seed.isdigit():
        return dataclasses.replace(REFERENCE_MODELS[base], seed=int(seed))
    if name not in REFERENCE_MODELS:
        raise ValueError(
            f"Unknown reference model {name!r}; known: {', '.join(REFERENCE_MODELS)} (append -seed<N> for "
            "another pre-training seed, e.g. 'tiny-moe-seed1')."
        )
    return REFERENCE_MODELS[name]


def reference_model(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A small pre-trained MoE and its tokenizer, built on first use and then loaded from the cache.

    Args:
        name: ``"mixtral-8x2"`` (Mixtral-style, 8 experts top-2), ``"qwen-moe"`` (Qwen1.5-MoE-style,
            16 experts top-4 plus a shared expert) or ``"mixtral-8x2-large"`` (Mixtral-style, 6 layers,
            hidden 256, trained ~4.8 epochs); see :data:`REFERENCE_MODELS`.
        cache_dir: cache root (default ``$HF_MOE_ROUTING_CACHE`` or ``~/.cache/hf_moe_routing``).
        data_dir: folder of the training text (default: see :func:`hf_moe_routing.data.data_dir`).
        rebuild: build again even if cached.
        max_steps: override the number of training steps (for a quick, lower-quality build).

    The model is returned unpatched, in eval mode. ``<folder>/build_info.json`` records how it was built,
    the build time, the weights' SHA-256 and the perplexity on the validation split.
    """
    folder = reference_path(name, cache_dir)
    if rebuild or not (folder / _INFO_FILE).is_file():
        build_reference_model(name, cache_dir, data_dir=data_dir, max_steps=max_steps, progress=progress)
    return load_reference_model(folder)


def load_reference_model(folder: str | os.PathLike) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a built reference model folder (safetensors only)."""
    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def reference_info(name: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The ``build_info.json`` of a cached reference model, or None if it is not built."""
    path = reference_path(name, cache_dir) / _INFO_FILE
    return read_json(path, "Reference model build info") if path.is_file() else None


def build_reference_model(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> Path:
    """Train the reference model ``name`` from scratch and write it (atomically) to its cache folder."""
    spec = _spec(name)
    if max_steps is not None:
        spec = dataclasses.replace(spec, max_steps=max_steps)
    folder = reference_path(name, cache_dir)
    start = time.perf_counter()
    splits = evidence_splits(data_dir)
    train_texts = getattr(splits, _TRAIN_SPLIT)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(spec.threads)
    torch.use_deterministic_algorithms(True)
    try:
        tokenizer = train_tokenizer(
            train_texts, spec.vocab_size, model_max_length=_BASE["max_position_embeddings"]
        )
        train = pack_dataset(train_texts, tokenizer, spec.seq_len)
        heldout = pack_dataset(getattr(splits, _HELDOUT_SPLIT), tokenizer, spec.seq_len)
        model = build_moe_model(spec.shape, len(tokenizer), seed=spec.seed)
        config = PretrainConfig(
            max_steps=spec.max_steps,
            batch_size=spec.batch_size,
            learning_rate=spec.learning_rate,
            warmup_steps=min(30, spec.max_steps // 10),
            seed=spec.seed,
            eval_every=spec.eval_every,
            eval_batch_size=32,
            progress=progress,
        )
        result = pretrain(model, None, train, heldout, config)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    if is_patched(model):
        unpatch_model(model)
    versions = package_versions()
    info = {
        "name": name,
        "spec": dataclasses.asdict(spec),
        "train_split": f"evidence_splits().{_TRAIN_SPLIT} (tinyshakespeare + 3/4 of WikiText-2 valid)",
        "train_tokens": int(train[:]["attention_mask"].sum()),
        "heldout_split": f"evidence_splits().{_HELDOUT_SPLIT} (the last 1/4 of WikiText-2 valid)",
        "validation_perplexity": result.val_perplexity,
        "final_train_loss": result.loss[-1],
        "num_parameters": result.num_parameters,
        "weights_sha256": weights_sha256(model),
        "build_key": build_key(versions["torch"] or torch.__version__, spec.threads),
        "recorded_sha256": recorded_hash(name, versions["torch"] or torch.__version__, spec.threads),
        "split_sha256": splits.fingerprint(),
        "packages": versions,
        "build_seconds": time.perf_counter() - start,
        "train_seconds": result.total_time,
        "mean_step_seconds": result.mean_step_time,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": spec.threads,
            "deterministic_algorithms": True,
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "pretrain_log.json").write_text(json.dumps(result.to_dict()))
    (staging / _INFO_FILE).write_text(json.dumps(info, indent=2))
    if folder.exists():  # replaced only once the new build is complete
        old = folder.parent / f".{name}.old-{os.getpid()}"
        folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(folder)
    return folder
