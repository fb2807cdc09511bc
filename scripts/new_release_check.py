"""Judge a transformers release in minutes: a throw-away venv with it, the family census and the family tests.

Creates a fresh virtual environment (``python -m venv --clear``), installs ``torch==2.13.0`` (the CPU wheel),
this checkout with its ``[dev,eval]`` extras and the given transformers release (pip must find that release
inside the declared range, unless ``--outside-range``), then runs there, on this checkout's package:

1. the family census, ``hf-moe-routing families --json``: every MoE causal-LM family of that release,
   exact (``TopKConfig()`` bit-identical and reversible), refused with a reason, or not testable here;
2. the family tests, ``python -m pytest tests/test_families.py`` (or the ``--tests`` given);

and prints a report (the installed versions, the census, what changed against the expectations recorded
in ``tests/families_expected.json``, the test outcome and times), also written as ``report.json`` and
``report.md`` to ``--out`` (default ``results/new_release/transformers-VERSION``). ``--update-expected``
then records the release's census in ``tests/families_expected.json`` (``scripts/families_table.py
--expected --from-json``) and writes its markdown table next to the report.

    python scripts/new_release_check.py --transformers 5.25.0
    python scripts/new_release_check.py --transformers 5.26.0 --outside-range --workers 2
    python scripts/new_release_check.py --transformers 5.20.2 --update-expected --keep-venv /tmp/v520

Exit status: 0 if the install, the census (no mismatch) and the tests passed, 1 otherwise, 2 if the release
could not be installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from families_table import markdown, write_expected  # noqa: E402

TORCH = "2.13.0"
#: Reported with their versions (the packages that shape trained weights, and the kernels package
#: through which transformers may run its hub kernels).
REPORTED = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "numpy",
    "accelerate",
    "kernels",
    "huggingface_hub",
)


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: list[str], log: Path, env: dict[str, str] | None = None, timeout: float | None = None):
    """Run ``command`` in the checkout, its output appended to ``log``; returns (exit code, seconds)."""
    start = time.perf_counter()
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        try:
            code = subprocess.run(
                command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            handle.write(f"timed out after {timeout} s\n")
            code = 124
    return code, time.perf_counter() - start


def make_venv(venv: Path, version: str, log: Path, outside_range: bool) -> tuple[int, float]:
    """A fresh venv at ``venv`` with torch, this checkout (``[dev,eval]``) and transformers ``version``."""
    start = time.perf_counter()
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        pip + [f"torch=={TORCH}"],
    ]
    if outside_range:  # the package and its dependencies first, then the release over them
        steps += [pip + [f"{ROOT}[dev,eval]"], pip + [f"transformers=={version}"]]
    else:  # one resolution: fails if the declared range does not admit the release
        steps += [pip + [f"{ROOT}[dev,eval]", f"transformers=={version}"]]
    for command in steps:
        code, _ = _run(command, log)
        if code:
            return code, time.perf_counter() - start
    return 0, time.perf_counter() - start


def installed_versions(python: Path) -> dict[str, str | None]:
    """The versions of :data:`REPORTED` and of Python in the venv of ``python``."""
    code = (
        "import json, platform\nfrom importlib.metadata import version, PackageNotFoundError\n"
        "def v(n):\n    try:\n        return version(n)\n    except PackageNotFoundError:\n        return None\n"
        f"print(json.dumps({{**{{n: v(n) for n in {list(REPORTED)!r}}}, 'python': platform.python_version()}}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def expectations(version: str) -> tuple[str | None, dict]:
    """The recorded expectations (tests/families_expected.json) that the tests apply to ``version``."""
    from packaging.version import Version

    path = ROOT / "tests" / "families_expected.json"
    versions = json.loads(path.read_text()).get("versions", {}) if path.exists() else {}
    if not versions:
        return None, {}
    ordered = sorted(versions, key=Version)
    older = [v for v in ordered if Version(v) <= Version(version)]
    release = older[-1] if older else ordered[0]
    return release, versions[release]


def census_summary(rows: list[dict], version: str) -> dict:
    """Counts and names by status, and the changes against the recorded expectations."""
    by_status: dict[str, list[str]] = {}
    for row in rows:
        by_status.setdefault(row["status"], []).append(row["model_type"])
    release, expected = expectations(version)
    names = {row["model_type"] for row in rows}
    supported = set(by_status.get("supported", []))
    was_supported = set(expected.get("supported", {}))
    recorded = was_supported | set(expected.get("refused", {})) | set(expected.get("not_testable", {}))
    return {
        "total": len(rows),
        "counts": {status: len(found) for status, found in by_status.items()},
        "families": by_status,
        "compared_with": release,
        "newly_supported": sorted(supported - was_supported),
        "no_longer_supported": sorted((was_supported & names) - supported),
        "new_families": sorted(names - recorded) if recorded else [],
        "gone_families": sorted(recorded - names),
    }


def test_outcome(junit: Path) -> dict:
    """Counts, failures and skip reasons from pytest's JUnit XML (our own file)."""
    if not junit.exists():
        return {"collected": 0, "error": "no JUnit report (pytest did not run to the end)"}
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    outcome = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skips": []}
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if (failed := case.find("failure")) is not None or (failed := case.find("error")) is not None:
            key = "failed" if failed.tag == "failure" else "errors"
            outcome[key] += 1
            outcome["failures"].append(f"{name}: {(failed.get('message') or '').splitlines()[0][:300]}")
        elif (skipped := case.find("skipped")) is not None:
            outcome["skipped"] += 1
            outcome["skips"].append(f"{name}: {(skipped.get('message') or '')[:300]}")
        else:
            outcome["passed"] += 1
    outcome["collected"] = outcome["passed"] + outcome["failed"] + outcome["errors"] + outcome["skipped"]
    return outcome


def _took(report: dict, step: str) -> str:
    cpu = report.get("cpu_seconds", {}).get(step)
    return f"{report['seconds'][step]:.0f} s wall" + (f", {cpu:.0f} s CPU" if cpu is not None else "")


def report_markdown(report: dict) -> str:
    census, tests = report.get("census", {}), report.get("tests", {})
    versions = ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items() if v)
    counts = census.get("counts", {})
    lines = [
        f"# transformers {report['transformers']}: new-release check",
        "",
        f"- installed: {versions or report.get('install', '')}",
        f"- install: {report['install']} ({report['seconds']['install']:.0f} s)",
    ]
    if census:
        lines += [
            f"- census ({_took(report, 'census')}): {census['total']} MoE causal-LM families: "
            f"{counts.get('supported', 0)} exact, {counts.get('refused', 0)} refused, "
            f"{counts.get('not testable', 0)} not testable here, {counts.get('mismatch', 0)} mismatch",
            f"- against the expectations recorded for {census['compared_with']}: newly supported "
            f"{census['newly_supported'] or 'none'}; no longer supported {census['no_longer_supported'] or 'none'}; "
            f"new families {census['new_families'] or 'none'}; gone {census['gone_families'] or 'none'}",
        ]
        for status in ("refused", "not testable", "mismatch"):
            if census["families"].get(status):
                lines.append(f"- {status}: {', '.join(census['families'][status])}")
    if tests:
        lines.append(
            f"- tests ({_took(report, 'tests')}, exit {tests.get('exit')}): {tests.get('passed', 0)} passed, "
            f"{tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped"
        )
        lines += [f"  - FAILED {line}" for line in tests.get("failures", [])]
        lines += [f"  - skipped {line}" for line in tests.get("skips", [])]
    lines.append(f"- verdict: {report['verdict']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--transformers", required=True, metavar="VERSION", help="the release to check, e.g. 5.25.0"
    )
    parser.add_argument(
        "--out", type=Path, help="report folder (default results/new_release/transformers-VERSION)"
    )
    parser.add_argument("--keep-venv", type=Path, metavar="DIR", help="build the venv at DIR and keep it")
    parser.add_argument(
        "--reuse-venv", type=Path, metavar="DIR", help="use the venv at DIR as it is (no install)"
    )
    parser.add_argument(
        "--outside-range", action="store_true", help="install the release even if the range excludes it"
    )
    parser.add_argument(
        "--tests",
        nargs="*",
        default=["tests/test_families.py"],
        help="test files (default: the family tests)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="pytest-xdist workers (default 1; 0 = in process)"
    )
    parser.add_argument("--no-tests", action="store_true", help="the census only")
    parser.add_argument(
        "--update-expected", action="store_true", help="record the census in tests/families_expected.json"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds for the census and for the tests, each"
    )
    args = parser.parse_args()

    version = args.transformers
    out = args.out or ROOT / "results" / "new_release" / f"transformers-{version}"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    log.write_text("")
    scratch = None
    if args.reuse_venv:
        venv = args.reuse_venv
    elif args.keep_venv:
        venv = args.keep_venv
    else:
        venv = Path(scratch := tempfile.mkdtemp(prefix=f"new-release-{version}-")) / "venv"
    python = venv / "bin" / "python"
    report: dict = {"transformers": version, "seconds": {"install": 0.0}, "venv": str(venv)}
    try:
        if args.reuse_venv:
            code = 0 if python.exists() else 2
        else:
            print(
                f"installing torch {TORCH}, this checkout and transformers {version} into {venv} ...",
                flush=True,
            )
            code, report["seconds"]["install"] = make_venv(venv, version, log, args.outside_range)
        report["install"] = "ok" if code == 0 else f"failed (exit {code}; see {log})"
        if code:
            report["verdict"] = f"transformers {version} could not be installed with this package"
            return _finish(report, out, 2)
        report["versions"] = installed_versions(python)
        if report["versions"]["transformers"] != version:
            report["verdict"] = (
                f"the venv has transformers {report['versions']['transformers']}, not {version}"
            )
            return _finish(report, out, 2)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        census_file = out / "families.json"
        print("family census ...", flush=True)
        with census_file.open("w") as handle:
            start, cpu = time.perf_counter(), _children_cpu()
            command = [str(python), "-m", "hf_moe_routing.cli.main", "families", "--json", "--quiet"]
            result = subprocess.run(
                command,
                cwd=ROOT,
                env=env,
                stdout=handle,
                stderr=subprocess.PIPE,
                text=True,
                timeout=args.timeout,
            )
            report["seconds"]["census"] = time.perf_counter() - start
            report["cpu_seconds"] = {"census": _children_cpu() - cpu}
        if result.returncode:
            report["verdict"] = f"the census failed (exit {result.returncode}): {result.stderr[-2000:]}"
            return _finish(report, out, 1)
        table = json.loads(census_file.read_text())
        report["census"] = census_summary(table["families"], version)
        (out / "families_table.md").write_text(markdown(table["families"], version))
        if args.update_expected:
            write_expected(table["families"], version)
        passed = not report["census"]["counts"].get("mismatch")
        if not args.no_tests:
            print(f"tests {' '.join(args.tests)} ...", flush=True)
            junit = out / "junit.xml"
            junit.unlink(missing_ok=True)
            command = [
                str(python),
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                "-q",
                "-rs",
                f"--junitxml={junit}",
            ]
            command += ["-n", str(args.workers), *args.tests]
            cpu = _children_cpu()
            code, report["seconds"]["tests"] = _run(command, log, env=env, timeout=args.timeout)
            report["cpu_seconds"]["tests"] = _children_cpu() - cpu  # the workers' CPU time included
            report["tests"] = {"exit": code, **test_outcome(junit)}
            passed = passed and code == 0
        report["verdict"] = "passed" if passed else "FAILED"
        return _finish(report, out, 0 if passed else 1)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _finish(report: dict, out: Path, code: int) -> int:
    report.setdefault("verdict", "FAILED")
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    text = report_markdown(report)
    (out / "report.md").write_text(text)
    print(text, end="")
    print(f"written: {out / 'report.json'}, {out / 'report.md'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
