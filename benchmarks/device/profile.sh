#!/bin/bash
# Device call: Nsight Compute on the march kernel (mono and realistic, 1024² AP, batch 16).
# Run after run_gpu.sh has installed the wheels (it leaves /tmp/site).
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD DRRFARM_CACHE=$PWD/.device/cache DRRFARM_TABLES_NPZ=$PWD/.device/data/tables.npz
for m in mono realistic; do
  timeout 90 ncu --clock-control none --kernel-name regex:drr_march --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SchedulerStats \
    python3 benchmarks/device/profile_kernel.py $m 1024 0 >"$OUT/ncu_$m.txt" 2>&1
  grep -E "Duration|L1/TEX Cache Throughput|Achieved Occupancy|Registers Per|L1/TEX Hit|L2 Hit|Issued Warp|Eligible Warps|stalled" "$OUT/ncu_$m.txt"
done
