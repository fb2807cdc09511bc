"""Ada-K design choices measured on the *validation* split (issue 19): which options to make the default.

Per base, budget and allocator seed, each variant is trained like the default and scored on validation rows that
the per-layer search does not use (``Protocol.validation_rows`` onwards); dynamic skipping with one quantile
(``dyn-skip uniform``) is solved to each run's compute on the same rows, and the margin is a paired bootstrap over
those rows. The test split is not touched.

Variants: ``default`` (``AdaKConfig()``); ``layer-targets`` (per-layer budgets from dynamic skipping's greedy
search on the first validation rows: the Skip-Warm start and the per-layer dual ascent); ``k_max=all`` (a token
may get more than top-k experts, same mean budget); ``renormalize`` (the paper's weights: renormalised over the
kept experts); ``heldout-train`` (allocators trained on WikiText-2 test's first half, text the base never saw);
``rollout-8k`` (rollouts of 64 x 128 tokens per PPO update, the order of the paper's, same number of updates);
``group-loo-4`` (4 samples of k per batch, each one's advantage measured against the other three: a group
baseline, ``baseline="leave-one-out"``); ``weight-gain`` (learned weight gains per layer and number of kept
experts, ``AdaKConfig(weight_gain=True)``, fitted after PPO; its dynamic-skipping baseline gets gains of its own,
fitted at the budget on the same text).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from evidence_protocol import Protocol, _find, gain_settings, train_adak
from evidence_results import Results, key, scores_row

from hf_moe_routing import AdaKConfig
from hf_moe_routing.data import evidence_splits, pack_dataset
from hf_moe_routing.evaluation.matched import BudgetedBaseline, greedy_layer_budgets, match_compute
from hf_moe_routing.evaluation.paired import ppl_change_ci, ppl_margin_ci, row_scores

VARIANTS = (
    "default",
    "layer-targets",
    "k_max=all",
    "renormalize",
    "heldout-train",
    "rollout-8k",
    "group-loo-4",
    "weight-gain",
)


def run_variants(
    protocol: Protocol, out: Path, variants: list[str], design_rows: int, log=print
) -> list[dict]:
    """Run (or resume) the variants into ``out``; returns all rows. Raises ProtocolMismatch where ``out`` holds
    rows of another protocol, ReferenceHashMismatch for another build."""
    results = Results(protocol, out, key, _describe, log)
    path, done, record = results.path, results.done, results.record
    splits = evidence_splits(protocol.data_dir)

    for base in protocol.bases:
        model, tok, _ = results.reference(base)
        validation = pack_dataset(splits.validation, tok, protocol.seq_len)
        search_rows = validation.select(range(protocol.validation_rows))
        design = validation.select(range(protocol.validation_rows, protocol.validation_rows + design_rows))
        train = pack_dataset(splits.pretrain, tok, protocol.seq_len)
        heldout = pack_dataset(splits.heldout_train, tok, protocol.seq_len)
        top_k, experts = model.config.num_experts_per_tok, model.config.num_experts
        started = time.process_time()
        if (base, "design-topk", None, None, None, None) not in done:
            record({"base": base, "kind": "design-topk", **scores_row(row_scores(model, design))}, started)
        calibration = train.shuffle(seed=0).select(range(protocol.calibration_rows))
        skip = BudgetedBaseline(model, "dyn-skip", calibration, batch_size=protocol.batch_size)
        for fraction in protocol.fractions:
            target = fraction * top_k
            split = skip_gain = None
            for seed in protocol.seeds:
                for variant in variants:
                    row = {
                        "base": base,
                        "kind": "variant",
                        "method": variant,
                        "fraction": fraction,
                        "seed": seed,
                    }
                    run = _find(path, key(row))
                    if run is None:
                        config, settings, rows = AdaKConfig(), {}, train
                        if variant == "layer-targets":
                            if split is None:
                                found = greedy_layer_budgets(
                                    skip, search_rows, [target], step=protocol.search_step
                                )
                                split = next(iter(found.values()))["budgets"]
                            settings["layer_targets"] = [split[i] for i in sorted(split)]
                        elif variant == "k_max=all":
                            config = AdaKConfig(k_max=experts)
                        elif variant == "renormalize":
                            config = AdaKConfig(renormalize=True)
                        elif variant == "heldout-train":
                            rows = heldout
                        elif variant == "rollout-8k":
                            settings["batch_size"] = 64
                        elif variant == "group-loo-4":
                            settings |= {"rollout_samples": 4, "baseline": "leave-one-out"}
                        elif variant == "weight-gain":
                            config = AdaKConfig(weight_gain=True)
                        started = time.process_time()
                        run = train_adak(
                            model, rows, search_rows, design, target, seed, protocol, config, **settings
                        )
                        run = {**row, **run, **settings}
                        record(run, started)
                    baseline = {**row, "kind": "variant-baseline"}
                    if key(baseline) in done:  # (a run stopped between the two rows makes only this one)
                        continue
                    started = time.process_time()
                    against = skip
                    if variant == "weight-gain":  # like for like: dynamic skipping with gains of its own
                        if skip_gain is None:
                            skip_gain = BudgetedBaseline(
                                model, "dyn-skip", calibration, batch_size=protocol.batch_size
                            )
                            skip_gain.set_budgets(target)
                            skip_gain.fit_weight_gains(train, **gain_settings(protocol, seed=0))
                        against = skip_gain
                    scores, info = match_compute(against, design, run["mean_experts"], mode="uniform")
                    record({**baseline, "match": {"knob": info["knob"]}, **scores_row(scores)}, started)
    return results.rows()


def _describe(row: dict[str, Any]) -> str:
    what = " ".join(str(row.get(k)) for k in ("kind", "method", "fraction", "seed"))
    return (
        f"{row['base']} {what}: ppl {row.get('perplexity', float('nan')):.3f} "
        f"experts {row.get('mean_experts', float('nan')):.4f}"
    )


def variants_markdown(rows: list[dict[str, Any]]) -> str:
    topk = {r["base"]: np.asarray(r["nll"]) for r in rows if r["kind"] == "design-topk"}
    tokens = np.asarray(next(r for r in rows if r["kind"] == "design-topk")["tokens"], dtype=np.float64)
    lines = [
        f"Validation rows not used by the per-layer search: {int(tokens.sum())} predicted tokens. Pooled over "
        "bases and seeds (per-row NLL averaged over runs); paired bootstrap 95% CI. Margin = dyn-skip uniform's "
        "change - the variant's change at the variant's own compute (> 0: the variant beats dynamic skipping).",
        "",
        "| variant | budget | runs | routed experts | Ada-K ppl change % | dyn-skip uniform % | margin pp | SNR | clip fraction |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for fraction in sorted({r["fraction"] for r in rows if r["kind"] == "variant"}, reverse=True):
        for variant in dict.fromkeys(r["method"] for r in rows if r["kind"] == "variant"):
            runs = [
                r
                for r in rows
                if r["kind"] == "variant" and r["method"] == variant and r["fraction"] == fraction
            ]
            pairs = [
                (
                    r,
                    next(
                        (
                            b
                            for b in rows
                            if b["kind"] == "variant-baseline"
                            and key(b)[2:] == key(r)[2:]
                            and b["base"] == r["base"]
                        ),
                        None,
                    ),
                )
                for r in runs
            ]
            pairs = [(r, b) for r, b in pairs if b is not None]
            if not pairs:
                continue
            ref = np.mean([topk[r["base"]] for r, _ in pairs], axis=0)
            a = np.mean([np.asarray(r["nll"]) for r, _ in pairs], axis=0)
            b = np.mean([np.asarray(x["nll"]) for _, x in pairs], axis=0)
            ca, cb, m = (
                ppl_change_ci(a, ref, tokens),
                ppl_change_ci(b, ref, tokens),
                ppl_margin_ci(a, b, ref, tokens),
            )
            experts = [r["mean_experts"] for r, _ in pairs]
            snr = [r["snr"] for r, _ in pairs if r.get("snr") is not None]
            clip = [r["clip_fraction"] for r, _ in pairs if r.get("clip_fraction") is not None]
            pct = lambda c: f"{100 * c[0]:+.2f} ({100 * c[1]:+.2f}..{100 * c[2]:+.2f})"  # noqa: E731
            lines.append(
                f"| {variant} | {fraction:g} | {len(pairs)} | {np.mean(experts):.3f} [{min(experts):.3f}..{max(experts):.3f}] | "
                f"{pct(ca)} | {pct(cb)} | {pct(m)} | {np.mean(snr) if snr else float('nan'):.2f} | "
                f"{np.mean(clip) if clip else float('nan'):.4f} |"
            )
    return "\n".join(lines) + "\n"
