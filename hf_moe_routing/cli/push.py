"""``hf-moe-routing push ADAPTER_DIR REPO_ID``: upload a saved routing adapter to the Hugging Face Hub."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a routing adapter folder (with its model card) to the Hugging Face Hub",
        description=(
            "Upload a routing adapter folder (routing_config.json, routing_adapter.safetensors and its\n"
            "README.md model card) to a model repo on the Hugging Face Hub. The folder is checked first and\n"
            "the repo is created if it does not exist. A folder without README.md gets a model card written\n"
            "into it from routing_config.json (routing settings, training info, measured results)."
        ),
        epilog=(
            "examples:\n"
            "  hf-moe-routing push ./hf-moe-routing-demo/adak-adapter my-user/tiny-moe-adak\n"
            "  hf-moe-routing push ./adak your-org/qwen-moe-adak --private --revision experiments\n\n"
            "The token comes from --token, HF_TOKEN, or `hf auth login`."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="routing adapter folder to upload")
    parser.add_argument(
        "repo_id", metavar="REPO_ID", help="target model repo on the Hub, e.g. my-user/my-adapter"
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


def run(args: argparse.Namespace) -> int:
    from ..hub import upload_adapter_folder

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
    )
    url = (
        getattr(commit, "pr_url", None)
        or getattr(commit, "commit_url", None)
        or f"https://huggingface.co/{args.repo_id}"
    )
    print(f"Uploaded routing adapter {folder} to {url}")
    return 0
