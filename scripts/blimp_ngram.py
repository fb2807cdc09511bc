"""BLiMP paradigms where a reference model beats word n-gram baselines trained on the same text.

    python scripts/blimp_ngram.py --cache-dir /work/cache/evidence                       # 6 models, 67 x 1000 pairs
    python scripts/blimp_ngram.py --cache-dir /work/cache/evidence --limit 100 --models tiny-moe
    python scripts/blimp_ngram.py --limit 5 --models --out /tmp/blimp_ngram               # n-grams only (smoke)
    python scripts/blimp_ngram.py --report-only                    # rewrite the .md from results/blimp_ngram/*.json

The small reference models score about 0.52-0.55 on BLiMP, close to what word n-gram models trained on the same
text score, so this script asks *where* a model does better than the n-grams, pair by pair.

**Training text.** Exactly the reference models' pre-training text, ``evidence_splits().pretrain``
(tinyshakespeare + the first 3/4 of WikiText-2 valid's articles; see hf_moe_routing/data/splits.py).

**Tokenisation** (:func:`words`, the same for the training text and the BLiMP sentences): lowercase; WikiText's
``@-@``, ``@,@``, ``@.@`` become ``-``, ``,``, ``.``; ``n't`` is split off its word as in WikiText / the Penn
Treebank (``doesn't`` -> ``does n't``); then a token is ``n't``, an apostrophe clitic (``'s``, ``'re``, ...),
a run of letters and digits, or any other single non-space character (punctuation). The training text is cut
into sentences after ``.``, ``!`` and ``?`` tokens. Every sentence is ``<s> w1 ... wm </s>``; a word never seen
in the training text is ``<unk>``.

**Model: interpolated Kneser-Ney** (Chen & Goodman 1998, one discount per order; the adjusted counts of KenLM).
For an n-gram model, the adjusted count of a k-gram ``g`` (k <= n) is

    a(g) = c(g)                  if k == n or g starts with <s>        (raw count)
    a(g) = N1+(. g)              otherwise                              (number of distinct words before g)

and with ``h`` a history of k-1 words, ``h'`` its last k-2, ``A(h) = sum_x a(h x)`` and
``T(h) = |{x : a(h x) > 0}|``:

    P_k(w | h) = max(a(h w) - D_k, 0) / A(h)  +  D_k T(h) / A(h) * P_{k-1}(w | h')      if A(h) > 0
    P_k(w | h) = P_{k-1}(w | h')                                                          if A(h) = 0
    P_1(w)     = max(a(w) - D_1, 0) / A()     +  D_1 T() / A() * 1 / |V|

over the vocabulary V (the training words, ``</s>`` and ``<unk>``; ``<s>`` is never predicted), with the
discount ``D_k = n1 / (n1 + 2 n2)`` (n1, n2: how many k-grams have adjusted count 1, 2). Each P_k sums to 1
over V (the discounted mass is exactly what the lower order gets). The first word has the history ``<s>`` only
(one ``<s>``, no padding), so a trigram model scores it with its bigram level.

**Scores.** A sentence's n-gram log-probability is ``sum_i log P_n(w_i | w_{i-n+1..i-1})`` over its words and
``</s>``. A model's is the direct scorer of scripts/reference_blimp.py (``log p(" " + sentence | BOS)``, as
lm-eval's ``blimp_local``). A pair is correct when log p(good) >= log p(bad), for models and n-grams alike; an n-gram ties when both
sentences are made of the same factors (e.g. they differ only in words it has never seen), and the report
gives the share of ties, which this rule counts as correct.

**Comparison.** Per paradigm and model: the paired difference model - best n-gram of the per-pair correctness
(1/0), where the best n-gram is the one (bigram or trigram) with the higher accuracy on that paradigm (picked on
the same pairs, which favours the n-gram), with a paired bootstrap 95% interval
(``paired_mean_difference_ci``: 4000 resamples, seed 0). A paradigm counts as a model win (loss) when the
interval lies above (below) 0. At 95% per paradigm, about 67 x 0.025 = 1.7 paradigms per model would show a
"win" by chance alone, so the report also gives an exact McNemar test on the discordant pairs with a Holm
correction over the paradigms, and the paradigms that both pre-training seeds of an architecture win.

Writes ``<out>/blimp_ngram.json`` (the settings, then one line per paradigm: accuracies, the comparisons, and
every per-pair result of each model and n-gram, so the tables can be recomputed: ``correct``, a string of 0/1
in the order of the paradigm's jsonl file, and ``margin``, log p(good) - log p(bad) rounded to 0.01) and
``<out>/blimp_ngram.md``. Models that are not built in the cache
are skipped (this script never builds one); ``--models`` without names scores the n-grams only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from hf_moe_routing.data import evidence_splits
from hf_moe_routing.evaluation.paired import paired_mean_difference_ci

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
NGRAM_ORDERS = (2, 3)
DEFAULT_MODELS = (
    "tiny-moe",
    "tiny-moe-seed1",
    "mixtral-8x2",
    "mixtral-8x2-seed1",
    "qwen-moe",
    "qwen-moe-seed1",
)

# ---- tokenisation --------------------------------------------------------------------------------------------

_WIKITEXT_AT = re.compile(r" @(.)@ ")
_NT = re.compile(r"n't\b")
_TOKEN = re.compile(r"n't|'[^\W\d_]+|[^\W_]+|\S")
_SENTENCE_END = {".", "!", "?"}


def words(text: str) -> list[str]:
    """Lowercased word and punctuation tokens (see the module docstring)."""
    text = _WIKITEXT_AT.sub(r"\1", text.lower())
    return _TOKEN.findall(_NT.sub(" n't", text))


def sentences(lines: list[str]) -> list[list[str]]:
    """The token lists of the sentences of ``lines`` (cut after ``.``, ``!``, ``?``)."""
    out = []
    for line in lines:
        current: list[str] = []
        for token in words(line):
            current.append(token)
            if token in _SENTENCE_END:
                out.append(current)
                current = []
        if current:
            out.append(current)
    return out


# ---- interpolated Kneser-Ney ---------------------------------------------------------------------------------


class KneserNey:
    """An interpolated Kneser-Ney word n-gram model (the formulas are in the module docstring)."""

    def __init__(self, corpus: list[list[str]], n: int):
        if n < 1:
            raise ValueError(f"The order n must be >= 1, got {n}.")
        self.n = n
        self.vocab = {w for sentence in corpus for w in sentence} | {EOS, UNK}
        self.vocab.discard(BOS)
        # raw counts c(g) of every k-gram, k = 1..n
        raw = [Counter() for _ in range(n + 1)]  # raw[k][g], g a tuple of k words
        for sentence in corpus:
            tokens = [BOS, *sentence, EOS]
            for k in range(1, n + 1):
                for i in range(len(tokens) - k + 1):
                    raw[k][tuple(tokens[i : i + k])] += 1
        # N1+(. g): the number of distinct words before g, from the (k+1)-grams
        before = [Counter() for _ in range(n + 1)]
        for k in range(1, n):
            for gram in raw[k + 1]:
                before[k][gram[1:]] += 1
        # adjusted counts a(g), the history sums A(h) and type counts T(h), and the discounts D_k
        self.count: list[dict[tuple, int]] = [{} for _ in range(n + 1)]
        self.total: list[dict[tuple, int]] = [defaultdict(int) for _ in range(n + 1)]
        self.types: list[dict[tuple, int]] = [defaultdict(int) for _ in range(n + 1)]
        self.discount = [0.0] * (n + 1)
        for k in range(1, n + 1):
            for gram, c in raw[k].items():
                if k == 1 and gram[0] == BOS:
                    continue  # <s> is never predicted
                a = c if (k == n or gram[0] == BOS) else before[k][gram]
                self.count[k][gram] = a
                self.total[k][gram[:-1]] += a
                self.types[k][gram[:-1]] += 1
            histogram = Counter(self.count[k].values())
            n1, n2 = histogram[1], histogram[2]
            self.discount[k] = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5

    def prob(self, word: str, history: tuple[str, ...] | list[str]) -> float:
        """P(word | history): the last n-1 words of ``history`` are used; unknown words are ``<unk>``."""
        word = word if word in self.vocab else UNK
        history = tuple(w if (w in self.vocab or w == BOS) else UNK for w in history)
        history = history[-(self.n - 1) :] if self.n > 1 else ()
        p = 1.0 / len(self.vocab)  # P_0: uniform
        for k in range(1, len(history) + 2):  # from the unigram up to the longest history available
            h = history[len(history) - (k - 1) :] if k > 1 else ()
            total = self.total[k].get(h, 0)
            if total:
                d = self.discount[k]
                p = max(self.count[k].get((*h, word), 0) - d, 0.0) / total + d * self.types[k][h] / total * p
        return p

    def logprob(self, sentence: list[str]) -> float:
        """Natural log-probability of ``<s> sentence </s>`` (every word and ``</s>`` predicted)."""
        tokens = [BOS, *sentence, EOS]
        # fsum: the exactly rounded sum, so two sentences made of the same factors tie exactly
        return math.fsum(
            math.log(self.prob(tokens[i], tokens[max(0, i - self.n + 1) : i])) for i in range(1, len(tokens))
        )


# ---- statistics ----------------------------------------------------------------------------------------------


def mcnemar_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: ``wins`` pairs only the model gets right, ``losses`` only the baseline."""
    m = wins + losses
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(wins, losses) + 1)) / 2**m
    return min(1.0, 2 * tail)


def holm(pvalues: dict[str, float], alpha: float = 0.05) -> dict[str, bool]:
    """Which hypotheses the Holm step-down procedure rejects at family-wise level ``alpha``."""
    order = sorted(pvalues, key=pvalues.get)
    rejected, m = {}, len(order)
    going = True
    for i, key in enumerate(order):
        going = going and pvalues[key] <= alpha / (m - i)
        rejected[key] = going
    return rejected


def compare(model: list[int], baselines: dict[str, list[int]]) -> dict:
    """Model vs the best baseline (highest accuracy; the first on a tie) on one paradigm's pairs."""
    best = max(baselines, key=lambda name: sum(baselines[name]))
    x, y = np.array(model, dtype=float), np.array(baselines[best], dtype=float)
    diff, low, high = paired_mean_difference_ci(x, y)
    wins, losses = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    return {
        "best_ngram": best,
        "diff": diff,
        "ci": [low, high],
        "wins": wins,
        "losses": losses,
        "mcnemar_p": mcnemar_p(wins, losses),
    }


# ---- scoring -------------------------------------------------------------------------------------------------


def score_models(names, paradigms, cache_dir, prefix: str, batch_size: int) -> dict[str, list[float]]:
    """name -> log-probabilities (good, bad interleaved, paradigms in order) by reference_blimp's scorer."""
    from reference_blimp import blimp_accuracy

    from hf_moe_routing.training.reference import reference_info, reference_model

    out = {}
    for name in names:
        if reference_info(name, cache_dir) is None:
            print(
                f"{name}: not built in the cache (scripts/build_reference_models.py); skipped",
                file=sys.stderr,
            )
            continue
        model, tokenizer = reference_model(name, cache_dir, progress=False)
        bos = tokenizer.bos_token_id if prefix == "bos" else tokenizer.eos_token_id
        start, cpu = time.perf_counter(), time.process_time()
        result = blimp_accuracy(model, tokenizer, paradigms, bos, batch_size)
        out[name] = result["scores"]
        print(
            f"{name}: BLiMP mean over paradigms {result['mean_over_paradigms']:.4f} "
            f"({time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU)",
            flush=True,
        )
    return out


def report(results: dict) -> str:
    """The markdown report of :func:`main`'s results."""
    models, ngrams = results["models"], results["ngrams"]
    paradigms = results["paradigms"]
    lines = [
        "# BLiMP: reference models against word n-gram baselines trained on the same text",
        "",
        f"{len(paradigms)} paradigms x {results['pairs_per_paradigm']} pairs; n-grams: interpolated "
        f"Kneser-Ney (n = {', '.join(str(n) for n in NGRAM_ORDERS)}) on `evidence_splits().pretrain` "
        f"({results['ngram_training']['sentences']:,} sentences, {results['ngram_training']['tokens']:,} tokens, "
        f"vocabulary {results['ngram_training']['vocab']:,}); BLiMP tokens unseen in that text: "
        f"{results['blimp_oov_rate']:.1%}. Models: direct scorer of scripts/reference_blimp.py "
        f"({results['prefix']} prefix). Made by `scripts/blimp_ngram.py` (the method is in its docstring).",
        "",
        "## Overall accuracy (mean over paradigms; pair-weighted in brackets)",
        "",
        "| scorer | accuracy | ties (counted correct) | accuracy, ties counted 1/2 |",
        "|---|---|---|---|",
    ]
    for name in [*ngrams, *models]:
        acc = [paradigms[p]["accuracy"][name] for p in paradigms]
        pairs = sum(len(paradigms[p]["correct"][name]) for p in paradigms)
        correct = sum(paradigms[p]["correct"][name].count("1") for p in paradigms)
        ties = sum(paradigms[p]["ties"][name] for p in paradigms)
        half = sum(
            paradigms[p]["accuracy"][name]
            - paradigms[p]["ties"][name] / 2 / len(paradigms[p]["correct"][name])
            for p in paradigms
        )
        lines.append(
            f"| {name} | {sum(acc) / len(acc):.4f} ({correct / pairs:.4f}) | {ties / pairs:.2%} | "
            f"{half / len(paradigms):.4f} |"
        )
    lines += [
        "",
        "## Paradigms where a model beats the best n-gram",
        "",
        "Best n-gram: bigram or trigram, whichever is more accurate on the paradigm. A win (loss): the paired "
        "bootstrap 95% interval of model - best n-gram accuracy lies above (below) 0. About "
        f"{0.025 * len(paradigms):.1f} wins per model are expected by chance over {len(paradigms)} paradigms; *Holm* counts the wins that survive an exact McNemar test "
        "with a Holm correction over the paradigms (family-wise 5%). An n-gram's ties count as correct, which "
        "makes the comparison conservative for the model.",
        "",
        "| model | wins (CI > 0) | of which Holm | losses (CI < 0) | of which Holm | CI holds 0 |",
        "|---|---|---|---|---|---|",
    ]
    for name in models:
        rows = {p: paradigms[p]["vs_best_ngram"][name] for p in paradigms}
        holm_ok = holm({p: r["mcnemar_p"] for p, r in rows.items()})
        win = [p for p, r in rows.items() if r["ci"][0] > 0]
        loss = [p for p, r in rows.items() if r["ci"][1] < 0]
        lines.append(
            f"| {name} | {len(win)} | {sum(holm_ok[p] for p in win)} | {len(loss)} | "
            f"{sum(holm_ok[p] for p in loss)} | {len(rows) - len(win) - len(loss)} |"
        )
    for name in models:
        rows = {p: paradigms[p]["vs_best_ngram"][name] for p in paradigms}
        holm_ok = holm({p: r["mcnemar_p"] for p, r in rows.items()})
        win = sorted((p for p, r in rows.items() if r["ci"][0] > 0), key=lambda p: -rows[p]["diff"])
        lines += ["", f"### {name}: {len(win)} paradigm(s) won", ""]
        if win:
            lines += [
                "| paradigm | model | best n-gram | difference [95% CI] | McNemar p | Holm |",
                "|---|---|---|---|---|---|",
            ]
            for p in win:
                r = rows[p]
                lines.append(
                    f"| {p} | {paradigms[p]['accuracy'][name]:.3f} | {r['best_ngram']} "
                    f"{paradigms[p]['accuracy'][r['best_ngram']]:.3f} | {r['diff']:+.3f} "
                    f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {r['mcnemar_p']:.2g} | "
                    f"{'yes' if holm_ok[p] else 'no'} |"
                )
    architectures = sorted({m.removesuffix("-seed1") for m in models if m.endswith("-seed1")} & set(models))
    if architectures:
        lines += ["", "## Wins that both pre-training seeds of an architecture share", ""]
        for arch in architectures:
            both = [
                p
                for p in paradigms
                if all(paradigms[p]["vs_best_ngram"][m]["ci"][0] > 0 for m in (arch, f"{arch}-seed1"))
            ]
            lines.append(f"- {arch}: {len(both)}" + (f" ({', '.join(both)})" if both else ""))
    lines += ["", "## Per paradigm: accuracy of every scorer", ""]
    names = [*ngrams, *models]
    lines += ["| paradigm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for p in paradigms:
        lines.append(f"| {p} | " + " | ".join(f"{paradigms[p]['accuracy'][n]:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def dump(results: dict) -> str:
    """JSON with the settings indented and one line per paradigm (its per-pair arrays are long)."""
    head = json.dumps({k: v for k, v in results.items() if k != "paradigms"}, indent=1)[:-2]
    body = ",\n".join(f" {json.dumps(p)}: {json.dumps(v)}" for p, v in results["paradigms"].items())
    return f'{head},\n "paradigms": {{\n{body}\n }}\n}}\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="*", default=list(DEFAULT_MODELS), help="reference models (none: n-grams only)"
    )
    parser.add_argument(
        "--cache-dir", help="cache root of the built models (default $HF_MOE_ROUTING_CACHE or ~/.cache/...)"
    )
    parser.add_argument("--data-dir", help="data folder (default $HF_MOE_ROUTING_DATA or ../shared/data)")
    parser.add_argument("--limit", type=int, help="first N pairs of each paradigm (default: all 1000)")
    parser.add_argument("--prefix", choices=("bos", "eos"), default="bos", help="models' context token")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("results/blimp_ngram"), help="output folder")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite <out>/blimp_ngram.md from <out>/blimp_ngram.json"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        text = report(json.loads((args.out / "blimp_ngram.json").read_text()))
        (args.out / "blimp_ngram.md").write_text(text)
        print(text.split("\n## Per paradigm")[0])
        return 0
    import torch
    from reference_blimp import read_blimp

    torch.set_num_threads(args.threads)
    blimp = read_blimp(args.data_dir, args.limit)

    start, cpu = time.perf_counter(), time.process_time()
    corpus = sentences(evidence_splits(args.data_dir).pretrain)
    ngrams = {f"{n}-gram": KneserNey(corpus, n) for n in NGRAM_ORDERS}
    vocab = ngrams[f"{NGRAM_ORDERS[0]}-gram"].vocab
    blimp_tokens = [w for pairs in blimp.values() for pair in pairs for s in pair for w in words(s)]
    ngram_scores = {
        name: [lm.logprob(words(s)) for pairs in blimp.values() for pair in pairs for s in pair]
        for name, lm in ngrams.items()
    }
    print(
        f"n-grams: {len(corpus):,} training sentences, vocabulary {len(vocab):,}, discounts "
        + ", ".join(f"{k}: {[round(d, 3) for d in lm.discount[1:]]}" for k, lm in ngrams.items())
        + f" ({time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU)",
        flush=True,
    )
    model_scores = score_models(args.models, blimp, args.cache_dir, args.prefix, args.batch_size)
    scores = {**ngram_scores, **model_scores}

    results = {
        "pairs_per_paradigm": args.limit or "all (1000)",
        "prefix": args.prefix,
        "models": list(model_scores),
        "ngrams": list(ngrams),
        "ngram_training": {
            "text": "evidence_splits().pretrain",
            "sentences": len(corpus),
            "tokens": sum(len(s) for s in corpus),
            "vocab": len(vocab),
            "discounts": {name: lm.discount[1:] for name, lm in ngrams.items()},
        },
        "blimp_oov_rate": sum(w not in vocab for w in blimp_tokens) / len(blimp_tokens),
        "paradigms": {},
    }
    cursor = 0
    for paradigm, pairs in blimp.items():
        good = {name: s[cursor : cursor + 2 * len(pairs) : 2] for name, s in scores.items()}
        bad = {name: s[cursor + 1 : cursor + 2 * len(pairs) : 2] for name, s in scores.items()}
        cursor += 2 * len(pairs)
        correct = {name: [int(g >= b) for g, b in zip(good[name], bad[name])] for name in scores}
        results["paradigms"][paradigm] = {
            "accuracy": {name: sum(c) / len(c) for name, c in correct.items()},
            "ties": {name: sum(g == b for g, b in zip(good[name], bad[name])) for name in scores},
            "vs_best_ngram": {m: compare(correct[m], {n: correct[n] for n in ngrams}) for m in model_scores},
            "correct": {name: "".join(map(str, c)) for name, c in correct.items()},
            "margin": {name: [round(g - b, 2) for g, b in zip(good[name], bad[name])] for name in scores},
        }

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "blimp_ngram.json").write_text(dump(results))
    text = report(results)
    (args.out / "blimp_ngram.md").write_text(text)
    print(text.split("\n## Per paradigm")[0])
    print(f"wrote {args.out / 'blimp_ngram.json'} and {args.out / 'blimp_ngram.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
