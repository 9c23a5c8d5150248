#!/bin/bash
# Device call: the GPU tests, then the full benchmark (--tune re-checks the build options; nanodrr in the same run).
# Usage (device tool, carry [".device"] after benchmarks/device/prepare_data.py): bash benchmarks/device/full_run.sh
set -uo pipefail
bash benchmarks/device/run_gpu.sh tests >/dev/null 2>&1; tail -4 "$OUT/pytest_gpu.txt"
export PYTHONPATH=/tmp/site:$PWD DRRFARM_CACHE=$PWD/.device/cache DRRFARM_TABLES_NPZ=$PWD/.device/data/tables.npz
export PYTHONUNBUFFERED=1
timeout 340 python3 benchmarks/bench_render.py --tune --min-time 0.3 --json "$OUT/bench.json" --md "$OUT/bench.md" \
  >"$OUT/bench_log.txt" 2>&1; echo "bench rc=$?"; grep -E "^\{\"mode\"|failed" "$OUT/bench_log.txt"; cat "$OUT/bench.md"
