# One entry point per job. `make serve` and `make test` set everything up from a clean clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint format bench bench-lora bench-prefix bench-adapters train-demo container-test clean

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh "$(VENV)" "$(PYTHON)"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/loraplex serve

test: $(STAMP)
	$(PY) -m ruff check server clients tests scripts benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check server clients tests scripts benchmarks
	$(PY) -m ruff format --check server clients tests scripts benchmarks

format: $(STAMP)
	$(PY) -m ruff format server clients tests scripts benchmarks
	$(PY) -m ruff check --fix server clients tests scripts benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks

bench-lora: $(STAMP)
	$(PY) -m benchmarks --lora

bench-prefix: $(STAMP)
	$(PY) -m benchmarks.prefix_bench

bench-adapters: $(STAMP)
	$(PY) -m benchmarks.many_adapters

train-demo: $(STAMP)
	$(PY) scripts/train_demo_model.py

container-test: $(STAMP)
	$(PY) -m pytest -q -m container

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
