"""Fuzz test (issue 10): random router weights and hidden states, dtypes, training or inference and
settings, through every routing method on routers of every kind.

For finite inputs every routing must return finite, non-negative weights, indices in ``[0, m]``, no
expert twice for one token, at least one expert per token, and weight exactly 0 on unused (sentinel)
slots. Hypothesis runs derandomized (the same examples every run) and shrinks any failure.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_models import make_model

from hf_moe_routing import ROUTING_METHODS, TopKConfig, patch_model
from hf_moe_routing.families import describe_model

#: softmax + renorm, softmax without renorm, sigmoid + bias grouped, softmax over chosen logits (two
#: dtype rules), sigmoid of chosen logits, SparseMixer, softmax + bias with a clamped denominator
FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "deepseek_v3",
    "gpt_oss",
    "granitemoe",
    "llama4_text",
    "phimoe",
    "ernie4_5_moe",
)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: every registered method (a new one is fuzzed once it lists its ``example_settings``)
METHODS = tuple(ROUTING_METHODS)
#: fixed-k methods that balance by moving tokens to other experts (BIP, Loss-Free)
BALANCING = tuple(
    n for n in METHODS if ROUTING_METHODS[n].requires == "fitting" and not ROUTING_METHODS[n].variable_k
)


@functools.cache
def _model(family: str, dtype: torch.dtype):
    model = make_model(family, dtype=dtype)
    patch_model(model, TopKConfig())  # described and verified once; later patches replace the routing
    return model


def _config(draw, method: str, spec):
    """A config of ``method`` from one of its example values per field (``RoutingConfig.example_settings``)."""
    cls = ROUTING_METHODS[method]
    settings = cls.example_settings(spec)
    return cls(**{name: draw(st.sampled_from(list(values)), label=name) for name, values in settings.items()})


FUZZ = settings(
    deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_every_routing_gives_valid_decisions_on_random_routers(data):
    draw = data.draw
    _route_and_check(
        draw,
        family=draw(st.sampled_from(FAMILIES), label="family"),
        method=draw(st.sampled_from(METHODS), label="method"),
        training=draw(st.booleans(), label="training"),
        logit_scale=draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0, 100.0, 1000.0]), label="logit scale"),
    )


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_balancing_never_gives_nan_weights_on_saturated_routers(data):
    """Where 0/0 lurks: balancing moves tokens onto experts whose probability underflowed to 0, on
    families that renormalise the chosen weights (the first test rarely draws this corner)."""
    draw = data.draw
    _route_and_check(
        draw,
        family=draw(st.sampled_from(["mixtral", "deepseek_v3", "ernie4_5_moe"]), label="family"),
        method=draw(st.sampled_from(BALANCING), label="method"),
        training=True,
        logit_scale=draw(st.sampled_from([100.0, 1000.0]), label="logit scale"),
    )


def _route_and_check(draw, family: str, method: str, training: bool, logit_scale: float) -> None:
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    model = _model(family, dtype)
    block = describe_model(model).blocks[-1]
    spec = block.spec
    config = _config(draw, method, spec)
    patch_model(model, config, replace=True)
    layer = block.router.routing
    layer.train(training)
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    n = draw(st.integers(1, 48), label="tokens")

    gen = torch.Generator().manual_seed(seed)
    weight = spec.weight(block.router)
    with torch.no_grad():  # logits ~ N(0, logit_scale^2); 1000 underflows every softmax but the best
        weight.copy_(
            (torch.randn(weight.shape, generator=gen) * logit_scale / spec.hidden_size**0.5).to(weight.dtype)
        )
        for param in layer.parameters():  # learned state (Ada-K's allocators): random too
            param.normal_(0.0, 1.0, generator=gen)
        if draw(st.booleans(), label="tied hidden states"):  # ties in the scores (dynamic skipping)
            hidden = torch.randint(-1, 2, (n, spec.hidden_size), generator=gen).to(dtype)
        else:
            hidden = torch.randn(n, spec.hidden_size, generator=gen).to(dtype)
        torch.manual_seed(seed)
        logits, weights, index = layer(block.router, hidden)
        if training:  # route again with the state the first forward updated (BIP, Loss-Free)
            logits, weights, index = layer(block.router, hidden)

    m = spec.num_experts
    assert torch.isfinite(logits).all()  # the inputs were finite (the premise of the test)
    assert index.dtype == torch.long and index.shape == weights.shape and index.shape[0] == n
    assert ((index >= 0) & (index <= m)).all(), "index outside [0, m]"
    assert torch.isfinite(weights).all(), "non-finite weight"
    assert (weights >= 0).all(), "negative weight"
    sentinel = index == m
    assert (weights[sentinel] == 0).all(), "a sentinel slot with a weight"
    assert (~sentinel).any(dim=-1).all(), "a token without an expert"
    ordered = index.sort(dim=-1).values
    duplicate = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] < m)
    assert not duplicate.any(), "an expert chosen twice for one token"


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_fuzz_models_are_built_for_each_dtype(family):
    for dtype in DTYPES:  # the fuzz premise: the cached models patch and route in every dtype
        assert describe_model(_model(family, dtype)).spec.num_experts > 0
