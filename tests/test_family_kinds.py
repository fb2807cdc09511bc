"""Every family's detected router kind is the recorded one, not only its support status.

``families_kinds.json`` (written by ``python scripts/families_table.py --kinds-only``) holds every
supported family's full router kind (each :class:`RouterKind` field, where the selection bias lives,
the rank of the hidden states). A change that routes identically but detects the wrong kind (e.g.
renormalisation always instead of read from ``norm_topk_prob``: a checkpoint with the flag off would
then be routed wrongly) fails here. A family the installed transformers does not have, or refuses
while ``families_expected.json`` does not list it as supported, is skipped. One tiny model per family, about a second each.
"""

import json
from pathlib import Path

import pytest
import transformers
from family_expectations import expected_for

from hf_moe_routing.testing import moe_families
from hf_moe_routing.testing.support import router_kinds

RECORDED = json.loads((Path(__file__).parent / "families_kinds.json").read_text())
STATUSES = expected_for()[1]
INSTALLED = {entry.model_type for entry in moe_families()}


def _expected(model_type: str) -> list[dict] | None:
    per_version = RECORDED["by_version"].get(transformers.__version__, {})
    return per_version[model_type] if model_type in per_version else RECORDED["kinds"][model_type]


def test_the_record_covers_every_attr_renormalising_family_and_both_renorm_kinds():
    kinds = [kind for found in RECORDED["kinds"].values() for kind in found]
    assert len(RECORDED["kinds"]) >= 55
    assert {kind["renormalize"] for kind in kinds} == {"never", "always", "attr"}


@pytest.mark.parametrize("model_type", sorted(RECORDED["kinds"]))
def test_the_detected_router_kind_is_the_recorded_one(model_type):
    if model_type not in INSTALLED:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    expected = _expected(model_type)
    if expected is None:
        pytest.skip(f"{model_type} is refused on transformers {transformers.__version__} (recorded)")
    found = router_kinds(model_type)
    if found is None:
        assert model_type not in STATUSES["supported"], f"{model_type} was supported and is now refused"
        pytest.skip(f"{model_type} is refused on transformers {transformers.__version__}")
    assert found == expected, (
        f"{model_type}: detected {json.dumps(found, sort_keys=True)}, recorded "
        f"{json.dumps(expected, sort_keys=True)}; if the change is intended, rerun "
        "`python scripts/families_table.py --kinds-only`"
    )
