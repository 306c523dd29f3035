# Every target sets up its own virtual environment first.
# torch is installed before the package so that pip does not pull a multi-GB CUDA build
# on machines without a GPU; GPU users override it, for example:
#   make test TORCH_SPEC="torch" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124"
# Everything else comes from the lock file requirements/ci.txt (regenerate it with
# requirements/lock.sh), so a fresh clone tests the versions the suite passed with;
# `make test-latest` tests the newest versions the ranges in pyproject.toml allow.
PYTHON ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
LOCK ?= requirements/ci.txt
PY := $(VENV)/bin/python
OUT ?= demo_output

.PHONY: setup demo test test-fast test-latest test-arviz1 lint benchmark benchmark-real benchmark-numpyro benchmark-streaming clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[dev]"
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

# The newest releases the package's ranges admit, in a venv of their own (not locked).
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(numpy|scipy|pandas|arviz|xarray|pyro-ppl|scikit-learn|matplotlib)=='
	$(LATEST_VENV)/bin/python -m pytest

# ArviZ 1.x (DataTree) on Python 3.12 in its own venv, .venv312, pinned by
# requirements/ci-py312.txt; ARGS narrows the tests, e.g. ARGS=tests/test_diagnostics.py
test-arviz1:
	bash .ci/arviz1.sh $(ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

benchmark: setup
	$(PY) -m benchmarks.steps
	$(PY) -m benchmarks.speed --rows 10000 100000 --repeats 3 --out docs/speed

# Full real-data suite (issue #12): every model, every split; writes docs/real_data.{md,json,png}.
# Cached per-split results in benchmarks/real_data_cache.json are reused where still valid.
benchmark-real: $(VENV)/.installed-benchmark
	$(PY) -m benchmarks.real_data --out docs

# Streamed fits from Parquet, 10^5 to 10^7 rows (files generated, not kept), 1 and 2 processes.
benchmark-streaming: setup
	$(PY) -m benchmarks.streaming --out docs/streaming

# One network per step against NumPyro (issue #17): 10^6 rows, 10 epochs; needs the benchmark extra.
benchmark-numpyro: $(VENV)/.installed-benchmark
	$(PY) -m benchmarks.numpyro_speed --rows 1000000 --epochs 10 --out docs/numpyro_speed

clean:
	rm -rf $(VENV) $(LATEST_VENV) .venv312 $(OUT) .pytest_cache
