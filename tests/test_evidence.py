"""The evidence protocol: splits, paired bootstrap CIs, per-layer budgets, compute matching, build hashes,
and ``scripts/reproduce.py`` (smoke run, hash refusal)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_moe_routing import DynamicSkipConfig, TopPConfig, patch_model
from hf_moe_routing.data import evidence_splits
from hf_moe_routing.data.splits import articles
from hf_moe_routing.evaluation.matched import BudgetedBaseline, match_compute, solve_monotone
from hf_moe_routing.evaluation.paired import (
    bootstrap_ci,
    paired_mean_difference_ci,
    ppl_change_ci,
    ppl_margin_ci,
    row_scores,
)
from hf_moe_routing.methods.dynamic_skip import (
    beta_for_budget,
    calibrate,
    calibrate_to_budget,
    collect_ratios,
)
from hf_moe_routing.methods.top_p import calibrate_to_budget as top_p_to_budget
from hf_moe_routing.methods.top_p import collect_probs, p_for_budget
from hf_moe_routing.testing import tiny_model
from hf_moe_routing.training.reference import (
    ReferenceHashMismatch,
    build_key,
    check_build_hash,
    recorded_hash,
    reference_info,
    reference_model,
)

ROOT = Path(__file__).resolve().parents[1]


# ---- splits ----------------------------------------------------------------------------------------
def test_splits_are_disjoint_deterministic_and_keep_validation_out_of_pretraining():
    a, b = evidence_splits(), evidence_splits()
    assert a.fingerprint() == b.fingerprint()
    pre, val, held, test = (set(x) for x in (a.pretrain, a.validation, a.heldout_train, a.test))
    # WikiText repeats a few short lines (e.g. headings) across articles: compare long paragraphs
    long = lambda s: {p for p in s if len(p) > 200}  # noqa: E731
    assert not long(pre) & long(val)
    assert not long(test) & (long(pre) | long(val) | long(held))
    assert not long(held) & (long(pre) | long(val))
    assert sum(len(p.split()) for p in a.test) > 100_000  # far more than 32k predicted tokens
    # articles stay whole: every split starts at a heading
    assert articles(a.validation)[0][0].startswith("= ") and articles(a.test)[0][0].startswith("= ")


def test_articles_group_paragraphs_at_top_level_headings():
    groups = articles(["intro", "= A =", "x", "= = sub = =", "y", "= B =", "z"])
    assert groups == [["intro"], ["= A =", "x", "= = sub = =", "y"], ["= B =", "z"]]
    with pytest.raises(ValueError, match="No paragraphs"):
        articles([])


# ---- statistics ------------------------------------------------------------------------------------
def test_paired_bootstrap_matches_the_normal_closed_form_and_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, 3000)
    y = x - rng.normal(0.1, 0.5, 3000)  # paired: the shared noise cancels
    est, low, high = paired_mean_difference_ci(x, y, n_resamples=4000, seed=3)
    d = x - y
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert est == pytest.approx(d.mean())
    assert low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.15 * half)
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.bootstrap((d,), np.mean, n_resamples=4000, method="percentile", random_state=0)
    assert low == pytest.approx(ref.confidence_interval.low, abs=0.1 * half)
    assert high == pytest.approx(ref.confidence_interval.high, abs=0.1 * half)


def test_ppl_change_and_margin_are_token_weighted_and_signed():
    tokens = np.array([10, 30, 60])
    ref = np.array([20.0, 60.0, 120.0])
    a = ref + np.array([0.1, 0.3, 0.6])  # +0.01 nats per token
    b = ref + np.array([0.5, 1.5, 3.0])  # +0.05 nats per token
    assert ppl_change_ci(a, ref, tokens)[0] == pytest.approx(math.expm1(0.01))
    margin = ppl_margin_ci(a, b, ref, tokens)
    assert margin[0] == pytest.approx(math.expm1(0.05) - math.expm1(0.01))
    assert margin[1] > 0  # A better than B on every row: the interval excludes 0
    assert ppl_margin_ci(b, a, ref, tokens)[2] < 0  # swapped: B worse
    with pytest.raises(ValueError, match="at least 2 rows"):
        bootstrap_ci(lambda w: w.sum(axis=1), 1)


# ---- per-layer budgets and compute matching ----------------------------------------------------------
def test_beta_and_p_for_budget_hit_the_requested_mean():
    g = torch.Generator().manual_seed(0)
    ratios = torch.rand(4000, 3, generator=g)
    for k in (1.0, 1.7, 2.5, 4.0):
        beta = beta_for_budget(ratios, k)
        assert 1 + (ratios >= beta).sum(dim=1).float().mean() == pytest.approx(k, abs=1e-3)
    probs = torch.softmax(torch.randn(4000, 4, generator=g) * 2, dim=-1).sort(descending=True).values
    for k in (1.3, 2.2, 3.5):
        from hf_moe_routing.methods.top_p.calibrate import mean_count

        assert mean_count(probs, p_for_budget(probs, k)) == pytest.approx(k, abs=2e-3)
    with pytest.raises(ValueError, match="mean_k"):
        beta_for_budget(ratios, 4.5)


def _rows(n: int, length: int = 16, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, length), generator=g)
    return [{"input_ids": r.tolist(), "attention_mask": [1] * length, "labels": r.tolist()} for r in ids]


@pytest.mark.parametrize("kind", ["dyn-skip", "top-p"])
def test_per_layer_calibration_hits_per_layer_budgets(kind):
    model = tiny_model("qwen2_moe", num_experts_per_tok=4)
    rows = _rows(32)
    budgets = {0: 1.5, 1: 3.0}
    if kind == "dyn-skip":
        patch_model(model, DynamicSkipConfig())
        calibrate_to_budget(model, budgets, collect_ratios(model, rows))
    else:
        patch_model(model, TopPConfig(p=1.0, max_k=4))
        top_p_to_budget(model, budgets, collect_probs(model, rows))
    per_layer = row_scores(model, rows).experts_per_layer
    # the first MoE layer sees exactly the calibration inputs; later layers see inputs changed by the
    # earlier layers' reduced routing, so their count is close, not exact
    assert per_layer[0] == pytest.approx(1.5, abs=0.01)
    assert per_layer[1] == pytest.approx(3.0, abs=0.15)


def test_dynamic_skip_calibrate_stays_importable_and_collect_ratios_leaves_beta():
    model = tiny_model("mixtral")
    patch_model(model, DynamicSkipConfig())
    betas = calibrate(model, _rows(8), progress=False)
    collect_ratios(model, _rows(4))
    layers = [m for m in model.modules() if hasattr(m, "beta")]
    assert [float(m.beta) for m in layers] == pytest.approx(list(betas.values()))


def test_solve_monotone_lands_on_the_target():
    calls = []
    f = lambda x: calls.append(x) or x**3  # noqa: E731
    x, fx = solve_monotone(f, 0.0, 2.0, 3.0, tol=1e-6)
    assert fx == pytest.approx(3.0, abs=1e-6) and x == pytest.approx(3 ** (1 / 3), abs=1e-6)
    assert len(calls) < 30
    x, fx = solve_monotone(f, 0.0, 1.0, 5.0, tol=1e-6)  # outside the range: the closest end
    assert (x, fx) == (1.0, 1.0)


@pytest.mark.parametrize("mode", ["uniform", "global-p", "per-layer"])
def test_match_compute_lands_on_the_target_on_the_evaluation_rows(mode):
    model = tiny_model("qwen2_moe", num_experts_per_tok=4)
    kind = "dyn-skip" if mode == "uniform" else "top-p"
    baseline = BudgetedBaseline(model, kind, _rows(16, seed=1))
    rows = _rows(24, seed=2)
    scores, info = match_compute(baseline, rows, 2.6, mode=mode, budgets={0: 2.0, 1: 3.5}, tol=2e-3)
    assert scores.mean_experts == pytest.approx(2.6, abs=2e-3)
    assert info["mean_experts"] == scores.mean_experts
    assert row_scores(baseline.model, rows).mean_experts == pytest.approx(2.6, abs=2e-3)  # left at the match
    if mode == "per-layer":  # a common shift keeps the searched split's shape
        assert info["budgets"][1] - info["budgets"][0] == pytest.approx(1.5)


def test_row_scores_split_nll_tokens_and_accuracy_by_the_predicted_tokens_class():
    model = tiny_model("mixtral")
    rows = _rows(6, length=12)
    rows[0]["labels"][:4] = [-100] * 4  # not predicted: in no class
    classes = torch.arange(model.config.vocab_size) % 3  # 3 classes by token id
    scores = row_scores(model, rows, batch_size=4, token_classes=classes)
    plain = row_scores(model, rows, batch_size=4)
    assert np.allclose(scores.class_nll.sum(axis=1), plain.nll, rtol=1e-5)
    assert np.array_equal(scores.class_tokens.sum(axis=1), plain.tokens) and plain.class_nll is None
    with torch.no_grad():  # independently: each predicted token's class, loss and argmax hit
        for r, row in enumerate(rows):
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            target = torch.tensor(row["labels"][1:])
            keep = target != -100
            nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="none")
            hit = logits[keep].argmax(-1) == target[keep]
            for c in range(3):
                in_c = classes[target[keep]] == c
                assert scores.class_tokens[r, c] == int(in_c.sum())
                assert scores.class_correct[r, c] == int(hit[in_c].sum())
                assert scores.class_nll[r, c] == pytest.approx(float(nll[in_c].sum()), rel=1e-4, abs=1e-4)


def test_vocab_classes_class_every_token_by_its_text():
    from hf_moe_routing.evaluation.token_classes import CLASSES, token_class, vocab_classes

    assert [token_class(t) for t in (" the", " @-@", ",", " river", "1,200", "<unk>", " ")] == [
        "function",
        "punctuation",
        "punctuation",
        "content",
        "number",
        "other",
        "other",
    ]

    class Tokenizer:
        words = ["the", ".", "river", "42"]

        def __len__(self):
            return len(self.words)

        def decode(self, ids):
            return " " + self.words[ids[0]]

    assert [CLASSES[i] for i in vocab_classes(Tokenizer())] == [
        "function",
        "punctuation",
        "content",
        "number",
    ]


# ---- reference builds and reproduce.py ---------------------------------------------------------------
def test_hash_mismatch_is_refused_naming_both(tmp_path):
    (tmp_path / "build_info.json").write_text(json.dumps({"weights_sha256": "a" * 64}))
    assert check_build_hash(tmp_path, None) == "a" * 64
    assert check_build_hash(tmp_path, "a" * 64) == "a" * 64
    with pytest.raises(ReferenceHashMismatch, match=f"{'a' * 64}.*{'b' * 64}"):
        check_build_hash(tmp_path, "b" * 64)


@pytest.mark.slow
def test_tiny_reference_model_rebuilds_to_its_recorded_hash(tmp_path):
    threads = 1
    expected = recorded_hash("tiny-moe", torch.__version__, threads)
    if expected is None:
        pytest.skip(f"no hash recorded for tiny-moe under {build_key(torch.__version__, threads)}")
    reference_model("tiny-moe", tmp_path, progress=False)
    info = reference_info("tiny-moe", tmp_path)
    assert info["weights_sha256"] == expected
    assert info["packages"]["torch"] == torch.__version__ and info["spec"]["threads"] == threads


def _reproduce(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _smoke_rows(table: str, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run ``reproduce.py TABLE --smoke --out OUT ARGS``; its result and the rows it wrote (it must succeed)."""
    result = _reproduce(table, "--smoke", "--out", str(out), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    return result, [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_reproduce_help():
    result = _reproduce("--help")
    assert result.returncode == 0 and "adak-evidence" in result.stdout and "--smoke" in result.stdout


@pytest.mark.slow
def test_reproduce_smoke_resumes_and_refuses_another_build(tmp_path):
    out = tmp_path / "out"
    result, rows = _smoke_rows("adak-evidence", out)
    kinds = {r["kind"] for r in rows}
    assert {"topk", "static-k", "search", "adak", "baseline"} <= kinds
    tables = (out / "tables.md").read_text()
    assert "CPU s" in result.stdout and "Ada-K" in tables
    assert "By token class" in tables and "| function |" in tables  # the per-class accuracy proxy
    assert (out / "pareto.png").stat().st_size > 1000  # the Pareto plot with CIs
    assert "Against the strongest baseline of each cell" in tables
    adak = next(r for r in rows if r["kind"] == "adak")
    assert np.array_equal(np.sum(adak["class_tokens"], axis=1), adak["tokens"])
    again = _reproduce("adak-evidence", "--smoke", "--out", str(out))  # resumes: nothing new
    assert again.returncode == 0 and len((out / "runs.jsonl").read_text().splitlines()) == len(rows)
    other = _reproduce("adak-evidence", "--smoke", "--out", str(out), "--budget-calibration", "train")
    assert other.returncode == 2 and "budget_calibration: 'validation' there, 'train' now" in other.stderr
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(rows)  # nothing mixed in
    hashes = json.loads((out / "reference.json").read_text())
    real = hashes["tiny-moe"]
    (out / "reference.json").write_text(json.dumps({"tiny-moe": "0" * 64}))
    refused = _reproduce("adak-evidence", "--smoke", "--out", str(out))
    assert refused.returncode == 2
    assert real in refused.stderr and "0" * 64 in refused.stderr


@pytest.mark.slow
def test_reproduce_bip_frozen_smoke_measures_in_sample_validation_and_test_balance(tmp_path):
    out = tmp_path / "out"
    _, rows = _smoke_rows("bip-frozen", out)
    assert {(r["kind"], r.get("estimate")) for r in rows} == {
        ("topk", None),
        ("bip", "last"),
        ("bip", "mean"),
        ("bip", "one-batch"),
        ("loss-free", None),
    }
    topk = next(r for r in rows if r["kind"] == "topk")
    for row in rows:
        assert len(row["test"]["nll"]) == 16 and row["test"]["avg_max_vio"] >= 0
        if row["kind"] == "bip":  # q fitted at C = 1 balances every split better than Top-K
            assert row["in_sample"]["avg_max_vio"] < topk["validation"]["avg_max_vio"]
            assert row["test"]["avg_max_vio"] < topk["test"]["avg_max_vio"]
    tables = (out / "tables.md").read_text()
    assert "Fit estimate chosen on the validation split" in tables and "Loss-Free u=0.01" in tables
    again = _reproduce("bip-frozen", "--smoke", "--out", str(out))  # resumes: nothing new
    assert again.returncode == 0 and len((out / "runs.jsonl").read_text().splitlines()) == len(rows)
    protocol = json.loads((out / "protocol.json").read_text())
    (out / "protocol.json").write_text(json.dumps({**protocol, "fit_rows": 32}))
    other = _reproduce("bip-frozen", "--smoke", "--out", str(out))
    assert other.returncode == 2 and "fit_rows: 32 there, 16 now" in other.stderr


@pytest.mark.slow
def test_reproduce_adak_variants_smoke_trains_each_variant_with_its_settings(tmp_path):
    out = tmp_path / "out"
    _, runs = _smoke_rows("adak-variants", out, "--variants", "rollout-8k", "group-loo-4")
    rows = {r["method"]: r for r in runs if r["kind"] == "variant"}
    assert rows["rollout-8k"]["batch_size"] == 64  # 8k tokens per PPO update
    assert (rows["group-loo-4"]["rollout_samples"], rows["group-loo-4"]["baseline"]) == (4, "leave-one-out")
    assert "| rollout-8k |" in (out / "tables.md").read_text()


@pytest.mark.slow
def test_reproduce_adak_variants_resumes_a_stopped_run_and_refuses_another_protocol(tmp_path):
    """A run stopped between a variant's row and its baseline's makes the baseline on rerun (else the table
    silently loses the variant); rows of another protocol are refused, as in adak-evidence."""
    out = tmp_path / "out"
    _, rows = _smoke_rows("adak-variants", out, "--variants", "default")
    assert [r["kind"] for r in rows][-2:] == ["variant", "variant-baseline"]
    lines = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # stopped before the baseline
    _, again = _smoke_rows("adak-variants", out, "--variants", "default")
    assert [r["kind"] for r in again] == [r["kind"] for r in rows]
    assert "| default |" in (out / "tables.md").read_text()
    other = _reproduce(
        "adak-variants",
        "--smoke",
        "--out",
        str(out),
        "--variants",
        "default",
        "--budget-calibration",
        "train",
    )
    assert other.returncode == 2 and "budget_calibration: 'validation' there, 'train' now" in other.stderr
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(rows)  # nothing mixed in


def test_row_scores_refuses_token_classes_it_cannot_use_naming_why():
    """Float or 2-D classes, negative classes and ids beyond the classes (data of another tokenizer) are refused
    with the reason, not an indexing error deep in a batch (on a GPU: a device-side assert)."""
    model = tiny_model("mixtral")
    rows = _rows(2, length=12)
    vocab = model.config.vocab_size
    for bad in (torch.zeros(vocab), torch.zeros(vocab, 1, dtype=torch.long), [0] * vocab):
        with pytest.raises(TypeError, match="1-D integer tensor"):
            row_scores(model, rows, token_classes=bad)
    with pytest.raises(ValueError, match="class index >= 0"):
        row_scores(model, rows, token_classes=torch.full((vocab,), -1))
    with pytest.raises(ValueError, match="has no class: token_classes covers ids 0..9"):
        row_scores(model, rows, token_classes=torch.zeros(10, dtype=torch.long))
    int32 = row_scores(model, rows, token_classes=(torch.arange(vocab) % 3).int())
    int64 = row_scores(model, rows, token_classes=torch.arange(vocab) % 3)
    assert np.array_equal(int32.class_tokens, int64.class_tokens)


def test_check_protocol_refuses_another_tables_folder_as_a_protocol_mismatch(tmp_path):
    """bip-frozen's protocol.json where adak-evidence writes: ProtocolMismatch (exit 2), not a TypeError."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bip_evidence import BIPProtocol
        from evidence_protocol import Protocol
        from evidence_results import ProtocolMismatch, check_protocol
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    path = tmp_path / "protocol.json"
    path.write_text(json.dumps(dataclasses.asdict(BIPProtocol(bases=["tiny-moe"], seeds=[0]))))
    with pytest.raises(
        ProtocolMismatch, match="capacity_factors, fit_rows, loss_free_rates.*choose another --out"
    ):
        check_protocol(Protocol(bases=["tiny-moe"], fractions=[0.7], seeds=[0]), path)


def test_results_refuse_another_protocol_only_where_rows_were_written(tmp_path):
    """A run stopped before its first row leaves protocol.json only: a rerun with other settings is no mix."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from evidence_protocol import Protocol
        from evidence_results import ProtocolMismatch, Results, key
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    first = Protocol(bases=["tiny-moe"], fractions=[0.7], seeds=[0], budget_calibration="train")
    second = dataclasses.replace(first, budget_calibration="validation")
    Results(first, tmp_path, key, str)  # stopped before any row
    results = Results(second, tmp_path, key, str, log=lambda line: None)
    results.hashes["tiny-moe"] = "0" * 64
    results.record({"base": "tiny-moe", "kind": "topk"}, 0.0)
    with pytest.raises(ProtocolMismatch, match="budget_calibration: 'validation' there, 'train' now"):
        Results(first, tmp_path, key, str)


def test_rows_of_two_bases_pool_only_where_they_are_the_same_token_rows():
    sys.path.insert(0, str(ROOT / "scripts"))
    from evidence_summary import same_test_rows

    same = [{"base": "a", "test_rows_sha256": "1"}, {"base": "b", "test_rows_sha256": "1"}]
    assert same_test_rows(same)
    assert not same_test_rows([same[0], {"base": "b", "test_rows_sha256": "2"}])  # another tokenizer's rows
    # rows recorded before the hash: a <shape>-seed<N> build shares its shape's tokenizer, other shapes do not
    assert same_test_rows([{"base": "tiny-moe"}, {"base": "tiny-moe-seed1"}])
    assert not same_test_rows([{"base": "tiny-moe"}, {"base": "mixtral-8x2"}])


def test_protocol_trains_ada_k_and_calibrates_the_baselines_on_the_named_text(monkeypatch):
    """``train_text`` picks the split that Ada-K trains on and the baselines' thresholds calibrate on; the
    recorded default stays ``pretrain`` (older folders resume), and an unknown split is refused at construction."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import evidence_protocol
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    class Packed:
        def select(self, rows):
            return self

    class Stop(Exception):
        pass

    splits = dataclasses.make_dataclass("Splits", ["pretrain", "validation", "heldout_train", "test"])(
        ["pre"], ["val"], ["held"], ["test"]
    )
    for text, wanted in (("pretrain", ["pre"]), ("heldout_train", ["held"])):
        packed = []

        def pack(texts, tokenizer, seq_len, packed=packed):
            packed.append(texts)
            if len(packed) == 3:  # test, validation, then the training text: nothing else is needed
                raise Stop
            return Packed()

        monkeypatch.setattr(evidence_protocol, "pack_dataset", pack)
        monkeypatch.setattr(evidence_protocol, "vocab_classes", lambda tokenizer: None)
        protocol = evidence_protocol.Protocol(bases=["tiny-moe"], fractions=[0.7], seeds=[0], train_text=text)
        with pytest.raises(Stop):
            evidence_protocol._prepare("tiny-moe", (None, None, None), splits, protocol, set(), None)
        assert packed == [["test"], ["val"], wanted]
    assert evidence_protocol.Protocol(bases=["tiny-moe"], fractions=[0.7], seeds=[0]).train_text == "pretrain"
    with pytest.raises(ValueError, match="train_text='validation': choose one of pretrain, heldout_train"):
        evidence_protocol.Protocol(bases=["tiny-moe"], fractions=[0.7], seeds=[0], train_text="validation")


def test_protocol_trains_ada_k_on_rollouts_of_rollout_rows(monkeypatch):
    """``rollout_rows`` is the number of rows in one PPO rollout (the trainer's ``batch_size``); the evaluation
    batches keep ``batch_size``; a non-positive count is refused at construction."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import evidence_protocol
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    import hf_moe_routing.training.adak as adak_training

    class Stop(Exception):
        pass

    seen = []

    def trainer(model, config, train, validation, adak_config):
        seen.append(config.batch_size)
        raise Stop

    class Rows:
        def shuffle(self, seed):
            return self

    monkeypatch.setattr(adak_training, "AdaKTrainer", trainer)
    for rows in (8, 64):
        protocol = evidence_protocol.Protocol(bases=["b"], fractions=[0.7], seeds=[0], rollout_rows=rows)
        with pytest.raises(Stop):
            evidence_protocol.train_adak(torch.nn.Linear(1, 1), Rows(), None, None, 1.4, 0, protocol)
    assert seen == [8, 64]
    assert evidence_protocol.Protocol(bases=["b"], fractions=[0.7], seeds=[0]).rollout_rows == 8
    for bad in (0, -8, 2.5):
        with pytest.raises(ValueError, match=f"rollout_rows={bad!r}: give a whole number of rows >= 1"):
            evidence_protocol.Protocol(bases=["b"], fractions=[0.7], seeds=[0], rollout_rows=bad)


@pytest.mark.slow
def test_reproduce_heldout_train_writes_its_own_folder_and_records_the_text(tmp_path):
    """``--train-text heldout_train`` and ``--rollout-rows`` are recorded in protocol.json, so their rows never
    mix with the defaults'."""
    out = tmp_path / "held"
    result, rows = _smoke_rows("adak-evidence", out, "--train-text", "heldout_train", "--rollout-rows", "4")
    recorded = json.loads((out / "protocol.json").read_text())
    assert recorded["train_text"] == "heldout_train" and recorded["rollout_rows"] == 4
    assert any(r["kind"] == "adak" for r in rows)
    mixed = _reproduce("adak-evidence", "--smoke", "--out", str(out))  # the defaults into that folder
    assert mixed.returncode == 2 and "train_text: 'heldout_train' there, 'pretrain' now" in mixed.stderr
    assert "rollout_rows: 4 there, 8 now" in mixed.stderr


def _evidence_folder(
    path: Path,
    adak_nll: list[float],
    *,
    build: str = "a" * 64,
    topk_nll=(10.0, 10.0),
    rows_hash: str | None = "r",
) -> Path:
    """An adak-evidence results folder of one base, two test rows of 5 tokens, Ada-K at 70% with two seeds."""
    path.mkdir()
    (path / "reference.json").write_text(json.dumps({"tiny-moe": build}))
    topk = {"base": "tiny-moe", "kind": "topk", "nll": list(topk_nll), "tokens": [5, 5]}
    topk |= {"test_rows_sha256": rows_hash} if rows_hash else {}  # older folders did not record it
    adak = [
        {"base": "tiny-moe", "kind": "adak", "fraction": 0.7, "seed": s, "nll": adak_nll, "mean_experts": 2.8}
        for s in (0, 1)
    ]
    (path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [topk, *adak]))
    return path


def test_evidence_compare_pairs_two_folders_rows_and_refuses_other_builds(tmp_path):
    """B's Ada-K with lower NLL on both rows is better by the exact perplexity margin; rows of another build
    or other test rows are refused, naming why (exit 2)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from evidence_compare import NotPaired, compare, main
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    a = _evidence_folder(tmp_path / "a", [10.5, 10.5])
    b = _evidence_folder(tmp_path / "b", [10.2, 10.0])
    (entry,) = compare(a, b)
    change_a, change_b = math.expm1(1.0 / 10), math.expm1(0.2 / 10)
    assert entry["change"] == pytest.approx([change_a, change_b])
    assert entry["margin"][0] == pytest.approx(change_a - change_b)  # > 0: B better
    assert 0 < entry["margin"][1] <= entry["margin"][0] <= entry["margin"][2]
    (flipped,) = compare(b, a)
    assert flipped["margin"][0] == pytest.approx(-entry["margin"][0])
    other_build = _evidence_folder(tmp_path / "c", [10.2, 10.0], build="b" * 64)
    with pytest.raises(NotPaired, match="tiny-moe: weights a+ in .* b+ in"):
        compare(a, other_build)
    other_rows = _evidence_folder(tmp_path / "d", [10.2, 10.0], topk_nll=(9.0, 10.0))
    with pytest.raises(NotPaired, match="test rows"):
        compare(a, other_rows)
    assert main([str(a), str(other_rows)]) == 2
    unhashed = _evidence_folder(tmp_path / "e", [10.2, 10.0], rows_hash=None)  # same build, same Top-K rows
    assert compare(a, unhashed)[0]["margin"][0] == pytest.approx(entry["margin"][0])
    with pytest.raises(NotPaired, match="test rows"):
        compare(_evidence_folder(tmp_path / "f", [10.2, 10.0], rows_hash="s"), a)
