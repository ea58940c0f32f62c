# fada-batch: set-up, demo, test, lint. Each target does its own set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint format clean

# A virtual environment with the pinned dependencies of requirements.lock. torch is installed
# first on its own: pip takes the CPU build 2.13.0 from this machine's disk (an unpinned torch
# would pull a multi-GB CUDA build).
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch==$$(sed -n 's/^torch==//p' requirements.lock)"
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/fada-batch demo --job job/demo.yaml

# Tests marked `gpu` run where CUDA is available and skip where not (tests/conftest.py), in
# both targets; tests/test_markers.py checks that with each target's own command line.
test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slurm and not slow"

lint: setup
	$(BIN)/ruff check fada_batch tests scripts
	$(BIN)/ruff format --check fada_batch tests scripts

format: setup
	$(BIN)/ruff format fada_batch tests scripts
	$(BIN)/ruff check --fix fada_batch tests scripts

clean:
	rm -rf outputs/demo data/demo models/tiny-blip2 .pytest_cache
