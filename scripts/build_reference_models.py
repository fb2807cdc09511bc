"""Build (or rebuild) the cached reference MoE models and print their build time and held-out perplexity.

    python scripts/build_reference_models.py                      # both models, cached ones are reused
    python scripts/build_reference_models.py --rebuild --threads 2 --json results/reference_models.json

Each model is pre-trained from scratch on the ``pretrain`` evidence split (tinyshakespeare + 3/4 of WikiText-2
valid; the project's BPE tokenizer) with fixed threads and deterministic algorithms, and evaluated on the
validation split (the last 1/4 of WikiText-2 valid); the weights' SHA-256 is printed beside the hash recorded
for this torch version and thread count (``hf_moe_routing/training/reference_hashes.json``). See
``hf_moe_routing.training.reference``.
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
    parser.add_argument(
        "--threads", type=int, help="torch threads outside the builds (each build uses its spec's threads, 1)"
    )
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
    print(
        f"{'model':<18}{'params':>9}{'steps':>7}{'build s':>9}{'s/step':>8}{'val ppl':>10}  weights SHA-256 (recorded)"
    )
    for name, info in infos.items():
        machine = info["machine"]
        print(
            f"{name:<18}{info['num_parameters'] / 1e6:>8.2f}M{info['spec']['max_steps']:>7}"
            f"{info['build_seconds']:>9.0f}{info['mean_step_seconds']:>8.2f}"
            f"{info['validation_perplexity']:>10.1f}  {info['weights_sha256'][:16]} "
            f"({(info.get('recorded_sha256') or 'none')[:16]}; {info['build_key']}, {machine['cpu_count']} CPUs)"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(infos, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
