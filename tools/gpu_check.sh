#!/usr/bin/env bash
# The GPU check, prepared for one call of the device tool on a lent machine (its CUDA image holds python3 with a
# CUDA torch, nvcc, cmake, ninja, scikit-build-core, pybind11, pytest, pytest-benchmark, hypothesis, matplotlib):
# build lowbit for sm_90 against that torch, run the gpu tests, the CUDA benchmarks, then the rest of the suite,
# each step under its own time limit so that one slow step leaves the others their time. Everything lands in
# $OUT: build.log, gpu-tests.log, bench.log, rest-tests.log and the benchmark results <device>.json / .png (copy
# them to bench/results/). From a session: run(command="bash tools/gpu_check.sh", timeout_s=570).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export LOWBIT_CUDA=ON LOWBIT_CUDA_ARCHS=90 PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16 OMP_NUM_THREADS=8
start=$SECONDS
step() { echo "== $1 (at ${SECONDS}s, rc of the last step: $2)"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/build.log"
device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
timeout 240 python3 -m pip install --no-build-isolation --no-deps -v . >>"$OUT/build.log" 2>&1
rc=$?
python3 -c "import json, lowbit; print(json.dumps(lowbit.build_info()))" 2>&1 | tee -a "$OUT/build.log"
step "gpu tests" $rc
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests >"$OUT/gpu-tests.log" 2>&1
rc=$?
tail -5 "$OUT/gpu-tests.log"
step "CUDA benchmarks" $rc
timeout 150 python3 -m lowbit.cli bench --bench-dir bench --families cuda_gemm,cuda_kernels \
  --out "$OUT/$device" >"$OUT/bench.log" 2>&1
rc=$?
grep -A30 "GEMV (M=1) speedup" "$OUT/bench.log"
step "the rest of the suite (no bundled model there: its tests fail)" $rc
left=$((540 - (SECONDS - start)))
timeout $((left > 10 ? left : 10)) python3 -m pytest -q -m "not gpu" -p no:cacheprovider -o addopts="" \
  tests >"$OUT/rest-tests.log" 2>&1
rc=$?
tail -5 "$OUT/rest-tests.log"
step "done" $rc
