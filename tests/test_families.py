"""Every MoE causal-LM family of the installed transformers: exact Top-K routing, or a refusal that says why.

The families are found by the package itself (``hf_moe_routing.testing.catalog``: transformers' auto
mappings and modeling files), not listed here, so a new transformers release is tested the day it is
installed. ``families_expected.json`` (written by ``scripts/families_table.py --expected``) holds what
this version of the package supports on each tested transformers release; the entry of the newest tested
release not newer than the installed one applies: a supported family must stay supported, a family
whose tiny model cannot be built here is skipped as "not testable here" (never supported), and the slower
checks (every routing method, statistics, bfloat16, FLOPs) run on one family per router kind.
"""

import copy
import json
import math

import pytest
import torch
import transformers
from family_expectations import expected_for
from packaging.version import Version

from hf_moe_routing import (
    AdaKConfig,
    BIPConfig,
    DynamicSkipConfig,
    LossControlledConfig,
    LossFreeConfig,
    TopKConfig,
    TopPConfig,
    UnsupportedFamilyError,
    describe_model,
    fit_routing,
    patch_model,
    routing_aux_loss,
    unpatch_model,
)
from hf_moe_routing.evaluation import RoutingStats
from hf_moe_routing.evaluation.flops import causal_context, counting_flops, flops_per_token, model_structure
from hf_moe_routing.patching import is_patched, routing_layers
from hf_moe_routing.testing import causal_lm_class, moe_families, tiny_model
from hf_moe_routing.testing.support import probe_ids, untestable_reason

FAMILIES = [entry.model_type for entry in moe_families()]
EXPECTED_RELEASE, EXPECTED = expected_for(transformers.__version__)
SUPPORTED = [name for name in FAMILIES if name in EXPECTED["supported"]]
#: Fewer supported families than this on any release of the declared range is a regression (5.20.2: 43 of 55).
MIN_SUPPORTED = 43
#: Families whose bfloat16 checkpoints must route exactly as the unpatched model (issue 8).
BF16_REQUIRED = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_5_moe_text",
    "deepseek_v2",
    "deepseek_v3",
    "olmoe",
    "flex_olmo",
    "minimax",
    "mellum",
    "glm4_moe",
    "gpt_oss",
    "llama4_text",
    "minimax_m2",
    "ernie4_5_moe",
    "granitemoe",
    "granitemoeshared",
    "granitemoehybrid",
    "granitemoe_swa",
    "phimoe",
    "jamba",
    "hunyuan_v1_moe",
    "kimi_linear",
    "exaone_moe",
    "solar_open",
    "longcat_flash",
]


def _one_per_kind() -> list[str]:
    """One supported family per router kind (every RouterKind field, bias location, input rank)."""
    chosen: dict[str, str] = {}
    for name in sorted(SUPPORTED):
        chosen.setdefault(EXPECTED["supported"][name]["kind_key"], name)
    return sorted(chosen.values())


REPRESENTATIVES = _one_per_kind()


def _logits(model, ids=None, **kwargs):
    with torch.no_grad():
        return model(probe_ids() if ids is None else ids, **kwargs)


# ---- the catalog --------------------------------------------------------------------------------
def test_the_catalog_finds_the_families_by_itself():
    assert len(FAMILIES) == len(set(FAMILIES)) >= MIN_SUPPORTED
    for entry in moe_families():
        assert causal_lm_class(entry.model_type).__name__ == entry.causal_lm_class
    # a family whose causal-LM class the auto mapping omits is found in its modeling file
    assert (
        any(not entry.in_auto_mapping for entry in moe_families()) or "mistral4" not in EXPECTED["supported"]
    )


def test_the_number_of_supported_families_does_not_drop():
    assert len(SUPPORTED) >= MIN_SUPPORTED, f"supported: {SUPPORTED}"
    if Version(transformers.__version__) == Version(EXPECTED_RELEASE):  # the catalog still finds them all
        assert set(EXPECTED["supported"]) <= set(FAMILIES), set(EXPECTED["supported"]) - set(FAMILIES)


# ---- every family: exact Top-K or a refusal -----------------------------------------------------
@pytest.mark.parametrize("model_type", FAMILIES)
def test_topk_is_exact_and_reversible_or_refused_with_a_reason(model_type):
    try:
        model = tiny_model(model_type)
    except Exception as error:  # a tiny model that cannot be built here: never a supported family
        assert model_type not in EXPECTED["supported"], f"{model_type} was supported: {error}"
        pytest.skip(untestable_reason(error))
    reference = _logits(model, output_router_logits=True)
    try:
        describe_model(model)
    except UnsupportedFamilyError as error:
        assert model_type not in EXPECTED["supported"], f"{model_type} was supported: {error}"
        assert error.model_type == model_type and len(error.reason) > 20 and model_type in str(error)
        with pytest.raises(UnsupportedFamilyError):
            patch_model(model, TopKConfig())
        assert not is_patched(model)  # refused before anything changed
        assert torch.equal(_logits(model).logits, reference.logits)
        return
    patch_model(model, TopKConfig())
    patched = _logits(model, output_router_logits=True)
    assert torch.equal(patched.logits, reference.logits)
    assert len(patched.router_logits) == len(reference.router_logits) > 0
    for ours, theirs in zip(patched.router_logits, reference.router_logits, strict=True):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    unpatch_model(model)
    assert torch.equal(_logits(model).logits, reference.logits)


@pytest.mark.parametrize("model_type", [f for f in SUPPORTED if f in BF16_REQUIRED or f in REPRESENTATIVES])
def test_bfloat16_checkpoints_route_exactly(model_type):
    """As ``from_pretrained(dtype=torch.bfloat16)`` loads them (selection biases in bf16 where the family stores them so)."""
    model = tiny_model(model_type, dtype=torch.bfloat16)
    reference = _logits(model).logits
    bias = describe_model(model).blocks[0].spec.selection_bias
    before = bias.get().clone() if bias is not None else None
    patch_model(model, TopKConfig())
    assert torch.equal(_logits(model).logits, reference)
    patch_model(model, LossFreeConfig(update_rate=1e-4), replace=True)
    assert torch.equal(_logits(model).logits, reference)  # routes like the model until it updates
    unpatch_model(model)
    if bias is not None:
        assert torch.equal(bias.get(), before) and bias.get().dtype == before.dtype
    assert torch.equal(_logits(model).logits, reference)


# ---- one family per router kind: every method, statistics ---------------------------------------
def _data(rows: int = 4, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(3, 128, (rows, seq_len), generator=torch.Generator().manual_seed(1))


def _routed(model):
    """Records each MoE block's routing decision (index (n, S)) in the next forwards."""
    described = describe_model(model, verify=False)
    seen = []
    handles = [
        b.router.register_forward_hook(lambda m, a, out, b=b: seen.append(b.spec.decode(out).index))
        for b in described.blocks
    ]
    return described, seen, handles


def _supports_eager_experts(model) -> bool:
    try:
        model.set_experts_implementation("eager")
    except (ValueError, NotImplementedError, AttributeError):
        return False
    return True


def _eager_logits(model, ids, num_experts: int) -> torch.Tensor:
    """Logits with transformers' eager experts, unused slots sent to expert 0 with weight 0 (the eager
    code of some families, e.g. gpt-oss, one-hot encodes the expert index and cannot take the sentinel m)."""

    def clamp(module, args, kwargs):
        def fix(t):
            is_index = isinstance(t, torch.Tensor) and not t.is_floating_point()
            return t.clamp(max=num_experts - 1) if is_index else t

        return tuple(fix(a) for a in args), {key: fix(v) for key, v in kwargs.items()}

    experts = [b.experts for b in describe_model(model, verify=False).blocks]
    handles = [e.register_forward_pre_hook(clamp, with_kwargs=True) for e in experts]
    try:
        return _logits(model, ids).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("model_type", REPRESENTATIVES)
def test_every_method_runs_with_finite_outputs_and_skips_sentinel_slots(model_type):
    model = tiny_model(model_type)
    ids = _data()
    described = describe_model(model)
    m, k = described.shape.num_experts, described.shape.top_k
    reference = _logits(model, ids).logits

    # fixed k: BIP (fitted prices), Loss-Free (the family's own bias, or a new one), Loss-Controlled
    own = [b.spec.selection_bias for b in described.blocks if b.spec.selection_bias is not None]
    saved = [slot.get().clone() for slot in own]
    for config in (BIPConfig(), LossFreeConfig(update_rate=1e-2)):
        patch_model(model, config, replace=True)
        assert torch.equal(_logits(model, ids).logits, reference)  # unfitted: the model's own routing
        fit_routing(model, ids, batch_size=2, progress=False)
        assert torch.isfinite(_logits(model, ids).logits).all()
    layer = next(iter(routing_layers(model).values()))
    if own:  # Loss-Free moved the family's own biases (and unpatching keeps them): put them back
        assert not torch.equal(own[0].get(), saved[0]) and layer.num_updates > 0
        with torch.no_grad():
            for slot, value in zip(own, saved, strict=True):
                slot.get().copy_(value)
    else:
        assert layer.bias.abs().sum() > 0 and layer.num_updates > 0
    patch_model(model, LossControlledConfig(coefficient=0.01), replace=True)
    model.train()
    out = model(ids, labels=ids)
    aux = routing_aux_loss(model)
    assert torch.isfinite(out.logits).all() and aux is not None and torch.isfinite(aux)
    model.eval()

    # variable k: sentinel slots appear, and the sentinel-safe experts skip them (eager experts agree)
    for config in (TopPConfig(p=0.5), DynamicSkipConfig(), AdaKConfig()):
        patch_model(model, config, replace=True)
        if isinstance(config, DynamicSkipConfig):  # beta: the median ratio w_j / w_(1) (the paper's rule)
            fit_routing(model, ids, batch_size=2, progress=False)
        _, seen, handles = _routed(model)
        ours = _logits(model, ids).logits
        for handle in handles:
            handle.remove()
        assert torch.isfinite(ours).all()
        index = torch.cat([i.reshape(-1) for i in seen])
        assert ((index >= 0) & (index <= m)).all()
        if not isinstance(config, AdaKConfig):  # an untrained allocator may pick k = top_k everywhere
            assert (index == m).any(), "no token used fewer experts"
        if _supports_eager_experts(model):
            eager = _eager_logits(model, ids, m)
            model.set_experts_implementation("sentinel_grouped_mm")
            torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-5)
    unpatch_model(model)
    assert torch.equal(_logits(model, ids).logits, reference)
    assert k >= 1


def _top_p_counts(model_type: str, first: torch.Tensor, index: torch.Tensor, bias, p: float, k: int):
    """Experts per token under top-p with ``max_k = k``, from the unpatched router's own output.

    ``first`` holds the router's logits (Gemma 4's: its softmax scores), ``index`` its chosen experts.
    P (Huang et al. 2024) is the softmax over every expert's logit, or the sigmoid scores normalised to
    sum 1 for sigmoid routers; the chosen experts are taken in the order the router selects them (its
    choice score: score or logit, plus the selection bias) until the mass of the ones before reaches
    p. Returns the counts (n,) and the mass before each rank (n, k).
    """
    kind = json.loads(EXPECTED["supported"][model_type]["kind_key"])
    first = first.float()
    if kind["codec"] == "scores_triple":  # the router returns softmax scores
        probs = choice = first
    elif kind["score"] == "sigmoid":
        choice = first.sigmoid()
        probs = choice / choice.sum(dim=-1, keepdim=True)
    else:
        probs = first.softmax(dim=-1)
        choice = first if kind["score"] in ("softmax_topk", "sigmoid_topk", "sparsemixer") else probs
    if bias is not None:
        choice = choice + bias.float()
    index = index.sort(dim=-1).values[:, :k]  # Llama 4 marks its unchosen experts with the index m
    order = choice.gather(1, index).argsort(dim=-1, descending=True, stable=True)
    mass = probs.gather(1, index.gather(1, order))
    before = mass.cumsum(dim=-1) - mass
    return (before < p).sum(dim=-1).clamp(min=1, max=k), before


def _router_calls(model, ids) -> list[tuple[tuple, dict]]:
    """Each MoE block's router inputs ``(args, kwargs)`` in one forward of ``model`` on ``ids``."""
    described = describe_model(model, verify=False)
    calls: dict[int, list] = {i: [] for i in range(len(described.blocks))}
    handles = [
        b.router.register_forward_pre_hook(lambda m, a, kw, i=i: calls[i].append((a, kw)), with_kwargs=True)
        for i, b in enumerate(described.blocks)
    ]
    _logits(model, ids)
    for handle in handles:
        handle.remove()
    assert all(len(c) == 1 for c in calls.values()), "a router ran more than once per forward"
    return [c[0] for c in calls.values()]


@pytest.mark.parametrize("model_type", REPRESENTATIVES)
def test_routing_stats_count_the_experts_each_token_uses(model_type):
    model = tiny_model(model_type)
    ids = _data()
    k = describe_model(model).shape.top_k
    with RoutingStats(model) as stats:
        _logits(model, ids)
    assert stats.last.activated.tolist() == [float(k)] * len(stats.last.activated)
    assert torch.equal(stats.last.loads.sum(dim=-1), torch.full_like(stats.last.loads[:, 0], ids.numel() * k))

    # top-p with max_k = k: each token's count follows from the unpatched router's probabilities on the
    # hidden states it sees (an unpatched copy's routers, called on the patched model's router inputs)
    reference = describe_model(copy.deepcopy(model), verify=False).blocks

    def counts(calls, p):
        result = []
        with torch.no_grad():
            for (args, kwargs), block in zip(calls, reference, strict=True):
                decision = block.spec.decode(block.router(*args, **kwargs))
                bias = block.spec.selection_bias.get() if block.spec.selection_bias else None
                result.append(_top_p_counts(model_type, decision.logits, decision.index, bias, p, k))
        return result

    befores = [before for _, before in counts(_router_calls(model, ids), 0.5)]
    # p: near the median top-1 mass, midway between two of the masses that decide the counts
    masses = torch.cat([b[:, 1:].reshape(-1) for b in befores]).sort().values
    target = torch.cat([b[:, 1] for b in befores]).median()
    gaps, mids = masses.diff(), (masses[1:] + masses[:-1]) / 2
    mids = mids[gaps > 1e-4]
    p = float(mids[(mids - target).abs().argmin()])
    patch_model(model, TopPConfig(p=p, max_k=k))
    with RoutingStats(model) as stats:
        calls = _router_calls(model, ids)
    expected = torch.stack([c.double().mean() for c, _ in counts(calls, p)])
    assert ((expected > 1) & (expected < k)).any(), "p leaves every token at 1 or k experts"
    torch.testing.assert_close(stats.last.activated.double(), expected, rtol=0, atol=1e-9)
    assert torch.equal(stats.last.loads.sum(dim=-1).double(), expected * ids.numel())


# ---- FLOPs: the analytic count agrees with torch's FlopCounterMode ------------------------------
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_flops_per_token_match_flop_counter(model_type):
    model = tiny_model(model_type)
    ids = _data(rows=2, seq_len=20)
    _supports_eager_experts(model)  # FlopCounterMode counts eager experts' matmuls, not grouped_mm's
    # Llama 4's experts multiply every expert on every token (zero weights for the unchosen ones)
    dense_experts = any(layer.dense_experts for layer in model_structure(model))
    with counting_flops(model) as counter:
        model(ids)
    measured = counter.get_total_flops() / ids.numel()
    activated = describe_model(model).shape.num_experts if dense_experts else None
    predicted = flops_per_token(model, ids.shape[1], activated=activated, causal=False)
    assert math.isfinite(predicted.total)
    assert predicted.total == pytest.approx(measured, rel=0.02)


# ---- the CLI --------------------------------------------------------------------------------------
def test_families_command_prints_the_support_table(capsys):
    from hf_moe_routing.cli.main import main

    refused = sorted(EXPECTED["refused"])[0]
    assert main(["families", "--only", "mixtral", refused, "--json", "--quiet"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert (table["transformers"], table["total"], table["supported"], table["refused"]) == (
        transformers.__version__,
        2,
        1,
        1,
    )
    rows = {row["model_type"]: row for row in table["families"]}
    assert rows["mixtral"]["status"] == "supported"
    assert rows["mixtral"]["router_kind"] == EXPECTED["supported"]["mixtral"]["router_kind"]
    assert rows[refused]["status"] == "refused" and rows[refused]["reason"] == EXPECTED["refused"][refused]

    assert main(["families", "--only", "mixtral", refused, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "mixtral" in text and refused in text and "1 of 2 MoE causal-LM families supported" in text
    assert main(["families", "--only", "no_such_family"]) == 2
    assert "Not a Mixture-of-Experts causal-LM family" in capsys.readouterr().err


def test_causal_context_of_chunked_attention():
    # Llama 4's chunked layers: a query sees the keys of its own chunk up to itself
    assert causal_context(5, chunk=2) == (1 + 2 + 1 + 2 + 1) / 5
    assert causal_context(4, chunk=8) == causal_context(4) == 2.5
