"""The evidence protocol for Ada-K against training-free baselines (used by ``scripts/reproduce.py``).

Per reference build (each pre-training seed is its own base), on the evidence splits
(``hf_moe_routing.data.splits``):

1. Top-K and static k = 1 .. top_k - 1 on the test rows;
2. per-layer budgets of dynamic skipping and top-p searched on the *validation* rows (greedy marginal value per
   expert per layer, refined), for every budget fraction;
3. for every fraction and allocator seed: Ada-K with our defaults (``target_experts = fraction * top_k``,
   trained on the pretrain split, or ``heldout_train`` with ``train_text``, shuffled by the seed, in rollouts of
   ``rollout_rows`` rows (with ``weight_gain``: then learned weight gains per kept-expert count, and the
   baselines get the same, fitted at each budget), its own
   evaluation on validation rows), scored on the test rows; then every baseline solved to *that run's* mean
   routed experts on the test rows and scored: dynamic skipping with one quantile for all layers (the paper;
   ``dyn-skip uniform``), with the searched per-layer budgets (``dyn-skip per-layer``), top-p with one p (the
   paper; ``top-p global``) and with searched per-layer budgets (``top-p per-layer``).

Every row stores per-row NLLs, so any comparison is a paired bootstrap over test rows. Rows go to
``<out>/runs.jsonl`` as they finish (a rerun skips finished ones); ``<out>/reference.json`` records each
base's weights SHA-256, and a run against a build with another hash stops (rows of two builds never mix);
the folder is a :class:`evidence_results.Results`.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from evidence_results import Results, RowsSettings, key, read_jsonl, rows_sha256, scores_row

from hf_moe_routing import AdaKConfig, TopKConfig, patch_model, unpatch_model
from hf_moe_routing.data import evidence_splits, pack_dataset
from hf_moe_routing.evaluation.matched import BudgetedBaseline, greedy_layer_budgets, match_compute
from hf_moe_routing.evaluation.paired import row_scores
from hf_moe_routing.evaluation.token_classes import vocab_classes
from hf_moe_routing.methods.kept_gain import fit_kept_weight_gains, kept_gains

BASELINE_MODES = {  # name -> (kind, mode)
    "dyn-skip uniform": ("dyn-skip", "uniform"),
    "dyn-skip per-layer": ("dyn-skip", "per-layer"),
    "top-p global": ("top-p", "global-p"),
    "top-p per-layer": ("top-p", "per-layer"),
}


#: splits Ada-K may train on (``Protocol.train_text``); never the validation or test rows
TRAIN_TEXTS = ("pretrain", "heldout_train")


@dataclasses.dataclass
class Protocol(RowsSettings):
    bases: list[str]
    fractions: list[float]
    seeds: list[int]
    adak_steps: int = 100
    calibration_rows: int = 64
    search_step: float = 0.25
    #: rows Ada-K's budget calibration measures its mean k on: "train" (training batches, the trainer's
    #: default) or "validation" (the validation rows it evaluates on: budget_calibration_data="eval")
    budget_calibration: str = "train"
    #: the split Ada-K trains on and the baselines calibrate their thresholds on (the same text for both):
    #: "pretrain" (text the base model was pre-trained on) or "heldout_train" (text it never saw)
    train_text: str = "pretrain"
    #: rows of ``seq_len`` tokens in one PPO rollout (Ada-K's training batch): 8 x 128 = 1,016 predicted tokens
    #: by default, 64 x 128 for rollouts of the order of the paper's 8k-64k tokens (issue 19's ``rollout-8k``)
    rollout_rows: int = 8
    #: learned weight gains per layer and number of kept experts (``AdaKConfig(weight_gain=True)``), fitted
    #: after training for ``gain_steps`` steps of ``batch_size`` rows of the training text; the baselines get
    #: the same gains, fitted at each budget on the same text, before their per-layer search
    weight_gain: bool = False
    gain_steps: int = 100

    def __post_init__(self) -> None:
        if self.train_text not in TRAIN_TEXTS:
            raise ValueError(f"train_text={self.train_text!r}: choose one of {', '.join(TRAIN_TEXTS)}.")
        if not (isinstance(self.rollout_rows, int) and self.rollout_rows >= 1):
            raise ValueError(f"rollout_rows={self.rollout_rows!r}: give a whole number of rows >= 1.")
        if not (isinstance(self.gain_steps, int) and self.gain_steps >= 1):
            raise ValueError(f"gain_steps={self.gain_steps!r}: give a whole number of steps >= 1.")


def _describe(row: dict[str, Any]) -> str:
    what = " ".join(
        f"{k}={row[k]}" for k in ("kind", "method", "fraction", "seed", "k") if row.get(k) is not None
    )
    change = f" ppl {row['perplexity']:.3f}" if "perplexity" in row else ""
    experts = f" experts {row['mean_experts']:.4f}" if "mean_experts" in row else ""
    return f"{row['base']} {what}:{change}{experts} ({row['cpu_seconds']:.0f} CPU s)"


def run(protocol: Protocol, out: Path, log=print) -> list[dict[str, Any]]:
    """Run (or resume) the protocol into ``out``; returns all rows. Raises ReferenceHashMismatch."""
    results = Results(protocol, out, key, _describe, log)
    path, done, record = results.path, results.done, results.record
    splits = evidence_splits(protocol.data_dir)
    contexts = {base: results.reference(base) for base in protocol.bases}  # build and check every base first

    prepared = {}
    for fraction in protocol.fractions:  # every base at one budget before the next budget
        for base in protocol.bases:
            if base not in prepared:
                prepared[base] = _prepare(base, contexts[base], splits, protocol, done, record)
            model, test, validation, train, baselines, classes = prepared[base]
            top_k = model.config.num_experts_per_tok
            if protocol.weight_gain:  # the baselines' gains at this budget (deterministic: a rerun refits)
                for baseline in baselines.values():
                    baseline.set_budgets(fraction * top_k)
                    baseline.fit_weight_gains(train, **gain_settings(protocol, seed=0))
            searched = {}
            for kind, baseline in baselines.items():
                row = _find(path, (base, "search", kind, fraction, None, None))
                if row is None:
                    started = time.process_time()
                    found = greedy_layer_budgets(
                        baseline, validation, [fraction * top_k], step=protocol.search_step
                    )
                    result = next(iter(found.values()))
                    row = {"base": base, "kind": "search", "method": kind, "fraction": fraction, **result}
                    record(row, started)
                searched[kind] = {int(i): b for i, b in row["budgets"].items()}
            for seed in protocol.seeds:
                adak = _find(path, (base, "adak", "ours", fraction, seed, None))
                if adak is None:
                    started = time.process_time()
                    adak = {
                        "base": base,
                        "kind": "adak",
                        "method": "ours",
                        "fraction": fraction,
                        "seed": seed,
                    }
                    adak.update(
                        train_adak(
                            model,
                            train,
                            validation,
                            test,
                            fraction * top_k,
                            seed,
                            protocol,
                            AdaKConfig(weight_gain=protocol.weight_gain),
                            token_classes=classes,
                        )
                    )
                    record(adak, started)
                for name, (kind, mode) in BASELINE_MODES.items():
                    if (base, "baseline", name, fraction, seed, None) in done:
                        continue
                    started = time.process_time()
                    budgets = searched[kind] if mode == "per-layer" else None
                    scores, info = match_compute(
                        baselines[kind], test, adak["mean_experts"], mode=mode, budgets=budgets
                    )
                    info["budgets"] = {str(i): b for i, b in info["budgets"].items()}
                    row = {
                        "base": base,
                        "kind": "baseline",
                        "method": name,
                        "fraction": fraction,
                        "seed": seed,
                    }
                    record({**row, "match": info, **scores_row(scores)}, started)
    return read_jsonl(path)


def _find(path: Path, wanted: tuple) -> dict[str, Any] | None:
    return next((r for r in read_jsonl(path) if key(r) == wanted), None)


def _prepare(base: str, context, splits, protocol: Protocol, done: set, record) -> tuple:
    """Rows of one base, its Top-K and static-k rows, and its calibrated baselines."""
    model, tokenizer, _ = context
    classes = vocab_classes(tokenizer)
    pack = lambda texts, n: pack_dataset(texts, tokenizer, protocol.seq_len).select(range(n))  # noqa: E731
    test = pack(splits.test, protocol.test_rows)
    validation = pack(splits.validation, protocol.validation_rows)
    train = pack_dataset(getattr(splits, protocol.train_text), tokenizer, protocol.seq_len)
    started = time.process_time()
    if (base, "topk", None, None, None, None) not in done:
        record(
            {
                "base": base,
                "kind": "topk",
                "test_rows_sha256": rows_sha256(test),
                **scores_row(row_scores(model, test, batch_size=protocol.batch_size, token_classes=classes)),
            },
            started,
        )
    for k in range(1, model.config.num_experts_per_tok):
        if (base, "static-k", None, None, None, k) not in done:
            started = time.process_time()
            patch_model(model, TopKConfig(top_k=k))
            scores = row_scores(model, test, batch_size=protocol.batch_size, token_classes=classes)
            record({"base": base, "kind": "static-k", "k": k, **scores_row(scores)}, started)
            unpatch_model(model)
    calibration = train.shuffle(seed=0).select(range(protocol.calibration_rows))
    baselines = {
        kind: BudgetedBaseline(
            model, kind, calibration, batch_size=protocol.batch_size, token_classes=classes
        )
        for kind in ("dyn-skip", "top-p")
    }
    return model, test, validation, train, baselines, classes


def train_adak(
    model,
    train,
    validation,
    test,
    target: float,
    seed: int,
    protocol: Protocol,
    adak_config: AdaKConfig | None = None,
    token_classes: Any = None,
    **settings: Any,
) -> dict[str, Any]:
    """Ada-K (our defaults unless ``adak_config`` / ``settings`` say otherwise) at ``target`` experts; returns
    its scores on ``test`` and training diagnostics."""
    from hf_moe_routing.training.adak import AdaKTrainer, AdaKTrainingConfig

    adak_model = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as tmp:
        defaults: dict[str, Any] = {
            "batch_size": protocol.rollout_rows,
            "budget_calibration_data": "eval" if protocol.budget_calibration == "validation" else "train",
            "weight_gain_steps": 0,  # the protocol fits the gains itself below (same settings, its own row order)
        }
        config = AdaKTrainingConfig(
            output_dir=tmp,
            seed=seed,
            target_experts=target,
            max_steps=protocol.adak_steps,
            progress_bar=False,
            log_level="warning",
            save_total_limit=1,
            logging_steps=10,
            eval_batches=2,
            **(defaults | settings),  # a variant's settings replace the protocol's
        )
        trainer = AdaKTrainer(
            adak_model, config, train.shuffle(seed=seed), validation, adak_config=adak_config or AdaKConfig()
        )
        trainer.train()
    gains = None
    if trainer.adak_config.weight_gain:  # fitted after PPO, on the training text
        gains = fit_kept_weight_gains(adak_model, train, **gain_settings(protocol, seed=seed))
    log = [e for e in trainer.state.log_history if e.get("phase") == "ppo"]
    snr = [np.mean(e["signal_to_noise_per_layer"]) for e in log if e.get("signal_to_noise_per_layer")]
    scores = row_scores(adak_model, test, batch_size=protocol.batch_size, token_classes=token_classes)
    return {
        "target_experts": target,
        "final_k_penalty": trainer.state.k_penalty,
        "snr": float(np.mean(snr)) if snr else None,
        "clip_fraction": float(np.mean([e.get("clip_fraction") or 0.0 for e in log])) if log else None,
        **({"gain_fit": gains, "gains": _gain_values(adak_model)} if gains is not None else {}),
        **scores_row(scores),
    }


def gain_settings(protocol: Protocol, seed: int) -> dict[str, Any]:
    """The weight-gain fit of Ada-K and of every baseline: ``fit_gains`` settings."""
    return {"max_steps": protocol.gain_steps, "batch_size": protocol.batch_size, "seed": seed}


def _gain_values(model) -> list[list[float]]:
    return [gain.tolist() for gain in kept_gains(model)]


__all__ = ["BASELINE_MODES", "TRAIN_TEXTS", "Protocol", "gain_settings", "run", "train_adak"]
