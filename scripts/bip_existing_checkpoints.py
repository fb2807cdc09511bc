"""Where BIP pays for an existing checkpoint: fine-tuning with the transformers Trainer, and frozen inference.

Two experiments on the cached reference models (``hf_moe_routing.training.reference``: pre-trained
with plain Top-K routing, so their routers are imbalanced), each over several seeds:

``finetune``  continue training ``mixtral-8x2`` with ``transformers.Trainer`` (AdamW, constant lr) on
              the evidence splits' ``heldout_train`` text (never pre-trained on), routed by Top-K (no
              balancing), the auxiliary loss (Loss-Controlled, alpha 0.001 / 0.01 / 0.1), Loss-Free
              (u = 1e-4 / 1e-3 / 1e-2) or BIP (``update="before"``, T = 4). MaxVio of every training
              batch (padding excluded: in-sample) is recorded by a callback; after training, with the
              routing's state frozen, AvgMaxVio and perplexity on the validation rows (where a
              baseline's best setting is read) and on the test rows (the result). The seed sets the data
              order and Trainer seed; every method sees the same batches.
``frozen``    no weight changes: BIP fitted with ``fit_routing`` on WikiText-2 valid, for several
              capacity factors, then evaluated on WikiText-2 test (perplexity and AvgMaxVio against
              the model's own Top-K). Loss-Free (fitted the same way, u = 1e-2) is a second row. The
              seed picks the fitting rows.

    python scripts/bip_existing_checkpoints.py finetune --seeds 0 1 2 --out results/bip_existing_checkpoints/heldout
    python scripts/bip_existing_checkpoints.py frozen --seeds 0 1 2 --models mixtral-8x2 qwen-moe

Writes ``<out>/<experiment>.json`` (every run) and ``<out>/<experiment>.md`` (mean and standard
deviation over seeds). Uses 1 torch thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hf_moe_routing import BIPConfig, LossControlledConfig, LossFreeConfig, TopKConfig, patch_model
from hf_moe_routing.data import evidence_splits, pack_dataset, read_corpus
from hf_moe_routing.evaluation.evaluate import evaluate_routing
from hf_moe_routing.evaluation.stats import RoutingStats
from hf_moe_routing.patching import fit_routing, routing_aux_loss, unpatch_model
from hf_moe_routing.training.reference import reference_model

FINETUNE_METHODS = {
    "Top-K (no balancing)": TopKConfig(),
    "aux loss (alpha 0.001)": LossControlledConfig(coefficient=0.001),
    "aux loss (alpha 0.01)": LossControlledConfig(coefficient=0.01),
    "aux loss (alpha 0.1)": LossControlledConfig(coefficient=0.1),
    "Loss-Free (u 1e-4)": LossFreeConfig(update_rate=1e-4),
    "Loss-Free (u 1e-3)": LossFreeConfig(update_rate=1e-3),
    "Loss-Free (u 1e-2)": LossFreeConfig(update_rate=1e-2),
    "BIP (before, T=4)": BIPConfig(update="before"),
}


def _rows(tokenizer: Any, corpus: str, seq_len: int) -> Any:
    return pack_dataset(read_corpus(corpus), tokenizer, seq_len)


# ---- fine-tuning with the transformers Trainer ----------------------------------------------------
def finetune_run(model_name: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, tokenizer = reference_model(model_name, args.cache_dir, progress=False)
    splits = evidence_splits()
    train = pack_dataset(splits.heldout_train, tokenizer, args.seq_len)
    validation = pack_dataset(splits.validation, tokenizer, args.seq_len).select(range(128))
    test = pack_dataset(splits.test, tokenizer, args.seq_len).select(range(256))
    patch_model(model, FINETUNE_METHODS[method])
    stats = RoutingStats(model).attach()
    max_vio: list[float] = []

    class MaxVioCallback(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            max_vio.append(float(stats.last.max_vio.mean()))

    class RoutingTrainer(Trainer):
        """Adds the routing's auxiliary loss (Loss-Controlled; None for the others) to the LM loss."""

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # noqa: ANN001
            outputs = model(**inputs)
            aux = routing_aux_loss(model)
            loss = outputs.loss + (aux if aux is not None else 0.0)
            return (loss, outputs) if return_outputs else loss

    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            logging_steps=args.steps,
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        started = time.perf_counter()
        RoutingTrainer(
            model=model, args=training_args, train_dataset=train, callbacks=[MaxVioCallback()]
        ).train()
        seconds = time.perf_counter() - started
    stats.detach()
    model.eval()
    scored = {
        name: evaluate_routing(model, rows, batch_size=8, topk_reference=False, progress=False)
        for name, rows in (("validation", validation), ("test", test))
    }
    return {
        "model": model_name,
        "method": method,
        "seed": seed,
        "max_vio_per_step": max_vio,
        "avg_max_vio": statistics.fmean(max_vio),
        "sup_max_vio": max(max_vio),
        "max_vio_step_1": max_vio[0],
        "validation_perplexity": scored["validation"]["perplexity"],
        "validation_avg_max_vio": scored["validation"]["avg_max_vio"],
        "test_perplexity": scored["test"]["perplexity"],
        "test_avg_max_vio": scored["test"]["avg_max_vio"],
        "seconds": seconds,
    }


# ---- frozen inference: balance against perplexity over the capacity factor -------------------------
def frozen_runs(model_name: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    model, tokenizer = reference_model(model_name, args.cache_dir, progress=False)
    fit_rows = _rows(tokenizer, "wikitext-2/valid", args.seq_len).shuffle(seed=seed)
    fit_rows = fit_rows.select(range(args.fit_batches * args.batch_size))
    test = _rows(tokenizer, "wikitext-2/test", args.seq_len).select(
        range(args.eval_batches * args.batch_size)
    )
    topk = evaluate_routing(model, test, batch_size=args.batch_size, topk_reference=False, progress=False)
    out = [_frozen_row(model_name, seed, "Top-K", None, topk, topk)]
    configs = [(f"BIP C={c:g}", c, BIPConfig(capacity_factor=c)) for c in args.capacity_factors]
    configs.append(("Loss-Free (u 1e-2)", None, LossFreeConfig(update_rate=1e-2)))
    for label, capacity, config in configs:
        patch_model(model, config)
        fit_routing(model, fit_rows, batch_size=args.batch_size, progress=False)
        result = evaluate_routing(
            model, test, batch_size=args.batch_size, topk_reference=False, progress=False
        )
        out.append(_frozen_row(model_name, seed, label, capacity, result, topk))
        unpatch_model(model)
    return out


def _frozen_row(
    model: str, seed: int, label: str, capacity: float | None, r: dict, topk: dict
) -> dict[str, Any]:
    return {
        "model": model,
        "seed": seed,
        "routing": label,
        "capacity_factor": capacity,
        "perplexity": r["perplexity"],
        "perplexity_change": r["perplexity"] / topk["perplexity"] - 1.0,
        "avg_max_vio": r["avg_max_vio"],
        "sup_max_vio": r["sup_max_vio"],
    }


# ---- tables ---------------------------------------------------------------------------------------
def _mean_sd(values: list[float], fmt: str) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{fmt}} ± {sd:{fmt}}"


def table(records: list[dict[str, Any]], group: tuple[str, ...], columns: dict[str, str]) -> str:
    """Markdown: one row per ``group`` key, mean ± sd over seeds of each column (``name -> format``)."""
    keys = list(dict.fromkeys(tuple(r[g] for g in group) for r in records))
    seeds = sorted({r["seed"] for r in records})
    lines = [
        "| " + " | ".join(group) + " | " + " | ".join(columns) + " |",
        "| " + " | ".join("---" for _ in (*group, *columns)) + " |",
    ]
    for key in keys:
        rows = [r for r in records if tuple(r[g] for g in group) == key]
        cells = [_mean_sd([r[c] for r in rows], fmt) for c, fmt in columns.items()]
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nmean ± standard deviation over seeds {seeds}\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=("finetune", "frozen"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["mixtral-8x2"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps (finetune)")
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="fine-tuning lr (finetune)")
    parser.add_argument("--fit-batches", type=int, default=20, help="fitting batches (frozen)")
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out batches (frozen)")
    parser.add_argument("--capacity-factors", type=float, nargs="+", default=[1.0, 1.1, 1.25, 1.5, 2.0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(FINETUNE_METHODS),
        choices=list(FINETUNE_METHODS),
        help="(finetune)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", help="reference models' cache (default: the package's)")
    parser.add_argument("--out", default="results/bip_existing_checkpoints")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for model_name in args.models:
        for seed in args.seeds:
            if args.experiment == "finetune":
                for method in args.methods:
                    records.append(finetune_run(model_name, method, seed, args))
                    print(
                        json.dumps({k: v for k, v in records[-1].items() if k != "max_vio_per_step"}),
                        flush=True,
                    )
            else:
                records += frozen_runs(model_name, seed, args)
                print(json.dumps(records[-1]), flush=True)
    (out / f"{args.experiment}.json").write_text(json.dumps({"args": vars(args), "runs": records}, indent=2))
    if args.experiment == "finetune":
        columns = {"avg_max_vio": ".3f", "max_vio_step_1": ".3f", "validation_avg_max_vio": ".3f"}
        columns |= {"validation_perplexity": ".2f", "test_avg_max_vio": ".3f", "test_perplexity": ".2f"}
        text = table(records, ("model", "method"), columns)
    else:
        text = table(
            records,
            ("model", "routing"),
            {"perplexity": ".2f", "perplexity_change": "+.2%", "avg_max_vio": ".3f"},
        )
    (out / f"{args.experiment}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
