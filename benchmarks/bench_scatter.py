"""Scatter benchmark on a GPU: Monte Carlo photons/s on the chest CT, the fast estimate's cost and
accuracy against a high-count Monte Carlo, and the 20 cm water slab's scatter-to-primary ratio.

    python benchmarks/bench_scatter.py --json out.json --md out.md

Tables come from xraydb/xraylib/SpekPy when installed, else from ``$DRRFARM_SCATTER_TABLES_NPZ``
(``benchmarks/device/prepare_scatter.py``). Times are CUDA-event kernel times unless named ``wall``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from scatter_cases import axis_camera, slab_volume, tables_for  # noqa: E402


def chest(path: str | None = None) -> tuple:
    """(material volume, world_from_patient, its Monte Carlo volume's maker) of the sample chest CT (or the CT
    at ``path``)."""
    from drrfarm.geometry import world_from_patient_default
    from drrfarm.samples.downloads import chest_ct
    from drrfarm.scatter import ScatterVolume
    from drrfarm.volume import load_volume, segment_by_thresholds

    vol = load_volume(path or str(chest_ct()))
    mv = segment_by_thresholds(vol)
    wfp = world_from_patient_default(vol.centre_patient_mm())
    return mv, wfp, lambda: ScatterVolume(mv.densities_g_cm3, wfp @ mv.patient_from_ijk, mv.material_names)


def backend_throughput(mv, wfp, cams: list, tables, photons: int) -> list[dict]:
    """images/s of ``CudaBackend.render`` (batch of ``cams``, float32 to the host) with scatter none / fast.

    Where xraydb/SpekPy are missing (GPU hosts), the tables come from the shipped npz files."""
    import drrfarm.physics
    import drrfarm.scatter
    from drrfarm.physics import Physics
    from drrfarm.render.cuda import CudaBackend
    from drrfarm.spectrum import Spectrum

    sys.path.insert(0, str(ROOT / "benchmarks" / "device"))
    from tables import load_tables

    cdf = tables.spectrum_cdf
    spectrum = Spectrum(tables.spectrum_kev, np.diff(np.concatenate([[0.0], cdf])), name="90KV_AL40")
    drrfarm.scatter.transport_tables = lambda s, names, physics: tables
    drrfarm.physics.detector_tables = lambda s, names, physics: load_tables("90KV_AL40", list(names), physics.detector)
    backend = CudaBackend(device=0)
    handle = backend.prepare(mv, wfp)
    out = []
    # the primary render's kernel alone (CUDA events around one launch, images left on the GPU): the yardstick of
    # the fast scatter estimate's cost
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_render import kernel_rate

    plain = Physics(output="line_integral")
    detector = drrfarm.physics.detector_tables(spectrum, list(mv.material_names), plain)  # outside the timing
    rate = kernel_rate(backend, handle, cams, detector, plain, "float32")
    out.append({"kind": "primary_kernel", "images": len(cams), "size": cams[0].height,
                "kernel_ms_per_image": 1e3 / rate})
    print(json.dumps(out[-1]), flush=True)
    for mode in ("none", "fast"):
        physics = Physics(output="line_integral", photons=10_000.0, scatter=mode, scatter_photons=photons)
        seeds = list(range(len(cams)))
        backend.render(handle, cams, spectrum, physics, seeds)  # warm-up (kernels, coarse volume)
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            backend.render(handle, cams, spectrum, physics, seeds)
        wall = (time.perf_counter() - t0) / reps
        out.append({"kind": "backend_throughput", "scatter": mode, "images": len(cams),
                    "images_per_s": len(cams) / wall, "ms_per_image": 1e3 * wall / len(cams)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--ct", help="CT file (default: the sample chest CT)")
    ap.add_argument("--reference-photons", type=int, default=200_000_000)
    ap.add_argument("--fast-photons", type=int, default=None, help="fast estimate histories (default: its default)")
    args = ap.parse_args()
    from drrfarm.scatter import default_photons

    args.fast_photons = args.fast_photons or default_photons("fast", "cuda")

    from drrfarm.geometry import CArm
    from drrfarm.physics import Physics
    from drrfarm.scatter import ScatterEstimator
    from drrfarm.scatter.cuda import CudaScatter

    mv, wfp, make = chest(args.ct)
    tables = tables_for("90KV_AL40", mv.material_names)
    est = ScatterEstimator("cuda")
    gpu: CudaScatter = est._gpu
    rows: list[dict] = []
    size = args.size
    pixel = 298.0 / size
    views = {"AP": (0.0, 0.0), "lateral": (90.0, 0.0), "oblique": (30.0, 15.0)}

    # 1. Monte Carlo throughput (full-resolution CT, 64x64 tally)
    full = est.volume("chest", make)
    res = gpu.resident("chest/full", full)
    gpu.simulate(res, tables, [CArm(height=size, width=size, pixel_mm=pixel).camera(0, 0)], 1_000_000, [0],
                 tally_shape=(64, 64))  # warm-up
    for view, (a, b) in views.items():
        cam = CArm(height=size, width=size, pixel_mm=pixel).camera(a, b)
        for n in (10_000_000, 100_000_000):
            t = gpu.simulate(res, tables, [cam], n, [1], tally_shape=(64, 64))[0]
            rows.append({"kind": "mc", "view": view, "photons": n, "seconds": t.seconds,
                         "photons_per_s": n / t.seconds, "interactions": t.interactions,
                         "spr_mean": float(t.scatter_signal.sum() / max(t.primary_signal.sum(), 1e-30))})
            print(json.dumps(rows[-1]), flush=True)

    # 2. fast estimate vs the reference Monte Carlo (its grid interpolated to the reference's 32x32 grid, upsampled)
    for view, (a, b) in views.items():
        cam = CArm(height=size, width=size, pixel_mm=pixel).camera(a, b)
        ref = est.estimate("chest", make, [cam], None, Physics(scatter="monte_carlo",
                           scatter_photons=args.reference_photons, scatter_bins=32), [11], tables=tables)[0]
        fast = est.estimate("chest", make, [cam], None, Physics(scatter="fast", scatter_photons=args.fast_photons),
                            [12], tables=tables)[0]
        rel = np.abs(fast.signal - ref.signal) / ref.signal
        rows.append({"kind": "fast_vs_mc", "view": view, "reference_photons": args.reference_photons,
                     "fast_photons": args.fast_photons, "mean_rel_error": float(rel.mean()),
                     "p95_rel_error": float(np.percentile(rel, 95)), "reference_kernel_s": ref.tally.seconds,
                     "fast_kernel_s": fast.tally.seconds, "cost_ratio": ref.tally.seconds / fast.tally.seconds,
                     "fast_wall_s": fast.seconds})
        print(json.dumps(rows[-1]), flush=True)

    # 2b. the fast estimate's accuracy and cost against its number of histories (AP and lateral)
    for view in ("AP", "lateral"):
        a, b = views[view]
        cam = CArm(height=size, width=size, pixel_mm=pixel).camera(a, b)
        ref = est.estimate("chest", make, [cam], None, Physics(scatter="monte_carlo",
                           scatter_photons=args.reference_photons, scatter_bins=32), [21], tables=tables)[0]
        for n in (5_000, 10_000, 20_000, 40_000):
            errs = []
            for seed in (31, 32, 33):
                fast = est.estimate("chest", make, [cam], None, Physics(scatter="fast", scatter_photons=n), [seed],
                                    tables=tables)[0]
                errs.append(float(np.mean(np.abs(fast.signal - ref.signal) / ref.signal)))
            rows.append({"kind": "fast_photons", "view": view, "fast_photons": n,
                         "mean_rel_error": float(np.mean(errs)), "worst_of_3": float(np.max(errs)),
                         "fast_kernel_s": fast.tally.seconds})
            print(json.dumps(rows[-1]), flush=True)

    # 3. fast estimate throughput: a batch of 16 poses per call, end to end (kernels + upsampling)
    cams = [CArm(height=size, width=size, pixel_mm=pixel).camera(a, 0.0) for a in np.linspace(-30, 30, 16)]
    phys = Physics(scatter="fast", scatter_photons=args.fast_photons)
    est.estimate("chest", make, cams[:2], None, phys, [0, 1], tables=tables)
    t0 = time.perf_counter()
    out = est.estimate("chest", make, cams, None, phys, list(range(16)), tables=tables)
    wall = time.perf_counter() - t0
    kernel = sum(o.tally.seconds for o in out)
    rows.append({"kind": "fast_throughput", "images": 16, "size": size, "photons": args.fast_photons,
                 "wall_s": wall, "images_per_s": 16 / wall, "kernel_s_per_image": kernel / 16})
    print(json.dumps(rows[-1]), flush=True)

    # 3b. the CUDA backend end to end (render + scatter + finish on the GPU, images to the host), batch 16
    rows += backend_throughput(mv, wfp, cams, tables, args.fast_photons)

    # 4. the 20 cm water slab (30 x 30 cm field, 90 kVp / 2.5 mm Al, no air gap, no grid)
    slab = gpu.resident("slab20", slab_volume(200.0, 500.0, 1000.0, gap_mm=0.0))
    t = gpu.simulate(slab, tables_for("tube:90:2.5", ["water"]), [axis_camera(300.0, 60)], 100_000_000, [3],
                     tally_shape=(5, 5))[0]
    rows.append({"kind": "slab_spr", "photons": 100_000_000, "seconds": t.seconds,
                 "spr_centre": float(t.scatter_signal[2, 2] / t.primary_signal[2, 2]),
                 "spr_corner": float(t.scatter_signal[0, 0] / t.primary_signal[0, 0]),
                 "energy_balance": (t.energy_kev["emitted"] - t.energy_kev["deposited"] - t.energy_kev["escaped"])
                 / t.energy_kev["emitted"]})
    print(json.dumps(rows[-1]), flush=True)

    if args.json:
        args.json.write_text(json.dumps({"device": gpu.gpu.name, "rows": rows}, indent=1))
    if args.md:
        lines = ["| measurement | value |", "|---|---|"]
        for r in rows:
            lines.append(f"| {r['kind']} {r.get('view', '')} | " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                if k not in ("kind", "view")) + " |")
        args.md.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
