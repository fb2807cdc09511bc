"""``hf-moe-routing evaluate MODEL``: held-out perplexity, activated experts, FLOPs and MaxVio of a routing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch import nn

_ROUTING_HELP = (
    "routing to evaluate: a name with optional settings, e.g. 'topk', 'topk:top_k=1', 'top_p:p=0.6', "
    "'dynamic_skip', 'dynamic_skip:beta=0.4', or a JSON object / JSON file of a routing config "
    "(default: the model's own Top-K, or the routing of --adapter)"
)


def parse_routing(spec: str):
    """A routing config from ``name``, ``name:key=value,key=value``, a JSON object, or a JSON file path."""
    from ..methods import RoutingConfig

    text = spec.strip()
    path = Path(text).expanduser()
    if text.endswith(".json") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"Routing config file {text!r} does not exist.")
        text = path.read_text(encoding="utf-8")
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--routing is not valid JSON: {error}") from error
        if "routing_type" not in data:
            raise ValueError(
                'A JSON routing config needs a \'routing_type\' key, e.g. {"routing_type": "top_p"}.'
            )
        return RoutingConfig.from_dict(data)
    name, _, settings = text.partition(":")
    data: dict[str, Any] = {"routing_type": name.strip()}
    for item in filter(None, (s.strip() for s in settings.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Routing setting {item!r} is not key=value (e.g. 'top_p:p=0.6,max_k=4').")
        try:
            data[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            data[key.strip()] = value.strip()
    return RoutingConfig.from_dict(data)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``evaluate`` and ``bench``: the model and its routing."""
    parser.add_argument("model", help="Hub model id or local folder (as for from_pretrained)")
    parser.add_argument("--adapter", default=None, help="routing adapter folder or Hub repo id to load")
    parser.add_argument("--routing", default=None, help=_ROUTING_HELP)
    parser.add_argument("--revision", default=None, help="model revision on the Hub")
    parser.add_argument(
        "--data-dir", default=None, help="folder of the local corpora (default ../shared/data)"
    )
    parser.add_argument(
        "--calibration-dataset",
        default="wikitext-2/valid",
        help="text for calibrating dynamic skipping when its beta is not set (default wikitext-2/valid)",
    )
    parser.add_argument("--calibration-batches", type=int, default=8, help="batches used for calibration")


def add_data_arguments(parser: argparse.ArgumentParser, default_dataset: str | None) -> None:
    parser.add_argument(
        "--dataset",
        default=default_dataset,
        help="local corpus (wikitext-2/test, wikitext-2/valid, tinyshakespeare), text file, or Hub dataset id",
    )
    parser.add_argument("--split", default="test", help="dataset split (Hub / folder datasets)")
    parser.add_argument("--dataset-config", default=None, help="Hub dataset configuration name")
    parser.add_argument("--text-field", default="text", help="column holding the text")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="perplexity, activated experts, FLOPs and MaxVio of a routing against Top-K",
        description=(
            "Evaluate a model's routing on held-out text: token-weighted perplexity, mean activated routed "
            "experts (overall and per layer), FLOPs per token and their reduction against the model's "
            "Top-K, and MaxVio. The same model under Top-K is evaluated alongside."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing evaluate ./my-mixtral --routing top_p:p=0.6 --dataset wikitext-2/test\n"
            "  hf-moe-routing evaluate ./my-qwen-moe --adapter ./adak-allocators --json out.json --plot k.png"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    add_data_arguments(parser, "wikitext-2/test")
    parser.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
    parser.add_argument("--no-topk-reference", action="store_true", help="skip the Top-K reference pass")
    parser.add_argument(
        "--tasks",
        default=None,
        help="also run these lm-eval tasks (comma-separated), e.g. blimp_local,wikitext2_local (needs lm-eval)",
    )
    parser.add_argument(
        "--limit", type=float, default=None, help="lm-eval: examples per task (or a fraction)"
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the results as JSON here (with `evaluate.save`: adds time, git commit and versions)",
    )
    parser.add_argument(
        "--plot",
        nargs="?",
        const="activated_experts.png",
        default=None,
        metavar="PNG",
        help="write a bar chart of activated experts per layer (default name activated_experts.png)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def load_model(args: argparse.Namespace) -> nn.Module:
    """The model of ``args.model``, patched with ``--adapter`` or ``--routing`` (calibrated if needed)."""
    from ..hub import load_routing_adapter
    from ..patching import patch_model
    from .inspect import load_for_inspection

    if args.adapter and args.routing:
        raise ValueError("Pass either --adapter (a saved routing) or --routing (a new one), not both.")
    routing = parse_routing(args.routing) if args.routing else None  # fail fast, before loading weights
    model = load_for_inspection(args.model, revision=args.revision).eval()
    if args.adapter:
        load_routing_adapter(model, args.adapter)
    elif routing is not None:
        patch_model(model, routing)
        _calibrate_if_needed(model, args)
    return model


def _calibrate_if_needed(model: nn.Module, args: argparse.Namespace) -> None:
    from ..methods.dynamic_skip import DynamicSkipConfig, calibrate
    from ..patching import get_patch_state

    config = get_patch_state(model).config
    if isinstance(config, DynamicSkipConfig) and config.beta is None:
        data = load_eval_data(
            args,
            model,
            args.calibration_dataset,
            split="train",
            max_rows=args.calibration_batches * args.batch_size,
        )
        betas = calibrate(
            model,
            data,
            batch_size=args.batch_size,
            max_batches=args.calibration_batches,
            progress=not getattr(args, "quiet", False),
        )
        print("calibrated beta per layer: " + ", ".join(f"{i}: {b:.3f}" for i, b in betas.items()))


def load_eval_data(
    args: argparse.Namespace,
    model: nn.Module,
    dataset: str,
    split: str | None = None,
    max_rows: int | None = None,
):
    """``dataset`` tokenised with the model's tokenizer and packed into rows of ``--seq-len`` tokens."""
    from transformers import AutoTokenizer

    from ..data import check_context_length, load_text_dataset, pack_dataset

    check_context_length(model, args.seq_len)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a tokenizer from {args.model!r} ({error}); the model folder needs its tokenizer files."
        ) from error
    texts = load_text_dataset(
        dataset,
        split=split or args.split,
        text_field=args.text_field,
        config_name=args.dataset_config,
        data_dir=args.data_dir,
    )
    packed = pack_dataset(texts, tokenizer, args.seq_len, text_field=args.text_field)
    return packed.select(range(min(len(packed), max_rows))) if max_rows else packed


def format_results(results: dict[str, Any]) -> str:
    """A readable summary table of :func:`~hf_moe_routing.evaluation.evaluate.evaluate_routing` output."""
    rows = [("routing", results["routing"])]
    ppl = f"{results['perplexity']:.3f}"
    if "topk" in results:
        ppl += f"   (Top-K {results['topk']['perplexity']:.3f}, {100 * results['perplexity_change']:+.2f}%)"
    rows += [
        ("perplexity", ppl),
        ("predicted tokens", f"{results['num_tokens']} (seq_len {results['seq_len']})"),
        (
            "activated experts",
            f"{results['mean_activated']:.3f} of top-{results['top_k']} "
            f"({100 * results['activation_reduction']:.1f}% fewer)",
        ),
        (
            "FLOPs / token",
            f"{results['flops_per_token']['total'] / 1e6:.2f} M vs Top-K "
            f"{results['flops_per_token_topk']['total'] / 1e6:.2f} M ({100 * results['flops_reduction']:.1f}% fewer; "
            f"routed experts {100 * results['routed_flops_reduction']:.1f}% fewer)",
        ),
        ("MaxVio", f"avg {results['avg_max_vio']:.3f}, sup {results['sup_max_vio']:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", "layer  activated  MaxVio"]
    for layer, k in results["activated_per_layer"].items():
        lines.append(f"{layer:>5}  {k:9.3f}  {results['max_vio_per_layer'][layer]:6.3f}")
    return "\n".join(lines)


def plot_activated(results: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of mean activated routed experts per MoE layer, with the model's top-k as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(results["activated_per_layer"])
    values = list(results["activated_per_layer"].values())
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(layers) + 2), 3.2))
    ax.bar(range(len(layers)), values, color="tab:blue", label=results["routing"])
    ax.axhline(results["top_k"], color="tab:red", linestyle="--", label=f"Top-K (k={results['top_k']})")
    ax.set_xticks(range(len(layers)), layers)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("mean activated routed experts")
    ax.set_ylim(0, max(results["top_k"], max(values)) * 1.15)
    ax.set_title(
        f"mean {results['mean_activated']:.2f} of {results['top_k']}, ppl {results['perplexity']:.2f}"
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_lm_eval_tasks(model: nn.Module, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """lm-eval's metrics per task for the (patched) model in memory: ``{task: {metric: value}}``."""
    from transformers import AutoTokenizer

    from ..integrations.lm_eval import evaluate_lm_eval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    ours = all(t.startswith(("blimp_local", "wikitext2_local")) for t in tasks)
    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    output = evaluate_lm_eval(
        model, tasks, tokenizer=tokenizer, data_dir=args.data_dir, include_defaults=not ours, limit=args.limit
    )
    return {
        task: {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "_stderr" not in k
        }
        for task, metrics in output["results"].items()
    }


def format_lm_eval(scores: dict[str, dict[str, float]]) -> str:
    lines = ["lm-eval"]
    for task, metrics in sorted(scores.items()):
        lines += [f"  {task:<40} {name:<20} {value:10.4f}" for name, value in sorted(metrics.items())]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import evaluate_routing

    if args.batch_size < 1 or args.seq_len < 2:
        raise ValueError("--batch-size must be >= 1 and --seq-len >= 2.")
    model = load_model(args)
    data = load_eval_data(args, model, args.dataset)
    results = evaluate_routing(
        model,
        data,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        topk_reference=not args.no_topk_reference,
        progress=not args.quiet,
    )
    results["model"] = args.model
    results["dataset"] = args.dataset
    print(format_results(results))
    if args.tasks:
        results["lm_eval"] = run_lm_eval_tasks(model, args)
        print(format_lm_eval(results["lm_eval"]))
    if args.json:
        from ..metrics import save_results

        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {save_results(path, results)}")
    if args.plot:
        print(f"wrote {plot_activated(results, args.plot)}")
    return 0
