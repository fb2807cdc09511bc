# Helpers for the CI steps (sourced by .ci/run and .ci/*.sh; run from the repository root).
#
#   fresh_venv NAME      a new, empty virtual environment (python -m venv --clear) at $CI_VENVS/NAME,
#                        activated: nothing installed on the machine is reused, so pip resolves the
#                        newest versions the declared ranges admit, as a new user's install does
#   show_versions LABEL  prints the versions that venv tests (transformers first)
#   floor_of PACKAGE     the lower bound a ">=" requirement in pyproject.toml declares for PACKAGE
#   step NAME CMD...     runs CMD, timed; its result is added to the summary that .ci/run prints
#   start_step NAME CMD... runs CMD in the background, timed, its output kept in $CI_VENVS/NAME.log
#   finish_step NAME     waits for it, prints its output and adds its result to the summary

CI_VENVS="${CI_VENVS:-${TMPDIR:-/tmp}/hf-moe-routing-ci}"
CI_PYTHON="${CI_PYTHON:-python3}"
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
CI_SUMMARY=()
declare -A CI_BACKGROUND=()

fresh_venv() {
    local dir="$CI_VENVS/$1"
    mkdir -p "$CI_VENVS"
    "$CI_PYTHON" -m venv --clear "$dir"
    # shellcheck disable=SC1091
    source "$dir/bin/activate"
    hash -r
    echo "fresh venv $dir ($(python --version))"
}

show_versions() {
    python - "$1" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError

def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"

names = ("torch", "tokenizers", "datasets", "numpy", "accelerate", "peft", "kernels", "huggingface_hub")
print(f"=== {sys.argv[1]}: transformers {v('transformers')} ===")
print("    " + ", ".join(f"{n} {v(n)}" for n in names))
PY
}

floor_of() {
    python3 - "$1" <<'PY'
import re, sys
text = open("pyproject.toml").read()
found = re.search(rf'"{re.escape(sys.argv[1])}\s*>=\s*([0-9][0-9.]*)', text)
if not found:
    sys.exit(f"pyproject.toml declares no '>=' floor for {sys.argv[1]}")
print(found.group(1))
PY
}

step() {
    local name="$1" start=$SECONDS code=0
    shift
    echo
    echo "##### step $name: $*"
    "$@" || code=$?
    local took=$((SECONDS - start))
    CI_SUMMARY+=("$(printf '%-10s %-6s %4d s' "$name" "$([ $code -eq 0 ] && echo ok || echo FAILED)" "$took")")
    echo "##### step $name: exit $code after ${took} s"
    return $code
}

start_step() {
    local name="$1"
    shift
    mkdir -p "$CI_VENVS"
    echo
    echo "##### step $name started in the background (output shown when it ends): $*"
    (
        start=$SECONDS
        code=0
        "$@" >"$CI_VENVS/$name.log" 2>&1 || code=$?
        echo "$code $((SECONDS - start))" >"$CI_VENVS/$name.status"
    ) &
    CI_BACKGROUND[$name]=$!
}

finish_step() {
    local name="$1" code took
    wait "${CI_BACKGROUND[$name]}" || true
    read -r code took <"$CI_VENVS/$name.status" || { code=1 took=0; }
    echo
    echo "##### step $name (ran in the background): output"
    cat "$CI_VENVS/$name.log"
    CI_SUMMARY+=("$(printf '%-10s %-6s %4d s (in the background)' "$name" "$([ "$code" -eq 0 ] && echo ok || echo FAILED)" "$took")")
    echo "##### step $name: exit $code after ${took} s"
    return "$code"
}
