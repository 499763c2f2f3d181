# kpisettle — every command a developer or CI needs. Only Python 3.11/3.12 must be installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint bench test-long clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create the virtualenv and install everything

run: setup  ## check every ruleset's examples, then print one settlement
	$(PY) -m engine check rulesets/*.yaml
	$(PY) -m engine demo rulesets/us-managed-standard.yaml

lint: setup  ## ruff and mypy
	$(VENV)/bin/ruff check engine tests benchmarks
	$(VENV)/bin/ruff format --check engine tests benchmarks
	$(VENV)/bin/mypy

test: setup lint  ## the whole suite
	$(PY) -m pytest

test-long: setup  ## the long fuzz runs as well
	$(PY) -m pytest -m "long or not long"

bench: setup  ## settlements per second, printed as a table
	$(PY) -m benchmarks.engine_bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
