"""The word n-gram baselines of scripts/blimp_ngram.py: proper distributions, a hand-computed case, a seen word
order preferred, and the statistics of the report. Offline, toy corpora, no reference model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import blimp_ngram as bn  # noqa: E402

TOY = [
    ["the", "cat", "sat"],
    ["the", "dog", "sat"],
    ["a", "cat", "ran"],
    ["the", "cat", "ran"],
    ["a", "dog", "sat", "down"],
]


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "history",
    [(), ("<s>",), ("the",), ("<s>", "the"), ("the", "cat"), ("dog", "sat"), ("zebra",), ("cat", "zebra")],
)
def test_probabilities_sum_to_one_over_the_vocabulary(n, history):
    lm = bn.KneserNey(TOY, n)
    total = sum(lm.prob(w, history) for w in lm.vocab)
    assert total == pytest.approx(1.0, abs=1e-12)
    assert all(lm.prob(w, history) > 0 for w in lm.vocab)


def test_unknown_words_are_unk():
    lm = bn.KneserNey(TOY, 3)
    assert "<s>" not in lm.vocab and {"</s>", "<unk>"} <= lm.vocab
    assert lm.prob("zebra", ("the",)) == lm.prob("<unk>", ("the",))
    assert lm.prob("cat", ("zebra", "the")) == lm.prob("cat", ("<unk>", "the"))


def test_hand_computed_bigram():
    """Corpus "<s> a b </s>", "<s> a a </s>"; V = {a, b, </s>, <unk>}."""
    lm = bn.KneserNey([["a", "b"], ["a", "a"]], 2)
    # bigram (raw) counts: <s>a 2, ab 1, b</s> 1, aa 1, a</s> 1 -> n1 = 4, n2 = 1, D2 = 4 / 6
    # unigram continuation counts: a {<s>, a} 2, b {a} 1, </s> {a, b} 2 -> n1 = 1, n2 = 2, D1 = 1 / 5
    d2, d1 = 4 / 6, 1 / 5
    assert lm.discount[2] == pytest.approx(d2) and lm.discount[1] == pytest.approx(d1)
    p1_b = (1 - d1) / 5 + d1 * 3 / 5 * 1 / 4
    p1_unk = d1 * 3 / 5 * 1 / 4
    assert lm.prob("b", ()) == pytest.approx(p1_b)
    assert lm.prob("<unk>", ()) == pytest.approx(p1_unk)
    # history "a": A = 3 (ab, aa, a</s>), T = 3
    assert lm.prob("b", ("a",)) == pytest.approx((1 - d2) / 3 + d2 * 3 / 3 * p1_b)
    # history "<s>": A = 2, T = 1; "b" never follows "<s>"
    assert lm.prob("b", ("<s>",)) == pytest.approx(d2 * 1 / 2 * p1_b)
    # a history never seen ("<unk>") falls back to the unigram level
    assert lm.prob("b", ("<unk>",)) == pytest.approx(p1_b)
    expected = math.log((2 - d2) / 2 + d2 / 2 * ((2 - d1) / 5 + d1 * 3 / 20))  # a | <s>
    expected += math.log((1 - d2) / 3 + d2 * p1_b)  # b | a
    expected += math.log((1 - d2) / 1 + d2 * 1 / 1 * ((2 - d1) / 5 + d1 * 3 / 20))  # </s> | b
    assert lm.logprob(["a", "b"]) == pytest.approx(expected)


@pytest.mark.parametrize("n", [2, 3])
def test_a_seen_word_order_is_preferred(n):
    lm = bn.KneserNey(TOY, n)
    assert lm.logprob(["the", "cat", "sat"]) > lm.logprob(["cat", "the", "sat"])
    assert lm.logprob(["a", "dog", "sat", "down"]) > lm.logprob(["a", "dog", "down", "sat"])


def test_tokenisation_matches_wikitext_and_blimp_forms():
    assert bn.words("Derek's dog doesn't bark.") == ["derek", "'s", "dog", "does", "n't", "bark", "."]
    assert bn.words("the dog does n't bark , 1 @,@ 000 well @-@ known") == [
        *("the", "dog", "does", "n't", "bark", ",", "1", ",", "000", "well", "-", "known"),
    ]
    assert bn.sentences(["A b. C d? E", "F"]) == [["a", "b", "."], ["c", "d", "?"], ["e"], ["f"]]


def test_mcnemar_and_holm():
    assert bn.mcnemar_p(0, 0) == 1.0
    assert bn.mcnemar_p(5, 0) == pytest.approx(2 / 32)
    assert bn.mcnemar_p(3, 3) == 1.0
    assert bn.holm({"a": 0.01, "b": 0.02, "c": 0.5}) == {"a": True, "b": True, "c": False}
    assert bn.holm({"a": 0.02, "b": 0.03}) == {"a": True, "b": True}
    assert bn.holm({"a": 0.03, "b": 0.03, "c": 0.001}) == {"c": True, "a": False, "b": False}


def test_compare_picks_the_best_ngram():
    model = [1] * 40 + [0] * 10
    result = bn.compare(model, {"2-gram": [1] * 20 + [0] * 30, "3-gram": [1] * 25 + [0] * 25})
    assert result["best_ngram"] == "3-gram"
    assert result["diff"] == pytest.approx(0.3)
    assert result["ci"][0] > 0 and result["wins"] == 15 and result["losses"] == 0


def test_the_report_is_recomputed_from_the_json(tmp_path):
    """A run on the real data (n-grams only, 3 pairs per paradigm); ``--report-only`` rewrites the same .md."""
    from hf_moe_routing.data import data_dir

    try:
        data_dir()
    except FileNotFoundError as error:
        pytest.skip(f"shared data folder missing: {error}")
    assert bn.main(["--limit", "3", "--models", "--out", str(tmp_path)]) == 0
    first = (tmp_path / "blimp_ngram.md").read_text()
    results = json.loads((tmp_path / "blimp_ngram.json").read_text())
    assert len(results["paradigms"]) == 67
    for paradigm in results["paradigms"].values():
        assert all(len(paradigm["correct"][n]) == len(paradigm["margin"][n]) == 3 for n in results["ngrams"])
    assert bn.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "blimp_ngram.md").read_text() == first
