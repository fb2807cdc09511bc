"""Regenerate a results table with one command (resumable; rows of two reference builds never mix).

    python scripts/reproduce.py adak-evidence            # Ada-K vs per-layer baselines, paired CIs (docs/evidence.md)
    python scripts/reproduce.py adak-evidence --smoke    # the same pipeline in seconds, on a 20-step build
    python scripts/reproduce.py adak-variants            # Ada-K design choices, on the validation split
    python scripts/reproduce.py bip-frozen               # BIP on a frozen checkpoint: held-out balance, paired CIs
    python scripts/reproduce.py reference-models         # build reference models, check their recorded SHA-256

Tables:

* ``adak-evidence``: the protocol of ``scripts/evidence_protocol.py`` on the ``tiny-moe`` reference shape with
  2 pre-training seeds (``tiny-moe``, ``tiny-moe-seed1``), allocator seeds 0 1 2, budgets 70% and 60% of top-k,
  100 PPO steps, 256 test rows of 128 tokens (32,512 predicted tokens); every base at 70% before any at 60%.
  Writes ``<out>/runs.jsonl`` (one line per finished run, with its CPU seconds; a rerun skips them),
  ``<out>/reference.json`` (each base's weights SHA-256: a build with another hash stops the command, naming
  both), ``<out>/summary.json`` and ``<out>/tables.md``. The command prints its CPU time; docs/evidence.md
  gives what it took here.
* ``adak-variants``: Ada-K design choices on the *validation* split (``scripts/evidence_variants.py``): our
  default, per-layer budgets (``layer_targets``), ``k_max`` = all experts, the paper's renormalised weights and
  allocators trained on held-out text, each against dynamic skipping at its own compute; 2 bases x seeds 0 1 at
  70%; the test split is not touched.
* ``bip-frozen``: BIP's q fitted on validation rows of a frozen reference model (``scripts/bip_evidence.py``):
  3 fitting seeds x capacity factors 1, 1.5, 2 x fit estimates (last batch, mean of the batches, one large
  batch), and Loss-Free at update rates 1e-3, 1e-2, 1e-1; in-sample, validation and test AvgMaxVio with q
  frozen, perplexity change vs Top-K with paired CIs on 256 test rows; default bases ``mixtral-8x2`` and
  ``qwen-moe`` with a second pre-training seed each (``-seed1``).
* ``reference-models``: builds the named reference models (default ``tiny-moe``) and compares each weights
  hash with ``hf_moe_routing/training/reference_hashes.json`` for this torch version and thread count.

``--train-text heldout_train`` (adak-evidence) trains Ada-K, and calibrates the baselines' thresholds, on
``heldout_train`` (WikiText-2 test's first half, text the base never saw) instead of ``pretrain``; issue 19's
validation study found it the one choice that helped on both shapes (docs/evidence.md). ``--rollout-rows 64``
(adak-evidence) trains Ada-K on rollouts of 64 x 128 tokens per PPO update instead of 8 x 128 (the validation
study's ``rollout-8k``, best on mixtral-8x2; 8x the training compute). ``--weight-gain`` (adak-evidence)
gives Ada-K, and every baseline, learned weight gains per layer and number of kept experts
(``hf_moe_routing.methods.kept_gain``), fitted on the training text.

Other README tables keep their own scripts for now (``scripts/adak_tradeoff.py``, ``scripts/bip_existing_checkpoints.py``): their
commands are in the README next to each table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bip_evidence import BIPProtocol
from bip_evidence import markdown as bip_markdown
from bip_evidence import run as run_bip
from evidence_classes import class_markdown
from evidence_protocol import TRAIN_TEXTS, Protocol, run
from evidence_results import ProtocolMismatch
from evidence_summary import markdown, pareto_plot, summarize, verdict_markdown
from evidence_variants import VARIANTS, run_variants, variants_markdown

from hf_moe_routing.training.reference import (
    ReferenceHashMismatch,
    build_key,
    recorded_hash,
    reference_info,
    reference_model,
)

TABLES = ("adak-evidence", "adak-variants", "bip-frozen", "reference-models")


def _protocol(args: argparse.Namespace, fractions: list[float], seeds: list[int], **full: Any) -> Protocol:
    """The run's protocol: with --smoke one tiny base, fraction 0.7, seed 0, 2 Ada-K steps and few rows
    (``full["test_rows"]`` becomes 24 where given); else the flags, with ``fractions`` and ``seeds`` as
    defaults and ``full`` as further settings."""
    if args.smoke:
        return Protocol(
            bases=["tiny-moe"],
            fractions=[0.7],
            seeds=[0],
            adak_steps=2,
            **({"test_rows": 24} if "test_rows" in full else {}),
            **({k: full[k] for k in ("train_text", "rollout_rows", "weight_gain") if k in full}),
            **({"gain_steps": 2} if full.get("weight_gain") else {}),
            validation_rows=8,
            calibration_rows=8,
            search_step=1.0,
            reference_steps=20,
            budget_calibration=args.budget_calibration,
            threads=args.threads,
            cache_dir=args.cache_dir or str(Path(args.out) / "cache"),
            data_dir=args.data_dir,
        )
    return Protocol(
        bases=args.bases or ["tiny-moe", "tiny-moe-seed1"],
        fractions=args.fractions or fractions,
        seeds=args.seeds or seeds,
        adak_steps=args.adak_steps,
        budget_calibration=args.budget_calibration,
        threads=args.threads,
        cache_dir=args.cache_dir,
        data_dir=args.data_dir,
        **full,
    )


def adak_evidence(args: argparse.Namespace) -> int:
    protocol = _protocol(
        args,
        [0.7, 0.6],
        [0, 1, 2],
        test_rows=args.test_rows,
        train_text=args.train_text,
        rollout_rows=args.rollout_rows,
        weight_gain=args.weight_gain,
    )
    out = Path(args.out)
    rows = run(protocol, out, log=lambda line: print(line, flush=True))
    summary = summarize(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    text += "\nAgainst the strongest baseline of each cell:\n\n" + verdict_markdown(summary)
    pareto_plot(summary, out / "pareto.png")
    classes = class_markdown(rows)
    text += f"\n{classes}" if classes else ""
    (out / "tables.md").write_text(text)
    print(text)
    return 0


def adak_variants(args: argparse.Namespace) -> int:
    protocol = _protocol(args, [0.7], [0, 1])
    design_rows = 16 if args.smoke else 256
    out = Path(args.out)
    rows = run_variants(
        protocol, out, args.variants or list(VARIANTS), design_rows, log=lambda x: print(x, flush=True)
    )
    text = variants_markdown(rows)
    (out / "tables.md").write_text(text)
    print(text)
    return 0


def bip_frozen(args: argparse.Namespace) -> int:
    if args.smoke:
        settings: dict[str, Any] = dict(
            bases=["tiny-moe"],
            seeds=[0],
            capacity_factors=[1.0],
            loss_free_rates=[1e-2],
            fit_rows=16,
            validation_rows=8,
            test_rows=16,
            reference_steps=20,
            cache_dir=args.cache_dir or str(Path(args.out) / "cache"),
        )
    else:
        settings = dict(
            bases=args.bases or ["mixtral-8x2", "mixtral-8x2-seed1", "qwen-moe", "qwen-moe-seed1"],
            seeds=args.seeds or [0, 1, 2],
            test_rows=args.test_rows,
            cache_dir=args.cache_dir,
        )
    protocol = BIPProtocol(**settings, threads=args.threads, data_dir=args.data_dir)
    out = Path(args.out)
    rows = run_bip(protocol, out, log=lambda line: print(line, flush=True))
    text = bip_markdown(rows)
    (out / "tables.md").write_text(text)
    print(text)
    return 0


def reference_models(args: argparse.Namespace) -> int:
    status = 0
    for name in args.bases or ["tiny-moe"]:
        reference_model(name, args.cache_dir, data_dir=args.data_dir, rebuild=args.rebuild, progress=False)
        info = reference_info(name, args.cache_dir)
        threads = info["spec"]["threads"]
        expected = recorded_hash(name, info["packages"]["torch"], threads)
        same = (
            "no recorded hash"
            if expected is None
            else ("matches" if expected == info["weights_sha256"] else "DIFFERS")
        )
        print(
            f"{name}: weights {info['weights_sha256']} ({build_key(info['packages']['torch'], threads)}; recorded: "
            f"{expected}: {same}), validation perplexity {info['validation_perplexity']:.3f}, "
            f"{info['build_seconds']:.0f} s"
        )
        status |= same == "DIFFERS"
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("table", choices=TABLES)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny settings (seconds): checks the pipeline only"
    )
    parser.add_argument(
        "--out",
        help="results folder (default results/evidence/<table>, with --bases results/evidence/<table>-<first "
        "base>, smoke: a temp folder)",
    )
    parser.add_argument("--bases", nargs="+", help="reference builds (name or name-seed<N>)")
    parser.add_argument("--fractions", nargs="+", type=float, help="budgets as fractions of top-k")
    parser.add_argument("--seeds", nargs="+", type=int, help="allocator seeds")
    parser.add_argument("--adak-steps", type=int, default=100)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="adak-variants: which (default all)")
    parser.add_argument("--test-rows", type=int, default=256)
    parser.add_argument(
        "--budget-calibration",
        choices=("train", "validation"),
        default="validation",
        help="rows Ada-K's budget calibration measures the mean k on: the validation rows it is evaluated on "
        "(default: lands within 3%% of the budget on the test rows, docs/evidence.md) or its training batches",
    )
    parser.add_argument(
        "--train-text",
        choices=TRAIN_TEXTS,
        default="pretrain",
        help="adak-evidence: the split Ada-K trains on and the baselines calibrate on: the base model's "
        "pre-training text (default) or heldout_train, text it never saw (default --out gains -heldout-train)",
    )
    parser.add_argument(
        "--rollout-rows",
        type=int,
        default=8,
        help="adak-evidence: rows of 128 tokens per PPO rollout (default 8, about 1k tokens; 64 is issue 19's "
        "rollout-8k, 8x the training compute; any other value: default --out gains -rollout<N>)",
    )
    parser.add_argument(
        "--weight-gain",
        action="store_true",
        help="adak-evidence: Ada-K with learned weight gains per layer and kept-expert count "
        "(AdaKConfig(weight_gain=True), fitted after PPO); the baselines get the same (default --out gains "
        "-weight-gain)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    parser.add_argument("--rebuild", action="store_true", help="reference-models: build again")
    parser.add_argument("--cache-dir")
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = None
    if args.out is None:
        if args.smoke:
            tmp = tempfile.TemporaryDirectory()
            args.out = tmp.name
        elif args.bases and args.table != "reference-models":
            args.out = f"results/evidence/{args.table}-{args.bases[0]}"
        else:
            args.out = f"results/evidence/{args.table}"
        if args.table == "adak-evidence" and args.train_text != "pretrain":
            args.out += "-" + args.train_text.replace("_", "-")
        if args.table == "adak-evidence" and args.rollout_rows != 8:
            args.out += f"-rollout{args.rollout_rows}"
        if args.table == "adak-evidence" and args.weight_gain:
            args.out += "-weight-gain"
    started, wall = time.process_time(), time.perf_counter()
    try:
        run_table = {
            "adak-evidence": adak_evidence,
            "adak-variants": adak_variants,
            "bip-frozen": bip_frozen,
        }.get(args.table, reference_models)
        status = run_table(args)
    except (ReferenceHashMismatch, ProtocolMismatch) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"{args.table}: {time.process_time() - started:.0f} CPU s, {time.perf_counter() - wall:.0f} s wall")
    return status


if __name__ == "__main__":
    sys.exit(main())
