#!/bin/bash
# Device call (carry [".device"] after benchmarks/device/prepare_scatter.py): the scatter GPU tests, then
# benchmarks/bench_scatter.py. Usage: bash benchmarks/device/run_scatter.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
GPU_TEST_FILES=tests/test_scatter_cuda.py bash "$(dirname "$0")/run_all_gpu_tests.sh"
export PYTHONPATH=/tmp/site:$PWD DRRFARM_CACHE=$PWD/.device/cache PYTHONUNBUFFERED=1
export DRRFARM_SCATTER_TABLES_NPZ=$PWD/.device/data/scatter_tables.npz DRRFARM_TABLES_NPZ=$PWD/.device/data/tables.npz
timeout 280 python3 benchmarks/bench_scatter.py --json "$OUT/bench_scatter.json" --md "$OUT/bench_scatter.md" \
  2>&1 | tee "$OUT/bench_scatter_log.txt" | tail -30
