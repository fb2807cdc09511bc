"""Every command under scripts/ keeps working: ``--help`` exits 0, and a smoke run where the script has one.

A script is a command if it has an ``if __name__ == "__main__":`` block (the others are modules the commands
share). New scripts are picked up by themselves: ``--help`` is run for every command, and a command is
smoke-run with ``--smoke`` if its ``--help`` lists that option (and ``--out DIR`` if it lists ``--out``),
with the arguments in :data:`SMOKE` otherwise. A command that has neither must say in :data:`NO_SMOKE` why
it cannot run in seconds to a minute on a CPU, so that nothing escapes unseen.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _is_command(path: Path) -> bool:
    """A module-level ``if __name__ == "__main__":`` (not one inside a string, e.g. a child-process script)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(
        isinstance(node, ast.If)
        and "__name__" in ast.unparse(node.test)
        and "__main__" in ast.unparse(node.test)
        for node in tree.body
    )


COMMANDS = sorted(p for p in SCRIPTS.glob("*.py") if _is_command(p))
#: smoke arguments of commands without a ``--smoke`` option ({out}: a fresh folder)
SMOKE: dict[str, list[str]] = {
    "evidence_compare.py": [  # the committed mixtral-8x2 results: pretrain against heldout_train training text
        str(SCRIPTS.parent / "results/evidence/adak-evidence-mixtral-8x2"),
        str(SCRIPTS.parent / "results/evidence/adak-evidence-mixtral-8x2-heldout-train"),
    ],
    "blimp_ngram.py": ["--limit", "5", "--models", "--out", "{out}"],  # the n-grams only: no reference build
    "bench_adak_speed.py": ["--smoke", "--out", "{out}"],  # listed: a smoke run then needs no --help first
    "bench_sentinel_experts.py": [
        *("--shapes", "small", "--tokens", "32", "--kept", "1.0", "0.5"),
        *("--repeats", "1", "--warmup", "0", "--threads", "1"),
    ],
    "pretrain_comparison.py": [
        *("--shapes", "mixtral-16x2", "--methods", "topk", "bip", "--steps", "1", "--batch-size", "2"),
        *(
            "--seq-len",
            "16",
            "--vocab-size",
            "300",
            "--eval-batches",
            "1",
            "--threads",
            "1",
            "--out",
            "{out}",
        ),
    ],
}
#: commands that are not smoke-run here, and why
NO_SMOKE: dict[str, str] = {
    "gpu_check.py": "its --smoke run (about a minute) is tests/test_gpu_check.py's, which checks the report",
    "adak_design.py": "trains Ada-K on a cached reference model (building one takes ~15 min on 2 cores)",
    "adak_tradeoff.py": "trains Ada-K on cached reference models (~15 min to build each)",
    "adak_where_experts_go.py": "trains Ada-K on a cached reference model (~15 min to build)",
    "bench_training_cost.py": "times training steps of a cached reference model (~15 min to build)",
    "bip_existing_checkpoints.py": "fine-tunes cached reference models (~15 min to build each)",
    "build_reference_models.py": "pre-trains a reference model (~15 min); tests/test_pretrain.py covers the build",
    "reference_blimp.py": "scores cached reference models on BLiMP (~15 min to build each)",
    "bench_bip_overhead.py": "builds a real-size MoE layer (GBs of weights); the solver is tests/test_bip_solver.py's",
    "bench_compile.py": "compiles models with inductor (10-80 s per routing); tests/test_compile.py compiles each",
    "demo_seeds.py": "runs whole demos in subprocesses; tests/test_demo.py runs the demo",
    "new_release_check.py": "creates a throw-away venv and installs torch and transformers (minutes); run by hand per release",
    "reproduce.py": "its --smoke run (a tiny reference build, resume and hash refusal) is tests/test_evidence.py's",
    "families_table.py": "builds a tiny model of every MoE family (minutes); tests/test_families.py does the same",
}


def _run(
    script: Path, *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "TRANSFORMERS_VERBOSITY": "error"},
    )


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    """``--help`` of every command, run side by side (each one imports torch and transformers: seconds)."""
    workers = max(1, min(8, (os.cpu_count() or 2)))
    with ThreadPoolExecutor(workers) as pool:
        done = pool.map(lambda script: _run(script, "--help", timeout=180), COMMANDS)
        return {script.name: result for script, result in zip(COMMANDS, done)}


def test_there_are_commands_and_each_is_accounted_for(helps):
    assert len(COMMANDS) >= 10
    for name in set(SMOKE) | set(NO_SMOKE):
        assert (SCRIPTS / name).is_file(), f"{name} is listed in tests/test_scripts.py but no longer exists"
    for script in COMMANDS:
        own = "--smoke" in helps[script.name].stdout
        listed = (script.name in SMOKE) + (script.name in NO_SMOKE)
        assert own or listed == 1, (
            f"scripts/{script.name}: give it a --smoke option (a run of seconds on tiny shapes), or add its smoke "
            "arguments to SMOKE, or say in NO_SMOKE why it cannot have one"
        )


@pytest.mark.parametrize("script", COMMANDS, ids=lambda p: p.name)
def test_help_exits_0(script, helps):
    result = helps[script.name]
    assert result.returncode == 0, f"scripts/{script.name} --help failed:\n{result.stderr[-3000:]}"
    assert "usage:" in result.stdout


def _smoke_args(script: Path, help_text: str, out: Path) -> list[str] | None:
    if "--smoke" in help_text:
        return ["--smoke", *(["--out", str(out)] if "--out" in help_text else [])]
    return None


@pytest.mark.parametrize("script", COMMANDS, ids=lambda p: p.name)
def test_smoke_run(script, request, tmp_path):
    if script.name in NO_SMOKE:
        pytest.skip(NO_SMOKE[script.name])
    if script.name in SMOKE:
        args = [arg.format(out=tmp_path / "out") for arg in SMOKE[script.name]]
    else:  # only now the --help of every command (a worker that runs listed scripts only never needs it)
        args = _smoke_args(script, request.getfixturevalue("helps")[script.name].stdout, tmp_path / "out")
        if args is None:
            pytest.fail(
                f"scripts/{script.name} has no smoke setting (test_there_are_commands_... says what to do)"
            )
    if script.name in ("pretrain_comparison.py", "blimp_ngram.py"):
        from hf_moe_routing.data import data_dir

        try:
            data_dir()
        except FileNotFoundError as error:
            pytest.skip(f"shared data folder missing: {error}")
    result = _run(script, *args, cwd=tmp_path)
    assert result.returncode == 0, f"scripts/{script.name} {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"scripts/{script.name} {' '.join(args)} printed no results"
