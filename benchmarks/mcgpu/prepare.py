"""Record, on a machine with SpekPy, xraydb and xraylib, what the MC-GPU comparison needs on the GPU host:

* ``<stage>/spectrum_90kV_Al2.5.json``: the 90 kVp / 2.5 mm Al spectrum as ``drrfarm.spectrum.get_spectrum``
  gives it (SpekPy; 1 keV bins), which ``make_inputs.py`` turns into MC-GPU's spectrum file;
* ``<stage>/tables.npz``: drrfarm's scatter transport tables (``drrfarm.scatter.tables.save_tables``) of that
  spectrum for the slab (water; detectors ideal and csi) and the chest CT (air, soft_tissue, bone; ideal);
* ``<stage>/material_check.json``: the partial mass attenuation coefficients of the staged MC-GPU material files
  (PENELOPE 2006) against drrfarm's (xraydb, Elam et al.) for the materials they stand for;
* ``<stage>/analytic_primary.npz``: drrfarm's analytic (line-integral) render of the chest case, transmission with
  ``solid_angle=True`` on the comparison's 64 x 64 detector: the reference both Monte Carlo primaries are checked
  against (``--ct``: the packed chest CT);
* ``<stage>/cache/cubin/``: drrfarm's scatter kernel compiled for sm_90 when nvcc is here (the GPU host uses it
  while ``scatter.cu`` is unchanged, else compiles its own).

    python benchmarks/mcgpu/prepare.py [--stage .device/mcgpu] [--ct .device/ct/chest]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import mcgpu_io as mio  # noqa: E402

TABLE_SETS = [(["water"], "ideal"), (["water"], "csi"), (["air", "soft_tissue", "bone"], "ideal")]
CHECK_ENERGIES_KEV = (15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0)


def read_mcgpu_material(path: Path) -> tuple[str, float, np.ndarray]:
    """(name, nominal density g/cm³, (N, 5) energy eV and mean free paths cm: Rayleigh, Compton, photoelectric,
    total) of an MC-GPU material file (gzip or plain)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        lines = f.readlines()
    name = lines[2].strip("#").strip()
    rho = next(float(lines[i + 1].strip("# \n")) for i, s in enumerate(lines) if "NOMINAL DENSITY" in s)
    start = next(i for i, s in enumerate(lines) if s.startswith("#[MEAN FREE PATHS")) + 2
    rows = []
    for s in lines[start:]:
        if s.startswith("#"):
            break
        rows.append([float(x) for x in s.split()[:5]])
    return name, rho, np.asarray(rows)


def material_check(stage: Path, spectrum: object) -> dict[str, object]:
    """Relative differences (MC-GPU / drrfarm - 1) of total, photoelectric, Compton and Rayleigh mu/rho."""
    from drrfarm.physics import Physics
    from drrfarm.scatter.tables import transport_tables

    out: dict[str, object] = {"energies_kev": list(CHECK_ENERGIES_KEV), "materials": {}}
    names = ["water", "air", "soft_tissue", "bone"]
    t = transport_tables(spectrum, names, Physics())
    E = np.asarray(CHECK_ENERGIES_KEV)
    for m, name in enumerate(names):
        f = stage / "materials" / (mio.MCGPU_MATERIAL[name] + ".gz")
        if not f.exists():
            f = stage / "materials" / mio.MCGPU_MATERIAL[name]
        title, rho, a = read_mcgpu_material(f)
        e = a[:, 0] / 1e3
        mc = {k: np.interp(E, e, 1.0 / (a[:, c] * rho)) for k, c in (("rayleigh", 1), ("compton", 2),
                                                                       ("photoelectric", 3), ("total", 4))}
        dr = {k: np.interp(E, t.energy_grid_kev, t.mu_cm2_g[m, c]) for k, c in (("photoelectric", 0),
                                                                                  ("compton", 1), ("rayleigh", 2))}
        dr["total"] = dr["photoelectric"] + dr["compton"] + dr["rayleigh"]
        out["materials"][name] = {  # type: ignore[index]
            "mcgpu_file": f.name, "mcgpu_name": title, "mcgpu_density_g_cm3": rho,
            "relative_difference": {k: [round(float(x / y - 1.0), 5) for x, y in zip(mc[k], dr[k], strict=True)]
                                    for k in ("total", "photoelectric", "compton", "rayleigh")},
            "drrfarm_total_cm2_g": [round(float(x), 6) for x in dr["total"]],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=Path, default=ROOT / ".device" / "mcgpu")
    ap.add_argument("--ct", default=str(ROOT / ".device" / "ct" / "chest"), help="chest CT: NIfTI or packed prefix")
    args = ap.parse_args(argv)

    from drrfarm.physics import Physics
    from drrfarm.scatter.tables import save_tables, transport_tables
    from drrfarm.spectrum import get_spectrum

    args.stage.mkdir(parents=True, exist_ok=True)
    _, kvp, al = mio.SPECTRUM_KEY.split(":")
    spec = get_spectrum({"kvp": float(kvp), "al_mm": float(al)})
    (args.stage / mio.SPECTRUM_FILE).write_text(json.dumps({
        "name": spec.name, "kvp": spec.kvp, "al_mm": spec.al_mm, "source": "SpekPy via drrfarm.spectrum.get_spectrum",
        "mean_energy_kev": float(spec.mean_energy_kev), "energies_kev": spec.energies_kev.tolist(),
        "weights": (spec.weights / spec.weights.sum()).tolist()}, indent=1))
    entries = {mio.table_key(m, det): transport_tables(spec, m, Physics(detector=det)) for m, det in TABLE_SETS}
    save_tables(str(args.stage / mio.TABLES_FILE), entries)
    print(f"{spec.name}: {spec.n_bins} bins, mean {spec.mean_energy_kev:.3f} keV; {len(entries)} transport tables")
    if (args.stage / "materials").is_dir():
        check = material_check(args.stage, spec)
        (args.stage / "material_check.json").write_text(json.dumps(check, indent=1))
        print("MC-GPU / drrfarm - 1 (%) at " + ", ".join(f"{e:g}" for e in CHECK_ENERGIES_KEV) + " keV:")
        for name, row in check["materials"].items():  # type: ignore[union-attr]
            print(f"  {name} <- {row['mcgpu_file']} ({row['mcgpu_name']}, {row['mcgpu_density_g_cm3']} g/cm3)")
            for k, v in row["relative_difference"].items():
                print(f"    {k:13s} " + " ".join(f"{100 * x:+6.1f}" for x in v))
    else:
        print(f"no {args.stage / 'materials'}: run .device/mcgpu/stage.sh for the material check")
    analytic_chest_primary(args.stage, args.ct, spec)
    precompile_scatter_kernel(args.stage / "cache")
    return 0


def analytic_chest_primary(stage: Path, ct: str, spectrum: object) -> None:
    """drrfarm's analytic transmission of the chest case (CPU renderer; its own segmentation of the CT)."""
    import make_inputs

    from drrfarm.api import Renderer
    from drrfarm.geometry import CArm
    from drrfarm.physics import Physics
    from drrfarm.volume import load_volume, volume_from_array

    if make_inputs._is_packed(ct):
        hu, affine = make_inputs._read_packed(ct)
        vol = volume_from_array(hu.astype(np.float32), affine, name=ct)
    elif Path(ct).exists():
        vol = load_volume(ct)
    else:
        print(f"no chest CT at {ct}: no analytic primary")
        return
    n = make_inputs.CHEST_PIXELS
    cam = CArm(height=n, width=n, pixel_mm=make_inputs.CHEST_DETECTOR_MM / n).camera(0.0, 0.0)
    r = Renderer(vol, backend="cpu", spectrum=spectrum, physics=Physics(output="transmission", solid_angle=True))
    img = np.asarray(r.render(cam), dtype=np.float64)
    np.savez(stage / "analytic_primary.npz", chest=img)
    print(f"analytic chest primary: mean transmission {img.mean():.4f} -> {stage / 'analytic_primary.npz'}")


def precompile_scatter_kernel(cache: Path, arch: str = "sm_90") -> None:
    """drrfarm's scatter kernel for ``arch`` into ``cache/cubin`` (skipped without nvcc)."""
    import os

    from drrfarm.errors import BackendError
    from drrfarm.gpu import build as cuda_build

    old = os.environ.get("DRRFARM_CACHE")
    os.environ["DRRFARM_CACHE"] = str(cache)
    try:
        _, how = cuda_build.load_kernel_image("scatter.cu", arch, order=("cache", "nvcc"))
        print(f"scatter.cu for {arch}: {how} -> {cache / 'cubin'}")
    except BackendError as exc:
        print(f"scatter.cu not precompiled ({exc}); the GPU host compiles it")
    finally:
        if old is None:
            os.environ.pop("DRRFARM_CACHE", None)
        else:
            os.environ["DRRFARM_CACHE"] = old


if __name__ == "__main__":
    raise SystemExit(main())
