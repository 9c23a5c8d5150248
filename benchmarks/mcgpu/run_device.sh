#!/bin/bash
# Device call: drrfarm's scatter beside MC-GPU v1.3 (docs/scatter.md, "Scatter beside MC-GPU").
#
# On the CPU machine first: stage MC-GPU into the git-ignored .device/mcgpu/ (its stage.sh, from a snapshot of
# the public MC-GPU repositories) and record the spectrum and drrfarm's tables with
# `python benchmarks/mcgpu/prepare.py`. Then, from the repository root on the GPU host:
#   bash benchmarks/mcgpu/run_device.sh          # carry .device/ct, .device/wmin, .device/mcgpu
# Steps: pycuda from .device/wmin; MC-GPU compiled by .device/mcgpu/build.sh; inputs (make_inputs.py; the chest
# CT from the packed .device/ct/chest, else /tmp/ct/ct.nii); MC-GPU on the slab and on the chest
# (each for a fixed number of GPU seconds); compare.py. Everything lands in $OUT: run_device.log,
# mcgpu_slab.log, mcgpu_chest.log, mcgpu_compare.json, mcgpu_compare.md, mcgpu_images.npz.
# Knobs: MCGPU_SLAB_SECONDS (40), MCGPU_CHEST_SECONDS (140), RUN_DEVICE_BUDGET_S (530: every step is cut to
# finish by then), COMPARE_ARGS (extra compare.py arguments). A rehearsal without GPU:
#   MCGPU_BUILD_ARGS=--cpu MCGPU_SLAB_SECONDS=1000000 MCGPU_CHEST_SECONDS=300000 RUN_DEVICE_BUDGET_S=100000 \
#   COMPARE_ARGS="--backend cpu --quick" OUT=/tmp/o bash benchmarks/mcgpu/run_device.sh
# (MC-GPU's CPU build takes histories, not seconds.)
set -uo pipefail
START=$(date +%s)
OUT=${OUT:-/tmp/out}
W=${MCGPU_WORK:-/tmp/mcgpu}
mkdir -p "$OUT" "$W"
exec > >(tee "$OUT/run_device.log") 2>&1
STAGE=$PWD/.device/mcgpu
SLAB_S=${MCGPU_SLAB_SECONDS:-40}
CHEST_S=${MCGPU_CHEST_SECONDS:-140}
DEADLINE=$((START + ${RUN_DEVICE_BUDGET_S:-530}))
left() { echo $((DEADLINE - $(date +%s))); }
cap() { local a=$1 b=$2; [ "$b" -lt "$a" ] && a=$b; [ "$a" -lt 1 ] && a=1; echo "$a"; }
stamp() { echo "== $(( $(date +%s) - START )) s: $*"; }

stamp "host"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nvcc --version | tail -1
python3 --version; nproc; df -h /tmp | tail -1
[ -f "$STAGE/src/MC-GPU_v1.3.cu" ] || { echo "no $STAGE/src: run .device/mcgpu/stage.sh here first"; exit 2; }
[ -f "$STAGE/tables.npz" ] || { echo "no $STAGE/tables.npz: run benchmarks/mcgpu/prepare.py here first"; exit 2; }

stamp "python packages (.device/wmin)"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wmin/*.whl >"$W/pip.txt" 2>&1 \
  || { tail -5 "$W/pip.txt"; echo "pip failed: drrfarm's CUDA backend needs pycuda"; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DRRFARM_CACHE=/tmp/drrfarm-cache
mkdir -p "$DRRFARM_CACHE"
[ -d "$STAGE/cache" ] && cp -r "$STAGE/cache/." "$DRRFARM_CACHE/"

stamp "MC-GPU build"
# shellcheck disable=SC2086
bash "$STAGE/build.sh" "$W/bin/MC-GPU_v1.3.x" ${MCGPU_BUILD_ARGS:-} || { echo "MC-GPU build failed"; BUILD_FAILED=1; }
mkdir -p "$W/materials"
for f in "$STAGE"/materials/*.mcgpu.gz; do
  python3 -c "import gzip,shutil,sys; shutil.copyfileobj(gzip.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    "$f" "$W/materials/$(basename "$f" .gz)"
done
ls -la "$W/materials"

stamp "inputs"
CT=$PWD/.device/ct/chest  # packed int16 HU + affine (lzma + numpy); the same voxels as /tmp/ct/ct.nii
[ -f "$CT.npy.xz" ] || CT=/tmp/ct/ct.nii
python3 benchmarks/mcgpu/make_inputs.py --out "$W/inputs" --materials "$W/materials" --stage "$STAGE" --ct "$CT" \
  --slab-budget "$SLAB_S" --chest-budget "$CHEST_S" || echo "make_inputs failed"

run_mcgpu() {  # case, GPU seconds, reserve for the steps after it
  local case=$1 secs=$2 reserve=$3 t
  t=$(cap $((2 * secs + 90)) $(( $(left) - reserve )))
  stamp "MC-GPU $case: $secs s requested, timeout $t s"
  if [ -z "${BUILD_FAILED:-}" ] && [ -f "$W/inputs/$case/mcgpu.in" ]; then
    (cd "$W/inputs/$case" && timeout "$t" "$W/bin/MC-GPU_v1.3.x" mcgpu.in) >"$OUT/mcgpu_$case.log" 2>&1
    echo "exit $?"
    grep -E "Simulated x rays|Speed \[x-rays|Estimated GPU speed|Executing|ERROR|[Ee]rror|GPU detected|Compute cap" \
      "$OUT/mcgpu_$case.log" | head -14
    ls -la "$W/inputs/$case"/mcgpu_image.dat* 2>/dev/null
  fi
}
run_mcgpu slab "$SLAB_S" $(( $(cap "$CHEST_S" 600) + 260 ))
run_mcgpu chest "$CHEST_S" 170

T=$(cap 400 $(( $(left) - 5 )))
stamp "compare.py (drrfarm on the GPU; time limit $((T - 20)) s, timeout $T s)"
# shellcheck disable=SC2086
timeout "$T" python3 benchmarks/mcgpu/compare.py --inputs "$W/inputs" --out "$OUT" --stage "$STAGE" --backend cuda \
  --time-limit $((T - 20)) ${COMPARE_ARGS:-}
echo "compare exit $?"
stamp "done"
ls -la "$OUT"
sleep 1  # let tee flush run_device.log
