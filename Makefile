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

.PHONY: setup demo test test-fast lint benchmark benchmark-real clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The real-data benchmark's peers (ngboost, zuko, statsmodels), on top of the same venv.
$(VENV)/.installed-benchmark: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[dev,benchmark]"
	touch $@

demo: setup
	$(VENV)/bin/bayes-mdn demo --out $(OUT)

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

benchmark: setup
	$(PY) scripts/benchmark.py

# Full real-data suite (issue #12): every model, every split; writes docs/real_data.{md,json,png}.
# Cached per-split results in benchmarks/real_data_cache.json are reused where still valid.
benchmark-real: $(VENV)/.installed-benchmark
	$(PY) -m benchmarks.real_data --out docs

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
