"""How far drrfarm's defaults are from DeepDRR 1.2.2, one number per difference, on the sample chest CT.

    python benchmarks/bench_deepdrr_compat.py [--size 256] [--pixel-mm 2.8] [--json out.json]

One AP view (alpha = beta = 0) of ``sample:chest_ct`` on the CPU reference backend, with DeepDRR's C-arm
distances (SDD 1020 mm, source-isocentre 530 mm) and a detector of ``--size``² pixels covering the whole CT
(2.8 mm pixels: 372 mm at the isocentre). Materials: DeepDRR's thresholds and HU -> density fit, which are
also drrfarm's defaults. The reference image is drrfarm's default: SpekPy ``90KV_AL40``, xraydb μ/ρ, ideal
energy-integrating detector, noiseless line integral log(I0/I), trilinear march at 0.5 voxel.

Each row changes one thing toward DeepDRR (the last rows change several) and compares the line-integral
images over the pixels whose reference line integral exceeds 0.1 (the rays through the patient):
``mean`` is the mean signed relative difference, ``mean |.|`` the mean absolute one, ``max |.|`` the
largest. DeepDRR itself is not run (it needs a GPU and CuPy); its conventions are re-created from its
source (tag v1.2.2) on drrfarm's CPU reference:

* ``spectrum`` -- DeepDRR's tabulated spectrum (``deepdrr:90KV_AL40``) instead of SpekPy's;
* ``kVp bin`` -- DeepDRR keeps its table's small negative kVp bin, the ``deepdrr:`` preset drops it;
* ``mu/rho`` -- DeepDRR's μ/ρ (NIST tables, log-log interpolation) instead of xraydb's;
* ``material mixing`` -- DeepDRR weights one trilinear density by the trilinear weights of the label map
  per material; drrfarm interpolates each material's density channel;
* ``0.1 mm step`` -- DeepDRR's ray step (0.1 mm) instead of 0.5 voxel;
* ``kernel offset`` -- DeepDRR's kernel reads the volume at index p - 1 for a ray point at index p
  (both fetches; read from ``project_kernel.cu``, not run), i.e. the CT appears moved by +1 voxel on each
  index axis;
* ``centre at n/2`` -- a CT placed by its centre (DeepDRR's ``Volume.get_center`` is index n/2, drrfarm's
  ``centre_patient_mm`` is (n - 1)/2) sits -1/2 voxel off on each axis; with the kernel offset, +1/2;
* ``DeepDRR emulation`` -- all of the above (a CT placed by its centre); ``compatible mode vs emulation``
  -- what remains between drrfarm with ``deepdrr:90KV_AL40`` and that emulation, with and without the
  two placement offsets; then drrfarm's default, and the compatible mode with DeepDRR's μ/ρ added, against
  the emulation without the offsets.

Also reported: DeepDRR's noise kernel (std factor, neighbour correlations) and its ``neglog`` output
versus a min-max normalised line integral.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drrfarm import deepdrr_compat  # noqa: E402
from drrfarm import physics as phys  # noqa: E402
from drrfarm.api import load_ct  # noqa: E402
from drrfarm.geometry import CArm, world_from_patient_default  # noqa: E402
from drrfarm.materials import material_table  # noqa: E402
from drrfarm.render import reference  # noqa: E402
from drrfarm.render.cpu import spacing_of  # noqa: E402
from drrfarm.spectrum import get_spectrum  # noqa: E402
from drrfarm.volume import MaterialVolume, segment_by_thresholds  # noqa: E402

BODY_LINE_INTEGRAL = 0.1  # pixels compared: reference line integral above this
DEEPDRR_STEP_MM = 0.1  # DeepDRR's default ray step (world mm)
DEEPDRR_NOISE_KERNEL = np.array([[0.03, 0.06, 0.02], [0.11, 0.98, 0.11], [0.02, 0.06, 0.03]])  # after Wang 2014
DEEPDRR_NEGLOG_EPSILON = 0.01
# drrfarm material -> DeepDRR's table of the same NIST material
DEEPDRR_TABLE_OF = {"air": "air", "soft_tissue": "soft tissue", "bone": "bone"}


def detector_tables(energies_kev: np.ndarray, weights: np.ndarray, mu_cm2_g: np.ndarray) -> phys.DetectorTables:
    """Ideal energy-integrating detector tables from raw bins (weights may hold DeepDRR's negative bin)."""
    p = weights / weights.sum()
    signal = energies_kev * p
    return phys.DetectorTables(mu_cm2_g=mu_cm2_g, signal_weights=signal / signal.sum(), count_weights=p,
                               open_field_signal=float(signal.sum()))


def xraydb_mu(names: list[str], energies_kev: np.ndarray) -> np.ndarray:
    return material_table(names, energies_kev)


def deepdrr_mu(names: list[str], energies_kev: np.ndarray) -> np.ndarray:
    return np.stack([deepdrr_compat.mass_attenuation_cm2_g(DEEPDRR_TABLE_OF[n], energies_kev) for n in names], axis=1)


def line_integral_image(A: np.ndarray, tables: phys.DetectorTables) -> np.ndarray:
    """Noiseless log(I0/I) of material line integrals (M, H, W)."""
    tau, _ = phys.transmissions(A, tables)
    return -np.log(np.maximum(tau, phys.NOISELESS_TAU_MIN))


def drrfarm_line_integrals(packed: reference.PackedVolume, world_from_ijk: np.ndarray, camera: Any,
                           step_voxels: float) -> np.ndarray:
    """drrfarm's per-material line integrals (M, H, W) g/cm² (each material's density interpolated)."""
    return reference.line_integrals(packed, world_from_ijk, spacing_of(world_from_ijk), camera,
                                    step_voxels=step_voxels)


def deepdrr_mixing_line_integrals(mv: MaterialVolume, world_from_ijk: np.ndarray, camera: Any,
                                  step_voxels: float) -> np.ndarray:
    """DeepDRR's sampling on drrfarm's march: A_m = Σ ρ(p) w_m(p) h / 10 with ρ the trilinear density and
    w_m the trilinear weight of label m (the label map's one-hot channels, interpolated). (M, H, W)."""
    dens = mv.densities_g_cm3
    if mv.material_names[0] != "air":
        raise ValueError("expects air first: voxels of density 0 belong to it")
    labels = np.argmax(dens, axis=0)  # the one non-zero channel; density-0 voxels -> 0 (air)
    channels = np.concatenate([dens.sum(axis=0)[None],
                               np.stack([labels == m for m in range(len(dens))]).astype(np.float32)])
    del labels
    packed = reference.pack_volume(channels)
    del channels
    M_inv = reference.ijk_from_world(world_from_ijk)
    src, dirs, t_det = reference.camera_rays_ijk(camera, M_inv)
    t0, t1 = reference.clip_rays_to_box(src, dirs, packed.shape, t_det)
    h0 = step_voxels * min(spacing_of(world_from_ijk))
    out = np.zeros((len(dens), dirs.shape[0]))
    chunk = reference.RAYS_PER_CHUNK * 4
    for start in range(0, dirs.shape[0], chunk):
        sl = slice(start, start + chunk)
        for rays, values, h in reference.trilinear_samples(packed, src, dirs[sl], t0[sl], t1[sl], h0):
            v = values.double()
            out[:, start + rays] = (v[0:1] * v[1:]).sum(dim=2).numpy() * h[None, :] / 10.0
    return out.reshape(len(dens), camera.height, camera.width)


def index_shift(voxels: float) -> np.ndarray:
    """4x4 ijk -> ijk moving the content by ``voxels`` on each index axis (compose as world_from_ijk @ it)."""
    t = np.eye(4)
    t[:3, 3] = voxels
    return t


def compare(image: np.ndarray, ref: np.ndarray, body: np.ndarray) -> dict[str, float]:
    rel = (image[body] - ref[body]) / ref[body]
    return {"mean_pct": 100 * float(rel.mean()), "mean_abs_pct": 100 * float(np.abs(rel).mean()),
            "max_abs_pct": 100 * float(np.abs(rel).max())}


def noise_kernel_numbers() -> dict[str, float]:
    """DeepDRR convolves the shot noise with a 3x3 kernel: its std factor and neighbour correlations."""
    k = DEEPDRR_NOISE_KERNEL
    power = float((k * k).sum())
    return {"std_factor": power ** 0.5,
            "corr_along_rows": float((k[:, :-1] * k[:, 1:]).sum()) / power,
            "corr_along_columns": float((k[:-1, :] * k[1:, :]).sum()) / power}


def neglog_vs_line_integral(line_integral: np.ndarray, open_field_kev: float) -> float:
    """Largest difference between DeepDRR's neglog and the min-max normalised line integral (same image)."""
    intensity = np.exp(-line_integral) * open_field_kev
    neglog = phys.deepdrr_neglog(intensity, DEEPDRR_NEGLOG_EPSILON)
    li = (line_integral - line_integral.min()) / (line_integral.max() - line_integral.min())
    return float(np.abs(neglog - li).max())


def run(size: int, pixel_mm: float) -> dict[str, Any]:
    t_start = time.perf_counter()
    ct = load_ct("sample:chest_ct")
    mv = segment_by_thresholds(ct)
    names = list(mv.material_names)
    world_from_patient = world_from_patient_default(mv.centre_patient_mm())
    world_from_ijk = world_from_patient @ mv.patient_from_ijk
    carm = CArm(height=size, width=size, pixel_mm=pixel_mm)  # DeepDRR's SDD 1020 mm, SID 530 mm
    camera = carm.camera(alpha_deg=0.0, beta_deg=0.0)
    step_01mm = DEEPDRR_STEP_MM / min(spacing_of(world_from_ijk))
    packed = reference.pack_volume(mv.densities_g_cm3)
    A = {
        "default": drrfarm_line_integrals(packed, world_from_ijk, camera, 0.5),
        "step": drrfarm_line_integrals(packed, world_from_ijk, camera, step_01mm),
        "kernel offset": drrfarm_line_integrals(packed, world_from_ijk @ index_shift(1.0), camera, 0.5),
        "centre": drrfarm_line_integrals(packed, world_from_ijk @ index_shift(-0.5), camera, 0.5),
        "net offset": drrfarm_line_integrals(packed, world_from_ijk @ index_shift(0.5), camera, 0.5),
    }
    del packed
    A["mixing"] = deepdrr_mixing_line_integrals(mv, world_from_ijk, camera, 0.5)
    A["emulation"] = deepdrr_mixing_line_integrals(mv, world_from_ijk @ index_shift(0.5), camera, step_01mm)
    A["emulation aligned"] = deepdrr_mixing_line_integrals(mv, world_from_ijk, camera, step_01mm)
    spek = get_spectrum("90KV_AL40")
    compat = get_spectrum("deepdrr:90KV_AL40")
    e_raw, w_raw = deepdrr_compat.spectrum_table("90KV_AL40")
    t_spek = detector_tables(spek.energies_kev, spek.weights, xraydb_mu(names, spek.energies_kev))
    t_compat = detector_tables(compat.energies_kev, compat.weights, xraydb_mu(names, compat.energies_kev))
    t_spek_ddmu = detector_tables(spek.energies_kev, spek.weights, deepdrr_mu(names, spek.energies_kev))
    t_compat_ddmu = detector_tables(compat.energies_kev, compat.weights, deepdrr_mu(names, compat.energies_kev))
    t_raw_ddmu = detector_tables(e_raw, w_raw, deepdrr_mu(names, e_raw))

    ref = line_integral_image(A["default"], t_spek)
    body = ref > BODY_LINE_INTEGRAL
    rows: dict[str, dict[str, float]] = {
        "spectrum": compare(line_integral_image(A["default"], t_compat), ref, body),
        "kVp bin": compare(line_integral_image(A["default"], t_raw_ddmu),
                           line_integral_image(A["default"], t_compat_ddmu), body),
        "mu/rho": compare(line_integral_image(A["default"], t_spek_ddmu), ref, body),
        "spectrum + mu/rho": compare(line_integral_image(A["default"], t_compat_ddmu), ref, body),
        "material mixing": compare(line_integral_image(A["mixing"], t_spek), ref, body),
        "0.1 mm step": compare(line_integral_image(A["step"], t_spek), ref, body),
        "kernel offset (+1 voxel)": compare(line_integral_image(A["kernel offset"], t_spek), ref, body),
        "centre at n/2 (-1/2 voxel)": compare(line_integral_image(A["centre"], t_spek), ref, body),
        "both offsets (+1/2 voxel)": compare(line_integral_image(A["net offset"], t_spek), ref, body),
    }
    emulation = line_integral_image(A["emulation"], t_raw_ddmu)
    compatible = line_integral_image(A["default"], t_compat)
    rows["DeepDRR emulation"] = compare(emulation, ref, body)
    rows["compatible mode vs emulation"] = compare(compatible, emulation, body)
    aligned = line_integral_image(A["emulation aligned"], t_raw_ddmu)
    rows["compatible mode vs emulation, offsets removed"] = compare(compatible, aligned, body)
    rows["default vs emulation, offsets removed"] = compare(ref, aligned, body)
    rows["compatible + DeepDRR mu/rho vs emulation, offsets removed"] = compare(
        line_integral_image(A["default"], t_compat_ddmu), aligned, body)
    return {
        "geometry": {"size_px": size, "pixel_mm": pixel_mm, "sdd_mm": carm.sdd_mm, "sid_mm": carm.sid_mm,
                     "view": "AP"},
        "ct": {"shape": list(mv.shape), "spacing_mm": list(mv.spacing_mm)},
        "pixels_compared": int(body.sum()),
        "reference_line_integral": {"median": float(np.median(ref[body])), "max": float(ref.max())},
        "mean_energy_kev": {"spekpy_90KV_AL40": spek.mean_energy_kev, "deepdrr:90KV_AL40": compat.mean_energy_kev,
                            "deepdrr_table_as_stored": float((e_raw * w_raw).sum() / w_raw.sum())},
        "rows": rows,
        "noise_kernel": noise_kernel_numbers(),
        "neglog_vs_minmax_line_integral_max_abs": neglog_vs_line_integral(ref, t_spek.open_field_signal),
        "seconds": time.perf_counter() - t_start,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = ["| difference (toward DeepDRR 1.2.2) | mean | mean \\|.\\| | max \\|.\\| |", "|---|---:|---:|---:|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['mean_pct']:+.3f} % | {r['mean_abs_pct']:.3f} % | {r['max_abs_pct']:.3f} % |")
    n = result["noise_kernel"]
    lines += ["", f"noise kernel: std x {n['std_factor']:.4f}, neighbour correlation {n['corr_along_rows']:.3f} "
              f"along rows, {n['corr_along_columns']:.3f} along columns; neglog vs min-max line integral: "
              f"max |difference| {result['neglog_vs_minmax_line_integral_max_abs']:.3f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="detector pixels per side")
    p.add_argument("--pixel-mm", type=float, default=2.8, help="detector pixel pitch, mm")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    result = run(args.size, args.pixel_mm)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
