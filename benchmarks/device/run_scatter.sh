#!/bin/bash
# Device call (carry [".device"] after benchmarks/device/prepare_scatter.py): the scatter GPU tests, then
# benchmarks/bench_scatter.py. Usage: bash benchmarks/device/run_scatter.sh [extra pytest files...]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl >"$OUT/pip.txt" 2>&1 \
  || { cat "$OUT/pip.txt"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
export DRRFARM_CACHE=$PWD/.device/cache DRRFARM_TABLES_NPZ=$PWD/.device/data/tables.npz
export DRRFARM_SCATTER_TABLES_NPZ=$PWD/.device/data/scatter_tables.npz
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 300 python3 -m pytest -m gpu tests/test_scatter_cuda.py "$@" -q -rA -p no:cacheprovider 2>&1 \
  | tee "$OUT/pytest_gpu.txt" | grep -E "passed|failed|PASSED|FAILED|Error|error" | tail -40
timeout 280 python3 benchmarks/bench_scatter.py --json "$OUT/bench_scatter.json" --md "$OUT/bench_scatter.md" \
  2>&1 | tee "$OUT/bench_scatter_log.txt" | tail -30
