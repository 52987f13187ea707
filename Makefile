# make test | make bench | make clean
#
# Both targets build into .venv, created with --system-site-packages so that a machine's own
# torch (a GPU image's CUDA build, say) is the one the extensions are built against. torch is
# installed only when none can be imported, and then only the pinned version: an unpinned
# torch pulls gigabytes of CUDA wheels.

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
PIP := $(VENV_PYTHON) -m pip
TORCH_PIN := torch==2.13.0
# Whatever torch the venv has stays: the editable install may not replace it.
TORCH_CONSTRAINT := $(VENV)/torch-constraint.txt
INSTALLED := $(VENV)/.vaekernels-installed
# Directories too, so an added or deleted source rebuilds.
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc 2>/dev/null)
PYTEST_ARGS ?=
# pytest-xdist workers for make test: one per core. A module whose tests share an expensive
# module fixture (the Triton compile, the disentanglement scores) keeps them on one worker
# (xdist_group, --dist loadgroup).
TEST_WORKERS ?= auto

GPU_CHECK_BUDGET ?= 540
GPU_CHECK_ARGS ?=

.PHONY: test lint bench clean gpu-check

# The docstring examples run too, but for the Triton launchers', which need a GPU.
test: $(INSTALLED)
	$(VENV_PYTHON) -m pytest tests vaekernels --doctest-modules --ignore=vaekernels/triton \
		-n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# ruff's rules and format (pyproject.toml), the gate .ci/run holds every change to.
lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(INSTALLED)
	$(VENV_PYTHON) -m pytest bench --benchmark-columns=min,median,max,rounds,iterations $(PYTEST_ARGS)

# For a machine with a GPU (bench/gpu_check.py): builds the extensions in place against that
# machine's own python3 and torch (no venv and no downloads: a lent GPU machine reaches no package
# index), runs the CUDA tests and `pytest bench -k cuda`, and appends device, versions, outcomes and
# the bench table to bench/RESULTS.md, all within GPU_CHECK_BUDGET seconds. Without a GPU: one line, exit 0.
gpu-check:
	$(PYTHON) bench/gpu_check.py --budget $(GPU_CHECK_BUDGET) $(GPU_CHECK_ARGS)

$(VENV_PYTHON):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# The venv's bin on PATH: torch's extension builder looks for the ninja installed there.
$(INSTALLED): export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
$(INSTALLED): $(VENV_PYTHON) $(BUILD_INPUTS)
	$(VENV_PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_PIN)"
	$(VENV_PYTHON) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(TORCH_CONSTRAINT)
	$(PIP) install ninja pybind11 "setuptools>=64" wheel
	@echo "Building the C++ extensions against $$(cat $(TORCH_CONSTRAINT)) (a few minutes)"
	$(PIP) install --no-build-isolation -c $(TORCH_CONSTRAINT) -e ".[test,bench,models]"
	touch $@

# Build outputs only; the venv (and its torch) stays: rm -rf .venv for a fresh start.
clean:
	rm -rf build *.egg-info .pytest_cache $(INSTALLED) $(TORCH_CONSTRAINT)
	find vaekernels -name '*.so' -delete
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
