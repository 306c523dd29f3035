#!/usr/bin/env bash
# The ArviZ 1.x line (xarray DataTree) on Python 3.12, beside `make test` (Python 3.11, ArviZ
# 0.x). Creates .venv312 with pyenv's 3.12.1, installs torch 2.13.0 first (on 3.12 the
# registry's build is the CUDA one: about 5 GB on disk), then the package and its dev extra,
# everything pinned by requirements/ci-py312.txt; checks that ArviZ 1.x is the one installed,
# then runs the whole test suite (measured here: install 3-5 min, suite 4-7 min on 2 busy
# cores). Pytest arguments narrow it, e.g. to the diagnostics, diagnose-CLI and notebook tests:
#   .ci/arviz1.sh tests/test_diagnostics.py tests/test_plotting_diagnostics.py \
#     tests/test_notebooks.py
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV312:-.venv312}
PY=$VENV/bin/python
LOCK=requirements/ci-py312.txt

if [ ! -f "$VENV/.installed" ] || [ "$LOCK" -nt "$VENV/.installed" ] \
    || [ pyproject.toml -nt "$VENV/.installed" ]; then
    start=$SECONDS
    if [ ! -x "$PY" ]; then
        PYENV_VERSION=3.12.1 python -m venv "$VENV"
    fi
    "$PY" -m pip install --quiet -c "$LOCK" torch==2.13.0
    "$PY" -m pip install --quiet -c "$LOCK" -e ".[dev]"
    touch "$VENV/.installed"
    echo "arviz1: $VENV installed in $((SECONDS - start)) s"
fi

"$PY" - <<'EOF'
import sys

import arviz

major = int(arviz.__version__.split(".")[0])
print(f"arviz1: Python {sys.version.split()[0]}, ArviZ {arviz.__version__}")
if sys.version_info[:2] < (3, 12) or major < 1:
    sys.exit("arviz1: this job is for ArviZ 1.x on Python >= 3.12")
EOF

OMP_NUM_THREADS=1 "$PY" -m pytest "$@"
