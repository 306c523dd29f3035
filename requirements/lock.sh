#!/usr/bin/env bash
# Regenerates requirements/ci.txt, the versions `make setup` (and so `make test`, `make demo`
# and CI) installs: a fresh venv, torch's CPU build first, the package with its dev extras
# resolved from the ranges in pyproject.toml, then pip freeze. torch itself is left out:
# `make` installs it first from TORCH_SPEC, so GPU users can choose their build.
# Run from the repository root: bash requirements/lock.sh
set -euo pipefail
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --upgrade pip
"$tmp/venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$tmp/venv/bin/python" -m pip install --quiet -e ".[dev]"
{
  echo "# Locked by requirements/lock.sh on $(date -u +%Y-%m-%d) with $("$tmp/venv/bin/python" --version)."
  echo "# Installed as constraints (pip install -c) by the Makefile; pyproject.toml keeps ranges."
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v -E '^(torch|pip|setuptools|wheel)=='
} > requirements/ci.txt
echo "wrote requirements/ci.txt ($(grep -c '==' requirements/ci.txt) pins)"
