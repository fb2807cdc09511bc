import dataclasses
import json
import math

import pytest
import torch

from hf_moe_routing import RoutingConfig, RoutingLayer, TopKConfig, describe_model, get_patch_state
from hf_moe_routing.data import pack_dataset, synthetic_corpus, synthetic_tokenizer
from hf_moe_routing.testing import REQUIRED_FAMILIES, tiny_model
from hf_moe_routing.training import (
    MOE_SHAPES,
    PretrainConfig,
    build_moe_model,
    plot_max_vio,
    pretrain,
    reference_info,
    reference_model,
    reference_path,
)
from hf_moe_routing.training import reference as reference_module

TOK = synthetic_tokenizer()


@pytest.fixture(scope="module")
def data():
    train = pack_dataset(synthetic_corpus(120, 6, seed=0), TOK, 32)
    valid = pack_dataset(synthetic_corpus(12, 6, seed=1), TOK, 32)
    return train, valid


def quick(**kw) -> PretrainConfig:
    return PretrainConfig(**{"max_steps": 4, "batch_size": 8, "warmup_steps": 1, "progress": False, **kw})


def test_pretrain_learns_and_records(data):
    train, valid = data
    model = tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = pretrain(
        model, TopKConfig(), train, valid, quick(max_steps=40, learning_rate=5e-3, eval_every=20)
    )
    assert get_patch_state(model).config == TopKConfig() and not model.training
    assert len(result.loss) == len(result.step_time) == len(result.max_vio) == len(result.lr) == 40
    assert result.layers == [0, 1] and all(len(row) == 2 for row in result.max_vio)
    assert all(v >= 0 for row in result.max_vio for v in row) and all(t > 0 for t in result.step_time)
    assert sum(result.loss[-5:]) / 5 < result.loss[0] - 1.0  # it learns the synthetic language
    assert [e["step"] for e in result.evals] == [20, 40] and result.val_perplexity == result.evals[-1][
        "perplexity"
    ]
    assert result.val_perplexity < math.exp(result.loss[0])
    assert result.lr[0] > result.lr[-1] > 0  # cosine decay to min_lr_ratio * lr
    assert 8 * 30 < result.tokens_per_step <= 8 * 32  # real tokens (the last packed row is padded)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    summary = result.summary()
    assert summary["avg_max_vio"] <= summary["sup_max_vio"] and summary["steps"] == 40


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_pretrain_every_family(family, data, tmp_path):
    train, valid = data
    model = tiny_model(family)
    result = pretrain(model, None, train, valid, quick(max_steps=2, max_eval_batches=1))
    assert math.isfinite(result.val_perplexity) and len(result.max_vio[0]) == len(result.layers)
    saved = json.loads(result.save(tmp_path / "r.json").read_text())
    assert saved["summary"]["routing"] == "topk" and saved["max_vio"] == result.max_vio


class _AuxLayer(RoutingLayer):
    def forward(self, router, hidden, *args):
        output = self.spec.route(router, hidden)
        self.context.add_aux_loss(output.logits.float().pow(2).mean())
        return output


@dataclasses.dataclass
class _AuxConfig(RoutingConfig):
    routing_type = "test-aux"

    def create_layer(self, block, model, context):
        return _AuxLayer(block, context)


def test_routing_aux_loss_is_trained(data):
    train, _ = data
    model = tiny_model("qwen3_moe")
    result = pretrain(model, _AuxConfig(), train, None, quick(max_steps=3))
    assert all(a > 0 for a in result.aux_loss) and result.val_perplexity is None
    assert get_patch_state(model).config.routing_type == "test-aux"
    # the model is re-patched when another routing is given
    pretrain(model, TopKConfig(), train, None, quick(max_steps=1))
    assert get_patch_state(model).config.routing_type == "topk"


def test_pretrain_bad_input(data):
    train, _ = data
    model = tiny_model("mixtral", max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pretrain(model, None, train, None, quick())
    with pytest.raises(ValueError, match="lr_schedule"):
        pretrain(tiny_model("mixtral"), None, train, None, quick(lr_schedule="step"))
    with pytest.raises(ValueError, match="empty"):
        pretrain(tiny_model("mixtral"), None, torch.zeros(0, 8, dtype=torch.long), None, quick())
    with pytest.raises(TypeError, match="RoutingConfig"):
        pretrain(tiny_model("mixtral"), {"routing_type": "bip"}, train, None, quick())


@pytest.mark.parametrize("shape", list(MOE_SHAPES))
def test_moe_shapes(shape):
    model = build_moe_model(shape, vocab_size=64, num_hidden_layers=2)
    moe = describe_model(model).shape
    experts, top_k = {
        "mixtral-16x2": (16, 2),
        "deepseek-v3-64x6": (64, 6),
        "mixtral-8x2": (8, 2),
        "mixtral-8x2-large": (8, 2),
        "tiny-moe": (8, 4),
    }.get(shape, (16, 4))
    assert (moe.num_experts, moe.top_k) == (experts, top_k)
    assert model(torch.randint(4, 64, (1, 8))).logits.shape == (1, 8, 64)
    with pytest.raises(ValueError, match="known shapes"):
        build_moe_model("mixtral-1x1", 64)


def test_reference_model_built_once_and_cached(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for name, text in {
        "tinyshakespeare/input.txt": "A:\nTo be or not to be.\n\nB:\nThat is the question.\n\n" * 40,
        "wikitext-2/valid.txt": " The tower is 300 m tall . \n The river is long . \n" * 40,
        "wikitext-2/test.txt": " The tower is long . \n" * 20,
    }.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text(text)
    monkeypatch.setenv("HF_MOE_ROUTING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        reference_module.REFERENCE_MODELS,
        "mixtral-8x2",
        dataclasses.replace(reference_module.REFERENCE_MODELS["mixtral-8x2"], batch_size=4, seq_len=32),
    )
    model, tokenizer = reference_model("mixtral-8x2", data_dir=data, max_steps=2, progress=False)
    folder = reference_path("mixtral-8x2")
    assert folder == tmp_path / "cache" / "reference" / "mixtral-8x2"
    assert (folder / "model.safetensors").is_file() and get_patch_state(model) is None
    info = reference_info("mixtral-8x2")
    assert info["spec"]["max_steps"] == 2 and math.isfinite(info["validation_perplexity"])
    ids = tokenizer("To be or not", return_tensors="pt")["input_ids"]
    expected = model(ids).logits

    def no_build(*args, **kwargs):
        raise AssertionError("a cached reference model must not be rebuilt")

    monkeypatch.setattr(reference_module, "build_reference_model", no_build)
    again, _ = reference_model("mixtral-8x2")
    torch.testing.assert_close(again(ids).logits, expected)
    with pytest.raises(ValueError, match="known"):
        reference_model("gpt-oss")


def test_plot_max_vio(data, tmp_path):
    train, _ = data
    result = pretrain(tiny_model("mixtral"), None, train, None, quick(max_steps=2))
    path = plot_max_vio({"Top-K": result, "again": result}, tmp_path / "plots" / "max_vio.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
