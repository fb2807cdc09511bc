"""The bit-exactness probe (``families/verify.py``) on routers built to be almost right.

The promise "a router is patched only if our rule reproduces it bit for bit" rests on this probe. It
must refuse a rule that agrees on random weights but not on the router as loaded (a router whose
arithmetic changes with its stored dtype), refuse a rule that is off by a single ulp in any output,
and accept the family's own router in every dtype it is stored in. Each test runs in well under a
second on one tiny Mixtral router.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_moe_routing import describe_model
from hf_moe_routing.families.verify import PROBES, verify_spec
from hf_moe_routing.testing import tiny_model


@pytest.fixture(scope="module")
def mixtral_block():
    """The first MoE block of a tiny Mixtral, with its verified spec."""
    return describe_model(tiny_model("mixtral")).blocks[0]


def _router_as(router: torch.nn.Module, cls: type, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``router`` stored in ``dtype`` whose class is ``cls`` (a subclass of its own)."""
    copied = copy.deepcopy(router).to(dtype)
    copied.__class__ = cls
    return copied


def _mixtral_router_class(block) -> type:
    return type(block.router)


def test_the_probe_runs_the_router_as_loaded_first():
    assert PROBES[0] == (None, False, None)  # as loaded: its own dtype and values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_familys_own_router_is_accepted_in_every_stored_dtype(mixtral_block, dtype):
    router = copy.deepcopy(mixtral_block.router).to(dtype)
    ok, why = verify_spec(mixtral_block.spec, router)
    assert ok, why


def _upcasting_class(base: type, upcast: torch.dtype) -> type:
    """Mixtral's router, except that when it is stored in ``upcast`` it computes differently:
    float16 routers compute their logits in float32, float64 routers their softmax in float64.
    On random float32 and bfloat16 copies (the other probes) it is exactly Mixtral's router."""

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        if self.weight.dtype == upcast == torch.float16:
            logits = F.linear(hidden_states.float(), self.weight.float())
        else:
            logits = F.linear(hidden_states, self.weight)
        work = logits if logits.dtype == upcast == torch.float64 else logits.float()
        probs = torch.nn.functional.softmax(work, dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        top /= top.sum(dim=-1, keepdim=True)
        return logits, top, index

    return type(f"Upcasting{upcast}Router", (base,), {"forward": forward})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_a_rule_exact_on_random_weights_but_not_as_loaded_is_refused(mixtral_block, dtype):
    cls = _upcasting_class(_mixtral_router_class(mixtral_block), dtype)
    # on the float32 copy the probes draw at random, the rule is exact ...
    assert verify_spec(mixtral_block.spec, _router_as(mixtral_block.router, cls, torch.float32))[0]
    # ... but the router as loaded (in ``dtype``) routes otherwise: refused, and the message says so
    ok, why = verify_spec(mixtral_block.spec, _router_as(mixtral_block.router, cls, dtype))
    assert not ok and "(as loaded)" in why, why


def _one_ulp_class(base: type, output: int, only_dtype: torch.dtype | None) -> type:
    """Mixtral's router with one element of output ``output`` (0 logits, 1 weights) moved by one ulp
    (only when the router is stored in ``only_dtype``, if given)."""
    original = base.forward

    def forward(self, hidden_states):
        out = list(original(self, hidden_states))
        if only_dtype is None or self.weight.dtype == only_dtype:
            value = out[output]
            moved = value.clone()
            moved.view(-1)[0] = torch.nextafter(value.view(-1)[:1], torch.full_like(value.view(-1)[:1], 1e9))[
                0
            ]
            assert not torch.equal(moved, value)
            out[output] = moved
        return tuple(out)

    return type("OneUlpRouter", (base,), {"forward": forward})


@pytest.mark.parametrize("output", [0, 1], ids=["logits", "weights"])
@pytest.mark.parametrize("only", [None, torch.float32, torch.bfloat16], ids=["always", "float32", "bfloat16"])
def test_a_rule_wrong_by_one_ulp_is_refused(mixtral_block, output, only):
    cls = _one_ulp_class(_mixtral_router_class(mixtral_block), output, only)
    ok, why = verify_spec(mixtral_block.spec, _router_as(mixtral_block.router, cls, torch.float32))
    assert not ok and "differs from the rule's" in why, why


def test_patching_refuses_a_model_whose_router_is_one_ulp_off(monkeypatch):
    """End to end: ``describe_model`` (what ``patch_model`` calls) refuses such a model."""
    from hf_moe_routing import UnsupportedFamilyError

    model = tiny_model("mixtral")
    cls = type(model.model.layers[0].mlp.gate)
    monkeypatch.setattr(cls, "forward", _one_ulp_class(cls, 1, None).forward)
    with pytest.raises(UnsupportedFamilyError, match=r"model\.layers\.0\.mlp\.gate.*differs"):
        describe_model(model)
