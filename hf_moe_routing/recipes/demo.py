"""The whole user path in one call: ``hf-moe-routing demo`` / :func:`run_demo`.

Offline by default (no download, no file from outside the package)::

    1. data      a generated language (hf_moe_routing.data.synthetic) mixing trivially predictable words
                 with words that need computation, and its word-level tokenizer
    2. model     a small Mixtral-style MoE, pre-trained briefly on it (Top-K routing)
    3. BIP       BIP balancing patched into the pre-trained model: q calibrated on training batches,
                 then balance and perplexity against Top-K on held-out text; routing adapter saved
    4. Ada-K     allocators warm-started (Skip-Warm at 75% of top-k) and trained with PPO on the frozen
                 model; evaluated against Top-K (perplexity, activated experts, FLOPs); routing adapter saved
    5. report    where the experts go (mean k per word class), plots, report.json, model cards

With ``model=`` and ``dataset=`` the same path runs on a Hub (or local) MoE checkpoint and text dataset,
without the pre-training step. Every step is a small function below; :func:`run_demo` chains them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import write_json
from ..data import load_text_dataset, pack_dataset, synthetic_corpus, synthetic_tokenizer
from ..evaluation.evaluate import evaluate_routing
from ..hub import save_routing_adapter
from ..hub.json_values import to_json
from ..hub.output_dir import LOCK_FILES, output_dir_lock
from ..methods import BIPConfig, TopKConfig
from ..patching import describe, fit_routing, get_patch_state, patch_model, unpatch_model
from ..training.pretrain import PretrainConfig, PretrainResult, pretrain
from ..training.reference import build_moe_model
from .demo_config import ADAK_BUDGET, DEFAULT_OUTPUT, SIZES, DemoConfig, DemoSize
from .demo_report import experts_by_word_class, format_report
from .plots import write_demo_plots


@dataclasses.dataclass
class DemoData:
    """The demo's tokenizer and packed train / evaluation datasets (``synthetic``: no real text found)."""

    tokenizer: Any
    train: Any
    eval: Any
    synthetic: bool


# ---- step 0: the output folder -----------------------------------------------------------------
def prepare_output(output_dir: str | os.PathLike | None, overwrite: bool = False) -> Path:
    """The output folder: ``output_dir`` (refused if it exists, unless ``overwrite``) or a new folder
    ``hf-moe-routing-demo[-N]`` in the working directory. Nothing is ever deleted; with ``overwrite`` the
    demo's own files in the folder are replaced."""
    if output_dir is None:
        base = Path.cwd() / DEFAULT_OUTPUT
        path, n = base, 1
        while True:  # mkdir without exist_ok: two demos started at once get two folders
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                path = base.with_name(f"{DEFAULT_OUTPUT}-{n}")
    else:
        path = Path(output_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder: choose another --output-dir.")
        if path.exists() and any(p.name not in LOCK_FILES for p in path.iterdir()) and not overwrite:
            raise FileExistsError(
                f"Output folder {path} already exists and is not empty: pass --overwrite to write into it "
                "(the demo's files are replaced, nothing else is touched) or choose another --output-dir."
            )
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- step 1: data ------------------------------------------------------------------------------
def synthetic_data(size: DemoSize, seq_len: int, seed: int = 0) -> DemoData:
    """The generated language, packed into training and held-out rows (different seeds)."""
    tokenizer = synthetic_tokenizer(model_max_length=max(seq_len, 64))
    train = pack_dataset(synthetic_corpus(size.num_texts, 8, seed=seed), tokenizer, seq_len)
    held_out_texts = max(2, size.eval_rows * seq_len // 50)
    eval_rows = pack_dataset(synthetic_corpus(held_out_texts, 8, seed=seed + 10_000), tokenizer, seq_len)
    eval_rows = eval_rows.select(range(min(size.eval_rows, len(eval_rows))))
    return DemoData(tokenizer, train, eval_rows, synthetic=True)


def hub_data(config: DemoConfig, tokenizer: Any, size: DemoSize, seq_len: int) -> DemoData:
    """A text dataset (Hub id, local files or corpus name) packed with the model's tokenizer and split
    into training rows and held-out rows (the last ~10%, at most ``size.eval_rows``)."""
    dataset = load_text_dataset(
        config.dataset, config.split, config.text_field, config_name=config.dataset_config
    )
    packed = pack_dataset(dataset, tokenizer, seq_len, text_field=config.text_field)
    if len(packed) < 2:
        raise ValueError(
            f"Dataset {config.dataset!r} packs into {len(packed)} row(s) of {seq_len} tokens: the demo needs "
            "at least 2 (one to train on, one held out). Use a larger dataset or a smaller --seq-len."
        )
    n_eval = max(1, min(size.eval_rows, len(packed) // 10))
    train = packed.select(range(len(packed) - n_eval))
    return DemoData(
        tokenizer, train, packed.select(range(len(packed) - n_eval, len(packed))), synthetic=False
    )


# ---- step 2: the model -------------------------------------------------------------------------
def build_demo_model(size: DemoSize, vocab_size: int, seq_len: int, seed: int = 0) -> nn.Module:
    """A small Mixtral-style MoE (8 experts, top-2) sized by ``size``."""
    return build_moe_model(
        "mixtral-8x2",
        vocab_size,
        seed=seed,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        intermediate_size=size.expert_intermediate,
        max_position_embeddings=max(seq_len, 64),
    )


def load_hub_model(model_id: str, device_map: str | None = None) -> tuple[nn.Module, Any]:
    """A MoE causal LM and its tokenizer from the Hub or a local folder.

    On GPUs: native dtype, spread over the visible GPUs with ``device_map`` (default ``"auto"``); on
    CPU: float32 (``device_map`` is used if given).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": "auto", "device_map": "auto"} if cuda else {"dtype": torch.float32}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except OSError as error:
        raise OSError(
            f"Could not load {model_id!r}: {error}. Check the id, your network connection and your Hugging "
            "Face token (HF_TOKEN / `hf auth login`)."
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def pretrain_demo_model(model: nn.Module, data: DemoData, size: DemoSize, progress: bool) -> PretrainResult:
    """Brief pre-training with the model's own Top-K routing; the model is returned unpatched."""
    config = PretrainConfig(
        max_steps=size.pretrain_steps,
        batch_size=size.batch_size,
        learning_rate=3e-3,
        warmup_steps=min(20, size.pretrain_steps // 5),
        eval_batch_size=16,
        progress=progress,
    )
    result = pretrain(model, TopKConfig(), data.train, data.eval, config)
    unpatch_model(model)
    return result


# ---- step 3: BIP -------------------------------------------------------------------------------
def calibrate_bip(
    model: nn.Module, data: DemoData, size: DemoSize, config: BIPConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Patch ``model`` with BIP and fit its prices q on training batches (no weight changes).

    Uses :func:`~hf_moe_routing.fit_routing` (the model stays in eval mode, no gradients); returns
    its summary (batches, tokens, per-layer rounds and overload of the last solve).
    """
    patch_model(model, config or BIPConfig(), replace=True)
    return fit_routing(
        model, data.train, batch_size=size.batch_size, max_batches=size.bip_batches, progress=progress
    )


# ---- step 4: Ada-K -----------------------------------------------------------------------------
def train_adak(
    model: nn.Module,
    data: DemoData,
    size: DemoSize,
    output_dir: Path,
    k_penalty: float,
    seed: int,
    progress: bool,
    overwrite: bool = False,
) -> Any:
    """Warm-start and PPO-train Ada-K allocators on the frozen ``model`` (patched with AdaKConfig)."""
    from ..methods.adak import AdaKConfig
    from ..training.adak import AdaKTrainer, AdaKTrainingConfig

    if get_patch_state(model) is not None:
        unpatch_model(model)
    fields = {f.name for f in dataclasses.fields(AdaKTrainingConfig)}
    top_k = describe(model).shape.top_k
    settings: dict[str, Any] = {  # our defaults (Skip-Warm start, counterfactual baseline) at a budget
        "output_dir": str(output_dir),
        "overwrite_output_dir": overwrite,
        "target_experts": ADAK_BUDGET * top_k,
        "warmup_steps": size.warmup_steps,
        "max_steps": size.ppo_steps,
        "batch_size": size.batch_size,
        "k_penalty": k_penalty,
        "seed": seed,
        "eval_batches": None,
        "logging_steps": max(1, (size.warmup_steps + size.ppo_steps) // 4),  # a few log lines
    }
    if not progress:  # quiet: no bar, no log lines
        settings["progress_bar"] = False
        settings.update({"log_level": "warning"} if "log_level" in fields else {"logging_steps": 0})
    config = AdaKTrainingConfig(**settings)
    trainer = AdaKTrainer(model, config, data.train, None, tokenizer=data.tokenizer, adak_config=AdaKConfig())
    trainer.train()
    return trainer


def _evaluation(model: nn.Module, data: DemoData, size: DemoSize, progress: bool) -> dict[str, Any]:
    return evaluate_routing(
        model, data.eval, batch_size=size.batch_size, topk_reference=True, progress=progress
    )


# ---- the pipeline ------------------------------------------------------------------------------
def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = fn()
    timings[name] = round(time.perf_counter() - start, 2)
    return value


def _balance_summary(ev: dict[str, Any], fit: dict[str, Any]) -> dict[str, Any]:
    return {
        "perplexity": ev["perplexity"],
        "topk_perplexity": ev["topk"]["perplexity"],
        "avg_max_vio": ev["avg_max_vio"],
        "topk_avg_max_vio": ev["topk"]["avg_max_vio"],
        "max_vio_per_layer": ev["max_vio_per_layer"],
        "topk_max_vio_per_layer": ev["topk"]["max_vio_per_layer"],
        "fit_batches": fit["batches"],
        "fit_tokens": fit["tokens"],
    }


def run_demo(config: DemoConfig | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole path (see the module docstring); returns the report (also in ``report.json``)."""
    config = config or DemoConfig()
    out = prepare_output(config.output_dir, config.overwrite) if config.output_dir is None else None
    with output_dir_lock(
        out or config.output_dir, created=out is not None
    ) as folder:  # one writer; no empty folder left on failure
        return _run_demo(config, out or prepare_output(folder, config.overwrite), log)


def _run_demo(config: DemoConfig, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    size = SIZES[config.size]
    log(f"hf-moe-routing demo -> {out}")
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    # 1-2. data and model
    pretrain_result = None
    if config.model is None:
        seq_len = config.seq_len or size.seq_len
        data = _timed(timings, "data", lambda: synthetic_data(size, seq_len, config.seed))
        model = build_demo_model(size, len(data.tokenizer), seq_len, config.seed)
        log(
            f"[1/4] pre-training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter MoE "
            f"(8 experts, top-2) on {len(data.train)} x {seq_len} synthetic tokens"
        )
        pretrain_result = _timed(
            timings, "pretrain", lambda: pretrain_demo_model(model, data, size, config.progress)
        )
        model.save_pretrained(out / "base-model")
        data.tokenizer.save_pretrained(out / "base-model")
        base_model_id = str(out / "base-model")
    else:
        seq_len = config.seq_len or 256
        model, tokenizer = _timed(
            timings, "load_model", lambda: load_hub_model(config.model, config.device_map)
        )
        data = _timed(timings, "data", lambda: hub_data(config, tokenizer, size, seq_len))
        log(f"[1/4] loaded {config.model} and {len(data.train)} x {seq_len} tokens of {config.dataset}")
        base_model_id = config.model

    dataset_name = f"{config.dataset}:{config.split}" if config.dataset else "synthetic language (held out)"

    # 3. BIP
    log("[2/4] balancing with BIP")
    fit = _timed(timings, "bip", lambda: calibrate_bip(model, data, size, progress=config.progress))
    bip_eval = _timed(timings, "bip_eval", lambda: _evaluation(model, data, size, config.progress))
    bip = _balance_summary(bip_eval, fit)
    save_routing_adapter(
        model,
        out / "bip-adapter",
        base_model_id=base_model_id,
        training_info={
            "method": "BIP q fitted with fit_routing on training batches",
            "batches": fit["batches"],
        },
        results={
            dataset_name: {
                "perplexity": bip["perplexity"],
                "perplexity_topk": bip["topk_perplexity"],
                "avg_max_vio": bip["avg_max_vio"],
                "avg_max_vio_topk": bip["topk_avg_max_vio"],
            }
        },
    )

    # 4. Ada-K
    log("[3/4] training Ada-K allocators (Skip-Warm at 75% of top-k, then PPO) on the frozen model")
    trainer = _timed(
        timings,
        "adak",
        lambda: train_adak(
            model,
            data,
            size,
            out / "adak-training",
            config.k_penalty,
            config.seed,
            config.progress,
            config.overwrite,
        ),
    )
    adak_eval = _timed(timings, "adak_eval", lambda: _evaluation(model, data, size, config.progress))
    adak = {
        "perplexity": adak_eval["perplexity"],
        "topk_perplexity": adak_eval["topk"]["perplexity"],
        "perplexity_change": adak_eval["perplexity_change"],
        "mean_activated": adak_eval["mean_activated"],
        "top_k": adak_eval["top_k"],
        "activation_reduction": adak_eval["activation_reduction"],
        "flops_reduction": adak_eval["flops_reduction"],
        "routed_flops_reduction": adak_eval["routed_flops_reduction"],
        "activated_per_layer": adak_eval["activated_per_layer"],
        "warmup_p": trainer.state.warmup_p,
    }
    report: dict[str, Any] = {
        "output_dir": str(out),
        "base_model": base_model_id,
        "dataset": dataset_name,
        "size": config.size,
        "seq_len": seq_len,
        "pretrain": pretrain_result.summary() if pretrain_result is not None else None,
        "bip": bip,
        "adak": adak,
        "experts_by_word_class": experts_by_word_class(model, data, size.batch_size)
        if data.synthetic
        else None,
    }
    trainer.save_adapter(
        out / "adak-adapter",
        base_model_id=base_model_id,
        results={
            dataset_name: {
                "perplexity": adak["perplexity"],
                "mean_activated_experts": adak["mean_activated"],
                "flops_reduction": adak["flops_reduction"],
            }
        },
    )

    # 5. report
    log("[4/4] writing the report")
    report["plots"] = write_demo_plots(out, report, pretrain_result) if config.plot else []
    timings["total"] = round(time.perf_counter() - start, 2)
    report["timings_s"] = timings
    write_json(out / "report.json", to_json(report, "report"))
    log(format_report(report))
    return report
