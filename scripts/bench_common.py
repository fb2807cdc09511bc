"""Shared pieces of the benchmark scripts: timing, time budgets, peak memory, real MoE layer shapes.

Timing (:func:`measure`) interleaves the cases round by round, so that machine load drifts hit every
case alike, after untimed warm-up calls; callers report medians. On CUDA each call is timed with
``torch.cuda.Event`` pairs and a synchronize; on CPU with process CPU time (``"cpu"``, robust to
other jobs on a shared machine when torch uses one thread) or wall time (``"wall"``).

:data:`REAL_SHAPES` holds the MoE dimensions of public checkpoints, copied from their ``config.json``
(the transformers defaults of these model types are the same models, except gpt-oss whose defaults
are the 120b model). :func:`build_model` builds a stack of such layers with random weights directly
on the target device, and ``tiny=True`` gives a small model of the same type for CPU smoke runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel


@dataclass
class Deadline:
    """A time budget in seconds (None: unlimited), counted from construction."""

    seconds: float | None
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.monotonic() - self.start)

    def passed(self) -> bool:
        return self.left() <= 0


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: str | torch.device, clock: str = "wall") -> float:
    """Seconds one call of ``fn`` takes: CUDA events on a GPU, else process CPU or wall time."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    timer = time.process_time if clock == "cpu" else time.perf_counter
    begin = timer()
    fn()
    return timer() - begin


def measure(
    cases: dict[str, Callable[[], Any]],
    *,
    device: str | torch.device,
    repeats: int = 5,
    warmup: int = 1,
    clock: str = "wall",
    deadline: Deadline | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every case, ``repeats`` interleaved rounds after ``warmup`` rounds.

    Stops early (after at least one timed round) when ``deadline`` has passed.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats):
        if round_ and deadline is not None and deadline.passed():
            break
        for name, fn in cases.items():
            times[name].append(time_call(fn, device, clock))
    return times


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def peak_memory_mb(fn: Callable[[], Any], device: str | torch.device) -> float | None:
    """Peak CUDA memory allocated during ``fn()`` in MiB (None on CPU: no per-call peak there)."""
    if torch.device(device).type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def environment(device: str | torch.device) -> dict[str, Any]:
    """Versions and device name, for the JSON of a benchmark run."""
    import transformers

    out: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if torch.device(device).type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    return out


# ---- real MoE layer shapes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """One public checkpoint's MoE layer: its model type, config values and a tiny stand-in."""

    model_type: str
    dims: dict[str, Any]  # the checkpoint's config.json values that shape a decoder layer
    tiny: dict[str, Any]  # a small config of the same type (CPU smoke runs)

    def config_kwargs(self, tiny: bool = False) -> dict[str, Any]:
        return dict(self.tiny if tiny else self.dims)


_TINY_ATTENTION = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)

REAL_SHAPES: dict[str, LayerShape] = {
    "qwen1.5-moe-a2.7b": LayerShape(
        "qwen2_moe",
        dict(
            hidden_size=2048,
            num_experts=60,
            num_experts_per_tok=4,
            moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632,
            intermediate_size=5632,
            norm_topk_prob=False,
            num_attention_heads=16,
            num_key_value_heads=16,
        ),
        dict(
            _TINY_ATTENTION,
            num_experts=8,
            num_experts_per_tok=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            intermediate_size=64,
            norm_topk_prob=False,
        ),
    ),
    "mixtral-8x7b": LayerShape(
        "mixtral",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_attention_heads=32,
            num_key_value_heads=8,
        ),
        dict(_TINY_ATTENTION, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
    ),
    "deepseek-v3": LayerShape(
        "deepseek_v3",
        dict(
            hidden_size=7168,
            moe_intermediate_size=2048,
            intermediate_size=18432,
            n_routed_experts=256,
            n_shared_experts=1,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            num_attention_heads=128,
            num_key_value_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            first_k_dense_replace=0,  # every layer of the stack is an MoE layer
        ),
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=4,
            moe_intermediate_size=32,
            intermediate_size=128,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=16,
            first_k_dense_replace=0,
        ),
    ),
    "gpt-oss-20b": LayerShape(
        "gpt_oss",
        dict(
            hidden_size=2880,
            intermediate_size=2880,
            num_local_experts=32,
            num_experts_per_tok=4,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            swiglu_limit=7.0,
            sliding_window=128,
        ),
        dict(
            _TINY_ATTENTION,
            head_dim=16,
            intermediate_size=64,
            num_local_experts=8,
            num_experts_per_tok=4,
            sliding_window=8,
        ),
    ),
}


def build_model(
    shape: str | LayerShape,
    *,
    layers: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    tiny: bool = False,
    vocab_size: int = 512,
    seed: int = 0,
) -> PreTrainedModel:
    """A causal LM of ``layers`` decoder layers of ``shape`` (a :data:`REAL_SHAPES` name), random weights.

    The weights are created on ``device`` directly (a DeepSeek-V3 MoE layer holds 11.3e9 expert
    weights: 22.6 GB in bfloat16). The vocabulary is small (``vocab_size``) so that the decoder
    layers, not the LM head, dominate the time.
    """
    spec = REAL_SHAPES[shape] if isinstance(shape, str) else shape
    kwargs = spec.config_kwargs(tiny)
    if spec.model_type == "gpt_oss":
        kwargs["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + [
            "sliding_attention"
        ] * (layers % 2)
    config = AutoConfig.for_model(
        spec.model_type,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        **kwargs,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_ids(batch: int, seq_len: int, vocab_size: int, device: str | torch.device, seed: int = 0):
    """(batch, seq_len) random token ids and an all-ones attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq_len), generator=generator)
    return ids.to(device), torch.ones_like(ids).to(device)
