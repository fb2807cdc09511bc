"""BLiMP accuracy (and WikiText-2 test perplexity) of the cached reference models, with a batched direct scorer.

    python scripts/reference_blimp.py                                  # every reference model, all 67 x 1000 pairs
    python scripts/reference_blimp.py mixtral-8x2 --limit 200 --json results/reference_models/blimp.json
    python scripts/reference_blimp.py mixtral-8x2 --check-lm-eval 3 --check-limit 50   # agreement with lm-eval

Each sentence is scored as the project's lm-eval task ``blimp_local`` (lm-eval's ``hf`` model) scores it: the
continuation is ``" " + sentence`` (lm-eval's target delimiter) encoded without special tokens, the context is
the prefix token alone (lm-eval's ``prefix_token_id``: the tokenizer's BOS, else EOS; ``--prefix eos`` uses EOS,
the token every training record follows), and the score is the summed log-probability of the continuation
tokens. A pair is correct when log p(good) >= log p(bad) (lm-eval's ``acc`` takes the argmax of the two
log-likelihoods, which picks the good sentence on a tie). The script reports the mean accuracy over paradigms
(what the ``blimp_local`` group reports) and the pair-weighted mean.

``--check-lm-eval N`` also runs ``evaluate_lm_eval`` on the first N paradigms (``--check-limit`` pairs each,
batch size 1) and compares its per-pair log-likelihoods with the direct scorer's.

The WikiText-2 test perplexity is recomputed at ``--ppl-seq-len`` tokens per packed row (128: the small
models' training length), so models trained at other lengths compare on the same rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from hf_moe_routing.data import data_dir as resolve_data_dir
from hf_moe_routing.data import pack_dataset, read_corpus
from hf_moe_routing.training.reference import REFERENCE_MODELS, reference_info, reference_model


def read_blimp(data_dir: str | None, limit: int | None) -> dict[str, list[tuple[str, str]]]:
    """paradigm -> [(sentence_good, sentence_bad)] (the first ``limit`` pairs of each file, sorted by name)."""
    folder = resolve_data_dir(data_dir) / "blimp"
    paradigms = {}
    for path in sorted(folder.glob("*.jsonl")):
        pairs = []
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    pairs.append((record["sentence_good"], record["sentence_bad"]))
        paradigms[path.stem] = pairs[:limit] if limit else pairs
    if not paradigms:
        raise FileNotFoundError(f"No BLiMP files (*.jsonl) in {folder}.")
    return paradigms


def encode(tokenizer, sentence: str, prefix: int) -> list[int]:
    """Context + continuation ids as lm-eval builds them for an empty context."""
    continuation = tokenizer.encode(" " + sentence, add_special_tokens=False)
    if continuation and continuation[0] == prefix:  # lm-eval then uses that token as the context
        return continuation
    return [prefix] + continuation


@torch.inference_mode()
def score(model, sequences: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
    """Summed log-probability of every token after the first, per sequence (right-padded batches)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in index)
        ids = torch.full((len(index), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        sums = (logprobs * mask[:, 1:]).sum(dim=1)
        for row, i in enumerate(index):
            scores[i] = float(sums[row])
    return scores


@torch.inference_mode()
def test_perplexity(model, tokenizer, data_dir: str | None, seq_len: int, batch_size: int = 32) -> float:
    """Token-weighted perplexity on WikiText-2 test packed into rows of ``seq_len`` (as in the builds)."""
    rows = pack_dataset(read_corpus("wikitext-2/test", data_dir), tokenizer, seq_len)[:]
    total, count = 0.0, 0
    for start in range(0, len(rows["input_ids"]), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in rows.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
        )
        count += int((labels != -100).sum())
    return math.exp(total / count)


def blimp_accuracy(model, tokenizer, paradigms, prefix: int, batch_size: int) -> dict:
    sentences = [s for pairs in paradigms.values() for pair in pairs for s in pair]
    scores = score(
        model, [encode(tokenizer, s, prefix) for s in sentences], tokenizer.pad_token_id, batch_size
    )
    per_paradigm, cursor, correct = {}, 0, 0
    for name, pairs in paradigms.items():
        hits = sum(scores[cursor + 2 * j] >= scores[cursor + 2 * j + 1] for j in range(len(pairs)))
        per_paradigm[name] = hits / len(pairs)
        correct += hits
        cursor += 2 * len(pairs)
    return {
        "mean_over_paradigms": sum(per_paradigm.values()) / len(per_paradigm),
        "pair_weighted": correct / (cursor // 2),
        "pairs": cursor // 2,
        "per_paradigm": per_paradigm,
        "scores": scores,
    }


def check_lm_eval(model, tokenizer, paradigms, direct_scores, count: int, limit: int, data_dir) -> dict:
    """Per-pair log-likelihoods of lm-eval's ``blimp_local_<paradigm>`` against the direct scorer's."""
    from hf_moe_routing.integrations.lm_eval import evaluate_lm_eval

    names = list(paradigms)[:count]
    results = evaluate_lm_eval(
        model,
        [f"blimp_local_{name}" for name in names],
        tokenizer=tokenizer,
        data_dir=data_dir,
        include_defaults=False,
        limit=limit,
        log_samples=True,
        batch_size=1,
    )
    offsets, cursor = {}, 0
    for name, pairs in paradigms.items():
        offsets[name] = cursor
        cursor += 2 * len(pairs)
    report, worst = {}, 0.0
    for name in names:
        task = f"blimp_local_{name}"
        diffs, same = [], 0
        for sample in results["samples"][task]:
            j = sample["doc_id"]
            lm_eval_ll = [resp[0][0] for resp in sample["resps"]]
            ours = direct_scores[offsets[name] + 2 * j : offsets[name] + 2 * j + 2]
            diffs += [abs(a - b) for a, b in zip(lm_eval_ll, ours)]
            same += (lm_eval_ll[0] >= lm_eval_ll[1]) == (ours[0] >= ours[1])
        ours_acc = sum(
            direct_scores[offsets[name] + 2 * j] >= direct_scores[offsets[name] + 2 * j + 1]
            for j in range(limit)
        )
        report[name] = {
            "pairs": len(results["samples"][task]),
            "lm_eval_acc": results["results"][task]["acc,none"],
            "direct_acc": ours_acc / limit,
            "same_decision": same,
            "max_abs_loglik_diff": max(diffs),
        }
        worst = max(worst, max(diffs))
    return {"paradigms": report, "max_abs_loglik_diff": worst}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", default=list(REFERENCE_MODELS), help="reference models")
    parser.add_argument(
        "--cache-dir", help="cache root (default $HF_MOE_ROUTING_CACHE or ~/.cache/hf_moe_routing)"
    )
    parser.add_argument("--data-dir", help="data folder (default $HF_MOE_ROUTING_DATA or ../shared/data)")
    parser.add_argument("--limit", type=int, help="first N pairs of each paradigm (default: all 1000)")
    parser.add_argument(
        "--prefix", choices=("bos", "eos"), default="bos", help="context token (lm-eval: bos)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ppl-seq-len", type=int, default=128, help="0: skip the perplexity")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--check-lm-eval", type=int, default=0, metavar="N", help="compare on N paradigms")
    parser.add_argument("--check-limit", type=int, default=50, help="pairs per paradigm in the comparison")
    parser.add_argument("--json", type=Path, help="write the results here (merged into an existing file)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paradigms = read_blimp(args.data_dir, args.limit)
    out = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    out.setdefault("models", {})
    for name in args.names:
        if reference_info(name, args.cache_dir) is None:
            print(f"{name}: not built (scripts/build_reference_models.py {name}); skipped", file=sys.stderr)
            continue
        model, tokenizer = reference_model(name, args.cache_dir, progress=False)
        prefix = tokenizer.bos_token_id if args.prefix == "bos" else tokenizer.eos_token_id
        start = time.perf_counter()
        acc = blimp_accuracy(model, tokenizer, paradigms, prefix, args.batch_size)
        seconds = time.perf_counter() - start
        scores = acc.pop("scores")
        info = reference_info(name, args.cache_dir)
        entry = out["models"].get(name, {})
        entry.update(
            {
                "shape": info["spec"]["shape"],
                "num_parameters": info["num_parameters"],
                "train_steps": info["spec"]["max_steps"],
                "train_seq_len": info["spec"]["seq_len"],
                "build_seconds": info["build_seconds"],
                "heldout_perplexity_build": info.get("validation_perplexity", info.get("test_perplexity")),
            }
        )
        entry.setdefault("blimp", {})[args.prefix] = {**acc, "limit": args.limit, "seconds": seconds}
        if args.ppl_seq_len:
            ppl = test_perplexity(model, tokenizer, args.data_dir, args.ppl_seq_len)
            entry[f"test_perplexity_seq{args.ppl_seq_len}"] = ppl
        if args.check_lm_eval:
            entry["lm_eval_check"] = {
                "prefix": args.prefix,
                **check_lm_eval(
                    model, tokenizer, paradigms, scores, args.check_lm_eval, args.check_limit, args.data_dir
                ),
            }
        out["models"][name] = entry
        print(
            f"{name}: BLiMP ({args.prefix} prefix, {acc['pairs']} pairs) mean over paradigms "
            f"{acc['mean_over_paradigms']:.4f}, pair-weighted {acc['pair_weighted']:.4f} ({seconds:.0f} s)"
            + (f"; test ppl @{args.ppl_seq_len} {ppl:.2f}" if args.ppl_seq_len else ""),
            flush=True,
        )
        if args.check_lm_eval:
            print(json.dumps(entry["lm_eval_check"], indent=2), flush=True)
        if args.json:
            out["scoring"] = (
                "direct scorer of scripts/reference_blimp.py: log p(' ' + sentence | prefix token), "
                "pair correct when log p(good) >= log p(bad); as lm-eval's blimp_local acc"
            )
            out["data"] = {"blimp_paradigms": len(paradigms), "pairs_per_paradigm": args.limit or 1000}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
