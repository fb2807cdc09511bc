"""Design measurements behind Ada-K's defaults: warm start, allocator input, advantage baseline, rollout size.

On one reference model and budget (``--fraction`` of the model's top-k), trains Ada-K with every variant
named in ``--variants`` (each a set of changes from our defaults) for ``--seeds`` seeds and writes one JSON
line per run to ``--out`` (held-out perplexity change vs Top-K, experts per token, training time, and the
mean per-layer policy-gradient signal-to-noise ratio, clip fraction and advantage spread of the PPO steps).

    python scripts/adak_design.py --model qwen-moe --fraction 0.7 --seeds 0 \
        --variants default k-warm hidden topk loo2 batch16
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

from adak_common import append_jsonl, evaluate, load, set_threads, train_adak

from hf_moe_routing.methods.adak import AdaKConfig

#: variant name -> (AdaKConfig changes, AdaKTrainingConfig changes) from our defaults
VARIANTS = {
    "default": ({}, {}),
    "warm-only": ({}, {"max_steps": 0}),
    "k-warm": ({}, {"warmup": "k-warm"}),
    "p-warm": ({}, {"warmup": "p-warm"}),
    "hidden": ({"allocator_input": "hidden"}, {}),
    "hidden-k-warm": ({"allocator_input": "hidden"}, {"warmup": "k-warm"}),
    "topk": ({}, {"baseline": "topk"}),
    "topk-batch20": ({}, {"baseline": "topk", "batch_size": 20}),  # the forwards of counterfactual at batch 8
    "topk-batch32": ({}, {"baseline": "topk", "batch_size": 32}),
    "loo2": ({}, {"baseline": "leave-one-out", "rollout_samples": 2}),
    "loo4": ({}, {"baseline": "leave-one-out", "rollout_samples": 4}),
    "batch16": ({}, {"batch_size": 16}),
    "scale2": ({}, {"warmup_scale": 2.0}),
    "scale8": ({}, {"warmup_scale": 8.0}),
    "lr3e-3": ({}, {"learning_rate": 3e-3}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen-moe")
    parser.add_argument("--fraction", type=float, default=0.7, help="target_experts as a fraction of top-k")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=100, help="PPO steps")
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument(
        "--split",
        default="validation",
        choices=["validation", "legacy-test"],
        help="rows the variants are compared on (validation: held out from pre-training and from the headline)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="results/adak_design/runs.jsonl")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    base, _, train, held_out = load(
        args.model, eval_rows=args.eval_rows, data_dir=args.data_dir, split=args.split
    )
    top_k = base.config.num_experts_per_tok
    target = args.fraction * top_k
    for seed in args.seeds:
        for name in args.variants:
            adak_changes, train_changes = VARIANTS[name]
            model = copy.deepcopy(base)
            settings = {"max_steps": args.steps, "target_experts": target, **train_changes}
            with tempfile.TemporaryDirectory() as tmp:
                info = train_adak(
                    model,
                    train.shuffle(seed=seed),
                    held_out,
                    adak_config=AdaKConfig(**adak_changes),
                    out=Path(tmp),
                    seed=seed,
                    **settings,
                )
            result = evaluate(model, held_out)
            log = info.pop("log")

            def mean_of(key: str, entries=log) -> float | None:
                values = [e[key] for e in entries if e.get(key) is not None]
                if values and isinstance(values[0], list):
                    values = [sum(v) / len(v) for v in values]
                return sum(values) / len(values) if values else None

            row = {
                "model": args.model,
                "variant": name,
                "seed": seed,
                "target_experts": target,
                "split": args.split,
                "steps": args.steps,
                **result,
                **{k: v for k, v in info.items() if k != "adapter"},
                "snr": mean_of("signal_to_noise_per_layer"),
                "clip_fraction": mean_of("clip_fraction"),
                "advantage_std": mean_of("advantage_std"),
                "greedy_k_end": log[-1]["greedy_k_mean"] if log else None,
            }
            append_jsonl(Path(args.out), row)
            print(
                f"{args.model} {name:<14} seed {seed}: ppl {100 * row['perplexity_change']:+.2f}% at "
                f"{row['mean_activated']:.3f}/{top_k} (target {target:.2f}), snr {row['snr']}, "
                f"{row['train_seconds']:.0f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
