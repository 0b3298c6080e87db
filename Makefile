# Two commands do all set-up on a fresh clone: `make repro` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Stage commands in dvc.yaml call `python`: make it the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
# glibc hands freed memory back to the kernel, so CPU training faults every page of its activations in again each
# step: train@baseline at one thread took 4.3M page faults and 7.7 of 45 s in the kernel; with these two, 0.35M and 1.3
# of 40 s, for 0.2 GB more peak memory. Nothing changes on a GPU. An environment that sets them keeps its own.
export MALLOC_MMAP_THRESHOLD_ ?= 1073741824
export MALLOC_TRIM_THRESHOLD_ ?= 1073741824

.PHONY: repro test bench sweep gpu-smoke install clean-venv

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Plain pip: torch==2.14.1 / torchvision==0.29.1 are found on this machine's disk. pip byte-compiles what it installs
# on one core; compileall does it on every core, so every stage imports from .pyc files even where
# PYTHONDONTWRITEBYTECODE is set. It skips test folders and torch/testing/_internal, which holds Python 3.12-only
# syntax (the few of its modules torch imports compile on first use, in milliseconds).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-compile -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 -x '/(tests?|testing/_internal)/' $(VENV)/lib
	@touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

# Method × amount sweep as queued DVC experiments (the `sweep` section of params.yaml); writes reports/sweep/.
sweep: $(STAMP)
	$(BIN)/python -m pipeline.sweep

bench: $(STAMP)
	$(BIN)/python -m bench

# On a GPU machine: the micro settings through every stage on CUDA (< 5 min), one PASS/FAIL line per stage.
gpu-smoke: $(STAMP)
	$(BIN)/python -m bench.gpu_smoke

clean-venv:
	rm -rf $(VENV)
