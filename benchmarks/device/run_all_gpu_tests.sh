#!/bin/bash
# Device call (carry [".device"] after benchmarks/device/prepare_scatter.py): every GPU test of the repository.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl >"$OUT/pip.txt" 2>&1 \
  || { cat "$OUT/pip.txt"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
export DRRFARM_CACHE=$PWD/.device/cache DRRFARM_TABLES_NPZ=$PWD/.device/data/tables.npz
export DRRFARM_SCATTER_TABLES_NPZ=$PWD/.device/data/scatter_tables.npz
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
FILES=${GPU_TEST_FILES:-tests/test_cuda.py tests/test_cuda_meshes.py tests/test_mesh_cuda.py tests/test_scatter_cuda.py tests/test_kernels_compile.py}
timeout 540 python3 -m pytest -m gpu $FILES -q -rA -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest_gpu_all.txt" \
  | grep -E "passed|failed|PASSED|FAILED|SKIPPED|Error" | tail -80
