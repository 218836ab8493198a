# The two commands of the README: `make test` and `make bench`. Each sets up .venv/ (Python 3.11,
# the pinned requirements.txt), builds the extension, then tests or benchmarks.
SHELL := /bin/bash
PYTHON_BASE ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

export CUDA_HOME ?= $(wildcard /usr/local/cuda)
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export PYTHONUNBUFFERED := 1

.PHONY: test bench build deps test-python test-slow test-hardening test-triton ctest kernels-report gpu-prebuild clean

deps: $(VENV)/.deps

$(VENV)/.deps: requirements.txt
	@test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

# The editable install registers the package once (EFFK_NO_EXTENSION: no build inside pip's
# throw-away build dir); build_ext --inplace then builds incrementally with ninja in build/.
build: deps
	@test -f $(VENV)/.editable || { EFFK_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e . && touch $(VENV)/.editable; }
	$(PY) setup.py -q build_ext --inplace

test: build test-python test-triton ctest

# CI runs the fast set; `make test-slow` adds the parity and compile tests of every model name.
test-python:
	$(PYTEST) tests -n 2 -q -rs --ignore=tests/triton -m "not slow"

test-slow: build
	$(PYTEST) tests -n 2 -q -rs --ignore=tests/triton -m slow

# The slow hardening tests that CI runs too: pip install without a CUDA toolkit / Triton / CUDA
# torch (tests/test_install.py) and tensors above 2^31 elements (tests/test_large.py, ~16 GiB,
# one test at a time).
test-hardening: build
	$(PYTEST) -q -rs -m slow tests/test_install.py tests/test_large.py

# Triton kernels run on CPU tensors in the interpreter, in processes of their own (two
# workers: 3.1 instead of 5.7 min on the 2-core CI machine).
test-triton:
	TRITON_INTERPRET=1 $(PYTEST) tests/triton -n 2 -q -rs

ctest: deps
	bash tests/cpp/run_ctest.sh $(PY)

# Ahead-of-time compile of every Triton kernel for sm_80/sm_90: registers, spills, smem.
kernels-report: build
	$(PY) -m bench.kernels_report

# Before a GPU session (bench/README.md): the extension built here for the GPU machine's Python
# and torch (its image: Python 3.12, torch 2.11.0+cu130, sm_90) into .prebuilt/, which the
# device tool carries; bench/gpu_check.sh uses it while csrc/ is unchanged.
GPU_PYTHON_BASE ?= python3.12
GPU_TORCH ?= torch==2.11.0
GPU_VENV ?= .venv-gpu
gpu-prebuild:
	@test -x $(GPU_VENV)/bin/python || { $(GPU_PYTHON_BASE) -m venv $(GPU_VENV) && \
	  $(GPU_VENV)/bin/python -m pip install -q $(GPU_TORCH) numpy ninja setuptools; }
	bash bench/gpu_prebuild.sh $(GPU_VENV)/bin/python

# Verify + time (bench/README.md), then the PNG plots and the Markdown report of the run from
# its CSV (also after a WRONG result; the target still fails then).
bench: build
	$(PY) -m bench.run $(BENCH_ARGS); rc=$$?; $(PY) -m bench.plot || rc=1; \
	  $(PY) -m bench.report > /dev/null || rc=1; exit $$rc

clean:
	rm -rf build cmake-build effkernels/_C*.so .prebuilt
