"""The README's code runs as written, on tiny local checkpoints instead of Hub models.

The Python and shell blocks of the quick start and of the routing-adapter section are executed;
``hf-moe-routing`` lines run through the CLI's ``main`` in-process. What is swapped (each swap must
still appear in the README, so that the list cannot rot):

* Hub model ids -> tiny checkpoints saved with ``save_pretrained`` plus a tokenizer,
* the Hub dataset -> a local text file, the Hub -> a fake ``HfApi`` / ``snapshot_download``,
* step counts -> a few steps (a real model trains for hundreds).

Every other ``hf-moe-routing`` line in the README is parsed by the CLI's parser (its options exist).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_moe_routing.cli.main import build_parser, main
from hf_moe_routing.testing import tiny_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
#: README sections whose blocks run (the others' ``hf-moe-routing`` lines are parsed only)
RUN_SECTIONS = ("Quick start", "Routing adapters: save, load, share")
STEP_SWAPS = {
    "warmup_steps=100": "warmup_steps=2",
    "--warmup-steps 100": "--warmup-steps 2",
    "max_steps=300": "max_steps=3",
    "--max-steps 300": "--max-steps 3",
    "max_batches=50": "max_batches=4",
    "max_batches=20": "max_batches=2",
    "--eval-batches 20": "--eval-batches 2",
}


def readme_blocks(text: str) -> list[tuple[str, str, str]]:
    """``(section, language, code)`` of every fenced block, in order."""
    out, section = [], ""
    for match in re.finditer(r"^## ([^\n]+)$|^```(\w+)\n(.*?)^```$", text, re.M | re.S):
        if match.group(1):
            section = match.group(1).strip()
        else:
            out.append((section, match.group(2), match.group(3)))
    return out


def commands(code: str) -> list[list[str]]:
    """The ``hf-moe-routing`` command lines of a shell block (continuations joined, comments dropped)."""
    joined = code.replace("\\\n", " ")
    lines = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [words[1:] for words in lines if words and words[0] == "hf-moe-routing"]


class FakeHub:
    """Model repos as folders: ``HfApi().upload_folder`` copies into them, ``snapshot_download`` reads them."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, repo_id: str) -> Path:
        return self.root / repo_id.replace("/", "--")

    def api(self, token=None):  # noqa: ANN001 - HfApi(token=...)
        hub = self

        class Api:
            def create_repo(self, repo_id, **kwargs):  # noqa: ANN001
                hub.folder(repo_id).mkdir(parents=True, exist_ok=True)
                return SimpleNamespace(repo_id=repo_id)

            def create_branch(self, *args, **kwargs):  # noqa: ANN001
                pass

            def upload_folder(
                self, *, repo_id, folder_path, allow_patterns=None, path_in_repo=None, **kwargs
            ):  # noqa: ANN001
                target = hub.folder(repo_id) / (path_in_repo or "")
                target.mkdir(parents=True, exist_ok=True)
                for path in Path(folder_path).iterdir():
                    if allow_patterns is None or path.name in allow_patterns:
                        shutil.copy(path, target / path.name)
                hub.uploads.append(sorted(p.name for p in target.iterdir()))
                return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", pr_url=None)

        return Api()

    def snapshot_download(self, repo_id, **kwargs):  # noqa: ANN001
        folder = self.folder(repo_id)
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    qwen = tiny_checkpoint(root / "qwen", "qwen2_moe", lines=200, max_position_embeddings=512)
    mixtral = tiny_checkpoint(root / "mixtral", "mixtral", max_position_embeddings=512)
    return {"qwen": qwen, "mixtral": mixtral}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    fake.uploads = []
    monkeypatch.setattr("huggingface_hub.HfApi", fake.api)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake.snapshot_download)
    return fake


def swapped(code: str, checkpoints: dict[str, Path]) -> str:
    keep = "--base-model Qwen/Qwen1.5-MoE-A2.7B"  # a Hub id recorded, not loaded: it stays
    code = code.replace(keep, "\0KEEP\0")
    swaps = {
        "Qwen/Qwen1.5-MoE-A2.7B": str(checkpoints["qwen"]),
        "mistralai/Mixtral-8x7B-v0.1": str(checkpoints["mixtral"]),
        "Salesforce/wikitext": str(checkpoints["qwen"] / "text.txt"),
        **STEP_SWAPS,
    }
    for old, new in swaps.items():
        code = code.replace(old, new)
    return code.replace("\0KEEP\0", keep)


def _blocks(readme: str, section: str, language: str) -> list[str]:
    return [code for s, lang, code in readme_blocks(readme) if s == section and lang == language]


def test_the_swaps_still_match_the_readme(readme):
    quick = "".join(_blocks(readme, "Quick start", "python") + _blocks(readme, "Quick start", "bash"))
    for old in ("Qwen/Qwen1.5-MoE-A2.7B", "Salesforce/wikitext", *STEP_SWAPS):
        assert old in quick, old
    assert all(section in {s for s, _, _ in readme_blocks(readme)} for section in RUN_SECTIONS)


def test_quick_start_python_runs_as_written(readme, checkpoints, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (code,) = _blocks(readme, "Quick start", "python")
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(swapped(code, checkpoints), "README.md (quick start)", "exec"), namespace)  # noqa: S102
    from hf_moe_routing import get_patch_state
    from hf_moe_routing.hub import read_adapter_config

    bip, adak = namespace["bip"], namespace["adak"]
    assert (
        get_patch_state(bip).config.routing_type == "bip"
        and get_patch_state(adak).config.routing_type == "adak"
    )
    assert read_adapter_config(tmp_path / "qwen-bip")["fitted"] is True  # a fitted BIP adapter
    assert any(float(layer.q.abs().sum()) > 0 for layer in _layers(bip))
    assert hub.uploads == [
        ["README.md", "routing_adapter.safetensors", "routing_config.json"]
    ]  # adapter files only
    ids = torch.randint(4, 100, (1, 16))
    assert torch.isfinite(adak(ids).logits).all()


def _layers(model):
    from hf_moe_routing.patching import routing_layers

    return list(routing_layers(model).values())


def test_quick_start_command_line_runs_as_written(readme, checkpoints, hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (code,) = _blocks(readme, "Quick start", "bash")
    for argv in commands(swapped(code, checkpoints)):
        assert main([*argv, "--quiet"] if argv[0] != "lm-eval" else argv) == 0, argv
    out = capsys.readouterr().out
    assert (
        "held-out AvgMaxVio" in out
        and "Ada-K routing adapter saved" in out
        and "Uploaded routing adapter" in out
    )
    assert hub.uploads == [["README.md", "routing_adapter.safetensors", "routing_config.json"]]
    pushed = json.loads((hub.folder("your-name/qwen1.5-moe-adak") / "routing_config.json").read_text())
    assert pushed["base_model"] == {
        "id": "Qwen/Qwen1.5-MoE-A2.7B",
        "path": str(checkpoints["qwen"]),
        "revision": None,
    }
    card = (hub.folder("your-name/qwen1.5-moe-adak") / "README.md").read_text()
    assert "base_model: Qwen/Qwen1.5-MoE-A2.7B" in card and 'adapter="your-name/qwen1.5-moe-adak"' in card


def test_routing_adapter_section_runs_as_written(readme, checkpoints, hub, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hf_moe_routing import TopKConfig, patch_model

    monkeypatch.chdir(tmp_path)
    section = "Routing adapters: save, load, share"
    model = AutoModelForCausalLM.from_pretrained(checkpoints["qwen"])
    namespace = {
        "model": patch_model(model, TopKConfig(top_k=1)),
        "other_model": AutoModelForCausalLM.from_pretrained(checkpoints["qwen"]),
        "results": {"wikitext-2/test": {"perplexity": 30.5, "mean_activated_experts": 1.0}},
    }
    (python,) = _blocks(readme, section, "python")
    exec(compile(swapped(python, checkpoints), "README.md (adapters)", "exec"), namespace)  # noqa: S102
    for argv in commands(swapped("".join(_blocks(readme, section, "bash")), checkpoints)):
        assert main(argv) == 0, argv


def test_every_command_line_in_the_readme_parses(readme):
    """Lines outside the sections that run use options that exist (lm-eval's own are not ours to check)."""
    parser = build_parser(full=True)
    checked = 0
    for _, language, code in readme_blocks(readme):
        if language != "bash":
            continue
        for argv in commands(code):
            if argv and argv[0] not in ("lm-eval",):
                parser.parse_args(argv)
                checked += 1
    assert checked >= 15
