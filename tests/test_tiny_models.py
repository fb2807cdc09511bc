"""Tiny models respect their config's own validators; a family that cannot be built is "not testable"."""

import pytest
import torch

from hf_moe_routing.testing import moe_families, support
from hf_moe_routing.testing.tiny import _build_within_validators, tiny_config


class _StrictConfig:
    """A config whose validator ties two settings, as transformers' ``@strict`` configs do."""

    def __init__(self, num_heads=4, index_heads=12, width=64):
        if not 0 < index_heads <= num_heads // 2:
            raise ValueError("`index_heads` must be between 1 and half the number of heads.")
        if width % 16:
            raise ValueError("width must be a multiple of 16")
        self.num_heads, self.index_heads, self.width = num_heads, index_heads, width


def test_a_setting_a_validator_names_is_shrunk_until_the_config_builds():
    config = _build_within_validators(_StrictConfig, {"num_heads": 4, "index_heads": 12}, fixed=set())
    assert (config.num_heads, config.index_heads) == (4, 2)  # the largest value that fits, heads kept
    config = _build_within_validators(_StrictConfig, {"index_heads": 12, "width": 24}, fixed=set())
    assert (config.index_heads, config.width) == (2, 16)  # two constraints, one after the other


def test_an_explicit_override_is_never_changed():
    with pytest.raises(ValueError, match="index_heads"):
        _build_within_validators(_StrictConfig, {"index_heads": 12}, fixed={"index_heads"})


@pytest.mark.skipif(
    "kolibri1_1" not in {e.model_type for e in moe_families()}, reason="no kolibri1_1 in this transformers"
)
def test_kolibri_index_heads_fit_the_query_heads_of_a_key_head():
    config = tiny_config("kolibri1_1")
    assert 0 < config.index_num_heads <= config.num_attention_heads // config.num_key_value_heads


def test_a_family_whose_tiny_model_cannot_be_built_is_not_testable_never_supported(monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("`index_heads` must be\n  between 1 and 2.")

    monkeypatch.setattr(support, "tiny_model", fail)
    row = support.check_family("mixtral", dtype=torch.float32)
    assert row.status == "not testable" and row.router_kind == "" and row.kind_key == ""
    assert row.reason == (
        "not testable here: no tiny model: ValueError: `index_heads` must be between 1 and 2."
    )
