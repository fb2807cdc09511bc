"""Cost of training Ada-K allocators against plain inference on the same model.

Each mode runs in its own subprocess (so peak memory is measured separately) on the same batches of a
reference model (``hf_moe_routing.training.reference``):

* ``inference``      -- no-grad forwards with the model's Top-K (what serving the model costs);
* ``adak-inference`` -- no-grad forwards with Ada-K allocators (the patched model at inference);
* ``warmup``         -- P-Warm cross-entropy steps of :class:`~hf_moe_routing.training.adak.AdaKTrainer`
                        (one Top-K forward per batch);
* ``ppo``            -- PPO steps with our default counterfactual baseline (sampled-k forward + one forward
                        per MoE layer + ``ppo_epochs`` allocator updates on the recorded states);
* ``ppo-topk``       -- PPO steps with the paper's Top-K baseline (sampled-k forward + Top-K forward).

Reports training tokens per second (tokens of the batches a step consumes / step time, median over
steps) and peak memory: the process's peak resident set size (CPU) or ``torch.cuda.max_memory_allocated``
(GPU), also as the increase over the memory right after loading the model.

    python scripts/bench_training_cost.py --model mixtral-8x2 --steps 8
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("inference", "adak-inference", "warmup", "ppo", "ppo-topk")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_mode(args: argparse.Namespace) -> dict:
    from hf_moe_routing import patch_model
    from hf_moe_routing.data import pack_dataset, read_corpus
    from hf_moe_routing.methods.adak import AdaKConfig
    from hf_moe_routing.training.adak import AdaKTrainer, AdaKTrainingConfig
    from hf_moe_routing.training.reference import reference_model

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer = reference_model(args.model, args.cache_dir, data_dir=args.data_dir, progress=False)
    model.to(device).eval()
    texts = read_corpus("tinyshakespeare", args.data_dir)
    rows = pack_dataset(texts, tokenizer, args.seq_len).select(range(args.batch_size * (args.steps + 2)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaded = current_memory_mb(device)
    tokens_per_step = args.batch_size * args.seq_len
    times: list[float] = []
    if args.mode in ("inference", "adak-inference"):
        if args.mode == "adak-inference":
            if args.adapter:
                from hf_moe_routing.hub import load_routing_adapter

                load_routing_adapter(model, args.adapter)
            else:
                patch_model(model, AdaKConfig())
        with torch.no_grad():
            for step in range(args.steps + 1):
                batch = rows[step * args.batch_size : (step + 1) * args.batch_size]
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if step:  # the first forward is a warm-up
                    times.append(time.perf_counter() - start)
    else:
        with tempfile.TemporaryDirectory() as folder:
            config = AdaKTrainingConfig(
                output_dir=folder,
                warmup="p-warm" if args.mode == "warmup" else "k-warm",
                baseline="topk" if args.mode == "ppo-topk" else "counterfactual",
                warmup_steps=args.steps + 1 if args.mode == "warmup" else 0,
                max_steps=0 if args.mode == "warmup" else args.steps + 1,
                batch_size=args.batch_size,
                logging_steps=1,
                progress_bar=False,
                log_level="warning",
                save_steps=0,
                save_total_limit=1,
                verify_base_unchanged=False,
            )
            trainer = AdaKTrainer(model, config, rows, None, adak_config=AdaKConfig())
            trainer.train()
            phase = "warmup" if args.mode == "warmup" else "ppo"  # ppo-topk logs as ppo
            times = [e["seconds"] for e in trainer.state.log_history if e.get("phase") == phase][1:]
    median = statistics.median(times)
    return {
        "mode": args.mode,
        "steps_timed": len(times),
        "tokens_per_step": tokens_per_step,
        "median_step_s": median,
        "tokens_per_s": tokens_per_step / median,
        "memory_after_load_mb": loaded,
        "peak_memory_mb": peak_memory_mb(device),
        "peak_increase_mb": peak_memory_mb(device) - loaded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mixtral-8x2", help="reference model name")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument(
        "--adapter",
        default=None,
        help="trained Ada-K adapter for adak-inference (default: untrained allocators)",
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--mode", default=None, choices=MODES, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--out", default="results/adak_training_cost")
    args = parser.parse_args(argv)
    if args.mode is not None:
        print("RESULT " + json.dumps(run_mode(args)))
        return 0

    rows = []
    for mode in args.modes:
        child = [sys.executable, __file__, "--mode", mode]
        for key in (
            "model",
            "steps",
            "batch_size",
            "seq_len",
            "threads",
            "device",
            "data_dir",
            "cache_dir",
            "adapter",
        ):
            value = getattr(args, key)
            if value is not None:
                child += [f"--{key.replace('_', '-')}", str(value)]
        proc = subprocess.run(child, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"mode {mode} failed (exit {proc.returncode})")
        rows.append(json.loads(line.removeprefix("RESULT ")))
        print(f"{mode}: {rows[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)

    base = next((r for r in rows if r["mode"] == "inference"), rows[0])
    print(
        f"{'mode':<16} {'tokens/s':>9} {'vs inference':>12} {'step ms':>9} {'peak MB':>9} {'peak increase MB':>17}"
    )
    for r in rows:
        r["throughput_vs_inference"] = r["tokens_per_s"] / base["tokens_per_s"]
        print(
            f"{r['mode']:<16} {r['tokens_per_s']:>9.0f} {r['throughput_vs_inference']:>11.2f}x "
            f"{1e3 * r['median_step_s']:>9.1f} {r['peak_memory_mb']:>9.0f} {r['peak_increase_mb']:>17.0f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        k: getattr(args, k)
        for k in ("model", "steps", "batch_size", "seq_len", "threads", "device", "adapter")
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
