"""``export_checkpoint``: the exported checkpoint routes as the patched model, loaded where hf_moe_routing cannot be imported.

Every exported folder is loaded by plain transformers in a subprocess whose import system refuses
``hf_moe_routing`` (the venv's editable install included); its experts per token and logits on
held-out ids must equal those of the base model patched with the routing adapter (fp32, 1e-5).
The fast cases cover one family per kind of selection-bias location and router kind; the slow sweep
covers every supported family of the installed transformers (bias folding where the router has a
selection bias, a top-k change everywhere).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from family_expectations import expected_for
from safetensors.torch import load_file, save_file

from hf_moe_routing import (
    AdaKConfig,
    BIPConfig,
    LossFreeConfig,
    NotExportableError,
    TopKConfig,
    TopPConfig,
    describe_model,
    export_checkpoint,
    load_routing_adapter,
    patch_model,
    save_routing_adapter,
)
from hf_moe_routing.cli.main import main
from hf_moe_routing.patching import describe, routing_layers
from hf_moe_routing.testing import causal_lm_class, moe_families, tiny_model

EXPECTED = expected_for()[1]
FAMILIES = [e.model_type for e in moe_families() if e.model_type in EXPECTED["supported"]]
BIAS_FAMILIES = [f for f in FAMILIES if '"selection_bias": true' in EXPECTED["supported"][f]["kind_key"]]
FAST_BIAS = ["deepseek_v3", "ernie4_5_moe", "minimax_m2", "kolibri1", "lfm2_moe", "afmoe"]
FAST_TOPK = ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3", "llama4_text", "gemma4_text", "granitemoe"]

#: Loads each exported folder with plain transformers; hf_moe_routing cannot be imported.
PLAIN_LOADER = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_moe_routing" or name.startswith("hf_moe_routing."):
            raise ImportError("hf_moe_routing is blocked in this process")
sys.meta_path.insert(0, Block())
import torch, transformers
from safetensors.torch import load_file, save_file
for job in json.loads(sys.argv[1]):
    cls = getattr(transformers, job["cls"])
    model = cls.from_pretrained(job["folder"], dtype=torch.float32).eval()
    out = {}
    def hook(name):
        def fn(module, args, output):
            for i, t in enumerate(output if isinstance(output, tuple) else (output,)):
                out[f"{name}/{i}"] = t.detach().float().contiguous()
        return fn
    for name in job["routers"]:
        model.get_submodule(name).register_forward_hook(hook(name))
    with torch.no_grad():
        out["logits"] = model(load_file(job["ids"])["ids"]).logits.float()
    save_file(out, job["out"])
assert "hf_moe_routing" not in sys.modules
print("plain-ok")
"""


def _router_outputs(model, ids):
    """``(logits, {router name: (n, k) sorted expert ids})`` of a (patched) model on ``ids``."""
    blocks = describe(model).blocks
    chosen = {}

    def hook(block):
        def fn(module, args, output):
            decoded = block.spec.decode(output)
            chosen[block.router_name] = decoded.index.sort(dim=-1).values

        return fn

    handles = [block.router.register_forward_hook(hook(block)) for block in blocks]
    with torch.no_grad():
        logits = model(ids).logits.float()
    for h in handles:
        h.remove()
    return logits, chosen, blocks


def _adapter(tmp, family, config, seed=3):
    """Save base checkpoint + a routing adapter with random (fitted-looking) state; returns folders."""
    base, adapter = tmp / f"{family}-base", tmp / f"{family}-{config.routing_type}-adapter"
    if not base.exists():
        tiny_model(family).save_pretrained(base)
    model = tiny_model(family)
    patch_model(model, config)
    g = torch.Generator().manual_seed(seed)
    for layer in routing_layers(model).values():
        for name in ("q", "bias"):
            if hasattr(layer, name) and isinstance(getattr(layer, name), torch.Tensor):
                getattr(layer, name).copy_(torch.rand(layer.num_experts, generator=g) * 0.3)
        if hasattr(layer, "num_updates"):
            layer.num_updates.fill_(1)
    save_routing_adapter(model, adapter, model_card=False)
    return base, adapter


def _run_cases(tmp, cases):
    """Export every ``(family, config)`` case, load all in one plain subprocess; returns results per case."""
    jobs, refs, results = [], {}, {}
    ids = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(11))  # held-out ids
    save_file({"ids": ids}, tmp / "ids.safetensors")
    for family, config in cases:
        key = f"{family}-{config.routing_type}-{getattr(config, 'top_k', None)}"
        base, adapter = _adapter(tmp, family, config)
        out = tmp / f"{key}-export"
        try:
            export_checkpoint(base, adapter, out)
        except NotExportableError as error:
            assert not out.exists(), "a refused export wrote files"
            results[key] = error
            continue
        reference = causal_lm_class(family).from_pretrained(base, dtype=torch.float32).eval()
        load_routing_adapter(reference, adapter)
        refs[key] = _router_outputs(reference, ids)
        jobs.append(
            {
                "cls": type(reference).__name__,
                "folder": str(out),
                "ids": str(tmp / "ids.safetensors"),
                "out": str(tmp / f"{key}-plain.safetensors"),
                "routers": [b.router_name for b in refs[key][2]],
            }
        )
    if jobs:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run(
            [sys.executable, "-I", "-c", PLAIN_LOADER, json.dumps(jobs)],
            capture_output=True,
            text=True,
            timeout=1800,
            env=env,
        )
        assert done.returncode == 0 and "plain-ok" in done.stdout, done.stderr[-3000:]
    for job, (key, (logits, chosen, blocks)) in zip(jobs, refs.items(), strict=True):
        plain = load_file(job["out"])
        got = {}
        for block in blocks:
            parts = sorted(k for k in plain if k.startswith(block.router_name + "/"))
            decoded = block.spec.decode(tuple(plain[k] for k in parts))
            got[block.router_name] = decoded.index.long().sort(dim=-1).values
        results[key] = (logits, chosen, plain["logits"], got)
    return results


def _assert_same(result):
    logits, chosen, plain_logits, plain_chosen = result
    for name, index in chosen.items():
        assert torch.equal(index, plain_chosen[name]), f"{name}: experts differ"
    assert (logits - plain_logits).abs().max().item() <= 1e-5


def _top_k_case(family):
    k = describe_model(tiny_model(family), verify=False).shape.top_k
    return TopKConfig(top_k=k - 1 if k > 1 else 2)


# ---- fast: one family per bias location / router kind -------------------------------------------
def test_bias_folding_and_top_k_on_representatives(tmp_path):
    cases = [(f, BIPConfig()) for f in FAST_BIAS] + [(f, LossFreeConfig()) for f in FAST_BIAS[:2]]
    cases += [(f, _top_k_case(f)) for f in FAST_TOPK] + [("deepseek_v3", BIPConfig(top_k=3))]
    results = _run_cases(tmp_path, cases)
    for key, result in results.items():
        assert not isinstance(result, Exception), f"{key}: {result}"
        _assert_same(result)
    # the routing did change: the exported model is not the base model
    assert not torch.equal(
        results["deepseek_v3-bip-None"][1]["model.layers.1.mlp.gate"], _base_choice(tmp_path)
    )


def _base_choice(tmp):
    model = causal_lm_class("deepseek_v3").from_pretrained(tmp / "deepseek_v3-base", dtype=torch.float32)
    ids = load_file(tmp / "ids.safetensors")["ids"]
    return _router_outputs(model, ids)[1]["model.layers.1.mlp.gate"]


#: the sweep runs in chunks of families, each loaded in one plain subprocess (importing torch and
#: transformers once per chunk, not per family); 4 chunks keep both xdist workers busy
CHUNKS = 4


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(CHUNKS), ids=lambda chunk: f"families{chunk}")
def test_every_family_exports_its_bias_and_top_k_exactly(tmp_path, chunk):
    """Bias folding (BIP, Loss-Free) where the router has a selection bias; a top-k change everywhere,
    exact or refused with a pointer to the vLLM plugin (PhiMoE's SparseMixer is fixed at top-2)."""
    cases, unsaveable = [], []
    for family in FAMILIES[chunk::CHUNKS]:
        try:
            tiny_model(family).save_pretrained(tmp_path / f"{family}-base")
        except Exception as error:  # transformers' own save of the tiny model fails: nothing to export
            unsaveable.append(f"{family}: {type(error).__name__}: {error}"[:300])
            continue
        cases.append((family, _top_k_case(family)))
        if family in BIAS_FAMILIES:
            cases += [(family, BIPConfig()), (family, LossFreeConfig())]
    results = _run_cases(tmp_path, cases)
    assert len(unsaveable) <= 2, unsaveable  # inkling2_text / inkling2_loop_text on 5.25
    failures = []
    for key, result in results.items():
        if isinstance(result, Exception):
            if not ("-topk-" in key and "vLLM plugin" in str(result)):
                failures.append(f"{key}: refused: {result}")
            print(f"{key}: refused: {result}")
            continue
        try:
            _assert_same(result)
        except AssertionError as error:
            failures.append(f"{key}: {error}")
    assert not failures, "\n".join(failures)
    for line in unsaveable:
        print(f"not exported (transformers cannot save a tiny model): {line}")


# ---- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family, config, words",
    [
        ("mixtral", BIPConfig(), "no selection-bias parameter"),
        ("qwen2_moe", LossFreeConfig(), "no selection-bias parameter"),
        ("mixtral", TopPConfig(), "cannot be written"),
        ("mixtral", AdaKConfig(), "cannot be written"),
        ("phimoe", TopKConfig(top_k=1), "no longer route"),
    ],
)
def test_what_a_checkpoint_cannot_express_is_refused_before_writing(tmp_path, family, config, words):
    base, adapter = _adapter(tmp_path, family, config)
    with pytest.raises(NotExportableError, match=words) as error:
        export_checkpoint(base, adapter, tmp_path / "out")
    assert "vLLM plugin" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_model_is_refused_naming_both(tmp_path):
    base, _ = _adapter(tmp_path, "deepseek_v3", BIPConfig())
    _, other = _adapter(tmp_path, "glm4_moe", BIPConfig())
    with pytest.raises(ValueError, match="glm4_moe model .* but this is a deepseek_v3 model"):
        export_checkpoint(base, other, tmp_path / "out")


def test_an_output_folder_with_a_model_needs_overwrite_and_keeps_other_files(tmp_path):
    base, adapter = _adapter(tmp_path, "deepseek_v3", BIPConfig())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    export_checkpoint(base, adapter, out)  # a folder without a model is fine
    with pytest.raises(FileExistsError, match="already holds a model"):
        export_checkpoint(base, adapter, out)
    export_checkpoint(base, adapter, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "routing_config.json").exists()  # the routing is in the weights, not beside them
    with pytest.raises(FileExistsError, match="base checkpoint itself"):
        export_checkpoint(base, adapter, base, overwrite=True)


def test_a_patched_model_exports_itself_and_the_cli_exports_folders(tmp_path, capsys):
    base, adapter = _adapter(tmp_path, "glm4_moe", LossFreeConfig())
    model = causal_lm_class("glm4_moe").from_pretrained(base, dtype=torch.float32)
    load_routing_adapter(model, adapter)
    first = export_checkpoint(model, output_dir=tmp_path / "from-model")
    assert main(["export", str(base), str(adapter), "--output-dir", str(tmp_path / "from-cli")]) == 0
    assert "Exported loss_free routing" in capsys.readouterr().out
    a, b = load_file(first / "model.safetensors"), load_file(tmp_path / "from-cli" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((first / "routing_export.json").read_text())
    assert record["routing"]["routing_type"] == "loss_free" and len(record["selection_bias_tensors"]) >= 1
    assert (
        main(["export", str(base), str(adapter), "--output-dir", str(tmp_path / "from-cli")]) == 2
    )  # exists
