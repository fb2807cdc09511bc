"""``hf-moe-routing``: the command-line entry point.

Every subcommand is a module ``hf_moe_routing.cli.<module>`` listed in :data:`COMMANDS` (name ->
module, one-line help) that provides

* ``add_parser(subparsers)`` -- registers its subcommand with ``subparsers.add_parser(name, ...)``
  (use :func:`hf_moe_routing.cli.common.add_command` for the shared help format), and
* ``run(args) -> int`` -- runs it (through library functions) and returns the exit status.

Only the module of the command being run is imported (``--help`` lists the commands from the
table), so ``hf-moe-routing --help`` does not load torch. Commands do not import each other.

Expected user errors (bad arguments, missing files, models that cannot be loaded or are not MoE, a
full disk) print one ``error: <message>`` line on stderr and exit with status 2, without a traceback
(``--traceback`` shows it).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

#: command -> (module under hf_moe_routing.cli, one-line help), in the order of a user's path.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "demo",
        "run the whole path offline: pre-train a small MoE, fit BIP, train Ada-K, evaluate, save",
    ),
    "inspect": ("inspect", "show the MoE structure, router and FLOPs per token of a model"),
    "families": ("families", "list the transformers MoE families and whether hf-moe-routing patches them"),
    "fit": (
        "fit",
        "fit a routing's state (BIP, Loss-Free, dynamic skipping) on text and save a routing adapter",
    ),
    "warmup": ("warmup", "warm-start Ada-K allocators on a frozen model and save the routing adapter"),
    "train": (
        "train",
        "train Ada-K allocators (warm start + PPO) on a frozen model and save the routing adapter",
    ),
    "evaluate": ("evaluate", "perplexity, activated experts, FLOPs and MaxVio of a routing against Top-K"),
    "bench": ("bench", "forward speed of a routing against the model's Top-K"),
    "lm-eval": (
        "lm_eval_cmd",
        "lm-eval (all its options) with routing=/adapter= model_args and offline tasks",
    ),
    "export": (
        "export",
        "write a routing into a standard checkpoint (loads and serves without hf-moe-routing)",
    ),
    "push": ("push", "upload a routing adapter (only its files, with a model card) to the Hugging Face Hub"),
}

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
the path, in order:
  hf-moe-routing inspect Qwen/Qwen1.5-MoE-A2.7B --config-only
  hf-moe-routing fit ./my-moe --routing bip --output-dir my-moe-bip
  hf-moe-routing train ./my-moe --dataset wikitext-2/valid --output-dir my-moe-adak
  hf-moe-routing evaluate ./my-moe --adapter my-moe-adak
  hf-moe-routing push my-moe-adak your-name/my-moe-adak
  hf-moe-routing demo                                   # all of it, offline, on a small generated MoE

Run `hf-moe-routing <command> --help` for the options of a command.
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf-moe-routing")
    except PackageNotFoundError:
        from ..core.version import __version__

        return __version__


def command_module(name: str) -> ModuleType:
    """The module of command ``name``."""
    return importlib.import_module(f"{__package__}.{COMMANDS[name][0]}")


def _requested(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not an option), if it is one of ours."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None, *, full: bool = False) -> argparse.ArgumentParser:
    """The top-level parser: the command of ``argv`` (or all with ``full``) in full, the others by name."""
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
    wanted = _requested(argv or [])
    for name, (_, help_text) in COMMANDS.items():
        if full or name == wanted:
            module = command_module(name)
            before = set(subparsers.choices)
            module.add_parser(subparsers)
            added = set(subparsers.choices) - before
            if not added:
                raise RuntimeError(f"{module.__name__}.add_parser registered no subcommand.")
            for sub in added:
                subparser = subparsers.choices[sub]
                subparser.set_defaults(_command_module=module)
                if "--traceback" not in subparser._option_string_actions:  # also accepted after the command
                    subparser.add_argument(
                        "--traceback", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
                    )
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-moe-routing`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        module = getattr(args, "_command_module", None)
        if module is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                status = int(module.run(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, inside the handler below
            return status
        except BrokenPipeError:
            raise
        except USER_ERRORS as error:
            if args.traceback:
                raise
            return _fail(error)
        except KeyboardInterrupt:
            hint = getattr(module, "INTERRUPT_HINT", None)
            print(f"interrupted{': ' + hint if hint else ''}", file=sys.stderr)
            return 130
        except Exception as error:
            if _disk_full(error) is None or args.traceback:
                raise
            return _fail(error)
    except BrokenPipeError:  # `hf-moe-routing inspect ... | head`: the reader has what it wanted
        _silence_stdout()
        return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Our warnings as one ``warning: ...`` line (no file and line number); others as Python shows them."""
    stream = file or sys.stderr
    if issubclass(category, UserWarning) and not issubclass(category, DeprecationWarning):
        print(f"warning: {message}", file=stream)
    else:
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))


def _fail(error: BaseException) -> int:
    full = _disk_full(error)
    if full is not None:
        message = f"disk full while writing ({full}): free some space or choose another --output-dir"
    else:
        message = str(error) or type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _disk_full(error: BaseException | None) -> str | None:
    """The message of a "no space left on device" error anywhere in the chain of ``error``, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if (
            getattr(error, "errno", None) == errno.ENOSPC
            or "No space left on device" in text
            or "StorageFull" in text
        ):
            return text.splitlines()[0] if text else "ENOSPC"
        error = error.__cause__ or error.__context__
    return None


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
