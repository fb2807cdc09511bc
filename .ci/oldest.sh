#!/usr/bin/env bash
# The oldest transformers release the range admits (pyproject.toml's floor), in its own fresh venv:
# the family tests and a core subset (patching, BIP, Ada-K, adapter files, FLOPs, tiny models).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/common.sh
floor=$(floor_of transformers)
fresh_venv oldest
pip install torch==2.13.0 && pip install -e ".[dev,eval]" "transformers==$floor"
show_versions "oldest end of the range (transformers==$floor)"
python -m pytest -n 2 \
    tests/test_families.py tests/test_tiny_models.py tests/test_flops.py tests/test_patching.py \
    tests/test_bip_routing.py tests/test_adak.py tests/test_adapter_io.py tests/test_version.py
