#!/bin/bash
# The loaders feeding training on a one-GPU host (device call, from the repository root, carrying .device like
# run_farm_gpu.sh: ct, data, gpu-farm, tables.pkl, wheels): the e2e-512 and e2e-1024 sweeps written by
# `drrfarm sweep` (4,000 images each, noisy and noiseless, local disk), benchmarks/bench_loader.py on them
# (Ray Data, the torch dataset and one-process decode, scaling over 2..16 CPUs), then jobs/train_pose.py on
# the 512² sweep streamed from the Ray Data loader, reporting images/s and the GPU's utilisation per epoch.
#
#   bash benchmarks/device/run_loader_gpu.sh [bench_loader.py args...]
# env: SPECS (default "e2e-512 e2e-1024"), CPUS (default "2 4 8 16"), TRAIN (train_pose.py arguments after
# --dataset; "" skips training), TAG (suffix of the result files in $OUT), BENCH_TIMEOUT / TRAIN_TIMEOUT (s).
set -u
source "$(dirname "${BASH_SOURCE[0]}")/farm_env.sh"
specs=${SPECS:-"e2e-512 e2e-1024"}
urls=()
for s in $specs; do
  farm_spec "$s"
  rm -rf "/tmp/sweeps/$s"
  t0=$(date +%s)
  python3 -m drrfarm.cli sweep "/tmp/specs/$s.yaml" --quiet --json >"$OUT/sweep_$s.json" 2>"$OUT/sweep_$s.err"
  rc=$?
  echo "sweep $s: rc=$rc in $(( $(date +%s) - t0 )) s; $(du -sh "/tmp/sweeps/$s" 2>/dev/null | cut -f1)"
  [[ $rc -eq 0 ]] || tail -5 "$OUT/sweep_$s.err"
  [[ -d /tmp/sweeps/$s/_manifest ]] && urls+=("/tmp/sweeps/$s")
done
args=(--cpus ${CPUS:-2 4 8 16} --markdown --json "$OUT/bench_loader${TAG:-}.json")
[[ ${#urls[@]} -gt 0 ]] && args+=(--dataset "${urls[@]}")  # else synthetic shards (bench_loader.py --sizes)
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_loader.py "${args[@]}" "$@" 2>&1 | tee "$OUT/bench_loader${TAG:-}.txt" \
  | grep -v "^\s*$" | grep -v "WARNING\|Token auth" | tail -60
train=${TRAIN-"--epochs 3 --batch-size 64 --image-size 256 --width 64 --materialize no"}
if [[ -n $train && -d /tmp/sweeps/e2e-512/_manifest ]]; then
  # shellcheck disable=SC2086
  timeout "${TRAIN_TIMEOUT:-300}" python3 jobs/train_pose.py --dataset /tmp/sweeps/e2e-512 --no-tracking $train \
    --output-json "$OUT/train_pose${TAG:-}.json" >"$OUT/train_pose${TAG:-}.txt" 2>&1
  echo "train_pose rc=$? ($train)"; grep -E "^epoch|error" "$OUT/train_pose${TAG:-}.txt" | tail -12
fi
