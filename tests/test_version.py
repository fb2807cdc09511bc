"""The versions that shape trained weights, as reference builds record them."""

import platform

import numpy
import tokenizers
import torch
import transformers

from hf_moe_routing.core.version import SHAPING_PACKAGES, shaping_versions


def test_shaping_versions_name_the_installed_packages_and_python():
    found = shaping_versions()
    assert set(found) == {*SHAPING_PACKAGES, "python"}
    assert found["torch"] == torch.__version__
    assert found["transformers"] == transformers.__version__
    assert found["tokenizers"] == tokenizers.__version__
    assert found["numpy"] == numpy.__version__
    assert found["python"] == platform.python_version()
    assert all(isinstance(value, str) and value for value in found.values())
