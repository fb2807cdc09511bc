"""Reliability, routing state: it stays float32 through dtype casts (issue 10, item 4) and every
method trains the same under activation checkpointing, non-reentrant and reentrant (item 5).

References are independent: the state before the cast, a float64 replay of Loss-Free's update rule
from the recorded routing decisions, and a run without checkpointing.
"""

from __future__ import annotations

import pytest
import torch
from reliability_models import make_model

from hf_moe_routing import (
    AdaKConfig,
    AutoRoutedModelForCausalLM,
    BIPConfig,
    DynamicSkipConfig,
    LossControlledConfig,
    LossFreeConfig,
    TopKConfig,
    TopPConfig,
    fit_routing,
    patch_model,
    routing_aux_loss,
    routing_layers,
    save_routing_adapter,
)
from hf_moe_routing.families import describe_model

CASTS = {  # applied in turn to one patched model
    "to-bf16": lambda m: m.to(torch.bfloat16),
    "to-kwargs": lambda m: m.to(device="cpu", dtype=torch.bfloat16),
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.bfloat16(),
}
STATEFUL = {
    "bip": BIPConfig(),
    "loss-free": LossFreeConfig(),
    "adak": AdaKConfig(),
    "skip-fixed": DynamicSkipConfig(beta=0.3),
    "skip-fitted": DynamicSkipConfig(),
}


def _float_state(model) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in routing_layers(model).items():
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if t.is_floating_point():
                out[f"{i}.{name}"] = t
    return out


@pytest.mark.parametrize("method", list(STATEFUL))
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_routing_state_stays_float32_through_dtype_casts_and_the_model_still_runs(family, method, ids):
    model = make_model(family)
    patch_model(model, STATEFUL[method])
    if method in ("bip", "loss-free", "skip-fitted"):
        fit_routing(model, ids, progress=False)
    before = {k: v.detach().clone() for k, v in _float_state(model).items()}
    assert before and all(v.dtype == torch.float32 for v in before.values())

    for name, cast in CASTS.items():
        model = cast(model)
        assert model.lm_head.weight.dtype != torch.float32, name  # the model was cast ...
        for key, value in _float_state(model).items():  # ... its routing state was not, values exact
            assert value.dtype == torch.float32 and torch.equal(value, before[key]), (name, key)
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all(), name
        model.float()  # and back: nothing lost
        assert all(torch.equal(v, before[k]) for k, v in _float_state(model).items()), name

    model.bfloat16().train()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(v.dtype == torch.float32 for v in _float_state(model).values())  # updates stay float32
    for name, p in routing_layers(model)[max(routing_layers(model))].named_parameters():
        assert p.grad is None or p.grad.dtype == torch.float32, name


@pytest.mark.parametrize("config", [BIPConfig(), AdaKConfig()], ids=["bip", "adak"])
def test_from_pretrained_with_a_low_precision_dtype_keeps_the_adapter_state_float32(tmp_path, config, ids):
    base = make_model("mixtral")
    base.save_pretrained(tmp_path / "base")
    patch_model(base, config)
    if isinstance(config, BIPConfig):
        fit_routing(base, ids, progress=False)
    else:
        for layer in routing_layers(base).values():
            layer.num_updates.fill_(1)
    save_routing_adapter(base, tmp_path / "adapter", model_card=False)
    saved = {k: v.detach().clone() for k, v in _float_state(base).items() if "num_updates" not in k}

    model = AutoRoutedModelForCausalLM.from_pretrained(
        str(tmp_path / "base"), adapter=str(tmp_path / "adapter"), dtype=torch.bfloat16
    )
    assert model.lm_head.weight.dtype == torch.bfloat16
    state = _float_state(model)
    for key, value in saved.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value), key
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_loss_free_updates_land_on_a_bf16_correction_bias_through_the_float32_master_copy():
    """The issue's case: a DeepSeek-V3 correction bias of 0.6 cast to bf16 (spacing 2**-7 there), 75
    updates of size 1e-3. Added to the bf16 tensor directly, none would land; through the float32
    master copy every one does, and the model's tensor follows the rounded master copy."""
    assert torch.tensor(0.6, dtype=torch.bfloat16) + 1e-3 == torch.tensor(0.6, dtype=torch.bfloat16)
    model = make_model("deepseek_v3")
    blocks = describe_model(model).blocks
    for block in blocks:  # the bias alone in bf16 (as after model.to(torch.bfloat16)); the rest float32
        slot = block.spec.selection_bias
        setattr(slot.owner, slot.name, torch.full_like(slot.get(), 0.6, dtype=torch.bfloat16))
    start = float(torch.tensor(0.6, dtype=torch.bfloat16))  # 0.6015625: what the model holds
    rate, steps = 1e-3, 75
    patch_model(model, LossFreeConfig(update_rate=rate))
    model.train()
    decisions: dict[int, list[torch.Tensor]] = {b.layer_index: [] for b in blocks}
    for block in blocks:
        block.router.register_forward_hook(
            lambda mod, args, out, i=block.layer_index: decisions[i].append(out[2].detach().clone())
        )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(steps):  # training forwards of the routers (the rest of the model plays no part)
            for block in blocks:
                block.router(torch.randn(16, block.spec.hidden_size, generator=gen))
    for block in blocks:
        layer, m = block.router.routing, block.spec.num_experts
        expected = torch.full((m,), start, dtype=torch.float64)
        for index in decisions[block.layer_index]:  # b_j += u sign(mean load - load_j), replayed in float64
            loads = torch.bincount(index.reshape(-1), minlength=m).double()
            expected += rate * torch.sign(loads.mean() - loads)
        assert int(layer.num_updates) == steps
        assert layer.bias.dtype == torch.float32
        torch.testing.assert_close(layer.bias.double(), expected, rtol=0, atol=1e-5)
        assert (expected - start).abs().max() > 0.01  # the updates moved the bias by several bf16 steps
        model_bias = block.spec.selection_bias.get()
        assert model_bias.dtype == torch.bfloat16
        assert torch.equal(model_bias, layer.bias.to(torch.bfloat16))  # what the model routes with
        assert (model_bias != torch.tensor(0.6, dtype=torch.bfloat16)).any()


# ---- item 5: activation checkpointing, both modes ------------------------------------------------
CHECKPOINT_CASES = {
    "topk": TopKConfig(),
    "bip-after": BIPConfig(update="after"),
    "bip-before": BIPConfig(update="before"),
    "loss-free": LossFreeConfig(update_rate=0.05),
    "loss-controlled": LossControlledConfig(coefficient=0.1),
    "loss-controlled-seq": LossControlledConfig(coefficient=0.1, per_sequence=True),
    "top-p": TopPConfig(p=0.6),
    "dynamic-skip": DynamicSkipConfig(beta=0.5),
    "adak": AdaKConfig(),  # training mode samples k: the recomputation must reuse the draw
}


def _train_two_steps(family, config, checkpointing):
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    model = make_model(family)
    model.config.use_cache = False
    patch_model(model, config)
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    torch.manual_seed(5)
    steps = []
    for _ in range(2):  # the second step routes with the state the first one updated
        model.zero_grad()
        out = model(ids, labels=ids)
        aux = routing_aux_loss(model)
        loss = out.loss + (aux if aux is not None else 0.0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        state = {
            i: {k: v.clone() for k, v in layer.state_dict().items()}
            for i, layer in routing_layers(model).items()
        }
        steps.append((out.loss.detach(), None if aux is None else aux.detach(), grads, state))
    return steps


#: every method on a softmax family; on a sigmoid + bias, group-limited one those whose state or
#: loss involves the bias and groups (BIP, Loss-Free on the model's own bias), or that sample (Ada-K)
CHECKPOINT_RUNS = [("mixtral", m) for m in CHECKPOINT_CASES] + [
    ("deepseek_v3", m) for m in ("bip-before", "loss-free", "loss-controlled", "adak")
]


@pytest.mark.parametrize(("family", "method"), CHECKPOINT_RUNS)
def test_checkpointed_training_equals_plain_training_in_both_modes(family, method):
    config = CHECKPOINT_CASES[method]
    plain = _train_two_steps(family, config, None)
    if isinstance(config, LossControlledConfig):
        assert all(aux is not None and aux > 0 for _, aux, _, _ in plain)
    for reentrant in (False, True):
        checkpointed = _train_two_steps(family, config, reentrant)
        for step, (want, got) in enumerate(zip(plain, checkpointed, strict=True)):
            where = (method, "reentrant" if reentrant else "non-reentrant", step)
            assert torch.equal(got[0], want[0]), where  # LM loss
            if want[1] is None:
                assert got[1] is None, where
            else:  # the aux loss is recorded once, with its value
                torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
            assert got[2].keys() == want[2].keys(), where  # the same parameters get gradients ...
            for name in want[2]:  # ... of the same value (the aux loss's included)
                torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-6, msg=str(where))
            for i in want[3]:  # state updated once per step, never by the recomputation
                for key in want[3][i]:
                    assert torch.equal(got[3][i][key], want[3][i][key]), (*where, i, key)
