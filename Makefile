# Two commands a newcomer needs: `make demo` and `make test`. Each works alone on a
# fresh machine: it creates .venv, installs the pinned dependencies and builds the
# extension (`pip install --no-build-isolation -e .`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Exact pins: torch/torchvision come from wheels on local disk; a looser pin downloads
# a different multi-GB build.
DEPS := torch==2.14.1 torchvision==0.29.1 triton==3.8.0 numpy scikit-learn tqdm matplotlib \
        pytest pytest-benchmark expecttest ninja setuptools wheel
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')
export MAX_JOBS ?= 2

.PHONY: demo test test-core test-triton test-cmake bench clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS)
	touch $@

# Rebuilds the extension whenever a C++/CUDA source or setup.py changes.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# The main job's default run: structured constrained L0 on an MLP over scikit-learn's
# digits, 30% density target (7-9 s on 2 cores); prints where the report is.
demo: $(VENV)/.built
	rm -rf runs/demo
	$(PY) -m sparsekern train --method l0 --structured --model mlp --data digits --density 0.3 \
		--epochs 30 --optimizer adam --lr 3e-3 --weight-decay 0 --gate-lr 0.1 --dual-lr 0.5 --out runs/demo

# The whole suite. Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be
# set before triton is imported, so they get their own pytest process.
# The core suite runs last so the closing summary line is the largest one.
test: test-cmake test-triton test-core

test-core: $(VENV)/.built
	$(PY) -m pytest python_tests -m "not triton and not cmake" -q

test-triton: $(VENV)/.built
	TRITON_INTERPRET=1 $(PY) -m pytest python_tests -m triton -q

test-cmake: $(VENV)/.built
	$(PY) -m pytest python_tests -m cmake -q

# Every bench/bench_*.py; tables in bench/results/ (README.md collects them).
bench: $(VENV)/.built
	$(PY) -m sparsekern bench

clean:
	rm -rf build build-cmake *.egg-info sparsekern/*.so $(VENV)/.built
