"""BIP on a frozen checkpoint, held out (used by ``scripts/reproduce.py bip-frozen``).

Per reference build (each pre-training seed is its own base), on the evidence splits
(``hf_moe_routing.data.splits``), no weight changes:

1. Top-K on the validation rows (the first ``validation_rows`` of the validation split) and on the test rows;
2. for every fitting seed (which ``fit_rows`` of the rest of the validation split q is fitted on), every fit
   estimate and every capacity factor C: fit BIP's q with ``fit_routing``, freeze it, and measure
   - *in-sample* AvgMaxVio: on the rows q was fitted on, batch by batch;
   - *validation* AvgMaxVio and per-row NLL: on the validation rows (choices are read here);
   - *test* AvgMaxVio and per-row NLL: on the test rows (results are read here, nothing is chosen on them).
   Fit estimates: ``last`` (the last batch's solve), ``mean`` (the mean over the fitting batches' solves) and
   ``one-batch`` (``last`` with all fitting rows in a single batch);
3. Loss-Free (the per-expert bias of arXiv 2408.15664) fitted on the same rows at each update rate, measured
   the same way.

Rows go to ``<out>/runs.jsonl`` as they finish (a rerun skips finished ones); ``<out>/reference.json``
records each base's weights SHA-256, and a build with another hash stops the run.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from evidence_results import Results, RowsSettings, scores_row

from hf_moe_routing import BIPConfig, LossFreeConfig, fit_routing, patch_model, unpatch_model
from hf_moe_routing.data import evidence_splits, pack_dataset
from hf_moe_routing.evaluation.paired import ppl_change_ci, ppl_margin_ci, row_scores
from hf_moe_routing.evaluation.stats import RoutingStats

FIT_ESTIMATES = ("last", "mean", "one-batch")


@dataclasses.dataclass
class BIPProtocol(RowsSettings):
    bases: list[str]
    seeds: list[int]
    capacity_factors: list[float] = dataclasses.field(default_factory=lambda: [1.0, 1.5, 2.0])
    loss_free_rates: list[float] = dataclasses.field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    fit_rows: int = 160


def _key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ("base", "kind", "estimate", "setting", "seed"))


def _describe(row: dict[str, Any]) -> str:
    what = " ".join(
        f"{k}={row[k]}" for k in ("kind", "estimate", "setting", "seed") if row.get(k) is not None
    )
    return (
        f"{row['base']} {what}: test AvgMaxVio {row['test']['avg_max_vio']:.3f} ppl "
        f"{row['test']['perplexity']:.3f} ({row['cpu_seconds']:.0f} CPU s)"
    )


def measured(model: Any, rows: Any, batch_size: int, *, nll: bool = True) -> dict[str, Any]:
    """AvgMaxVio of ``model`` on ``rows`` (batches of ``batch_size``) and, with ``nll``, its per-row NLLs."""
    with RoutingStats(model) as stats:
        scores = row_scores(model, rows, batch_size=batch_size)
    out = {"avg_max_vio": stats.summary()["avg_max_vio"]}
    if nll:
        out |= {k: v for k, v in scores_row(scores).items() if k in ("nll", "tokens", "perplexity")}
    return out


def run(protocol: BIPProtocol, out: Path, log=print) -> list[dict[str, Any]]:
    """Run (or resume) the protocol into ``out``; returns all rows. Raises ReferenceHashMismatch."""
    results = Results(protocol, out, _key, _describe, log)
    done, record = results.done, results.record
    splits = evidence_splits(protocol.data_dir)
    bs = protocol.batch_size

    for base in protocol.bases:
        model, tokenizer, _ = results.reference(base)
        validation_all = pack_dataset(splits.validation, tokenizer, protocol.seq_len)
        validation = validation_all.select(range(protocol.validation_rows))
        pool = validation_all.select(range(protocol.validation_rows, len(validation_all)))
        test = pack_dataset(splits.test, tokenizer, protocol.seq_len).select(range(protocol.test_rows))
        if (base, "topk", None, None, None) not in done:
            started = time.process_time()
            row = {"base": base, "kind": "topk"}
            record(
                {**row, "validation": measured(model, validation, bs), "test": measured(model, test, bs)},
                started,
            )
        runs = [("bip", e, c) for c in protocol.capacity_factors for e in FIT_ESTIMATES]
        runs += [("loss-free", None, u) for u in protocol.loss_free_rates]
        for seed in protocol.seeds:
            fit_rows = pool.shuffle(seed=seed).select(range(protocol.fit_rows))
            for kind, estimate, setting in runs:
                if (base, kind, estimate, setting, seed) in done:
                    continue
                started = time.process_time()
                if kind == "bip":
                    config = BIPConfig(
                        capacity_factor=setting, fit_estimate="mean" if estimate == "mean" else "last"
                    )
                else:
                    config = LossFreeConfig(update_rate=setting)
                patch_model(model, config)
                fit_batch = len(fit_rows) if estimate == "one-batch" else bs
                fit_routing(model, fit_rows, batch_size=fit_batch, progress=False)
                row = {"base": base, "kind": kind, "estimate": estimate, "setting": setting, "seed": seed}
                row["in_sample"] = measured(model, fit_rows, bs, nll=False)
                row["validation"] = measured(model, validation, bs)
                row["test"] = measured(model, test, bs)
                unpatch_model(model)
                record(row, started)
    return results.rows()


# ---- summary --------------------------------------------------------------------------------------------
def _mean_sd(values: list[float], fmt: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{fmt}} ± {sd:{fmt.lstrip('+')}}"


def chosen_estimate(rows: list[dict[str, Any]]) -> str:
    """The fit estimate with the lowest mean validation AvgMaxVio over every base, seed and capacity factor."""
    bip = [r for r in rows if r["kind"] == "bip"]
    means = {
        e: statistics.fmean(r["validation"]["avg_max_vio"] for r in bip if r["estimate"] == e)
        for e in FIT_ESTIMATES
        if any(r["estimate"] == e for r in bip)
    }
    return min(means, key=means.__getitem__)


def _label(kind: str, estimate: str | None, setting: float) -> str:
    return f"BIP C={setting:g} ({estimate})" if kind == "bip" else f"Loss-Free u={setting:g}"


def _change(row: dict[str, Any], ref: dict[str, Any], split: str) -> float:
    return float(
        np.expm1((np.sum(row[split]["nll"]) - np.sum(ref[split]["nll"])) / np.sum(ref[split]["tokens"]))
    )


def _mean_nll(rows: list[dict[str, Any]], split: str) -> np.ndarray:
    return np.mean([np.asarray(r[split]["nll"]) for r in rows], axis=0)


def markdown(rows: list[dict[str, Any]]) -> str:
    """Tables: the validation split (where the fit estimate and settings are chosen), then the test split per
    base and across bases, with the paired bootstrap CI of each setting's perplexity change against Top-K."""
    bases = list(dict.fromkeys(r["base"] for r in rows))
    topk = {r["base"]: r for r in rows if r["kind"] == "topk"}
    fits = [r for r in rows if r["kind"] != "topk"]
    settings = list(dict.fromkeys((r["kind"], r["estimate"], r["setting"]) for r in fits))
    group = {
        s: {
            b: [r for r in fits if (r["kind"], r["estimate"], r["setting"]) == s and r["base"] == b]
            for b in bases
        }
        for s in settings
    }
    lines = [
        "### Validation split (choices): AvgMaxVio in-sample / held out, and perplexity change vs Top-K",
        "",
    ]
    lines += [
        "mean ± sd over q fits (fitting seeds) and bases; Top-K: "
        + ", ".join(f"{b} {topk[b]['validation']['avg_max_vio']:.3f}" for b in bases if b in topk),
        "",
    ]
    lines += [
        "| routing | AvgMaxVio in-sample | AvgMaxVio validation | sd of validation AvgMaxVio over fits | ppl change |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for s in settings:
        runs = [r for b in bases for r in group[s][b]]
        within = [
            statistics.stdev([r["validation"]["avg_max_vio"] for r in group[s][b]])
            for b in bases
            if len(group[s][b]) > 1
        ]
        lines.append(
            f"| {_label(*s)} | {_mean_sd([r['in_sample']['avg_max_vio'] for r in runs], '.3f')} | "
            f"{_mean_sd([r['validation']['avg_max_vio'] for r in runs], '.3f')} | "
            f"{statistics.fmean(within) if within else 0.0:.3f} | "
            f"{_mean_sd([100 * _change(r, topk[r['base']], 'validation') for r in runs], '+.2f')}% |"
        )
    lines += ["", "### Test split (results): held-out AvgMaxVio, perplexity change vs Top-K", ""]
    lines += [
        "Per base: mean ± sd over q fits; CI: paired bootstrap 95% over test rows of the fit-averaged NLL. "
        "Across bases: mean ± sd of the per-base means.",
        "",
    ]
    head = " | ".join(f"{b}: AvgMaxVio / ppl change % (CI)" for b in bases)
    lines += [
        f"| routing | {head} | across bases: AvgMaxVio / ppl change % |",
        "| --- | " + " | ".join("---" for _ in bases) + " | --- |",
    ]
    lines.append(
        "| Top-K | "
        + " | ".join(
            f"{topk[b]['test']['avg_max_vio']:.3f} / (ppl {topk[b]['test']['perplexity']:.2f})"
            for b in bases
            if b in topk
        )
        + " | |"
    )
    for s in settings:
        cells, vio_means, change_means = [], [], []
        for b in bases:
            runs, ref = group[s][b], topk[b]
            if not runs:
                cells.append("")
                continue
            ci = ppl_change_ci(_mean_nll(runs, "test"), ref["test"]["nll"], ref["test"]["tokens"])
            vios = [r["test"]["avg_max_vio"] for r in runs]
            changes = [100 * _change(r, ref, "test") for r in runs]
            vio_means.append(statistics.fmean(vios))
            change_means.append(statistics.fmean(changes))
            cells.append(
                f"{_mean_sd(vios, '.3f')} / {_mean_sd(changes, '+.2f')} ({100 * ci[1]:+.2f}..{100 * ci[2]:+.2f})"
            )
        lines.append(
            f"| {_label(*s)} | "
            + " | ".join(cells)
            + f" | {_mean_sd(vio_means, '.3f')} / {_mean_sd(change_means, '+.2f')} |"
        )
    estimate = chosen_estimate(rows)
    lines += ["", f"Fit estimate chosen on the validation split (lowest mean AvgMaxVio): **{estimate}**.", ""]
    lines += comparisons(estimate, bases, topk, group, settings)
    return "\n".join(lines) + "\n"


def _verdict(ci: tuple[float, float, float]) -> str:
    return "BIP cheaper" if ci[1] > 0 else "Loss-Free cheaper" if ci[2] < 0 else "no measurable difference"


def comparisons(estimate: str, bases, topk, group, settings) -> list[str]:
    """Each BIP capacity factor (fitted with ``estimate``) against the most balanced Loss-Free rate that is no
    more balanced than it (or the most balanced rate, where BIP beats them all), per base on the test rows:
    the paired perplexity margin."""
    out = [
        "### BIP against Loss-Free at equal or better balance (test rows, paired 95% CI, pp; > 0: BIP cheaper)",
        "",
    ]
    for b in bases:
        ref = topk[b]
        frees = [s for s in settings if s[0] == "loss-free" and group[s][b]]
        if not frees:
            continue
        balance = {f: statistics.fmean(r["test"]["avg_max_vio"] for r in group[f][b]) for f in frees}
        for s in (s for s in settings if s[0] == "bip" and s[1] == estimate and group[s][b]):
            vio = statistics.fmean(r["test"]["avg_max_vio"] for r in group[s][b])
            rivals = [f for f in frees if balance[f] >= vio]
            note = "" if rivals else " (BIP more balanced than every rate)"
            rival = min(rivals or frees, key=balance.__getitem__)
            ci = ppl_margin_ci(
                _mean_nll(group[s][b], "test"),
                _mean_nll(group[rival][b], "test"),
                ref["test"]["nll"],
                ref["test"]["tokens"],
            )
            out.append(
                f"- {b}: {_label(*s)} (AvgMaxVio {vio:.3f}) vs {_label(*rival)} ({balance[rival]:.3f}){note}: "
                f"**{100 * ci[0]:+.2f} ({100 * ci[1]:+.2f}..{100 * ci[2]:+.2f})** {_verdict(ci)}"
            )
    return out
