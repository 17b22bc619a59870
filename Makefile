# Quick start: `make demo` (set up + end-to-end run on CPU) and `make test` (set up + test suite).
# Both create .venv if missing and install everything into it. On a GPU machine with your own CUDA
# torch, install it into .venv first and run `make demo TORCH_SPEC=` to keep it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,deepspeed,api,serve
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -c constraints.txt $(TORCH_SPEC); fi
	$(BIN)/pip install -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

test: setup
	bash scripts/install_test_deps.sh
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

bench: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m benchmarks

clean-demo:
	rm -rf runs/demo
