"""Write the family support table of the installed transformers as markdown (for docs/families.md).

Checks every Mixture-of-Experts causal-LM family of the installed transformers on a tiny random model
(``hf_moe_routing.testing.support``: exact ``TopKConfig()``, a refusal that says why, or "not testable
here" when no tiny model of it can be built) and writes

* ``results/families/families_table.md``: the table (the README's "Supported model families"), with the
  transformers version and the counts;
* ``tests/families_expected.json`` (with ``--expected``): the statuses and router kinds that
  ``tests/test_families.py`` holds later versions of the package to (a supported family must stay
  supported) and uses to pick one family per router kind for its slower checks. The file keeps one entry
  per tested transformers release (``"versions"``); this run replaces the installed release's entry, and
  the test uses the entry of the newest recorded release not newer than the installed one.

    python scripts/families_table.py                 # the markdown table
    python scripts/families_table.py --expected      # also refresh the test expectations
    python scripts/families_table.py --from-json families.json --expected   # from `hf-moe-routing families --json`
* ``tests/families_kinds.json`` (with ``--kinds``): every supported family's full detected router kinds
  (``testing.support.router_kinds``), which ``tests/test_family_kinds.py`` compares with what the
  families layer detects; another transformers version merges (a kind that differs there is recorded under
  ``by_version``).

    python scripts/families_table.py --kinds-only    # only refresh tests/families_kinds.json (fast)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package of this checkout, not an installed one
EXPECTED_PATH = ROOT / "tests" / "families_expected.json"


def markdown(rows: list[dict], version: str) -> str:
    supported = sum(r["status"] == "supported" for r in rows)
    refused = sum(r["status"] == "refused" for r in rows)
    untestable = sum(r["status"] == "not testable" for r in rows)
    untestable_text = (
        f"; {untestable} are not testable here (no tiny model could be built)" if untestable else ""
    )
    lines = [
        f"### Supported model families (transformers {version})",
        "",
        f"{supported} of the {len(rows)} Mixture-of-Experts causal-LM families of transformers {version} are "
        f"patched bit-exactly (`TopKConfig()` reproduces the model's own routing, in float32 and bfloat16); "
        f"{refused} are refused with the reason below{untestable_text}. "
        '"detected": no family file, the router kind is '
        "found by probing the router. Regenerate with `python scripts/families_table.py`; "
        "`hf-moe-routing families` prints the table for the transformers you have installed.",
        "",
        "| family | causal LM class | router kind | family file | status | reason |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        reason = r["reason"].replace("|", "\\|")
        cells = (r["model_type"], f"`{r['causal_lm_class']}`", r["router_kind"] or "-", r["family"] or "-")
        lines.append(f"| {' | '.join(cells)} | {r['status']} | {reason} |")
    return "\n".join(lines) + "\n"


def expected_entry(rows: list[dict]) -> dict:
    """The test expectations of one transformers release, from its support table rows."""
    return {
        "supported": {
            r["model_type"]: {"router_kind": r["router_kind"], "kind_key": r["kind_key"]}
            for r in rows
            if r["status"] == "supported"
        },
        "refused": {r["model_type"]: r["reason"] for r in rows if r["status"] == "refused"},
        "not_testable": {r["model_type"]: r["reason"] for r in rows if r["status"] == "not testable"},
    }


def write_expected(rows: list[dict], version: str, path: Path = EXPECTED_PATH) -> Path:
    """Replace ``version``'s entry of the expectations file (other releases' entries are kept)."""
    versions = json.loads(path.read_text()).get("versions", {}) if path.exists() else {}
    versions[version] = expected_entry(rows)
    path.write_text(json.dumps({"versions": versions}, indent=1, sort_keys=True) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "families" / "families_table.md")
    parser.add_argument(
        "--expected",
        action="store_true",
        help="also write the installed release's entry of tests/families_expected.json (the test expectations)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="take the table from FILE (the output of `hf-moe-routing families --json`) instead of checking",
    )
    parser.add_argument(
        "--kinds", action="store_true", help="also write tests/families_kinds.json (detected router kinds)"
    )
    parser.add_argument("--kinds-only", action="store_true", help="only write tests/families_kinds.json")
    args = parser.parse_args()
    if args.kinds_only:
        return write_kinds()

    if args.from_json is not None:
        table = json.loads(args.from_json.read_text())
        rows, version = table["families"], table["transformers"]
    else:
        import torch
        import transformers

        from hf_moe_routing.testing.support import support_table

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(1)
        start = time.time()
        rows = [r.to_dict() for r in support_table(progress=lambda name: print(name, end=" ", flush=True))]
        print(f"\n{len(rows)} families checked in {time.time() - start:.0f} s")
        version = transformers.__version__
    for r in rows:
        if r["status"] in ("mismatch", "not testable"):
            print(f"WARNING {r['model_type']}: {r['status']}: {r['reason']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, version))
    print(f"wrote {args.out}")
    if args.expected:
        print(f"wrote the transformers {version} entry of {write_expected(rows, version)}")
    if args.kinds:
        write_kinds()
    return 1 if any(r["status"] == "mismatch" for r in rows) else 0


def write_kinds(path: Path = ROOT / "tests" / "families_kinds.json") -> int:
    """Merge this transformers version's detected router kinds into ``path`` (see the module docstring)."""
    import torch
    import transformers

    from hf_moe_routing.testing import moe_families
    from hf_moe_routing.testing.support import router_kinds

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    version = transformers.__version__
    old = (
        json.loads(path.read_text())
        if path.exists()
        else {"kinds": {}, "by_version": {}, "recorded_with": []}
    )
    kinds, by_version = old["kinds"], old.get("by_version", {})
    here = {}
    for entry in moe_families():
        try:
            here[entry.model_type] = router_kinds(entry.model_type)
        except Exception as error:  # noqa: BLE001 - an unbuildable family is reported, not recorded
            print(f"WARNING {entry.model_type}: no tiny model: {type(error).__name__}: {error}")
    by_version.pop(version, None)
    for name, found in sorted(here.items()):
        if name not in kinds and found is not None:
            kinds[name] = found
        elif name in kinds and found != kinds[name]:
            by_version.setdefault(version, {})[name] = found
    recorded = sorted(set(old.get("recorded_with", [])) | {version})
    out = {"recorded_with": recorded, "kinds": kinds, "by_version": by_version}
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(
        f"wrote {path}: {sum(f is not None for f in here.values())} supported families on transformers {version}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
