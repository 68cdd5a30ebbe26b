# fedpipe: the two commands a fresh machine needs are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs docs-serve format bench bench-full up down clean-state test-multihost

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so pip takes the CPU wheel on disk (never a CUDA download)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# the dask extra too, so the suite runs the Dask runner on a local cluster (ray's is
	# optional: its test runs where `pip install -e '.[ray]'` was done, and skips otherwise)
	$(BIN)/python -m pip install --quiet -e '.[dev,dask]'
	# Prefect's empty database, made once: a run in a fresh folder then skips its migrations
	-$(BIN)/fedpipe server prepare  # optional: without it the first run migrates
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedpipe demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# the docs site (docs/, mkdocs.yml): strict, so a broken link or a missing page fails
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

test: $(STAMP) lint docs
	$(BIN)/python -m pytest -q -n 2

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

bench-full: $(STAMP)
	$(BIN)/python -m benchmarks.run_all --full

up: $(STAMP)
	$(BIN)/fedpipe up

down: $(STAMP)
	$(BIN)/fedpipe down

# issue 20: a coordinator and two sites in their own network namespaces, over TLS (root)
test-multihost: $(STAMP)
	FEDPIPE_MULTIHOST=1 $(BIN)/python -m pytest -q -s tests/multihost
