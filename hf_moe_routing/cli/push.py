"""``hf-moe-routing push ADAPTER_DIR REPO_ID``: upload a routing adapter (only its files) to the Hugging Face Hub."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_command, add_quiet_argument, setup_logging


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hf-moe-routing push`` and its options on ``subparsers``."""
    parser = add_command(
        subparsers,
        "push",
        help="upload a routing adapter (only its files, with a model card) to the Hugging Face Hub",
        description=(
            "Upload the routing adapter in a folder to a model repo on the Hugging Face Hub: only\n"
            "routing_config.json, routing_adapter.safetensors and a model card rendered for REPO_ID (plus a\n"
            "PEFT adapter's adapter_config.json / adapter_model.safetensors if the folder holds one).\n"
            "Checkpoints, logs and other files in the folder never go up, and the folder is not changed.\n"
            "The adapter is checked first; the repo is created if it does not exist."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing push ./hf-moe-routing-demo/adak-adapter my-user/tiny-moe-adak\n"
            "  hf-moe-routing push ./adak your-org/qwen-moe-adak --base-model Qwen/Qwen1.5-MoE-A2.7B --private\n\n"
            "The token comes from --token, HF_TOKEN, or `hf auth login`."
        ),
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder holding the routing adapter")
    parser.add_argument(
        "repo_id", metavar="REPO_ID", help="target model repo on the Hub, e.g. my-user/my-adapter"
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="Hub id of the base model, recorded in the uploaded config and card (for an adapter trained "
        "on a local copy of a Hub model)",
    )
    parser.add_argument(
        "--private", action="store_true", help="create the repo as private (if it does not exist)"
    )
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    parser.add_argument(
        "--commit-message", default=None, help="commit message (default: describes the adapter)"
    )
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument(
        "--path-in-repo",
        default=None,
        help="upload into this subfolder of the repo (load with subfolder=...)",
    )
    parser.add_argument(
        "--token", default=None, help="Hub token with write access (default: HF_TOKEN or login)"
    )
    add_quiet_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``hf-moe-routing push`` with the parsed ``args``; returns the exit code (0 = success)."""
    from ..hub import upload_adapter_folder

    setup_logging(args.quiet)
    folder = Path(args.adapter_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Routing adapter folder {args.adapter_dir} does not exist.")
    commit = upload_adapter_folder(
        folder,
        args.repo_id,
        private=args.private,
        commit_message=args.commit_message,
        revision=args.revision,
        token=args.token,
        create_pr=args.create_pr,
        path_in_repo=args.path_in_repo,
        base_model=args.base_model,
    )
    url = (
        getattr(commit, "pr_url", None)
        or getattr(commit, "commit_url", None)
        or f"https://huggingface.co/{args.repo_id}"
    )
    print(f"Uploaded routing adapter {folder} to {url}")
    return 0
