"""``hf-moe-routing``: the command-line entry point.

Every subcommand is a module ``hf_moe_routing.cli.<module>`` listed in :data:`COMMANDS` that provides

* ``add_parser(subparsers)`` -- registers its subcommand (any name, e.g. ``"lm-eval"`` from module
  ``lm_eval_cmd``) with ``subparsers.add_parser(...)``, and
* ``run(args) -> int`` -- runs it and returns the exit status.

Expected user errors (bad arguments, missing files, models that cannot be loaded or are not MoE) print
``error: <message>`` on stderr and exit with status 2, without a traceback (``--traceback`` shows it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

#: Modules under ``hf_moe_routing.cli`` that provide a subcommand, in help order (add yours to the tuple).
COMMANDS: tuple[str, ...] = (  # in the order of a user's path, as --help lists them
    "demo",
    "inspect",
    "families",
    "balance",
    "warmup",
    "train",
    "evaluate",
    "bench",
    "lm_eval_cmd",
    "push",
)

#: Exceptions that mean "the user asked for something that cannot be done", not a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    OSError,  # transformers / huggingface_hub raise OSError for models that cannot be found or loaded
)

EXIT_USAGE = 2

_EPILOG = """\
examples:
  hf-moe-routing demo                                   # the offline end-to-end demo
  hf-moe-routing inspect Qwen/Qwen1.5-MoE-A2.7B --config-only
  hf-moe-routing inspect ./my-mixtral --seq-len 4096 --json

Run `hf-moe-routing <command> --help` for the options of a command.
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf-moe-routing")
    except PackageNotFoundError:
        from hf_moe_routing import __version__

        return __version__


def command_modules() -> list[ModuleType]:
    """The imported subcommand modules, in :data:`COMMANDS` order."""
    return [importlib.import_module(f"{__package__}.{name}") for name in COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of :data:`COMMANDS` registered."""
    parser = argparse.ArgumentParser(
        prog="hf-moe-routing",
        description=(
            "Better routers for existing Mixture-of-Experts checkpoints in Hugging Face transformers: "
            "inspect MoE models, balance their experts (BIP), train adaptive expert counts (Ada-K), "
            "evaluate and share routing adapters."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback of errors (for bug reports)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for module in command_modules():
        before = set(subparsers.choices)
        module.add_parser(subparsers)
        added = set(subparsers.choices) - before
        if not added:
            raise RuntimeError(f"{module.__name__}.add_parser registered no subcommand.")
        for name in added:
            subparser = subparsers.choices[name]
            subparser.set_defaults(_command_module=module)
            if "--traceback" not in subparser._option_string_actions:  # also accepted after the command
                subparser.add_argument(
                    "--traceback", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
                )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-moe-routing`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    module = getattr(args, "_command_module", None)
    if module is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as error:
        if args.traceback:
            raise
        message = str(error) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
