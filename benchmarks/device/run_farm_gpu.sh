#!/bin/bash
# The farm end to end on a one-GPU host (device call, from the repository root, carrying .device):
# GPU tests, then benchmarks/bench_farm_gpu.py on the end-to-end specs.
#
# .device/ holds (prepared on a CPU machine with drrfarm installed, SpekPy and xraydb included):
#   wheels/cuda13-cp312/   pycuda + a slim Ray and their dependencies for the host's Python
#   gpu-farm/              the e2e specs (CT_PATH / OUT_URL placeholders), pack_ct.py, and site/: a spekpy
#                          stand-in and sitecustomize.py that answer SpekPy / xraydb from tables.pkl
#   tables.pkl             those answers, recorded for the specs (gpu-farm/record_tables.py)
#   data/tables.npz        detector tables of tests/test_cuda.py (benchmarks/device/tables.py)
#   ct/chest.*             the sample chest CT, packed (gpu-farm/pack_ct.py)
#
#   bash benchmarks/device/run_farm_gpu.sh "TESTS" SPEC_NAME... [-- bench args]
# TESTS: pytest files for -m gpu ("" for none); SPEC_NAME: e2e-1024, e2e-512, e2e-1024-png; TAG (env):
# suffix of the result files. The memory run: TAG=-20k run_farm_gpu.sh "" e2e-1024 -- --images 20000
set -u
source "$(dirname "${BASH_SOURCE[0]}")/farm_env.sh"
tests=$1; shift
if [[ -n $tests ]]; then
  timeout 300 python3 -m pytest -m gpu $tests -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25
fi
specs=(); while [[ $# -gt 0 && $1 != -- ]]; do specs+=("/tmp/specs/$1.yaml"); farm_spec "$1"; shift; done
[[ ${1:-} == -- ]] && shift
if [[ ${#specs[@]} -gt 0 ]]; then
  python3 benchmarks/bench_farm_gpu.py "${specs[@]}" --output /tmp/sweeps --json "$OUT/bench_farm_gpu${TAG:-}.json" "$@" \
    2>&1 | tee "$OUT/bench_farm_gpu${TAG:-}.txt" | grep -v "^\s*$" | tail -40
fi
