# facereid: two commands for a fresh machine.
#   make demo   set everything up, then ingest -> retrain -> verify on the embedded default
#   make test   set everything up, then the default test suite + ruff (what .ci/run runs)
# The local Prefect stack (server + UI on 127.0.0.1, work pool, deployments, worker):
#   make serve / make stop

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# stamp file: pyproject.toml is installed into the venv (newer pyproject.toml -> reinstall)
INSTALLED := $(VENV)/.installed
# Prefect server/UI port of `make serve`
PORT ?= 4200
# extra flags for `facereid demo`, e.g. DEMO_ARGS='--siamese-epochs 2'
DEMO_ARGS ?=
# extra flags for pytest, e.g. PYTEST_ARGS="-m 'not slow'" or PYTEST_ARGS='-k ingest'
PYTEST_ARGS ?=

.PHONY: help venv demo test lint format serve stop clean

help:
	@echo "make venv    create .venv and install the project (re-runs when pyproject.toml changes)"
	@echo "make demo    ingest -> retrain -> verify on ./var/storage, local backend (DEMO_ARGS=...)"
	@echo "make test    default test suite incl. e2e, then ruff check (PYTEST_ARGS=...)"
	@echo "make lint    ruff check, ruff format --check, mypy"
	@echo "make serve   Prefect server + UI on http://127.0.0.1:$(PORT), work pool, deployments, worker"
	@echo "make stop    stop the worker and the server started by make serve"
	@echo "make clean   stop the stack and delete ./var (local storage, Prefect state, logs)"

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test,sagemaker]'
	touch $@

demo: venv
	scripts/demo.sh $(DEMO_ARGS)

test: venv
	scripts/with_test_services.sh scripts/test.sh $(PYTEST_ARGS)

# all three always run; the target fails when any of them does
lint: venv
	rc=0; \
	$(BIN)/ruff check . || rc=1; \
	$(BIN)/ruff format --check . || rc=1; \
	$(BIN)/mypy || rc=1; \
	exit $$rc

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

serve: venv
	FACEREID_PREFECT_PORT=$(PORT) scripts/serve.sh

stop:
	scripts/stop.sh

clean: stop
	rm -rf var
