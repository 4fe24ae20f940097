# The README's two commands are `make demo` and `make test`; both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the CPU build that lies on disk; on a CUDA machine pass the CUDA wheel index,
# e.g. `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126` (see README).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR ?= demo
TEST_ARGS ?=
# pytest-xdist workers: one a core, at most 4 (each test may start torchrun and its ranks), none
# on one core. NOTE: on CI's 2 cores the serial suite kept ~1.15 cores busy (processes waiting on
# each other, torchrun's rendezvous, subprocess starts); whole files go to a worker (loadfile), so
# a module's fixtures (a trained run, a prepared dataset) are built once.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; [ $$n -lt 2 ] && n=0; echo $$n)

.PHONY: setup test lint demo gpu-check clean
.DEFAULT_GOAL := help

help:
	@echo "make demo   - set up .venv and run the whole pipeline on the synthetic AOI (into $(DEMO_DIR)/)"
	@echo "make test   - set up .venv, then ruff and pytest"
	@echo "make setup  - only create .venv with everything installed"
	@echo "make gpu-check - GPU tests and benchmarks (needs CUDA)"

# One stamp per torch spec and index: `make setup TORCH_INDEX=...` after a CPU setup must run.
STAMP := $(VENV)/.setup-$(shell printf '%s' '$(TORCH) $(TORCH_INDEX)' | cksum | cut -d' ' -f1)

setup: $(STAMP)

# NOTE: with another index, torch is uninstalled first: pip keeps an installed 2.13.0+cpu as
# satisfying torch==2.13.0 and would never fetch the CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip uninstall --quiet --yes torch)
	$(PY) -m pip install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	# (the numba kernels into their cache now, not in a run's first validation or polygonize)
	OMP_NUM_THREADS=1 $(PY) -m postproc.precompile
	touch $@

lint: setup
	$(PY) -m ruff check .

test: setup lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(TEST_ARGS)

demo: setup
	$(PY) -m launch.demo --out $(DEMO_DIR)

# Every GPU test plus the loader, training and postprocessing benchmarks on this machine's GPU(s);
# JSON lands in gpu-check/. Without CUDA it says so and fails.
gpu-check: setup
	$(PY) -m launch.gpu_check --out gpu-check

clean:
	rm -rf $(VENV) $(DEMO_DIR)
