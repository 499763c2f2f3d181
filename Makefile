# kpisettle — every command a developer or CI needs. Only Python 3.11/3.12 must be installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint bench test-long clean node

GEN    := gen/.generated
PROTOS := $(wildcard proto/kpisettle/v1/*.proto)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Code generated from the protos into gen/ (git-ignored), importable through a .pth file.
$(GEN): $(STAMP) $(PROTOS) proto/generate.py
	$(PY) proto/generate.py
	$(PY) -c "import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()['purelib'], 'kpisettle_gen.pth').write_text(str(pathlib.Path('gen').resolve()) + '\n')"
	touch $(GEN)

# The Node.js interop client's packages (clients/node, used by tests/test_interop.py), again only
# when package-lock.json changes. Without npm it is skipped, and so is the Node test.
NODE_STAMP := clients/node/node_modules/.installed

$(NODE_STAMP): clients/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		echo "npm ci in clients/node"; \
		cd clients/node && npm ci --no-audit --no-fund --ignore-scripts && touch node_modules/.installed; \
	else \
		echo "npm not found: the Node.js client is not installed and its test will be skipped"; \
	fi

node: $(NODE_STAMP)  ## install the Node.js interop client's packages (when npm is installed)

setup: $(STAMP) $(GEN) node  ## create the virtualenv, install everything, generate code from the protos

run: setup  ## start the service on 127.0.0.1:50051 with SQLite in var/ and the rulesets loaded
	$(PY) -m engine check rulesets/*.yaml
	$(PY) -m server.dev

lint: setup  ## ruff and mypy
	$(VENV)/bin/ruff check engine server clients proto tests benchmarks
	$(VENV)/bin/ruff format --check engine server clients proto tests benchmarks
	$(VENV)/bin/mypy

test: setup lint  ## the whole suite
	$(PY) -m pytest

test-long: setup  ## the long fuzz runs as well
	$(PY) -m pytest -m "long or not long"

bench: setup  ## engine, peer, service and memory benchmarks: one table, also written to benchmarks/results.json
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) gen .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info clients/node/node_modules
