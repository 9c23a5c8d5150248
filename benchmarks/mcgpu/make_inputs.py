"""Write MC-GPU v1.3 inputs for the drrfarm-vs-MC-GPU scatter comparison (numpy; drrfarm's own functions when
drrfarm is importable, a numpy replica of them otherwise).

    python benchmarks/mcgpu/make_inputs.py --out /tmp/mcgpu/inputs --materials /tmp/mcgpu/materials \\
        [--ct /tmp/ct/ct.nii | --ct .device/ct/chest] [--cases slab,chest] [--slab-budget 60] [--chest-budget 120]

Cases (``<out>/<case>/``: ``mcgpu.in``, ``phantom.vox``, ``phantom.npz`` for ``compare.py``, ``case.json``):

* ``slab``: 20 cm of water, 50 x 50 cm, 1 cm voxels, its exit face on the detector (no air gap), a point source
  1 m from the detector, the field collimated to the 30 x 30 cm detector (60 x 60 pixels of 5 mm): the geometry of
  ``tests/test_scatter.py`` (``slab_volume(200, 500, 1000, gap_mm=0)``, ``axis_camera(300, 60)``);
* ``chest``: the sample chest CT segmented as drrfarm's default sweep does (``segment_by_thresholds``: HU <= -800
  air, <= 350 soft tissue, above bone; density from HU by ``hu_to_density_g_cm3``), placed HFS with its centre at
  the isocentre (``world_from_patient_default``), seen AP by the default C-arm (``CArm()``: SDD 1020 mm, SID
  530 mm, alpha = beta = 0) on a 29.8 cm detector of 64 x 64 pixels (4.656 mm; drrfarm's Monte Carlo tallies a
  1024-pixel detector on the same 64 x 64 grid).

Both simulators get the same phantom: densities are rounded to 1e-5 g/cm³ (empty voxels get 1e-5, MC-GPU rejects
zero) and ``phantom.npz`` holds exactly what the voxel file holds. Materials map to MC-GPU's PENELOPE files by
``mcgpu_io.MCGPU_MATERIAL``; the spectrum (90 kVp, 2.5 mm Al, SpekPy) is the table ``prepare.py`` recorded.
``--*-budget``: MC-GPU's first input value, histories (>= 1e5) or seconds of simulation (< 95 000; GPU builds).
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import mcgpu_io as mio  # noqa: E402

DEFAULT_STAGE = ROOT / ".device" / "mcgpu"
CHEST_DETECTOR_MM = 298.0
CHEST_PIXELS = 64
SLAB_PIXELS = 60
SEEDS = {"slab": 1234567890, "chest": 987654321}


def _drrfarm() -> bool:
    try:
        sys.path.insert(0, str(ROOT))
        import drrfarm.geometry  # noqa: F401
        import drrfarm.volume  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------- slab

def slab_case() -> dict[str, Any]:
    """The water slab of ``tests/test_scatter.py``: (material index, density, world_from_ijk, names, camera)."""
    thickness, lateral, sdd, voxel = 200.0, 500.0, 1000.0, 10.0
    if _drrfarm():
        sys.path.insert(0, str(ROOT / "tests"))
        from scatter_cases import axis_camera, slab_volume

        vol = slab_volume(thickness, lateral, sdd, gap_mm=0.0)
        cam = axis_camera(300.0, SLAB_PIXELS)
        dens = np.asarray(vol.densities_g_cm3[0], dtype=np.float32)
        A = vol.world_from_ijk
        K, R, t = cam.K, cam.R, cam.t
        pixel_mm = cam.pixel_mm
    else:  # the same numbers without drrfarm
        n = (round(lateral / voxel), round(lateral / voxel), round(thickness / voxel))
        sp = np.array([voxel, voxel, thickness / n[2]])
        A = np.eye(4)
        A[:3, :3] = np.diag(sp)
        A[:3, 3] = np.array([0.0, 0.0, sdd - thickness / 2.0]) - sp * (np.asarray(n) - 1) / 2.0
        dens = np.ones(n, np.float32)
        pixel_mm = 300.0 / SLAB_PIXELS
        f = sdd / pixel_mm
        K = np.array([[f, 0.0, (SLAB_PIXELS - 1) / 2.0], [0.0, f, (SLAB_PIXELS - 1) / 2.0], [0.0, 0.0, 1.0]])
        R, t = np.eye(3), np.zeros(3)
    return {"material": np.zeros(dens.shape, np.uint8), "density": dens, "world_from_ijk": np.asarray(A),
            "material_names": ["water"], "K": np.asarray(K), "R": np.asarray(R), "t": np.asarray(t),
            "height": SLAB_PIXELS, "width": SLAB_PIXELS, "pixel_mm": float(pixel_mm),
            "title": "20 cm water slab, 30 x 30 cm field at 1 m, detector on the exit face"}


# ------------------------------------------------------------------------------------------------ chest

def _read_packed(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """HU (int16) and affine of ``.device/ct/<name>`` (``<name>.npy.xz`` + ``<name>.affine.npy``)."""
    with lzma.open(prefix + ".npy.xz", "rb") as f:
        hu = np.load(io.BytesIO(f.read()))
    return hu, np.load(prefix + ".affine.npy")


def _is_packed(ct: str) -> bool:
    return Path(ct + ".npy.xz").exists() and Path(ct + ".affine.npy").exists()


def chest_case(ct: str) -> dict[str, Any]:
    """The chest CT as drrfarm's default sweep sees it (see the module docstring)."""
    pixel_mm = CHEST_DETECTOR_MM / CHEST_PIXELS
    if _drrfarm():
        from drrfarm.geometry import CArm, world_from_patient_default
        from drrfarm.volume import load_volume, segment_by_thresholds, volume_from_array

        if _is_packed(ct):
            hu, affine = _read_packed(ct)
            vol = volume_from_array(hu.astype(np.float32), affine, name=ct)
        else:
            vol = load_volume(ct)
        mv = segment_by_thresholds(vol)
        wfp = world_from_patient_default(mv.centre_patient_mm())
        d = mv.densities_g_cm3
        material = np.argmax(d > 0, axis=0).astype(np.uint8)  # one material per voxel; empty voxels: air
        density = d.sum(axis=0, dtype=np.float32)
        names = list(mv.material_names)
        A = wfp @ mv.patient_from_ijk
        cam = CArm(height=CHEST_PIXELS, width=CHEST_PIXELS, pixel_mm=pixel_mm).camera(0.0, 0.0)
        K, R, t = cam.K, cam.R, cam.t
    else:  # numpy replica of load_volume + segment_by_thresholds + world_from_patient_default + CArm().camera()
        if _is_packed(ct):
            hu, affine = _read_packed(ct)
        else:
            import nibabel as nib

            img = nib.load(ct)
            hu, affine = np.asarray(img.get_fdata(dtype=np.float32)), img.affine
        h = np.maximum(np.asarray(hu, dtype=np.float32), np.float32(-1024.0))
        density = np.maximum(np.minimum(np.float32(1.03) + np.float32(0.001029) * h,
                                        np.float32(1.03) + np.float32(0.0005886) * h), np.float32(0.0))
        material = ((h > np.float32(-800.0)).astype(np.uint8) + (h > np.float32(350.0)).astype(np.uint8))
        names = ["air", "soft_tissue", "bone"]
        centre = affine[:3, :3] @ ((np.asarray(h.shape) - 1.0) / 2.0) + affine[:3, 3]
        A = np.asarray(affine, dtype=np.float64).copy()
        A[:3, 3] -= centre
        sdd, sid = 1020.0, 530.0
        R = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
        t = -R @ np.array([0.0, -sid, 0.0])
        f = sdd / pixel_mm
        K = np.array([[f, 0.0, (CHEST_PIXELS - 1) / 2.0], [0.0, f, (CHEST_PIXELS - 1) / 2.0], [0.0, 0.0, 1.0]])
    return {"material": material, "density": density, "world_from_ijk": np.asarray(A, dtype=np.float64),
            "material_names": names, "K": np.asarray(K), "R": np.asarray(R), "t": np.asarray(t),
            "height": CHEST_PIXELS, "width": CHEST_PIXELS, "pixel_mm": float(pixel_mm),
            "title": f"sample chest CT ({ct}), AP, default C-arm, 29.8 cm detector"}


# -------------------------------------------------------------------------------------------- writing

def write_case(name: str, case: dict[str, Any], out: Path, materials_dir: str, spectrum_file: str,
               mean_energy_ev: float, budget: float, seed: int) -> dict[str, Any]:
    """MC-GPU input, voxel file and the phantom for drrfarm of one case; returns its ``case.json``."""
    t0 = time.perf_counter()
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    material = np.asarray(case["material"], dtype=np.uint8)
    dq = mio.quantize_density(case["density"])
    density = (dq * mio.DENSITY_QUANTUM).astype(np.float32)
    R, K, t = case["R"], case["K"], case["t"]
    frame = mio.frame_for(case["world_from_ijk"], material.shape, R)
    source_world = -np.asarray(R).T @ np.asarray(t)
    source_mc_cm = frame.to_mc(source_world) / 10.0
    sdd_mm = float(K[0, 0] * case["pixel_mm"])
    if abs(K[1, 1] - K[0, 0]) > 1e-9 * K[0, 0] or abs(K[0, 1]) > 1e-9 * K[0, 0]:
        raise ValueError("MC-GPU's detector needs square pixels and no skew")
    if abs(K[0, 2] - (case["width"] - 1) / 2.0) > 1e-9 or abs(K[1, 2] - (case["height"] - 1) / 2.0) > 1e-9:
        raise ValueError("MC-GPU's detector is centred on the principal ray: the principal point must be the centre")
    width_cm = case["width"] * case["pixel_mm"] / 10.0
    height_cm = case["height"] * case["pixel_mm"] / 10.0
    nbytes = mio.write_voxels(d / "phantom.vox", frame.array_to_mc(material + 1), frame.array_to_mc(dq),
                              frame.spacing_mm)
    mat_files = [str(Path(materials_dir) / mio.MCGPU_MATERIAL[m]) for m in case["material_names"]]
    mio.write_input(d / "mcgpu.in", budget=budget, seed=seed, spectrum=spectrum_file, source_cm=source_mc_cm,
                    image="mcgpu_image.dat", pixels=(case["width"], case["height"]), size_cm=(width_cm, height_cm),
                    sdd_cm=sdd_mm / 10.0, voxels="phantom.vox", materials=mat_files, title=case["title"])
    np.savez(d / "phantom.npz", material=material, density=density, world_from_ijk=case["world_from_ijk"],
             material_names=np.array(case["material_names"]), K=K, R=R, t=t,
             height=case["height"], width=case["width"], pixel_mm=case["pixel_mm"])
    info = {
        "case": name, "title": case["title"], "material_names": case["material_names"],
        "mcgpu_materials": [mio.MCGPU_MATERIAL[m] for m in case["material_names"]],
        "voxels_ijk": list(material.shape), "voxels_mc_xyz": list(frame.shape_mc),
        "voxel_mm_mc_xyz": frame.spacing_mm.tolist(), "frame": frame.to_dict(),
        "source_world_mm": source_world.tolist(), "source_mc_cm": source_mc_cm.tolist(), "sdd_mm": sdd_mm,
        "detector_pixels": [case["width"], case["height"]], "pixel_mm": case["pixel_mm"],
        "detector_cm": [width_cm, height_cm], "mean_energy_ev": mean_energy_ev,
        "tau_per_ev_cm2": mio.open_field_factor(width_cm, height_cm, sdd_mm / 10.0, mean_energy_ev),
        "solid_angle_sr": mio.rectangle_solid_angle_sr(width_cm, height_cm, sdd_mm / 10.0),
        "budget": budget, "seed": seed, "voxel_file_bytes": nbytes,
        "materials_by_voxels": {m: int(np.sum(material == i)) for i, m in enumerate(case["material_names"])},
        "seconds": time.perf_counter() - t0,
    }
    (d / "case.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the cases")
    ap.add_argument("--materials", default=str(DEFAULT_STAGE / "materials"),
                    help="folder of the UNCOMPRESSED MC-GPU material files, as the run will see it")
    ap.add_argument("--stage", type=Path, default=DEFAULT_STAGE, help="staging folder (the recorded spectrum)")
    ap.add_argument("--ct", default="/tmp/ct/ct.nii", help="chest CT: NIfTI, or a packed .device/ct/<name> prefix")
    ap.add_argument("--cases", default="slab,chest")
    ap.add_argument("--slab-budget", type=float, default=60.0, help="histories (>= 1e5) or GPU seconds (< 95000)")
    ap.add_argument("--chest-budget", type=float, default=120.0, help="histories (>= 1e5) or GPU seconds (< 95000)")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    energies, weights = mio.read_spectrum(args.stage / mio.SPECTRUM_FILE)
    spc = args.out / "spectrum_90kV_Al2.5.spc"
    mean_ev = mio.write_spectrum(spc, energies, weights, "90 kVp, 2.5 mm Al (SpekPy via drrfarm.spectrum)")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    summary = {"drrfarm_importable": _drrfarm(), "spectrum": str(spc), "mean_energy_ev": mean_ev, "cases": {}}
    for name in cases:
        if name == "slab":
            case, budget = slab_case(), args.slab_budget
        elif name == "chest":
            case, budget = chest_case(args.ct), args.chest_budget
        else:
            raise SystemExit(f"unknown case {name!r} (slab, chest)")
        info = write_case(name, case, args.out, args.materials, str(spc.resolve()), mean_ev, budget, SEEDS[name])
        summary["cases"][name] = info
        print(f"{name}: {info['voxels_mc_xyz']} voxels ({info['voxel_file_bytes'] / 2**20:.0f} MiB), source "
              f"{np.round(info['source_mc_cm'], 3).tolist()} cm, {info['seconds']:.1f} s", flush=True)
    (args.out / "inputs.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
