"""``hf-moe-routing evaluate MODEL``: held-out perplexity, activated experts, FLOPs and MaxVio of a routing."""

from __future__ import annotations

import argparse

from .common import (
    add_command,
    add_data_arguments,
    add_model_arguments,
    add_quiet_argument,
    add_routing_arguments,
    check_positive,
    dataset_label,
    load_data,
    load_model,
    load_tokenizer,
    parse_routing,
    quiet_lm_eval,
    setup_logging,
)
from .options import check_output_file


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hf-moe-routing evaluate`` and its options on ``subparsers``."""
    parser = add_command(
        subparsers,
        "evaluate",
        help="perplexity, activated experts, FLOPs and MaxVio of a routing against Top-K",
        description=(
            "Evaluate a model's routing on held-out text: token-weighted perplexity, mean activated routed\n"
            "experts (overall and per layer), FLOPs per token and their reduction against the model's own\n"
            "Top-K, and MaxVio. The same model under its Top-K is evaluated alongside. A --routing with\n"
            "state to fit (bip, loss_free, dynamic_skip) is fitted first on --fit-dataset; an untrained\n"
            "routing (adak without an adapter) is evaluated with a warning."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing evaluate ./my-mixtral --routing top_p:p=0.6 --dataset wikitext-2/test\n"
            "  hf-moe-routing evaluate ./my-mixtral --routing bip --fit-steps 20 --plot bip.png\n"
            "  hf-moe-routing evaluate ./my-qwen-moe --adapter ./qwen-adak --json out.json --tasks blimp_local"
        ),
    )
    add_model_arguments(parser)
    add_routing_arguments(parser)
    add_data_arguments(parser, dataset="wikitext-2/test", split="test")
    group = parser.add_argument_group("evaluation")
    group.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    group.add_argument(
        "--eval-batches", type=int, default=None, help="evaluate on at most N batches (default: all)"
    )
    group.add_argument("--no-topk-reference", action="store_true", help="skip the Top-K reference pass")
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="transformers.set_seed before patching: the allocators of an untrained Ada-K (and any "
        "sampled routing decision) are the same for the same seed",
    )
    group.add_argument(
        "--fit-dataset",
        default="wikitext-2/valid",
        help="text to fit a --routing on, when it has state to fit",
    )
    group.add_argument("--fit-split", default="train", help="split of --fit-dataset")
    group.add_argument("--fit-steps", type=int, default=8, help="batches to fit a --routing on")
    group.add_argument(
        "--tasks",
        default=None,
        help="also run these lm-eval tasks (comma-separated), e.g. blimp_local,wikitext2_local",
    )
    group.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or a fraction)")
    out = parser.add_argument_group("output")
    out.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the results as JSON (evaluate.save: time, versions)",
    )
    out.add_argument(
        "--plot", default=None, metavar="PNG", help="write activated experts and MaxVio per layer as a PNG"
    )
    out.add_argument("--overwrite", action="store_true", help="replace existing --json / --plot files")
    add_quiet_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``hf-moe-routing evaluate`` with the parsed ``args``; returns the exit code (0 = success)."""
    from ..evaluation.evaluate import evaluate_routing
    from ..evaluation.summary import format_evaluation

    setup_logging(args.quiet)
    check_positive(args, "batch_size", "eval_batches", "fit_steps")
    check_positive(args, "seq_len", minimum=2)
    if args.adapter and args.routing:
        raise ValueError("Pass either --adapter (a saved routing) or --routing (a new one), not both.")
    routing = parse_routing(args.routing) if args.routing else None  # fail fast, before loading weights
    json_path = check_output_file(args.json, args.overwrite) if args.json else None
    plot_path = check_output_file(args.plot, args.overwrite) if args.plot else None
    tasks = _tasks(args.tasks) if args.tasks else None
    model = load_model(args)
    tokenizer = load_tokenizer(args)
    data = load_data(args, model, tokenizer, args.dataset, args.split)
    from transformers import set_seed

    set_seed(args.seed)  # an untrained routing's random initialisation (Ada-K) is reproducible
    if args.adapter:
        from ..hub import load_routing_adapter

        load_routing_adapter(model, args.adapter, revision=None)
    elif routing is not None:
        _patch_and_fit(model, routing, tokenizer, args)
    results = evaluate_routing(
        model,
        data,
        batch_size=args.batch_size,
        max_batches=args.eval_batches,
        topk_reference=not args.no_topk_reference,
        progress=not args.quiet,
    )
    results["model"] = args.model
    results["dataset"] = dataset_label(args.dataset, args.split)
    print(format_evaluation(results))
    if tasks:
        results["lm_eval"] = _run_lm_eval(model, tokenizer, tasks, args)
    if json_path is not None:
        from ..metrics import save_results

        print(f"wrote {save_results(json_path, results)}")
    if plot_path is not None:
        from ..recipes.plots import plot_evaluation

        print(f"wrote {plot_evaluation(results, plot_path)}")
    return 0


def _tasks(text: str) -> list[str]:
    """The task names of ``--tasks``, checked with lm-eval before any model is loaded."""
    from ..integrations import register_lm_eval

    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks needs at least one lm-eval task name, e.g. --tasks blimp_local.")
    if not register_lm_eval():
        raise ValueError(
            "--tasks needs lm-eval: pip install 'hf-moe-routing[eval]' (or pip install lm-eval)."
        )
    from ..integrations.lm_eval import check_tasks

    check_tasks(tasks)
    return tasks


def _patch_and_fit(model, routing, tokenizer, args: argparse.Namespace) -> None:
    """Patch with ``routing``; fit it on --fit-dataset first if it has state that can be fitted."""
    from ..patching import fit_routing, patch_model

    patch_model(model, routing)
    if routing.requires == "fitting":
        rows = args.fit_steps * args.batch_size
        fit_data = load_data(args, model, tokenizer, args.fit_dataset, args.fit_split, max_rows=rows)
        fitted = fit_routing(
            model, fit_data, batch_size=args.batch_size, max_batches=args.fit_steps, progress=not args.quiet
        )
        print(
            f"fitted {routing.routing_type} on {fitted['batches']} batches ({fitted['tokens']} tokens) of {args.fit_dataset}"
        )


def _run_lm_eval(model, tokenizer, tasks: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """lm-eval's metrics per task for the model in memory, printed and returned as ``{task: {metric: value}}``."""
    from ..integrations.lm_eval import evaluate_lm_eval, is_ours

    ours = all(map(is_ours, tasks))
    with quiet_lm_eval(args.quiet):  # lm-eval's own bars and log lines too
        output = evaluate_lm_eval(
            model,
            tasks,
            tokenizer=tokenizer,
            data_dir=args.data_dir,
            include_defaults=not ours,
            limit=args.limit,
        )
    scores = {
        task: {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "_stderr" not in k
        }
        for task, metrics in output["results"].items()
    }
    lines = ["lm-eval"]
    for task, metrics in sorted(scores.items()):
        lines += [f"  {task:<40} {name:<20} {value:10.4f}" for name, value in sorted(metrics.items())]
    print("\n".join(lines))
    return scores
