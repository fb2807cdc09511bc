"""Shared set-up of the Ada-K experiment scripts: reference models, data, one training run, one evaluation.

Every script evaluates on fixed held-out rows (the design study: the evidence *validation* split; the old
trade-off table: the first rows of WikiText-2 test) with
:func:`hf_moe_routing.evaluation.evaluate.evaluate_routing`, and trains on the reference models' own
training text (the ``pretrain`` evidence split), shuffled by the run's seed. Perplexity changes are
relative to the same model's Top-K on the same rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from hf_moe_routing.data import evidence_splits, pack_dataset, read_corpus
from hf_moe_routing.evaluation.evaluate import evaluate_routing
from hf_moe_routing.training.reference import reference_model

KEEP = (
    "perplexity",
    "perplexity_change",
    "mean_activated",
    "activation_reduction",
    "flops_reduction",
    "routed_flops_reduction",
    "activated_per_layer",
    "top_k",
    "num_tokens",
    "routing",
)


def load(
    name: str,
    seq_len: int = 128,
    eval_rows: int = 64,
    data_dir: str | None = None,
    split: str = "legacy-test",
):
    """``(model, tokenizer, train rows, eval rows)`` of a reference model (built on first use).

    ``split``: ``"validation"`` (the evidence validation split, held out from pre-training: for design choices)
    or ``"legacy-test"`` (the first rows of WikiText-2 test, the old trade-off table's rows). Training rows are
    the ``pretrain`` evidence split, which the reference models are pre-trained on.
    """
    model, tokenizer = reference_model(name, data_dir=data_dir, progress=False)
    model.eval()
    splits = evidence_splits(data_dir)
    if split == "validation":
        texts = splits.validation
    elif split == "legacy-test":
        texts = read_corpus("wikitext-2/test", data_dir)
    else:
        raise ValueError(f"Unknown split {split!r}: validation or legacy-test.")
    held_out = pack_dataset(texts, tokenizer, seq_len)
    held_out = held_out.select(range(min(eval_rows, len(held_out))))
    train = pack_dataset(splits.pretrain, tokenizer, seq_len)
    return model, tokenizer, train, held_out


def evaluate(model, rows, batch_size: int = 8) -> dict[str, Any]:
    """The routing's held-out numbers (perplexity change vs the model's Top-K, experts, FLOPs)."""
    result = evaluate_routing(model, rows, batch_size=batch_size, progress=False)
    return {k: result[k] for k in KEEP if k in result}


def train_adak(
    model, train, eval_rows, *, adak_config, out: Path, seed: int, **settings: Any
) -> dict[str, Any]:
    """Train Ada-K allocators (model patched in place); returns timing, final lambda and the log."""
    from hf_moe_routing.training.adak import AdaKTrainer, AdaKTrainingConfig

    config = AdaKTrainingConfig(
        output_dir=str(out),
        seed=seed,
        progress_bar=False,
        log_level="warning",
        save_total_limit=1,
        **{"logging_steps": 10, "eval_batches": 2, **settings},
    )
    trainer = AdaKTrainer(model, config, train, eval_rows, adak_config=adak_config)
    started = time.perf_counter()
    output = trainer.train()
    return {
        "train_seconds": time.perf_counter() - started,
        "final_k_penalty": trainer.state.k_penalty,
        "warmup_p": trainer.state.warmup_p,
        "log": [e for e in trainer.state.log_history if e.get("phase") == "ppo"],
        "adapter": output.adapter_dir,
    }


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
