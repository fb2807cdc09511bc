"""Pre-train small MoE models from scratch under each balancing method and compare load balance.

The BIP paper's comparison (arXiv 2502.15451, Sun 2025), scaled down to CPU: two shapes from
``hf_moe_routing.training.reference.MOE_SHAPES``,

* ``mixtral-16x2``: Mixtral-style, 16 experts, top-2, softmax router,
* ``deepseek-v3-64x6``: DeepSeek-V3-style, 64 experts, top-6, sigmoid router with group limiting and
  a shared expert,

trained on real text (tinyshakespeare + WikiText-2 valid; the WikiText-2 training split is not
available offline) with a byte-level BPE tokenizer trained on that text, and evaluated on
WikiText-2 test. Methods: Top-K (no balancing), Loss-Controlled (auxiliary loss, alpha = 0.01),
Loss-Free (bias, u = 1e-3), BIP (``update="before"``, the paper's behaviour) and BIP-after (causal).
Every run starts from the same initial weights and sees the same batches.

Writes ``<out>/<shape>/<method>.json`` (full per-step record: loss, MaxVio per step and layer, step
time), ``<out>/<shape>/max_vio.png``, and ``<out>/comparison.json`` + ``<out>/comparison.md`` (the
table: AvgMaxVio, SupMaxVio, MaxVio at step 1, validation perplexity, time per step).

    python scripts/pretrain_comparison.py                 # the default: ~15 min on 2 CPU cores
    python scripts/pretrain_comparison.py --steps 400 --batch-size 16 --shapes mixtral-16x2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from hf_moe_routing import BIPConfig, LossControlledConfig, LossFreeConfig, RoutingConfig, TopKConfig
from hf_moe_routing.data import pack_dataset, read_corpus, train_tokenizer
from hf_moe_routing.training.pretrain import PretrainConfig, PretrainResult, plot_max_vio, pretrain
from hf_moe_routing.training.reference import build_moe_model

SHAPES = ("mixtral-16x2", "deepseek-v3-64x6")
TRAIN_CORPORA = ("tinyshakespeare", "wikitext-2/valid")
TEST_CORPUS = "wikitext-2/test"


def method_config(name: str, bip_iters: int, bip_extra_iters: int | None = None) -> RoutingConfig:
    """Routing config of a method name."""
    extra = {} if bip_extra_iters is None else {"max_extra_iters": bip_extra_iters}
    methods = {
        "topk": TopKConfig(),
        "loss_controlled": LossControlledConfig(coefficient=0.01),
        "loss_free": LossFreeConfig(update_rate=1e-3),
        "bip": BIPConfig(num_iters=bip_iters, update="before", **extra),
        "bip_after": BIPConfig(num_iters=bip_iters, update="after", **extra),
    }
    if name not in methods:
        raise ValueError(f"Unknown method {name!r}; choose from {', '.join(methods)}.")
    return methods[name]


LABELS = {
    "topk": "Top-K (no balancing)",
    "loss_controlled": "Loss-Controlled (aux loss 0.01)",
    "loss_free": "Loss-Free (u=1e-3)",
    "bip": "BIP (before, T={T})",
    "bip_after": "BIP (after, T={T})",
}


def table(rows: list[dict]) -> str:
    """Markdown table of the summaries."""
    lines = [
        "| shape | method | AvgMaxVio | SupMaxVio | MaxVio step 1 | val perplexity | s / step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['label']} | {r['avg_max_vio']:.3f} | {r['sup_max_vio']:.3f} | "
            f"{r['max_vio_step1']:.3f} | {r['val_perplexity']:.1f} | {r['mean_step_time']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument(
        "--methods", nargs="+", default=["topk", "loss_controlled", "loss_free", "bip", "bip_after"]
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--bip-iters", type=int, default=BIPConfig().num_iters)
    parser.add_argument(
        "--bip-extra-iters", type=int, default=None, help="BIP max_extra_iters (default: BIPConfig's)"
    )
    parser.add_argument(
        "--eval-batches", type=int, default=8, help="validation batches (of --batch-size * 2)"
    )
    parser.add_argument("--data-dir", default=None, help="default: $HF_MOE_ROUTING_DATA or ../shared/data")
    parser.add_argument("--out", default="results/pretrain_comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {
        name: method_config(name, args.bip_iters, args.bip_extra_iters) for name in args.methods
    }  # fail fast on bad names
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    train_texts = [text for corpus in TRAIN_CORPORA for text in read_corpus(corpus, args.data_dir)]
    tokenizer = train_tokenizer(train_texts, args.vocab_size, model_max_length=256)
    train = pack_dataset(train_texts, tokenizer, args.seq_len)
    test = pack_dataset(read_corpus(TEST_CORPUS, args.data_dir), tokenizer, args.seq_len)
    print(
        f"data: {len(train)} train rows, {len(test)} test rows of {args.seq_len} tokens ({time.perf_counter() - start:.0f}s)"
    )

    rows = []
    for shape in args.shapes:
        results: dict[str, PretrainResult] = {}
        for name, routing in configs.items():
            model = build_moe_model(shape, len(tokenizer), seed=args.seed)
            settings = PretrainConfig(
                max_steps=args.steps,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                warmup_steps=max(1, args.steps // 10),
                eval_batch_size=args.batch_size * 2,
                max_eval_batches=args.eval_batches,
                seed=args.seed,
            )
            result = pretrain(model, routing, train, test, settings)
            label = LABELS[name].format(T=args.bip_iters)
            results[label] = result
            result.save(out / shape / f"{name}.json")
            summary = {"shape": shape, "method": name, "label": label, **result.summary()}
            rows.append(summary)
            print(
                f"{shape} {label}: AvgMaxVio {summary['avg_max_vio']:.3f}, SupMaxVio {summary['sup_max_vio']:.3f}, "
                f"step-1 MaxVio {summary['max_vio_step1']:.3f}, val ppl {summary['val_perplexity']:.1f}, "
                f"{summary['mean_step_time']:.3f} s/step",
                flush=True,
            )
        plot_max_vio(results, out / shape / "max_vio.png", title=f"{shape}: MaxVio during pre-training")

    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    machine = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    total = time.perf_counter() - start
    (out / "comparison.json").write_text(
        json.dumps(
            {"settings": settings, "machine": machine, "total_seconds": total, "results": rows}, indent=2
        )
    )
    text = table(rows)
    (out / "comparison.md").write_text(text + "\n")
    print(f"\n{text}\n\ntotal {total / 60:.1f} min; results in {out}")


if __name__ == "__main__":
    main()
