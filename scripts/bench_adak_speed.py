"""Speed of Ada-K-style variable expert counts against Top-K, at real MoE-layer sizes (random weights).

For each layer shape (Qwen1.5-MoE-A2.7B: hidden 2048, 60 experts of 1408, top-4, shared experts of 5632;
Mixtral-8x7B: hidden 4096, 8 experts of 14336, top-2) one transformers MoE block is built from the
family's config and timed on n random hidden states:

* ``topk``          the block as shipped (the family's router, transformers' default experts kernel);
* ``topk_sentinel`` the same routing through the sentinel-safe kernel (isolates the kernel's own cost);
* ``adak``          every token takes the top-k_i experts in the router's order, k_i drawn from a k
                    distribution (``--k-dist``, or the one measured by ``adak_tradeoff.py``), weights
                    renormalised as in Ada-K, through the sentinel-safe kernel (as ``patch_model`` does).

Predicted saving = 1 - FLOPs(adak) / FLOPs(topk) of the MoE block (router + shared + routed experts);
measured saving = 1 - time(adak) / time(topk). Target: measured >= 80% of predicted. Timings alternate
between the variants (``--repeats`` rounds) and report medians.

    python scripts/bench_adak_speed.py --shapes qwen --tokens 256 --repeats 5
    python scripts/bench_adak_speed.py --shapes qwen mixtral --k-dist qwen=1:0.3,2:0.25,3:0.2,4:0.25
    python scripts/bench_adak_speed.py --smoke --out /tmp/adak_speed     # a tiny layer: the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hf_moe_routing import RoutingConfig, patch_model, unpatch_model
from hf_moe_routing.core.context import RoutingContext
from hf_moe_routing.evaluation.flops import flops_per_token
from hf_moe_routing.families import MoEBlock, MoEModel, RouterOutput
from hf_moe_routing.methods import RoutingLayer
from hf_moe_routing.methods.routing import keep_slots, rank_experts

SHAPES = {
    "qwen": dict(
        model_type="qwen2_moe",
        hidden_size=2048,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_experts=60,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        intermediate_size=5632,
    ),
    "mixtral": dict(
        model_type="mixtral",
        hidden_size=4096,
        intermediate_size=14336,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
    # a Qwen-MoE-style layer small enough for a smoke run (not a performance number)
    "small": dict(
        model_type="qwen2_moe",
        hidden_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        intermediate_size=128,
    ),
}
#: Default k distributions (k: probability) when neither --k-dist nor a measured result is given:
#: Ada-K's reported averages (Qwen1.5-MoE 2.58 of 4; Mixtral about 1.5 of 2), spread over 1..top-k.
DEFAULT_K = {
    "qwen": {1: 0.25, 2: 0.22, 3: 0.23, 4: 0.30},
    "mixtral": {1: 0.5, 2: 0.5},
    "small": {1: 0.25, 2: 0.22, 3: 0.23, 4: 0.30},
}


@dataclass
class SampledKConfig(RoutingConfig):
    """Ada-K-style selection with k drawn per token from a fixed distribution (benchmark only)."""

    routing_type = "sampled_k"
    variable_k = True
    k_probs: dict | None = None
    seed: int = 0

    def create_layer(self, block: MoEBlock, model: MoEModel, context: RoutingContext) -> RoutingLayer:
        return SampledKLayer(block, context, self.k_probs, self.seed)


class SampledKLayer(RoutingLayer):
    """Top-k_i of the family's own ranking, ``g = P / sum of P over the chosen`` (Ada-K's weights)."""

    def __init__(self, block: MoEBlock, context: RoutingContext, k_probs: dict, seed: int) -> None:
        super().__init__(block, context)
        self.values = torch.tensor([int(k) for k in k_probs])
        self.probs = torch.tensor([float(p) for p in k_probs.values()])
        self.seed = seed
        self._k: torch.Tensor | None = None

    def counts(self, n: int) -> torch.Tensor:
        if self._k is None or self._k.numel() != n:  # same k for every timed repeat
            generator = torch.Generator().manual_seed(self.seed)
            self._k = self.values[torch.multinomial(self.probs, n, replacement=True, generator=generator)]
        return self._k

    def forward(self, router: nn.Module, hidden_states: torch.Tensor, *router_args) -> RouterOutput:  # noqa: ANN002
        ranking = rank_experts(self.spec, router, hidden_states, int(self.values.max()))
        keep = ranking.rank < self.counts(ranking.index.shape[0]).to(ranking.index.device).unsqueeze(-1)
        return keep_slots(self.spec, ranking, keep, renormalize=True, hidden_dtype=hidden_states.dtype)


def parse_k_dist(text: str) -> dict[int, float]:
    """``"1:0.3,2:0.7"`` -> {1: 0.3, 2: 0.7} (normalised)."""
    out: dict[int, float] = {}
    for item in text.split(","):
        k, _, p = item.partition(":")
        out[int(k)] = float(p)
    total = sum(out.values())
    if total <= 0 or any(k < 1 for k in out) or any(p < 0 for p in out.values()):
        raise ValueError(f"Bad k distribution {text!r}: use k:prob pairs with k >= 1, e.g. 1:0.4,2:0.6.")
    return {k: p / total for k, p in sorted(out.items())}


def measured_k_dist(path: Path, shape: str) -> dict[int, float] | None:
    """The k distribution of the Ada-K run of ``adak_tradeoff.py`` closest to a 30-40% reduction."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    runs = [r for r in data.get("runs", []) if r.get("method", "").startswith("ada-k") and r.get("k_hist")]
    models = {"qwen": "qwen-moe", "mixtral": "mixtral-8x2"}
    if shape not in models:
        return None
    runs = [r for r in runs if r.get("model") == models[shape]] or runs
    if not runs:
        return None
    best = min(runs, key=lambda r: abs(r["activation_reduction"] - 0.35))
    hist = {int(k): float(v) for k, v in best["k_hist"].items() if float(v) > 0}
    total = sum(hist.values())
    return {k: v / total for k, v in sorted(hist.items())}


def build_block(shape: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """A one-layer model of the shape (random weights) and its MoE block."""
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        num_hidden_layers=1,
        vocab_size=256,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=512,
        **spec,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name or "mlp" in name:
                param.normal_(0.0, 0.02)
    return model, model.model.layers[0].mlp


def time_block(block: nn.Module, hidden: torch.Tensor) -> tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of one no-grad forward of ``block``."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        block(hidden)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_shape(
    shape: str, k_dist: dict[int, float], tokens: int, repeats: int, dtype: torch.dtype, clock: str = "cpu"
) -> dict:
    model, block = build_block(shape, dtype)
    hidden = torch.randn(
        1, tokens, model.config.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(1)
    )
    default_impl = model.config._experts_implementation
    top_k = SHAPES[shape]["num_experts_per_tok"]
    mean_k = sum(k * p for k, p in k_dist.items())
    flops_topk = flops_per_token(model.config, tokens)
    flops_adak = flops_per_token(model.config, tokens, activated=mean_k)
    moe = lambda f: f.router + f.shared_experts + f.routed_experts  # noqa: E731
    predicted = 1.0 - moe(flops_adak) / moe(flops_topk)

    def variant(name: str) -> tuple[float, float]:
        if name == "topk":
            return time_block(block, hidden)
        if name == "topk_sentinel":
            model.set_experts_implementation("sentinel_grouped_mm")
            try:
                return time_block(block, hidden)
            finally:
                model.set_experts_implementation(default_impl)
        patch_model(model, SampledKConfig(k_probs=k_dist))
        try:
            return time_block(block, hidden)
        finally:
            unpatch_model(model)

    names = ["topk", "topk_sentinel", "adak"]
    for name in names:  # warm-up
        variant(name)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            w, c = variant(name)
            wall[name].append(w)
            cpu[name].append(c)
    # with one torch thread, process CPU time is the compute time; wall time also counts the waits
    # for other jobs on a shared machine (see --clock)
    times = cpu if clock == "cpu" else wall
    med = {name: statistics.median(v) for name, v in times.items()}
    med_wall = {name: statistics.median(v) for name, v in wall.items()}
    measured = 1.0 - med["adak"] / med["topk"]
    measured_same_kernel = 1.0 - med["adak"] / med["topk_sentinel"]
    return {
        "shape": shape,
        "dims": SHAPES[shape],
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "top_k": top_k,
        "k_dist": {str(k): p for k, p in k_dist.items()},
        "mean_k": mean_k,
        "default_experts_implementation": default_impl,
        "clock": clock,
        "median_ms": {name: 1e3 * v for name, v in med.items()},
        "median_wall_ms": {name: 1e3 * v for name, v in med_wall.items()},
        "wall_saving": 1.0 - med_wall["adak"] / med_wall["topk"],
        "cpu_ms": {name: [1e3 * t for t in v] for name, v in cpu.items()},
        "wall_ms": {name: [1e3 * t for t in v] for name, v in wall.items()},
        "moe_flops_per_token": {"topk": moe(flops_topk), "adak": moe(flops_adak)},
        "predicted_saving": predicted,
        "measured_saving": measured,
        "measured_saving_same_kernel": measured_same_kernel,
        "ratio": measured / predicted if predicted > 0 else float("nan"),
        "ratio_same_kernel": measured_same_kernel / predicted if predicted > 0 else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["qwen", "mixtral"], choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=256, help="tokens per forward")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--clock",
        default="cpu",
        choices=["cpu", "wall"],
        help="what the savings use: process CPU time (default; robust on a shared machine with 1 thread) or wall",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 = stable on a shared machine)"
    )
    parser.add_argument(
        "--k-dist",
        action="append",
        default=[],
        metavar="SHAPE=K:P,...",
        help="k distribution per shape, e.g. qwen=1:0.3,2:0.3,3:0.2,4:0.2 (default: measured, else Ada-K-like)",
    )
    parser.add_argument("--measured", default="results/adak_tradeoff/results.json", help="trade-off results")
    parser.add_argument("--out", default="results/adak_speed", help="output folder")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny layer, 32 tokens, 1 repeat: checks that the script runs (its numbers mean nothing)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes, args.tokens, args.repeats = ["small"], 32, 1
    torch.set_num_threads(args.threads)
    given = {}
    for item in args.k_dist:
        shape, _, dist = item.partition("=")
        given[shape] = parse_k_dist(dist)
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape in args.shapes:
        k_dist = given.get(shape) or measured_k_dist(Path(args.measured), shape) or DEFAULT_K[shape]
        source = (
            "given"
            if shape in given
            else ("measured" if measured_k_dist(Path(args.measured), shape) else "default")
        )
        row = bench_shape(shape, k_dist, args.tokens, args.repeats, dtype, args.clock)
        row["k_dist_source"] = source
        rows.append(row)
        print(
            f"{shape}: topk {row['median_ms']['topk']:.1f} ms, topk(sentinel kernel) "
            f"{row['median_ms']['topk_sentinel']:.1f} ms, adak {row['median_ms']['adak']:.1f} ms",
            file=sys.stderr,
        )
    header = (
        f"{'shape':<8} {'tokens':>6} {'mean k':>9} {'topk ms':>8} {'topk(s) ms':>10} {'adak ms':>8} "
        f"{'pred. save':>10} {'meas. save':>10} {'ratio':>6} {'ratio(s)':>8} {'wall save':>9}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['shape']:<8} {r['tokens']:>6} {r['mean_k']:>4.2f}/{r['top_k']:<4} {r['median_ms']['topk']:>8.1f} "
            f"{r['median_ms']['topk_sentinel']:>10.1f} {r['median_ms']['adak']:>8.1f} "
            f"{100 * r['predicted_saving']:>9.1f}% {100 * r['measured_saving']:>9.1f}% {r['ratio']:>6.2f} "
            f"{r['ratio_same_kernel']:>8.2f} {100 * r['wall_saving']:>8.1f}%"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "clock": args.clock, "torch": torch.__version__, "device": "cpu"}
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
