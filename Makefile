# Every target sets up its own virtual environment first.
# torch is installed before the package so that pip does not pull a multi-GB CUDA build
# on machines without a GPU; GPU users override it, for example:
#   make test TORCH_SPEC="torch" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
OUT ?= demo_output

.PHONY: setup demo test test-fast test-arviz1 lint benchmark clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/bayes-mdn demo --out $(OUT)

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# ArviZ 1.x (DataTree) on Python 3.12 in its own venv, .venv312, pinned by
# requirements/ci-py312.txt; ARGS narrows the tests, e.g. ARGS=tests/test_diagnostics.py
test-arviz1:
	bash .ci/arviz1.sh $(ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

benchmark: setup
	$(PY) scripts/benchmark.py

clean:
	rm -rf $(VENV) .venv312 $(OUT) .pytest_cache
