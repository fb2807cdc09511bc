"""The family expectations recorded in ``families_expected.json`` for the installed transformers.

The file keeps one entry per tested release (``scripts/families_table.py --expected``); a test uses the
entry of the newest recorded release not newer than the installed one (the oldest if it is older).
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from packaging.version import Version

PATH = Path(__file__).parent / "families_expected.json"


def expected_for(installed: str = transformers.__version__) -> tuple[str, dict]:
    """``(release, entry)``: the recorded expectations that hold for transformers ``installed``."""
    versions = json.loads(PATH.read_text())["versions"]
    ordered = sorted(versions, key=Version)
    older = [v for v in ordered if Version(v) <= Version(installed)]
    release = older[-1] if older else ordered[0]
    return release, versions[release]
