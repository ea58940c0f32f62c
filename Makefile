# fada-batch: set-up, demo, test, lint. Each target does its own set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-container lint format clean

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
# Two pytest-xdist workers (one per core; tests use one thread each): the SLURM tests run on
# one worker in turn while the other runs the rest, file by file (tests/conftest.py's scheduler).
XDIST ?= -n 2 --dist loadfile
# the slowest tests are listed at the end of the run (CI's time budget is watched there)
DURATIONS ?= --durations=25
test: setup
	$(BIN)/python -m pytest $(XDIST) $(DURATIONS) -m "not container"

test-fast: setup
	$(BIN)/python -m pytest $(XDIST) -m "not slurm and not slow and not container"

# The container check (CI runs it after `make test`): build the CPU test image of
# container/Dockerfile with podman on a Debian base made here from Debian's packages
# (scripts/build_test_image.py; base and dependency layers cached), then run the tests marked
# `container` against it, the SLURM array in the image included. Needs podman, buildah,
# mmdebstrap and runc (.ci/run installs them) and root.
CONTAINER_ENV ?= /var/tmp/fada-container/test.env
test-container: setup
	@start=$$(date +%s); \
	$(BIN)/python scripts/build_test_image.py --env-file $(CONTAINER_ENV) \
	  && . $(CONTAINER_ENV) && $(BIN)/python -m pytest $(XDIST) -m container; \
	rc=$$?; echo "container check: $$(( $$(date +%s) - start )) s wall (image build + container tests), exit $$rc"; \
	exit $$rc

lint: setup
	$(BIN)/ruff check fada_batch tests scripts
	$(BIN)/ruff format --check fada_batch tests scripts

format: setup
	$(BIN)/ruff format fada_batch tests scripts
	$(BIN)/ruff check --fix fada_batch tests scripts

clean:
	rm -rf outputs/demo data/demo models/tiny-blip2 .pytest_cache
