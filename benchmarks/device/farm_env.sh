# The environment of a farm run on the GPU host (sourced by run_farm_gpu.sh): wheels installed under
# /tmp/site, SpekPy / xraydb answers replayed from .device/tables.pkl, the sample CT unpacked to
# /tmp/ct/ct.nii, and specs NAME filled in as /tmp/specs/NAME.yaml (farm_spec NAME).
D=$PWD/.device; W=${FARM_WHEELS:-$D/wheels/cuda13-cp312}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/site /tmp/ct /tmp/specs
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ls "$W"/ray-*.tar.xz >/dev/null 2>&1 && tar -xJf "$W"/ray-*.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$W"/*.whl >"$OUT/pip.txt" 2>&1 || cat "$OUT/pip.txt"
export PYTHONPATH=$D/gpu-farm/site:/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export DRRFARM_REPLAY_TABLES=$D/tables.pkl DRRFARM_TABLES_NPZ=$D/data/tables.npz DRRFARM_CACHE=/tmp/drrfarm-cache
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; df -h /tmp | tail -1
python3 "$D/gpu-farm/pack_ct.py" unpack "$D/ct/chest" /tmp/ct/ct.nii >/dev/null
farm_spec() { sed -e "s#CT_PATH#/tmp/ct/ct.nii#" -e "s#OUT_URL#/tmp/sweeps/$1#" "$D/gpu-farm/$1.yaml" >"/tmp/specs/$1.yaml"; }
