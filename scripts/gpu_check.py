"""One-command GPU check: correctness on CUDA and the speed numbers that matter at real layer sizes.

On one H100/H200 it finishes in under 8 minutes and writes ``gpu_check.json``, ``gpu_check.png`` and
``summary.md`` under ``--out`` (default ``results/gpu/``)::

    python scripts/gpu_check.py                      # on a machine with a CUDA GPU
    python scripts/gpu_check.py --smoke --out /tmp/x # CPU, tiny shapes, seconds (what CI runs)
    python scripts/gpu_check.py --sections experts bip

Sections (budget in seconds on the GPU; see ``gpu_check_sections.py``):

* ``tests``    the test suite's CUDA tests (named ``test_cuda_*``; ``pytest -k test_cuda``);
* ``families`` every supported family on CUDA in bf16: TopKConfig identical to the model's routing,
               BIP fit and route, Ada-K through the sentinel kernel against eager experts;
* ``experts``  sentinel_grouped_mm vs grouped_mm and eager at Qwen1.5-MoE, Mixtral-8x7B, DeepSeek-V3
               and gpt-oss-20b layer shapes, decode (1-64 tokens) and prefill (4k-16k), 25-100% of
               slots kept: time saved as a share of the FLOPs-predicted saving;
* ``bip``      BIP solve time as a share of the MoE layer forward at n = 4k-64k tokens;
* ``adak``     Ada-K end-to-end forward speed-up and peak memory on stacks of real-size MoE layers;
* ``ppo``      PPO rollout tokens/s against inference tokens/s;
* ``compile``  torch.compile(fullgraph=True) vs eager forward speed per routing.

Safety: each section runs in its own process (a CUDA error cannot poison the others) with a time
budget it respects between cases and a hard limit after which its process group is killed; results
are written after every case, so a failed or killed section keeps what it measured. Nothing changes
GPU settings (clocks, MIG, persistence); the processes free their memory when they exit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: seconds per section on a GPU; the hard limit adds GRACE_S. Sum + graces stays under 8 minutes.
BUDGETS = {
    "tests": 90,
    "families": 100,
    "experts": 60,
    "bip": 30,
    "adak": 50,
    "ppo": 30,
    "compile": 60,
    "serving": 240,  # three vLLM engine starts; skips at once where vLLM is not installed
}
GRACE_S = 8
SMOKE_BUDGET_S = 120  # per section in --smoke runs (they take seconds)
STATUSES = ("ok", "partial", "skipped", "failed", "error", "timeout", "not run")


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def child_main(args: argparse.Namespace) -> int:
    """Run sections in this process, each recording into ``<out>/parts/<section>.json``."""
    import torch
    from bench_common import Deadline, environment
    from gpu_check_sections import Context, dump, run_section

    device = "cpu" if args.smoke else "cuda"
    torch.manual_seed(0)
    if args.smoke:
        torch.set_num_threads(1)
    out = Path(args.out)
    imports_s = max(0.0, time.time() - args.spawned_at) if args.spawned_at else 0.0
    for position, name in enumerate(args.sections):
        budget = args.budget[name] - (imports_s if position == 0 else 0.0)  # the hard limit counts imports
        part = out / "parts" / f"{name}.json"
        data = {"section": name, "status": "running", "budget_s": args.budget[name], "results": {}}
        data["environment"] = environment(device)
        started = time.monotonic()
        ctx = Context(
            device=device,
            smoke=args.smoke,
            deadline=Deadline(budget),
            results=data["results"],
            flush=lambda data=data, part=part: dump(part, data),
            out=out,
        )
        ctx.flush()
        try:
            data["status"] = run_section(name, ctx)
        except Exception:  # noqa: BLE001 - recorded with the partial results
            data["status"] = "error"
            data["error"] = traceback.format_exc()[-4000:]
        data["seconds"] = time.monotonic() - started
        ctx.flush()
    return 0


def run_children(args: argparse.Namespace, groups: list[list[str]]) -> None:
    """One child process per group of sections; killed (whole process group) at its hard limit."""
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for group in groups:
        limit = sum(args.budget[name] + GRACE_S for name in group)
        command = [sys.executable, __file__, "--child", "--out", str(out), "--sections", *group]
        command += ["--budget-json", json.dumps(args.budget), "--spawned-at", str(time.time())]
        command += ["--smoke"] if args.smoke else []
        spawned = time.monotonic()
        log = out / "logs" / f"{'_'.join(group)}.log"
        print(f"[gpu_check] {', '.join(group)} (limit {limit} s, log {log})", flush=True)
        with open(log, "w") as handle:
            proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _stop(proc)
                code = "timeout"
            except BaseException:  # Ctrl-C: stop the child (its own session gets no SIGINT), then report
                _stop(proc)
                raise
        for name in group:  # a section still "running" died with its process
            part = out / "parts" / f"{name}.json"
            data = json.loads(part.read_text()) if part.is_file() else {"section": name, "results": {}}
            if data.get("status") in (None, "running"):
                data["status"] = "timeout" if code == "timeout" else "error"
                data.setdefault("budget_s", args.budget[name])
                if len(group) == 1:
                    data["seconds"] = time.monotonic() - spawned
                data["error"] = f"process ended ({code}) during the section; see {log}:\n" + _tail(log)
                part.write_text(json.dumps(data, indent=2) + "\n")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (it and e.g. compile workers), SIGKILL after 5 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def collect(args: argparse.Namespace, started: float) -> dict:
    out = Path(args.out)
    sections = {}
    for name in args.sections:
        part = out / "parts" / f"{name}.json"
        sections[name] = (
            json.loads(part.read_text()) if part.is_file() else {"status": "not run", "results": {}}
        )
    environment = next((s.get("environment") for s in sections.values() if s.get("environment")), {})
    return {
        "meta": {
            **environment,
            "smoke": args.smoke,
            "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "seconds": time.time() - started,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "git_commit": git_commit(),
            "budgets_s": {name: args.budget[name] for name in args.sections},
        },
        "sections": sections,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, seconds (for CI)")
    parser.add_argument("--out", default="results/gpu", help="output folder")
    parser.add_argument("--sections", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument(
        "--budget-scale", type=float, default=1.0, help="multiply every section's time budget"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--budget-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_scale <= 0:
        parser.error("--budget-scale must be > 0")
    if args.budget_json:
        args.budget = json.loads(args.budget_json)
    else:
        base = {name: SMOKE_BUDGET_S for name in BUDGETS} if args.smoke else BUDGETS
        args.budget = {name: round(seconds * args.budget_scale) for name, seconds in base.items()}
    if args.child:
        return child_main(args)

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a machine with an "
            "NVIDIA GPU and a CUDA build of torch, or use --smoke for the CPU smoke run. Nothing was written.",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    for name in args.sections:  # a stale part from an earlier run must not pass for this one's
        (out / "parts" / f"{name}.json").unlink(missing_ok=True)
    started = time.time()
    # on a GPU every section gets its own process; the smoke run shares one (imports cost seconds)
    groups = [list(args.sections)] if args.smoke else [[name] for name in args.sections]
    try:
        run_children(args, groups)
    finally:
        report = collect(args, started)
        from gpu_check_report import write_report

        paths = write_report(report, out)
        print(f"[gpu_check] wrote {', '.join(str(p) for p in paths)}")
    for name, section in report["sections"].items():
        print(f"[gpu_check] {name:<9} {section.get('status')}  ({section.get('seconds', 0):.0f} s)")
    return (
        0 if all(s.get("status") in ("ok", "partial", "skipped") for s in report["sections"].values()) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
