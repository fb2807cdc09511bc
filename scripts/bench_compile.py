"""Forward speed of ``torch.compile(model, fullgraph=True)`` against the eager model, per routing.

For each routing (``none`` = the unpatched model) a model of a public checkpoint's layer type
(``bench_common.REAL_SHAPES``; ``--tiny`` shrinks it, the default on CPU) with random weights is
patched, compiled once (the first call's time is the compile time), checked against eager (largest
|logit difference|), then timed: eager and compiled calls alternate for ``--repeats`` rounds after a
warm-up, and the table gives the medians side by side with the speed-up (eager / compiled). Stateful
routings get a random frozen state (BIP q, Loss-Free bias), dynamic skipping a fixed beta, Ada-K its
random allocators (greedy). Every routing runs in eval mode, with the same weights and tokens::

    python scripts/bench_compile.py                                  # CPU, tiny Mixtral, 1 thread
    python scripts/bench_compile.py --shape qwen1.5-moe-a2.7b --routings none topk adak
    python scripts/bench_compile.py --device cuda --dtype bfloat16 --real --batch 8 --seq-len 512

On CPU the clock is process CPU time (robust to other jobs with 1 torch thread); on CUDA, events.
The first compile of a model takes 10-80 s on a small CPU (less with a warm inductor cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REAL_SHAPES, Deadline, build_model, environment, measure, random_ids  # noqa: E402

from hf_moe_routing import (  # noqa: E402
    AdaKConfig,
    BIPConfig,
    DynamicSkipConfig,
    LossControlledConfig,
    LossFreeConfig,
    TopKConfig,
    TopPConfig,
    patch_model,
    routing_layers,
)

ROUTINGS = {
    "none": None,
    "topk": TopKConfig(),
    "bip": BIPConfig(),
    "loss_free": LossFreeConfig(),
    "loss_controlled": LossControlledConfig(),
    "adak": AdaKConfig(),
    "top_p": TopPConfig(p=0.6),
    "dynamic_skip": DynamicSkipConfig(beta=0.5),
}


def patched(
    shape: str, routing: str, *, layers: int, device: str, dtype: torch.dtype, tiny: bool, seed: int = 0
):
    """The model of ``shape`` (same random weights for every routing of a seed) patched with ``routing``."""
    model = build_model(shape, layers=layers, device=device, dtype=dtype, tiny=tiny, seed=seed)
    if ROUTINGS[routing] is not None:
        patch_model(model, ROUTINGS[routing])
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in routing_layers(model).values():
                for name in ("q", "bias"):
                    state = getattr(layer, name, None)
                    if isinstance(state, torch.Tensor):
                        state.copy_(0.05 * torch.randn(state.shape, generator=generator))
    return model.eval()


def bench_compile(
    shape: str,
    routings: list[str],
    *,
    batch: int = 4,
    seq_len: int = 64,
    layers: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tiny: bool = True,
    repeats: int = 5,
    warmup: int = 1,
    clock: str = "cpu",
    mode: str | None = None,
    backend: str = "inductor",
    deadline: Deadline | None = None,
    seed: int = 0,
) -> list[dict]:
    """One row per routing: eager and compiled median ms, speed-up, compile seconds, max |Δ logits|.

    Routings left when ``deadline`` has passed get a ``skipped`` row; a routing that fails to compile
    gets an ``error`` row (the others still run). ``backend="eager"`` checks the capture only (no
    code generation: fast, and no speed-up to expect). ``seed`` seeds the weights, the tokens and the
    random routing state.
    """
    rows = []
    for routing in routings:
        if deadline is not None and deadline.passed():
            rows.append({"routing": routing, "skipped": "time budget used up"})
            continue
        torch._dynamo.reset()  # a fresh cache per routing (the recompile limit is per code object)
        model = patched(shape, routing, layers=layers, device=device, dtype=dtype, tiny=tiny, seed=seed)
        ids, mask = random_ids(batch, seq_len, model.config.vocab_size, device, seed=seed)
        compiled = torch.compile(model, fullgraph=True, mode=mode, backend=backend)

        def eager_call(model=model, ids=ids, mask=mask):
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask).logits

        def compiled_call(compiled=compiled, ids=ids, mask=mask):
            with torch.no_grad():
                return compiled(input_ids=ids, attention_mask=mask).logits

        try:
            start = time.perf_counter()
            actual = compiled_call()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            compile_s = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - reported in the row
            rows.append({"routing": routing, "error": f"{type(error).__name__}: {str(error)[:300]}"})
            continue
        expected = eager_call()
        times = measure(
            {"eager": eager_call, "compiled": compiled_call},
            device=device,
            repeats=repeats,
            warmup=warmup,
            clock=clock,
            deadline=deadline,
        )
        eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
        rows.append(
            {
                "routing": routing,
                "seed": seed,
                "eager_ms": 1e3 * eager_s,
                "compiled_ms": 1e3 * compiled_s,
                "speedup": eager_s / compiled_s,
                "compile_s": compile_s,
                "max_abs_diff": float((actual.float() - expected.float()).abs().max()),
                "repeats": len(times["eager"]),
            }
        )
        del model, compiled
    torch._dynamo.reset()
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| routing | seed | eager ms | compiled ms | speed-up | first call (compile) s | max abs diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "eager_ms" not in r:
            lines.append(
                f"| {r['routing']} | {r.get('seed', '')} | {r.get('error') or r.get('skipped')} | | | | |"
            )
            continue
        lines.append(
            f"| {r['routing']} | {r['seed']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['speedup']:.2f}x "
            f"| {r['compile_s']:.1f} | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="mixtral-8x7b", choices=list(REAL_SHAPES))
    parser.add_argument(
        "--real", action="store_true", help="the checkpoint's real layer size (default: tiny)"
    )
    parser.add_argument("--routings", nargs="+", default=list(ROUTINGS), choices=list(ROUTINGS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: inductor's default)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="weights/tokens/state seeds")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    on_cuda = args.device.startswith("cuda")
    rows = [
        row
        for seed in args.seeds
        for row in bench_compile(
            args.shape,
            args.routings,
            batch=args.batch,
            seq_len=args.seq_len,
            layers=args.layers,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            tiny=not args.real,
            repeats=args.repeats,
            clock="wall" if on_cuda else "cpu",
            mode=args.mode,
            seed=seed,
        )
    ]
    size = "real" if args.real else "tiny"
    print(
        f"{args.shape} ({size}, {args.layers} layers), batch {args.batch} x {args.seq_len}, {args.dtype}, "
        f"{args.device}, {torch.get_num_threads()} threads, {'CUDA events' if on_cuda else 'process CPU time'}, "
        f"median of {args.repeats}, fullgraph=True, mode={args.mode}, seeds {args.seeds}"
    )
    print(format_table(rows))
    if args.json:
        meta = {**environment(args.device), **{k: v for k, v in vars(args).items() if k != "json"}}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
