"""One render launch to profile with Nsight Compute (run under ncu on the GPU host).

python benchmarks/device/profile_kernel.py [mono|realistic] [size] [fused 0|1]: warm-up launches, then
one measured launch of 16 AP images; profile with
``ncu --kernel-name regex:drr_ --launch-skip 4 --launch-count 1 ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "device"))

from bench_render import cameras  # noqa: E402
from tables import load_tables  # noqa: E402

from drrfarm.geometry import world_from_patient_default  # noqa: E402
from drrfarm.physics import Physics  # noqa: E402
from drrfarm.render.cuda import CudaBackend  # noqa: E402
from drrfarm.samples.downloads import chest_ct  # noqa: E402
from drrfarm.volume import MaterialVolume, load_volume, segment_by_thresholds  # noqa: E402


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "mono"
    size = sys.argv[2] if len(sys.argv) > 2 else "1024"
    fused = bool(int(sys.argv[3])) if len(sys.argv) > 3 else False
    volume = load_volume(chest_ct())
    mv = segment_by_thresholds(volume)
    if mode == "mono":
        mv = MaterialVolume(["soft_tissue"], mv.densities_g_cm3.sum(axis=0, keepdims=True), mv.patient_from_ijk,
                            mv.volume_sha256, {})
        tables, physics, dtype = load_tables("mono:60", mv.material_names, "ideal"), Physics(method="joseph"), "float16"
    else:
        tables = load_tables("90KV_AL40@20", mv.material_names, "ideal")
        physics, dtype = Physics(method="joseph", photons=1e4), "uint16"
    be = CudaBackend(device=0, fused=fused)
    h = be.prepare(mv, world_from_patient_default(volume.centre_patient_mm()))
    cams = cameras(size, "AP", 16)
    for _ in range(3):
        be.render_async(h, cams, tables, physics, list(range(16)), dtype=dtype, to_host=False).wait()
    be.render_async(h, cams, tables, physics, list(range(16)), dtype=dtype, to_host=False).wait()
    print("profiled", mode, size, "fused" if fused else "unfused")


if __name__ == "__main__":
    main()
