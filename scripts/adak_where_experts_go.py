"""Where Ada-K spends its experts: mean k per MoE layer and per token class (as in Yue et al.'s analysis).

Loads a reference model (``hf_moe_routing.training.reference``) with a trained Ada-K routing adapter (by
default the one ``adak_tradeoff.py`` trained with our defaults at 70% of the model's top-k, seed 0), routes
held-out WikiText-2 test text, and groups the number of experts each token got by the token's class:

* ``punctuation`` -- tokens made only of punctuation (WikiText's ``@-@`` and ``@,@`` included);
* ``function``    -- closed-class English words (articles, prepositions, pronouns, auxiliaries, conjunctions);
* ``content``     -- other alphabetic tokens (content words and their word pieces);
* ``number`` and ``other`` (special tokens, ``<unk>``, mixed).

It also measures whether layers decide independently: the share of tokens that lost experts at *every*
layer, against the share expected if each layer dropped its own tokens independently (the product of the
per-layer drop rates). Writes ``<model>.json``, ``<model>.md`` (table) and ``<model>_k_by_class.png``
into ``--out``.

    python scripts/adak_where_experts_go.py --model mixtral-8x2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from hf_moe_routing.data import pack_dataset, read_corpus
from hf_moe_routing.evaluation.evaluate import token_expert_counts
from hf_moe_routing.evaluation.token_classes import CLASSES, token_class
from hf_moe_routing.hub import load_routing_adapter
from hf_moe_routing.training.reference import reference_model


def default_adapter(results: Path, model: str, method: str, setting: str, seed: int) -> Path:
    """The adapter of the trade-off run (model, method, setting, seed)."""
    data = json.loads(results.read_text())
    runs = [
        r
        for r in data["runs"]
        if r["model"] == model and r["method"] == method and r["setting"] == setting and r.get("seed") == seed
    ]
    if not runs or "adapter" not in runs[0]:
        raise FileNotFoundError(
            f"No {method} run {setting!r} (seed {seed}) for {model} in {results}: run scripts/adak_tradeoff.py first."
        )
    return Path(runs[0]["adapter"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mixtral-8x2", help="reference model name")
    parser.add_argument(
        "--adapter", default=None, help="Ada-K routing adapter folder (default: from the trade-off)"
    )
    parser.add_argument("--tradeoff", default="results/adak_tradeoff/results.json")
    parser.add_argument("--method", default="ada-k (ours)", help="Ada-K series of the trade-off")
    parser.add_argument("--setting", default="target=0.7", help="Ada-K run of the trade-off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="results/adak_where_experts_go")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    adapter = (
        Path(args.adapter)
        if args.adapter
        else default_adapter(Path(args.tradeoff), args.model, args.method, args.setting, args.seed)
    )
    model, tokenizer = reference_model(args.model, args.cache_dir, data_dir=args.data_dir)
    load_routing_adapter(model, adapter)
    rows = pack_dataset(read_corpus("wikitext-2/test", args.data_dir), tokenizer, args.seq_len)
    rows = rows.select(range(min(args.eval_rows, len(rows))))
    routed = token_expert_counts(model, rows, batch_size=args.batch_size)

    ids = routed["input_ids"].tolist()
    texts = {i: tokenizer.decode([i]) for i in set(ids)}
    classes = [token_class(texts[i]) for i in ids]
    layers = sorted(routed["counts"])
    counts = torch.stack([routed["counts"][i].double() for i in layers])  # (L, N)
    per_class: dict[str, dict] = {}
    for name in CLASSES:
        mask = torch.tensor([c == name for c in classes])
        if mask.any():
            per_layer = counts[:, mask].mean(dim=1)
            per_class[name] = {
                "tokens": int(mask.sum()),
                "share": float(mask.double().mean()),
                "mean_k": float(per_layer.mean()),
                "mean_k_per_layer": {str(layer): float(v) for layer, v in zip(layers, per_layer)},
            }
    frequent = [i for i, n in Counter(ids).most_common(200) if n >= 20]
    mean_by_token = {
        texts[i].strip() or repr(texts[i]): float(counts[:, torch.tensor(ids) == i].mean()) for i in frequent
    }
    ranked = sorted(mean_by_token.items(), key=lambda kv: kv[1])
    top_k = model.config.num_experts_per_tok
    dropped = counts < top_k  # (L, N): token lost experts at that layer
    every_layer = float(dropped.all(dim=0).double().mean())
    independent = float(dropped.double().mean(dim=1).prod())
    result = {
        "model": args.model,
        "adapter": str(adapter),
        "tokens": len(ids),
        "layers": layers,
        "mean_k": float(counts.mean()),
        "mean_k_per_layer": {str(layer): float(v) for layer, v in zip(layers, counts.mean(dim=1))},
        "per_class": per_class,
        "dropped_at_every_layer": every_layer,
        "dropped_at_every_layer_if_independent": independent,
        "fewest_experts": ranked[:12],
        "most_experts": ranked[-12:][::-1],
    }

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    header = "| class | share of tokens | mean k | " + " | ".join(f"layer {i}" for i in layers) + " |"
    lines = [f"### {args.model} ({len(ids)} held-out tokens, adapter `{adapter}`)", "", header]
    lines.append("| --- | ---: | ---: |" + " ---: |" * len(layers))
    lines.append(
        f"| all | 100% | {result['mean_k']:.2f} | "
        + " | ".join(f"{v:.2f}" for v in result["mean_k_per_layer"].values())
        + " |"
    )
    for name, c in per_class.items():
        lines.append(
            f"| {name} | {100 * c['share']:.1f}% | {c['mean_k']:.2f} | "
            + " | ".join(f"{v:.2f}" for v in c["mean_k_per_layer"].values())
            + " |"
        )
    lines += [
        "",
        f"tokens that lost experts at every layer: {100 * every_layer:.1f}% (if layers chose independently, "
        f"with the same per-layer drop rates: {100 * independent:.1f}%)",
        "",
        "fewest experts (frequent tokens): "
        + ", ".join(f"`{t}` {k:.2f}" for t, k in result["fewest_experts"]),
        "",
        "most experts (frequent tokens): " + ", ".join(f"`{t}` {k:.2f}" for t, k in result["most_experts"]),
    ]
    text = "\n".join(lines) + "\n"
    (out / f"{args.model}.md").write_text(text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(per_class))
    for j, (name, c) in enumerate(per_class.items()):
        values = list(c["mean_k_per_layer"].values())
        ax.bar(
            [x + j * width for x in range(len(layers))],
            values,
            width,
            label=f"{name} ({100 * c['share']:.0f}%)",
        )
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(layers))], [str(i) for i in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("mean experts per token (Ada-K)")
    ax.set_title(f"{args.model}: experts per token class")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{args.model}_k_by_class.png", dpi=120)
    plt.close(fig)
    print(
        f"wrote {out / (args.model + '.json')}, {out / (args.model + '.md')}, {out / (args.model + '_k_by_class.png')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
