"""gpu_check section ``serving``: vLLM with the hf-moe-routing plugin, decode and prefill tokens/s.

A Qwen1.5-MoE-shaped model (real layer sizes, 4 layers, random weights, bfloat16) is served three
times through the plugin (Transformers backend, external routing):

* ``topk``: the model's own Top-K (``TopKConfig()``), the baseline;
* ``p70_zero``: top-p calibrated to use 70% of top-k experts on average (``TopPConfig(p, max_k=top_k)``),
  dropped slots sent to a real expert with weight 0 (the default, ``HF_MOE_ROUTING_VLLM_DROPPED=zero``);
* ``p70_skip``: the same adapter with dropped slots as expert id -1 (``=skip``).

It records prefill tokens/s (long prompts, one new token) and decode tokens/s (short prompts, 64 new
tokens), and checks that the skip path gives the same greedy tokens as the zero-weight path. Each
engine runs in its own subprocess. Skips with a reason where vLLM is not importable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

#: One vLLM engine: start, a prefill batch, a decode batch; prints RESULT <json>.
ENGINE = r"""
import json, os, sys, time
def main():
    case = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t0 = time.perf_counter()
    llm = LLM(model=case["model"], dtype=case["dtype"], max_model_len=2304, seed=0, skip_tokenizer_init=True,
              gpu_memory_utilization=0.5, max_num_seqs=64, enforce_eager=case.get("eager", False))
    start_s = time.perf_counter() - t0
    prefill = [TokensPrompt(prompt_token_ids=p) for p in case["prefill"]]
    decode = [TokensPrompt(prompt_token_ids=p) for p in case["decode"]]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    many = SamplingParams(temperature=0.0, max_tokens=case["new_tokens"], ignore_eos=True, detokenize=False)
    llm.generate(prefill[:2], one)  # warm-up
    t = time.perf_counter(); llm.generate(prefill, one); prefill_s = time.perf_counter() - t
    t = time.perf_counter(); outs = llm.generate(decode, many); decode_s = time.perf_counter() - t
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    print("RESULT " + json.dumps({
        "start_s": start_s,
        "prefill_tokens_per_s": sum(len(p) for p in case["prefill"]) / prefill_s,
        "decode_tokens_per_s": sum(len(x) for x in tokens) / decode_s,
        "tokens": tokens,
    }), flush=True)
if __name__ == "__main__":
    main()
"""


def section_serving(ctx) -> str:
    """Record tokens/s per routing and whether the -1 path equals the zero-weight path."""
    if importlib.util.find_spec("vllm") is None:
        ctx.record(
            "skipped", "vLLM is not installed here (pip install 'hf-moe-routing[vllm]' to run this section)"
        )
        return "skipped"
    from bench_common import build_model

    from hf_moe_routing import TopKConfig, TopPConfig, patch_model, save_routing_adapter
    from hf_moe_routing.patching import routing_layers

    layers, new_tokens = (2, 8) if ctx.smoke else (4, 64)
    model = build_model(
        "qwen1.5-moe-a2.7b", layers=layers, device=ctx.device, dtype=ctx.dtype, tiny=ctx.smoke
    )
    top_k = model.config.num_experts_per_tok
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prefill = torch.randint(
        3, vocab, (8 if ctx.smoke else 32, 64 if ctx.smoke else 2048), generator=gen
    ).tolist()
    decode = torch.randint(3, vocab, (4 if ctx.smoke else 64, 16), generator=gen).tolist()
    p = calibrate_top_p(model, torch.tensor(prefill[:4], device=ctx.device), target=0.7 * top_k)
    ctx.record("setup", {"layers": layers, "top_k": top_k, "top_p": p, "dtype": str(ctx.dtype)})
    work = Path(tempfile.mkdtemp(prefix="gpu_check_serving_", dir=ctx.out))
    base = work / "base"
    model.save_pretrained(base)
    adapters = {}
    for name, config in (("topk", TopKConfig()), ("p70", TopPConfig(p=p, max_k=top_k))):
        patch_model(model, config, replace=True)
        for layer in routing_layers(model).values():
            layer.eval()
        adapters[name] = work / f"adapter-{name}"
        save_routing_adapter(model, adapters[name], model_card=False)
    rows = {}
    for run, adapter, mode in (
        ("topk", "topk", "zero"),
        ("p70_zero", "p70", "zero"),
        ("p70_skip", "p70", "skip"),
    ):
        if ctx.deadline.left() < 30:
            ctx.append("skipped_runs", run)
            continue
        case = {
            "model": str(base),
            "dtype": "float32" if ctx.smoke else "bfloat16",
            "prefill": prefill,
            "decode": decode,
            "new_tokens": new_tokens,
            "eager": ctx.smoke,
        }
        env = {
            **os.environ,
            "HF_MOE_ROUTING_ADAPTER": str(adapters[adapter]),
            "HF_MOE_ROUTING_VLLM_DROPPED": mode,
        }
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", ENGINE, json.dumps(case)],
            capture_output=True,
            text=True,
            env=env,
            timeout=max(30, ctx.deadline.left() - 5),
        )
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            errors = [
                x for x in (done.stdout + done.stderr).splitlines() if "Error" in x or "hf-moe-routing" in x
            ]
            rows[run] = {"error": "\n".join(errors[-15:]) or done.stderr[-2000:]}
        else:
            rows[run] = json.loads(lines[-1][len("RESULT ") :])
            rows[run]["external_routing"] = "external routing" in done.stdout + done.stderr
        rows[run]["seconds"] = time.monotonic() - started
        ctx.append("rows", {"run": run, **{k: v for k, v in rows[run].items() if k != "tokens"}})
    if any("error" in r for r in rows.values()):
        return "failed"
    if "p70_zero" in rows and "p70_skip" in rows:
        same = rows["p70_zero"]["tokens"] == rows["p70_skip"]["tokens"]
        ctx.record("skip_equals_zero_weight", same)
        if not same:
            return "failed"
    return "ok" if len(rows) == 3 else "partial"


def calibrate_top_p(model, ids: torch.Tensor, target: float) -> float:
    """The p whose mean experts per token on ``ids`` is closest to ``target`` (bisection on p)."""
    from hf_moe_routing import TopPConfig, patch_model, unpatch_model
    from hf_moe_routing.patching import get_patch_state

    def mean_experts(p: float) -> float:
        patch_model(model, TopPConfig(p=p, max_k=model.config.num_experts_per_tok), replace=True)
        counts = []

        def count(module, args, out):
            counts.append((out[2] < module.routing.num_experts).float().sum(1).mean())

        handles = [b.router.register_forward_hook(count) for b in get_patch_state(model).blocks]
        with torch.no_grad():
            model(ids)
        for handle in handles:
            handle.remove()
        unpatch_model(model)
        return float(torch.stack(counts).mean())

    low, high = 0.05, 1.0
    for _ in range(8):
        mid = (low + high) / 2
        if mean_experts(mid) < target:
            low = mid
        else:
            high = mid
    return round((low + high) / 2, 4)
