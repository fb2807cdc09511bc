#!/usr/bin/env bash
# The README's test command in a fresh venv: the newest transformers (and everything else) that the
# declared ranges admit, as a new user's `pip install` gets them today.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/common.sh
fresh_venv newest
pip install torch==2.13.0 && pip install -e ".[dev,eval]"
show_versions "newest end of the range (README's test command)"
newest=$(pip index versions transformers 2>/dev/null | sed -n 's/^transformers (\(.*\))$/\1/p')
echo "    newest transformers on the package index: ${newest:-unknown}"
python -m pytest -n 2
