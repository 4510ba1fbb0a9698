# The two commands of the README:  `make demo`  and  `make test`.
# Each sets up what it needs (virtualenv, Kafka jars, redis-server) on a fresh machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STACK  := $(PYTHON) scripts/stack

.PHONY: help venv lint docs docs-serve test test-unit test-integration demo demo-maintenance stack-up stack-down stack-status stack-up-secure stack-down-secure test-secure demo-hybrid stack-up-registry stack-down-registry test-registry bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "streamserve needs Python >= 3.11, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

venv: $(BIN)/.installed  ## create .venv with streamserve and its dev tools

lint: venv  ## ruff (lint, complexity, format check), mypy, the layers (import-linter, docs/architecture.md), the docs site
	$(BIN)/ruff check src tests bench docs/hooks
	$(BIN)/ruff format --check src tests bench docs/hooks
	$(BIN)/mypy
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site-check

docs: venv  ## the docs site into site/ (mkdocs-material; the config and CLI references generated from the code)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: venv  ## the docs site on http://127.0.0.1:8000, rebuilt on every change
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

test-unit: venv  ## unit tests only (no servers)
	$(BIN)/pytest tests/unit

test-integration: venv  ## integration tests (start the local stack when needed)
	$(BIN)/pytest tests/integration

test: lint  ## lint, type check and the whole suite against a real Kafka broker and Redis
	$(BIN)/pytest

demo: venv  ## the card-fraud demo end to end: stack up, train, stream, predict, hot-swap, stack down
	bash scripts/demo

stack-up:  ## start the local Kafka broker and Redis server (no Docker)
	$(STACK) up

stack-down:  ## stop what stack-up started
	$(STACK) down

stack-status:
	$(STACK) status

stack-up-secure:  ## the secured stack beside the plain one: SASL_SSL + ACLs, Redis over TLS with ACL users
	$(STACK) up --secure

stack-down-secure:  ## stop what stack-up-secure started
	$(STACK) down --secure

test-secure: venv  ## worker + publisher end to end on the secured stack (started when needed)
	$(BIN)/pytest tests/secure

stack-up-registry:  ## Apicurio Schema Registry alone (.stack-registry/, needs a JDK >= 21), beside any stack
	$(STACK) up --registry-only

stack-down-registry:  ## stop what stack-up-registry started
	$(STACK) down --registry-only

test-registry: venv  ## evolution, registry outage, wire-format predictions, schemas check on the real registry
	$(BIN)/pytest tests/integration/test_schema_registry.py tests/unit/test_schema_registry.py

bench: venv  ## benchmark against the Kafka limit, a hand-written loop, Quix Streams, faust (BENCHMARKS.md)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(STACK) up
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:  ## remove the virtualenv and local state
	-$(STACK) down
	-$(STACK) down --secure
	rm -rf $(VENV) site .tools .stack .stack-secure .pytest_cache .mypy_cache .ruff_cache .import_linter_cache examples/fraud/models examples/fraud/data

demo-hybrid: venv  ## batch, backtest and dead-letter replay beside the stream, with the worker's own code path
	bash scripts/demo --hybrid

demo-maintenance: venv  ## the predictive-maintenance example: nested/nullable events, multi-input model, string labels
	bash scripts/demo --example maintenance
