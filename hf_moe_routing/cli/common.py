"""What every command shares: model, data and routing options (output folders and generated options:
:mod:`hf_moe_routing.cli.options`).

Nothing here imports torch or transformers at module level: ``hf-moe-routing --help`` must answer
at once. One name per concept across commands and the Python configs (transformers'
``TrainingArguments`` names where a concept is shared): ``--output-dir``, ``--overwrite``,
``--batch-size``, ``--eval-batches``, ``--max-steps``, ``--learning-rate``, ``--seed``, ``--quiet``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the descriptions' line breaks and shows every default in ``--help``."""


def add_command(subparsers: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser with our formatter (descriptions as written, defaults shown)."""
    return subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)


# ---- quiet ------------------------------------------------------------------------------------------
def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--quiet`` (no progress bars or log lines) to ``parser``."""
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars, log lines or loading bars (results and errors are still printed)",
    )


def setup_logging(quiet: bool) -> None:
    """With ``quiet``: silence our logs and progress bars and those of transformers, datasets and the Hub."""
    if not quiet:
        return
    import logging

    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    logging.getLogger("hf_moe_routing").setLevel(logging.WARNING)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except (ImportError, AttributeError):  # pragma: no cover
        pass


@contextlib.contextmanager
def quiet_lm_eval(quiet: bool) -> Iterator[None]:
    """With ``quiet``: no lm-eval log lines or progress bars inside the block.

    lm-eval passes ``disable=`` to its tqdm bars itself (so ``TQDM_DISABLE`` does not reach them) and
    logs through its own handlers: its loggers are set to ERROR and ``sys.stderr`` is captured
    meanwhile (errors still propagate as exceptions and are printed by the command).
    """
    if not quiet:
        yield
        return
    import io
    import logging

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    loggers += [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith(("lm_eval.", "lm-eval."))
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ---- model ------------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser, *, device_map: bool = True) -> None:
    """``MODEL`` plus ``--revision``, ``--dtype`` and ``--device-map`` (as ``from_pretrained``)."""
    parser.add_argument("model", help="Hub model id or local folder (as for from_pretrained)")
    group = parser.add_argument_group("model")
    group.add_argument("--revision", default=None, help="model revision (branch, tag or commit) on the Hub")
    group.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="weights dtype (auto: as saved in the checkpoint)"
    )
    if device_map:
        group.add_argument(
            "--device-map",
            default=None,
            help="from_pretrained's device_map, e.g. 'auto' to spread a large model over the GPUs "
            "(one process); default: the whole model on the first GPU, else the CPU",
        )


def _check_model_name(name: str) -> str:
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"No model folder at {name!r} (and it is not a Hub model id).")
    return name


def load_model(args: argparse.Namespace, *, config_only: bool = False) -> Any:
    """The causal LM of ``args.model`` in eval mode, or (``config_only``) built on the meta device.

    Raises:
        FileNotFoundError: no such local folder. ValueError: weights that are not safetensors
            (pickle is never loaded), or a checkpoint that cannot be read (truncated).
        OSError: the Hub cannot be reached or the id does not exist.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    name = _check_model_name(args.model)
    revision = getattr(args, "revision", None)
    if config_only:
        config = AutoConfig.from_pretrained(name, revision=revision)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    _refuse_pickle_only(name)
    dtype = getattr(args, "dtype", "auto")
    kwargs: dict[str, Any] = {
        "revision": revision,
        "dtype": dtype if dtype == "auto" else getattr(torch, dtype),
    }
    device_map = getattr(args, "device_map", None)
    if device_map is None and torch.cuda.is_available():
        device_map = "cuda"
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, **kwargs)
    except Exception as error:  # noqa: BLE001 - safetensors' own errors are not OSError
        if (
            type(error).__name__ in ("SafetensorError", "HeaderTooLarge")
            or "safetensors" in str(error).lower()
        ):
            raise ValueError(
                f"Could not read the weights of {args.model}: {error}. The checkpoint may be truncated or "
                "corrupt: download or save it again."
            ) from error
        raise
    return model.eval()


def _refuse_pickle_only(name: str) -> None:
    folder = Path(name)
    if not folder.is_dir():
        return
    files = {p.name for p in folder.iterdir()}
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in files):
        return
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in files):
        raise ValueError(
            f"{name} holds only pickle weights (.bin / .pt), which hf-moe-routing never loads: convert them "
            "to safetensors (model.save_pretrained(folder) with transformers) and try again."
        )


def load_tokenizer(args: argparse.Namespace) -> Any:
    """The tokenizer of ``args.model`` (a pad token set to EOS if it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            _check_model_name(args.model), revision=getattr(args, "revision", None)
        )
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a tokenizer from {args.model!r} ({error}); the model folder needs its tokenizer files."
        ) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---- data -------------------------------------------------------------------------------------------
def add_data_arguments(
    parser: argparse.ArgumentParser,
    *,
    dataset: str | None,
    split: str,
    required: bool = False,
    eval_dataset: bool = False,
    seq_len: int = 256,
) -> None:
    """``--dataset`` and its options (``--eval-dataset`` too with ``eval_dataset``), and ``--seq-len``."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default=dataset,
        required=required,
        help="local corpus (wikitext-2/valid, wikitext-2/test, tinyshakespeare), a .txt/.json/.jsonl/.csv/"
        ".parquet file or folder, or a Hub dataset id",
    )
    group.add_argument("--split", default=split, help="split of --dataset")
    group.add_argument("--dataset-config", default=None, help="Hub dataset configuration name")
    group.add_argument(
        "--text-field",
        default="text",
        help="column holding the text (chat records: messages / prompt+completion)",
    )
    if eval_dataset:
        group.add_argument("--eval-dataset", default=None, help="held-out data (same forms as --dataset)")
        group.add_argument("--eval-split", default="test", help="split of --eval-dataset")
    group.add_argument("--seq-len", type=int, default=seq_len, help="tokens per packed sequence")
    group.add_argument(
        "--data-dir",
        default=None,
        help="folder of the local corpora (default: $HF_MOE_ROUTING_DATA or ../shared/data)",
    )


def check_positive(args: argparse.Namespace, *names: str, minimum: int = 1) -> None:
    """ValueError naming the option if any of ``names`` (attributes of ``args``) is below ``minimum``."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}.")


def load_data(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    dataset: str,
    split: str,
    max_rows: int | None = None,
) -> Any:
    """``dataset`` tokenised with ``tokenizer`` and packed into rows of ``--seq-len`` tokens."""
    from ..data import check_context_length, load_text_dataset, pack_dataset

    check_context_length(model, args.seq_len)
    texts = load_text_dataset(
        dataset,
        split=split,
        text_field=args.text_field,
        config_name=args.dataset_config,
        data_dir=args.data_dir,
    )
    packed = pack_dataset(texts, tokenizer, args.seq_len, text_field=args.text_field)
    return packed.select(range(min(len(packed), max_rows))) if max_rows else packed


def dataset_label(dataset: str, split: str | None) -> str:
    """The name results are filed under: a local corpus as is, else ``dataset:split``."""
    from ..data.corpora import CORPORA

    if dataset in CORPORA or not split or Path(dataset).expanduser().is_file():
        return dataset
    return f"{dataset}:{split}"


# ---- routing ----------------------------------------------------------------------------------------
ROUTING_HELP = (
    "a routing method with optional settings: NAME or NAME:key=value,key=value (e.g. bip, "
    "bip:capacity_factor=1.25, top_p:p=0.6, topk:top_k=1, dynamic_skip), a JSON object, or a JSON file"
)


def add_routing_arguments(
    parser: argparse.ArgumentParser, *, adapter: bool = True, required: bool = False
) -> None:
    """Add ``--routing SPEC`` (e.g. ``bip:capacity_factor=1.1``) and, with ``adapter``, ``--adapter`` to ``parser``."""
    group = parser.add_argument_group("routing")
    group.add_argument("--routing", default=None, required=required, metavar="SPEC", help=ROUTING_HELP)
    if adapter:
        group.add_argument(
            "--adapter",
            default=None,
            help="a saved routing adapter (folder or Hub repo id) instead of --routing",
        )


def parse_routing(spec: str) -> Any:
    """A routing config from ``name``, ``name:key=value,...``, a JSON object, or a JSON file path.

    Raises:
        ValueError: unknown method or setting, bad value, invalid JSON. FileNotFoundError: a missing file.
    """
    from ..core.config import parse_json, read_json
    from ..methods import RoutingConfig

    text = spec.strip()
    path = Path(text).expanduser()
    data: Any
    if text.endswith(".json") or path.is_file():
        data = read_json(path, "Routing config file")
    elif text.startswith("{"):
        data = parse_json(text, "--routing")  # depth-limited, no NaN literals
    else:
        name, _, settings = text.partition(":")
        data = {"routing_type": name.strip().replace("-", "_")}
        for item in filter(None, (s.strip() for s in settings.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"Routing setting {item!r} is not key=value (e.g. 'top_p:p=0.6,max_k=4').")
            if key.strip() in data:
                raise ValueError(f"Routing setting {key.strip()!r} is given twice in {spec!r}: give it once.")
            try:
                data[key.strip()] = json.loads(value, parse_constant=_no_constant)
            except ValueError:
                data[key.strip()] = value.strip()
    if not isinstance(data, dict) or "routing_type" not in data:
        raise ValueError(
            'A JSON routing config must be an object with a "routing_type" key, e.g. {"routing_type": "bip"}.'
        )
    return RoutingConfig.from_dict(data)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a setting can take")
