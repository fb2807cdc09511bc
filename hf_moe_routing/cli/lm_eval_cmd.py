"""``hf-moe-routing lm-eval``: lm-eval's own command line with our model type and offline tasks.

Every argument is lm-eval's (``run``, ``ls``, ``validate`` and all their options); this wrapper only

* registers the ``hf-moe-routing`` model type and makes it the default ``--model``,
* puts the packaged offline tasks (``blimp_local``, ``wikitext2_local``) on the include path, next to
  any ``--include_path`` given, and adds ``--data_dir`` for where they read their files,
* prints the routing statistics after lm-eval's result tables (they are also saved in the results JSON).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

NAME = "lm-eval"
_DATA_DIR_OPTIONS = ("--data_dir", "--data-dir")


def _preface() -> str:
    from ..integrations import LM_EVAL_MODEL_NAME
    from ..methods import ROUTING_METHODS

    return f"""\
hf-moe-routing lm-eval: the LM Evaluation Harness command line (all options below are lm-eval's), with
  --model defaulting to {LM_EVAL_MODEL_NAME}: lm-eval's `hf` model with extra model_args
      routing=NAME              patch the model with a routing method ({", ".join(sorted(ROUTING_METHODS))})
      routing_<setting>=VALUE   its settings, e.g. routing_top_k=1 (or routing_config=JSON object or file)
      adapter=DIR_OR_HUB_ID     load a saved routing adapter instead
  offline tasks on the include path: blimp_local (67 BLiMP paradigms, subtasks blimp_local_<paradigm>)
      and wikitext2_local (WikiText-2 test document perplexity), reading
      --data_dir DIR            (default: $HF_MOE_ROUTING_DATA, else ../shared/data beside the checkout)
  routing statistics (mean activated experts, MaxVio, FLOPs per token) printed after the results
      and saved in the results JSON under config.routing_stats

also: hf-moe-routing lm-eval ls tasks | ls groups | validate --tasks ...

example:
  hf-moe-routing lm-eval --model_args pretrained=./my-moe,routing=topk,routing_top_k=1 \\
      --tasks blimp_local wikitext2_local --limit 100 --output_path results/
"""


INTERRUPT_HINT = "lm-eval runs do not resume; run the command again"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``hf-moe-routing lm-eval`` and its options on ``subparsers``."""
    # prefix_chars="+" and REMAINDER: every argument, --help included, is handed to lm-eval untouched.
    parser = subparsers.add_parser(
        NAME,
        help="lm-eval (all its options) with routing=/adapter= model_args, offline BLiMP/WikiText tasks, routing stats",
        description=__doc__,
        add_help=False,
        prefix_chars="+",
    )
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    return parser


def _pop_data_dir(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--data_dir DIR`` / ``--data_dir=DIR``, and DIR."""
    rest: list[str] = []
    data_dir = None
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in _DATA_DIR_OPTIONS:
            data_dir = value if eq else next(args, None)
            if not data_dir:
                raise ValueError(f"{name} needs a folder, e.g. {name} ../shared/data")
        else:
            rest.append(arg)
    return rest, data_dir


def _parse(cli: Any, argv: list[str]) -> argparse.Namespace:
    """lm-eval's own parsing of ``argv`` (with its legacy rule: no subcommand means ``run``)."""
    saved = sys.argv
    sys.argv = ["hf-moe-routing lm-eval", *argv]
    try:
        return cli.parse_args()
    finally:
        sys.argv = saved


def _yaml_config(namespace: argparse.Namespace) -> dict[str, Any]:
    """The ``--config`` YAML of ``run`` (command-line values replace its values, so we merge into them)."""
    if not getattr(namespace, "config", None):
        return {}
    from lm_eval.config.evaluate_config import EvaluatorConfig

    return EvaluatorConfig.load_yaml_config(namespace.config)


def run(args: argparse.Namespace) -> int:
    """Run ``hf-moe-routing lm-eval`` with the parsed ``args``; returns the exit code (0 = success)."""
    from ..integrations import LM_EVAL_MODEL_NAME, register_lm_eval

    if not register_lm_eval():
        raise ValueError(
            "lm-eval is not installed: pip install 'hf-moe-routing[eval]' (or pip install lm-eval)."
        )
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from ..integrations.lm_eval import TASKS_DIR
    from ..integrations.lm_eval.model import format_routing_report, last_routing_report

    argv, data_dir = _pop_data_dir(list(args.lm_eval_args))
    if not argv or ({"-h", "--help"} & set(argv) and argv[0] not in ("ls", "validate")):
        print(_preface())
        if len(argv) <= 1:  # bare `--help`: the options of `run`, not lm-eval's list of subcommands
            argv = ["run", "--help"]
    setup_logging()
    cli = HarnessCLI()
    try:
        namespace = _parse(cli, argv)
    except SystemExit as exit_:  # --help, or a usage error lm-eval already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    yaml_config = _yaml_config(namespace)
    if hasattr(namespace, "include_path"):
        theirs = namespace.include_path or yaml_config.get("include_path")
        namespace.include_path = [str(TASKS_DIR), *([theirs] if theirs else [])]
    if namespace.command == "run":
        if namespace.model is None and "model" not in yaml_config:
            namespace.model = LM_EVAL_MODEL_NAME
        if data_dir is not None:
            metadata = namespace.metadata or yaml_config.get("metadata") or {}
            namespace.metadata = {**metadata, "data_dir": data_dir}
    elif data_dir is not None:
        raise ValueError("--data_dir only applies to `run` (evaluations).")
    import lm_eval.evaluator  # noqa: F401 - imported before quiet_git() so that its git call is replaced too

    from ..metrics.quiet_git import quiet_git

    before = last_routing_report()
    with quiet_git():
        cli.execute(namespace)
    report = last_routing_report()
    if namespace.command == "run" and report is not None and report is not before:
        print(f"\n{format_routing_report(report)}")
    return 0
