#!/bin/bash
# Runs on the GPU host (device tool), from the repository root, with .device carried.
# Usage: bash benchmarks/device/run_gpu.sh [tests|bench|all] [extra bench args...]
set -uo pipefail
what=${1:-all}; shift || true
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl >"$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; exit 3; }
mkdir -p /tmp/site/torchio
printf 'class ScalarImage:  # stub: nanodrr imports these names; the benchmark builds Subject directly\n    pass\n\n\nclass LabelMap:\n    pass\n' >/tmp/site/torchio/__init__.py
export PYTHONPATH=/tmp/site:$PWD
export DRRFARM_CACHE=$PWD/.device/cache DRRFARM_TABLES_NPZ=$PWD/.device/data/tables.npz
export DRRFARM_GPU_REPORT=$OUT/gpu_numbers.txt
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >"$OUT/nvidia_smi.txt" 2>&1
cat "$OUT/nvidia_smi.txt"
python3 -c "import pycuda.driver as d; d.init(); print('pycuda', d.get_version(), d.get_driver_version(), d.Device(0).name())"
if [[ $what == tests || $what == all ]]; then
  timeout 420 python3 -m pytest -m gpu tests/test_cuda.py -q -rA -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -60
fi
if [[ $what == bench || $what == all ]]; then
  timeout 400 python3 benchmarks/bench_render.py --json "$OUT/bench.json" --md "$OUT/bench.md" "$@" 2>&1 | tee "$OUT/bench_log.txt" | tail -80
fi
