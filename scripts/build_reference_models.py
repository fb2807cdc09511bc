"""Build (or rebuild) the cached reference MoE models and print their build time and held-out perplexity.

    python scripts/build_reference_models.py                      # both models, cached ones are reused
    python scripts/build_reference_models.py --rebuild --threads 2 --json results/reference_models.json

Each model is pre-trained from scratch on tinyshakespeare + WikiText-2 valid (the project's BPE tokenizer)
and evaluated on WikiText-2 test; see ``hf_moe_routing.training.reference``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hf_moe_routing.training.reference import REFERENCE_MODELS, reference_info, reference_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", default=list(REFERENCE_MODELS), help="reference models to build")
    parser.add_argument(
        "--cache-dir", help="cache root (default $HF_MOE_ROUTING_CACHE or ~/.cache/hf_moe_routing)"
    )
    parser.add_argument("--data-dir", help="data folder (default $HF_MOE_ROUTING_DATA or ../shared/data)")
    parser.add_argument("--rebuild", action="store_true", help="build again even if cached")
    parser.add_argument("--max-steps", type=int, help="override the number of training steps")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the build infos to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    infos = {}
    for name in args.names:
        reference_model(
            name, args.cache_dir, data_dir=args.data_dir, rebuild=args.rebuild, max_steps=args.max_steps
        )
        infos[name] = reference_info(name, args.cache_dir)
    print(f"{'model':<14}{'params':>9}{'steps':>7}{'build s':>9}{'s/step':>8}{'test ppl':>10}  machine")
    for name, info in infos.items():
        machine = info["machine"]
        print(
            f"{name:<14}{info['num_parameters'] / 1e6:>8.2f}M{info['spec']['max_steps']:>7}"
            f"{info['build_seconds']:>9.0f}{info['mean_step_seconds']:>8.2f}{info['test_perplexity']:>10.1f}"
            f"  {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(infos, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
