"""drrfarm's scatter beside MC-GPU v1.3's on the same phantoms, spectrum and detector (``make_inputs.py``).

    python benchmarks/mcgpu/compare.py --inputs /tmp/mcgpu/inputs --out "$OUT"            # GPU host
    python benchmarks/mcgpu/compare.py --inputs /tmp/in --out /tmp/o --backend cpu --quick  # a check on a CPU

For each case of ``--inputs`` (``<case>/phantom.npz``, ``case.json`` and, once MC-GPU has run,
``<case>/mcgpu_image.dat[.raw]``) it runs drrfarm's Monte Carlo on the same voxels (``solid_angle=True``: a point
source whose fluence falls off as cos³θ, as MC-GPU's isotropic cone; ideal energy-integrating detector; tallies on
MC-GPU's pixel grid), in two halves with independent seeds (their difference measures drrfarm's noise), and for the
chest also the ``fast`` estimate (three seeds). MC-GPU's images (eV/cm² per history) are put in drrfarm's units
(signal relative to the open field on the principal ray) with ``Ω D² / Ē``: MC-GPU emits isotropically into the
solid angle Ω of the detector seen from the focal spot.

Reported (``mcgpu_compare.json``, ``mcgpu_compare.md`` and the images in ``mcgpu_images.npz`` under ``--out``):

* slab: scatter-to-primary ratio at the centre (6 x 6 cm, as ``tests/test_scatter.py``; and 2 x 2 cm), both codes;
  drrfarm's also with ``solid_angle=False`` (the test's source) and for the CsI detector (MC-GPU v1.3 has no detector
  model); the primaries against the analytic transmission; the SPR profile;
* chest: mean relative difference of the scatter images over the field (64 x 64 and 32 x 32 bins), the ratio of
  their sums, the primaries likewise (a check of geometry and attenuation), the noise of each, and the ``fast``
  estimate's mean relative error against MC-GPU (and against drrfarm's own Monte Carlo).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import mcgpu_io as mio  # noqa: E402

DEFAULT_PHOTONS = {"cuda": {"slab": 1_000_000_000, "chest": 4_000_000_000},
                   "cpu": {"slab": 2_000_000, "chest": 1_000_000}}
QUICK_PHOTONS = {"slab": 200_000, "chest": 60_000, "fast": 20_000}
FAST_SEEDS = (31, 32, 33)
PILOT_PHOTONS = 20_000_000
SPR_TARGET = 0.05  # |SPR_drrfarm / SPR_MC-GPU - 1|


# ------------------------------------------------------------------------------------------- loading

def load_case(d: Path) -> dict[str, Any]:
    """phantom.npz + case.json of one case: the drrfarm ScatterVolume, Camera and the case's numbers."""
    from drrfarm.geometry import Camera
    from drrfarm.scatter import ScatterVolume

    info = json.loads((d / "case.json").read_text())
    with np.load(d / "phantom.npz") as z:
        material, density = z["material"], z["density"]
        names = [str(n) for n in z["material_names"]]
        dens = np.zeros((len(names), *material.shape), dtype=np.float32)
        for m in range(len(names)):
            np.copyto(dens[m], density, where=material == m)
        volume = ScatterVolume(dens, z["world_from_ijk"], names)
        camera = Camera(z["K"], z["R"], z["t"], int(z["height"]), int(z["width"]), float(z["pixel_mm"]))
    return {"info": info, "volume": volume, "camera": camera, "names": names}


def load_mcgpu(d: Path, info: dict[str, Any]) -> dict[str, Any] | None:
    """MC-GPU's images of a case in drrfarm's units (None when it has not run)."""
    raw = d / "mcgpu_image.dat.raw"
    if not raw.exists():
        return None
    nx, nz = info["detector_pixels"]
    images = mio.read_image(raw, nx, nz)
    header = mio.read_header(d / "mcgpu_image.dat") if (d / "mcgpu_image.dat").exists() else {}
    f = float(info["tau_per_ev_cm2"])
    return {"tau": {k: v * f for k, v in images.items()}, "ev_cm2": images, "header": header}


def tables_for(stage: Path, names: list[str], detector: str = "ideal") -> Any:
    """drrfarm's transport tables recorded by prepare.py (computed here instead when SpekPy/xraydb are there and
    the file is missing)."""
    from drrfarm.scatter.tables import load_tables

    path = stage / mio.TABLES_FILE
    if path.exists():
        return load_tables(str(path), mio.table_key(names, detector))
    from drrfarm.physics import Physics
    from drrfarm.scatter import transport_tables
    from drrfarm.spectrum import get_spectrum

    _, kvp, al = mio.SPECTRUM_KEY.split(":")
    return transport_tables(get_spectrum({"kvp": float(kvp), "al_mm": float(al)}), names, Physics(detector=detector))


# ------------------------------------------------------------------------------------------ statistics

def rel_stats(est: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Mean, RMS and 95th percentile of |est - ref| / ref over bins where ref > 0, and the ratio of the sums."""
    ok = ref > 0
    r = np.abs(est[ok] - ref[ok]) / ref[ok]
    return {"mean_rel": float(r.mean()), "rms_rel": float(np.sqrt(np.mean(r * r))),
            "p95_rel": float(np.percentile(r, 95)), "ratio_of_sums": float(est[ok].sum() / ref[ok].sum()),
            "bias_mean_rel": float(np.mean((est[ok] - ref[ok]) / ref[ok]))}


def halves_noise(a: np.ndarray, b: np.ndarray) -> float:
    """RMS over bins of the relative noise of (a + b) / 2 from two independent halves: |a - b| / (a + b)."""
    s = a + b
    ok = s > 0
    return float(np.sqrt(np.mean(((a[ok] - b[ok]) / s[ok]) ** 2)))


def laplacian_noise(img: np.ndarray) -> float:
    """Relative noise of a smooth image from its residual against the mean of the 4 neighbours (interior bins):
    an upper bound (the image's own curvature adds to it)."""
    c = img[1:-1, 1:-1]
    nb = 0.25 * (img[:-2, 1:-1] + img[2:, 1:-1] + img[1:-1, :-2] + img[1:-1, 2:])
    ok = c > 0
    return float(np.sqrt(np.mean(((c[ok] - nb[ok]) / c[ok]) ** 2) / 1.25))


def count_noise(n: np.ndarray) -> float:
    """RMS relative Poisson noise 1/sqrt(n) of bins holding n photons."""
    n = np.asarray(n, dtype=np.float64)
    ok = n > 0
    return float(np.sqrt(np.mean(1.0 / n[ok])))


def grid(a: np.ndarray, bins: int) -> np.ndarray:
    """Block means down to ``bins`` x ``bins`` (from a square grid divisible by it)."""
    return mio.block_mean(a, a.shape[0] // bins, a.shape[1] // bins)


# ---------------------------------------------------------------------------------------------- runs

class Runner:
    """drrfarm's Monte Carlo and fast estimate on one engine (``cpu``: the NumPy reference, ``cuda``: the kernel)."""

    def __init__(self, engine: str) -> None:
        from drrfarm.scatter import ScatterEstimator

        self.engine = engine
        self.est = ScatterEstimator(engine)

    def tally(self, key: str, volume: Any, tables: Any, camera: Any, photons: int, seed: int,
              solid_angle: bool = True) -> Any:
        shape = (int(camera.height), int(camera.width))
        t0 = time.perf_counter()
        out = self.est.tallies(key, volume, tables, [camera], int(photons), [int(seed)], shape, solid_angle)[0]
        out.wall_s = time.perf_counter() - t0
        return out

    def fit(self, key: str, volume: Any, tables: Any, camera: Any, photons: int, budget_s: float | None
            ) -> tuple[int, float | None]:
        """``photons``, or fewer if the measured rate (a warm-up and a timed pilot run) would overrun ``budget_s``
        seconds; (photons, histories per second). Only on the GPU."""
        if budget_s is None or self.engine != "cuda":
            return int(photons), None
        self.tally(key, volume, tables, camera, 1_000_000, 97)  # kernel load, volume upload
        pilot = self.tally(key, volume, tables, camera, PILOT_PHOTONS, 98)
        rate = PILOT_PHOTONS / max(pilot.wall_s, 1e-6)
        return int(min(photons, max(PILOT_PHOTONS, 0.9 * rate * budget_s))), float(rate)

    def halves(self, key: str, volume: Any, tables: Any, camera: Any, photons: int, seeds: tuple[int, int] = (11, 12),
               solid_angle: bool = True) -> dict[str, Any]:
        """Two independent runs of photons/2 each: their mean, their noise, the mean scatter energy per bin."""
        half = max(1, int(photons) // 2)
        a = self.tally(key, volume, tables, camera, half, seeds[0], solid_angle)
        b = self.tally(key, volume, tables, camera, half, seeds[1], solid_angle)
        per_bin = half / float(a.scatter_signal.size)
        mean = {k: 0.5 * (getattr(a, k) + getattr(b, k)) for k in
                ("scatter_signal", "scatter_counts", "primary_signal", "primary_counts")}
        energy, number = {}, {}
        for part in ("scatter", "primary"):
            sig, cnt = mean[f"{part}_signal"], mean[f"{part}_counts"]
            with np.errstate(divide="ignore", invalid="ignore"):  # ideal detector: signal E / S0, counts 1 / C0
                energy[part] = np.where(cnt > 0, sig * tables.signal_norm / (cnt * tables.count_norm), np.nan)
            number[part] = cnt * 2 * per_bin * tables.count_norm  # photons (weighted by cos³θ) per bin, both halves
        return {"a": a, "b": b, "photons": 2 * half, "per_bin": per_bin, **mean,
                "scatter_noise_halves": halves_noise(a.scatter_signal, b.scatter_signal),
                "primary_noise_halves": halves_noise(a.primary_signal, b.primary_signal),
                "scatter_photons_per_bin": number["scatter"], "primary_photons_per_bin": number["primary"],
                "mean_scatter_energy_kev": energy["scatter"], "mean_primary_energy_kev": energy["primary"],
                "kernel_s": float(a.seconds + b.seconds), "wall_s": float(a.wall_s + b.wall_s),
                "interactions": {k: a.interactions[k] + b.interactions[k] for k in a.interactions},
                "energy_balance": max(abs(t.energy_kev["emitted"] - t.energy_kev["deposited"] - t.energy_kev["escaped"])
                                      / t.energy_kev["emitted"] for t in (a, b))}

    def fast(self, key: str, volume: Any, tables: Any, camera: Any, photons: int | None, seed: int) -> Any:
        from drrfarm.physics import Physics

        physics = Physics(scatter="fast", scatter_photons=photons, solid_angle=True)
        return self.est.estimate(key, lambda: volume, [camera], None, physics, [seed], tables=tables)[0]


def mcgpu_photons(mc: dict[str, Any], part: str, info: dict[str, Any], e_mean_kev: np.ndarray) -> np.ndarray | None:
    """Photons per pixel behind MC-GPU's ``part`` image (``scatter`` or ``primary``): its energy over the mean photon
    energy of that part per bin, taken from drrfarm's tallies (both codes see the same spectrum and phantom);
    None without the number of histories."""
    n_hist = mc["header"].get("histories")
    if not n_hist:
        return None
    px = info["pixel_mm"] / 10.0
    e = np.where(np.isfinite(e_mean_kev), e_mean_kev, np.nanmean(e_mean_kev)) * 1e3
    return mc["ev_cm2"][part] * px * px * n_hist / e


def poisson_on(n: np.ndarray | None, bins: int) -> float | None:
    """RMS relative Poisson noise of the bins x bins block sums of per-pixel photon numbers ``n``."""
    if n is None:
        return None
    f = n.shape[0] // bins
    return count_noise(grid(n, bins) * f * f)


def mcgpu_noise(mc: dict[str, Any], info: dict[str, Any], e_scatter_kev: np.ndarray, bins: int) -> dict[str, float]:
    """MC-GPU's relative scatter noise on a bins x bins grid: Poisson from the photons its energies imply, and the
    neighbour-residual bound."""
    out: dict[str, float] = {"laplacian_bound": laplacian_noise(grid(mc["tau"]["scatter"], bins))}
    p = poisson_on(mcgpu_photons(mc, "scatter", info, e_scatter_kev), bins)
    if p is not None:
        out["poisson"] = p
    return out


# ---------------------------------------------------------------------------------------------- cases

PARTS = ("compton", "rayleigh", "multiple")


def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def centre(img: np.ndarray, bins: int) -> float:
    return float(grid(img, bins)[bins // 2, bins // 2])


def slab_spr(s: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """SPR of the centre 6 x 6 cm (5 x 5 bins of the 30 cm field, as tests/test_scatter.py), 2 x 2 cm and corner."""
    return {"centre_6cm": centre(s, 5) / centre(p, 5), "centre_2cm": centre(s, 15) / centre(p, 15),
            "corner_6cm": float(grid(s, 5)[0, 0] / grid(p, 5)[0, 0])}


def centre_noise(n_scatter: np.ndarray | None, n_primary: np.ndarray | None) -> dict[str, float] | None:
    """Poisson relative noise of the centre 6 x 6 cm scatter, primary and their ratio (photons per pixel given)."""
    if n_scatter is None or n_primary is None:
        return None
    f = n_scatter.shape[0] // 5
    s, p = (float(grid(x, 5)[2, 2] * f * f) ** -0.5 for x in (n_scatter, n_primary))
    return {"scatter": s, "primary": p, "spr": math.hypot(s, p)}


def analytic_primary(tables: Any, thickness_cm: float) -> float:
    """Energy-weighted transmission of ``thickness_cm`` of the tables' first material on the central ray."""
    from drrfarm.scatter.tables import interp_grid

    e = tables.spectrum_kev
    p = np.diff(np.concatenate([[0.0], tables.spectrum_cdf]))
    mu = interp_grid(tables.mu_cm2_g[0].sum(axis=0), e, tables)
    return float(np.sum(p * e * np.exp(-mu * thickness_cm)) / np.sum(p * e))


def run_slab(case: dict[str, Any], mc: dict[str, Any] | None, runner: Runner, stage: Path,
             photons: int, budget_s: float | None = None) -> dict[str, Any]:
    vol, cam, info = case["volume"], case["camera"], case["info"]
    tables = tables_for(stage, case["names"], "ideal")
    requested = photons
    photons, rate = runner.fit("slab", vol, tables, cam, photons, None if budget_s is None else budget_s / 2.0)
    d = runner.halves("slab", vol, tables, cam, photons)
    flat = runner.halves("slab", vol, tables, cam, photons // 2, seeds=(13, 14), solid_angle=False)
    csi = runner.halves("slab", vol, tables_for(stage, case["names"], "csi"), cam, photons // 2, seeds=(15, 16))
    thickness_cm = float(np.asarray(vol.world_from_ijk)[2, 2]) * vol.shape[2] / 10.0
    dd = {"photons": d["photons"], "photons_requested": requested, "histories_per_s": rate, "kernel_s": d["kernel_s"],
          "wall_s": d["wall_s"], "spr": slab_spr(d["scatter_signal"], d["primary_signal"]),
          "primary_centre_6cm": centre(d["primary_signal"], 5), "scatter_centre_6cm": centre(d["scatter_signal"], 5),
          "noise_centre_6cm": centre_noise(d["scatter_photons_per_bin"], d["primary_photons_per_bin"]),
          "energy_balance": d["energy_balance"], "interactions": d["interactions"]}
    out: dict[str, Any] = {
        "voxels": info["voxels_ijk"], "detector_pixels": info["detector_pixels"], "pixel_mm": info["pixel_mm"],
        "slab_cm": thickness_cm, "analytic_primary_centre_ray": analytic_primary(tables, thickness_cm), "drrfarm": dd,
        "drrfarm_flat_source": {"photons": flat["photons"], "spr": slab_spr(flat["scatter_signal"],
                                                                             flat["primary_signal"])},
        "drrfarm_csi": {"photons": csi["photons"], "spr": slab_spr(csi["scatter_signal"], csi["primary_signal"])},
        "spr_profile_bins_2cm": {"drrfarm": ratio(grid(d["scatter_signal"], 15), grid(d["primary_signal"], 15))[7]},
    }
    images = {"slab_drrfarm_scatter": d["scatter_signal"], "slab_drrfarm_primary": d["primary_signal"]}
    if mc is not None:
        t = mc["tau"]
        m = {"histories": mc["header"].get("histories"), "seconds": mc["header"].get("seconds"),
             "histories_per_s": mc["header"].get("histories_per_s"), "spr": slab_spr(t["scatter"], t["primary"]),
             "primary_centre_6cm": centre(t["primary"], 5), "scatter_centre_6cm": centre(t["scatter"], 5),
             "scatter_parts_centre_6cm": {k: centre(t[k], 5) / centre(t["scatter"], 5) for k in PARTS},
             "noise_centre_6cm": centre_noise(mcgpu_photons(mc, "scatter", info, d["mean_scatter_energy_kev"]),
                                              mcgpu_photons(mc, "primary", info, d["mean_primary_energy_kev"]))}
        out["mcgpu"] = m
        out["spr_profile_bins_2cm"]["mcgpu"] = ratio(grid(t["scatter"], 15), grid(t["primary"], 15))[7]
        r6 = dd["spr"]["centre_6cm"] / m["spr"]["centre_6cm"]
        out["comparison"] = {
            "spr_centre_6cm_ratio": r6, "spr_centre_2cm_ratio": dd["spr"]["centre_2cm"] / m["spr"]["centre_2cm"],
            "spr_within_target": bool(abs(r6 - 1.0) <= SPR_TARGET), "target": SPR_TARGET,
            "spr_ratio_noise": (math.hypot(dd["noise_centre_6cm"]["spr"], m["noise_centre_6cm"]["spr"])
                                if m["noise_centre_6cm"] else None),
            "scatter_centre_6cm_ratio": dd["scatter_centre_6cm"] / m["scatter_centre_6cm"],
            "primary_centre_6cm_ratio": dd["primary_centre_6cm"] / m["primary_centre_6cm"],
            "scatter_field_15x15": rel_stats(grid(d["scatter_signal"], 15), grid(t["scatter"], 15)),
            "primary_field_15x15": rel_stats(grid(d["primary_signal"], 15), grid(t["primary"], 15)),
        }
        images.update({"slab_mcgpu_scatter": t["scatter"], "slab_mcgpu_primary": t["primary"]})
    out["_images"] = images
    return out


def run_chest(case: dict[str, Any], mc: dict[str, Any] | None, runner: Runner, stage: Path, photons: int,
              fast_photons: int | None, budget_s: float | None = None) -> dict[str, Any]:
    vol, cam, info = case["volume"], case["camera"], case["info"]
    tables = tables_for(stage, case["names"], "ideal")
    requested = photons
    photons, rate = runner.fit("chest/full", vol, tables, cam, photons, budget_s)
    d = runner.halves("chest/full", vol, tables, cam, photons)
    fasts = [runner.fast("chest", vol, tables, cam, fast_photons, s) for s in FAST_SEEDS]
    n = cam.height
    grids = (n, n // 2)

    def per_grid(fn: Any) -> dict[str, Any]:
        return {f"{b}x{b}": fn(b) for b in grids}

    dd = {"photons": d["photons"], "photons_requested": requested, "histories_per_s": rate, "kernel_s": d["kernel_s"],
          "wall_s": d["wall_s"], "spr_mean": float(d["scatter_signal"].sum() / d["primary_signal"].sum()),
          "scatter_noise": per_grid(lambda b: halves_noise(grid(d["a"].scatter_signal, b),
                                                           grid(d["b"].scatter_signal, b))),
          "scatter_noise_poisson": per_grid(lambda b: poisson_on(d["scatter_photons_per_bin"], b)),
          "primary_noise": per_grid(lambda b: halves_noise(grid(d["a"].primary_signal, b),
                                                           grid(d["b"].primary_signal, b))),
          "mean_scatter_energy_kev": float(np.nanmean(d["mean_scatter_energy_kev"])),
          "energy_balance": d["energy_balance"], "interactions": d["interactions"]}
    out: dict[str, Any] = {
        "voxels": info["voxels_ijk"], "detector_pixels": info["detector_pixels"], "pixel_mm": info["pixel_mm"],
        "materials_by_voxels": info.get("materials_by_voxels"), "drrfarm": dd,
        "fast": {"photons": fasts[0].photons, "seeds": list(FAST_SEEDS), "seconds_each": [f.seconds for f in fasts],
                 "kernel_s_each": [f.tally.seconds for f in fasts],
                 "vs_drrfarm_mc": per_grid(lambda b: float(np.mean(
                     [rel_stats(grid(f.signal, b), grid(d["scatter_signal"], b))["mean_rel"] for f in fasts])))},
    }
    images = {"chest_drrfarm_scatter": d["scatter_signal"], "chest_drrfarm_primary": d["primary_signal"],
              "chest_fast_scatter": fasts[0].signal}
    analytic = stage / "analytic_primary.npz"
    ref_primary = None
    if analytic.exists():
        with np.load(analytic) as z:
            if "chest" in z.files and z["chest"].shape == d["primary_signal"].shape:
                ref_primary = z["chest"]
    if ref_primary is not None:
        out["analytic_primary"] = {"mean": float(ref_primary.mean()), "drrfarm_mc": per_grid(
            lambda b: rel_stats(grid(d["primary_signal"], b), grid(ref_primary, b)))}
        images["chest_analytic_primary"] = ref_primary
    if mc is not None:
        t = mc["tau"]
        n_primary = mcgpu_photons(mc, "primary", info, d["mean_primary_energy_kev"])
        m = {"histories": mc["header"].get("histories"), "seconds": mc["header"].get("seconds"),
             "histories_per_s": mc["header"].get("histories_per_s"),
             "spr_mean": float(t["scatter"].sum() / t["primary"].sum()),
             "scatter_parts": {k: float(t[k].sum() / t["scatter"].sum()) for k in PARTS},
             "scatter_noise": per_grid(lambda b: mcgpu_noise(mc, info, d["mean_scatter_energy_kev"], b)),
             "primary_noise_poisson": per_grid(lambda b: poisson_on(n_primary, b))}
        out["mcgpu"] = m
        if ref_primary is not None:
            out["analytic_primary"]["mcgpu"] = per_grid(lambda b: rel_stats(grid(t["primary"], b),
                                                                             grid(ref_primary, b)))
        comp: dict[str, Any] = {}
        for b in grids:
            key = f"{b}x{b}"
            ref = grid(t["scatter"], b)
            fast_stats = [rel_stats(grid(f.signal, b), ref) for f in fasts]
            noise_d = dd["scatter_noise"][key]
            noise_m = m["scatter_noise"][key].get("poisson", m["scatter_noise"][key]["laplacian_bound"])
            comp[key] = {
                "scatter": rel_stats(grid(d["scatter_signal"], b), ref),
                "primary": rel_stats(grid(d["primary_signal"], b), grid(t["primary"], b)),
                "fast_vs_mcgpu_mean_rel": float(np.mean([x["mean_rel"] for x in fast_stats])),
                "fast_vs_mcgpu_bias": float(np.mean([x["bias_mean_rel"] for x in fast_stats])),
                "noise_combined_rms": float(math.hypot(noise_d, noise_m)),
                # E|X| of a normal X of that RMS: what the mean |rel. diff.| would be from noise alone
                "mean_rel_expected_from_noise": float(math.sqrt(2.0 / math.pi) * math.hypot(noise_d, noise_m)),
            }
        out["comparison"] = comp
        images.update({"chest_mcgpu_scatter": t["scatter"], "chest_mcgpu_primary": t["primary"],
                       **{f"chest_mcgpu_{k}": t[k] for k in PARTS}})
    out["_images"] = images
    return out


# -------------------------------------------------------------------------------------------- report

def _f(v: Any, spec: str, unit: str = "") -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{spec}}{unit}"


def markdown_slab(s: dict[str, Any]) -> list[str]:
    m, c = s.get("mcgpu") or {}, s.get("comparison") or {}
    dd = s["drrfarm"]
    lines = ["## 20 cm water slab, 30 x 30 cm field, no air gap", "",
             "| quantity | drrfarm | MC-GPU | drrfarm / MC-GPU |", "|---|---|---|---|"]
    rows = [("SPR centre 6 x 6 cm", dd["spr"]["centre_6cm"], m.get("spr", {}).get("centre_6cm"),
             c.get("spr_centre_6cm_ratio")),
            ("SPR centre 2 x 2 cm", dd["spr"]["centre_2cm"], m.get("spr", {}).get("centre_2cm"),
             c.get("spr_centre_2cm_ratio")),
            ("SPR corner 6 x 6 cm", dd["spr"]["corner_6cm"], m.get("spr", {}).get("corner_6cm"), None),
            ("scatter, centre (open field = 1)", dd["scatter_centre_6cm"], m.get("scatter_centre_6cm"),
             c.get("scatter_centre_6cm_ratio")),
            ("primary, centre (open field = 1)", dd["primary_centre_6cm"], m.get("primary_centre_6cm"),
             c.get("primary_centre_6cm_ratio"))]
    for name, a, b, r in rows:
        lines.append(f"| {name} | {_f(a, '.4g')} | {_f(b, '.4g')} | {_f(r, '.4f')} |")
    nd, nm = dd["noise_centre_6cm"], m.get("noise_centre_6cm")
    lines.append(f"| noise of the centre SPR (Poisson) | {_f(100 * nd['spr'], '.2f', ' %')} | "
                 f"{_f(100 * nm['spr'] if nm else None, '.2f', ' %')} | "
                 f"{_f(100 * c['spr_ratio_noise'] if c.get('spr_ratio_noise') else None, '.2f', ' %')} |")
    lines += ["", f"Analytic primary on the central ray {s['analytic_primary_centre_ray']:.5g}. drrfarm's SPR with a "
              f"flat source (`solid_angle=False`): {s['drrfarm_flat_source']['spr']['centre_6cm']:.4g}; "
              f"with the 0.6 mm CsI detector: {s['drrfarm_csi']['spr']['centre_6cm']:.4g} (MC-GPU v1.3 has no detector "
              f"model). Histories: drrfarm {dd['photons']:.3g}, MC-GPU {_f(m.get('histories'), '.3g')}."]
    if c:
        lines.append(f"SPR within {100 * c['target']:.0f} %: **{c['spr_within_target']}**. Over the field (15 x 15 "
                     f"bins) mean abs rel diff: scatter {100 * c['scatter_field_15x15']['mean_rel']:.2f} %, primary "
                     f"{100 * c['primary_field_15x15']['mean_rel']:.2f} %. MC-GPU's scatter at the centre: "
                     + ", ".join(f"{k} {100 * v:.1f} %" for k, v in m["scatter_parts_centre_6cm"].items()) + ".")
    return lines + [""]


def markdown_chest(ch: dict[str, Any]) -> list[str]:
    dd, m = ch["drrfarm"], ch.get("mcgpu")
    lines = ["## Sample chest CT, AP", "",
             f"drrfarm {dd['photons']:.3g} histories, scatter noise "
             + ", ".join(f"{k} {100 * v:.2f} %" for k, v in dd["scatter_noise"].items())
             + f"; fast estimate {ch['fast']['photons']:.3g} histories x {len(ch['fast']['seeds'])} seeds.", ""]
    if m:
        lines.append(f"MC-GPU {_f(m['histories'], '.3g')} histories in {_f(m['seconds'], '.1f')} s, scatter noise "
                     + ", ".join(f"{k} {100 * v.get('poisson', v['laplacian_bound']):.2f} %"
                                 for k, v in m["scatter_noise"].items())
                     + "; scatter parts " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in m["scatter_parts"].items()))
        lines += ["", "| grid | scatter: mean abs rel diff | scatter: sum ratio | from noise alone | primary: mean abs "
                  "rel diff | primary: sum ratio | fast vs MC-GPU | fast bias |", "|---|---|---|---|---|---|---|---|"]
        for k, c in ch["comparison"].items():
            lines.append(f"| {k} | {100 * c['scatter']['mean_rel']:.2f} % | {c['scatter']['ratio_of_sums']:.4f} | "
                         f"{100 * c['mean_rel_expected_from_noise']:.2f} % | {100 * c['primary']['mean_rel']:.2f} % | "
                         f"{c['primary']['ratio_of_sums']:.4f} | {100 * c['fast_vs_mcgpu_mean_rel']:.2f} % | "
                         f"{100 * c['fast_vs_mcgpu_bias']:+.2f} % |")
        lines += ["", f"Mean SPR over the field: drrfarm {dd['spr_mean']:.4f}, MC-GPU {m['spr_mean']:.4f}."]
    a = ch.get("analytic_primary")
    if a:
        half = ch["detector_pixels"][0] // 2
        k = f"{half}x{half}"
        parts = [f"{who} mean abs rel diff {100 * a[who][k]['mean_rel']:.2f} %, "
                 f"sum ratio {a[who][k]['ratio_of_sums']:.4f}" for who in ("drrfarm_mc", "mcgpu") if who in a]
        lines.append(f"Primaries against drrfarm's analytic render (mean transmission {a['mean']:.4f}), {k} bins: "
                     + "; ".join(parts) + ".")
    lines.append("Fast estimate vs drrfarm's own Monte Carlo: "
                 + ", ".join(f"{k} {100 * v:.2f} %" for k, v in ch["fast"]["vs_drrfarm_mc"].items()) + ".")
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
    lines = ["# drrfarm vs MC-GPU v1.3: scatter", "",
             f"Backend `{report['backend']}`{' (quick)' if report['quick'] else ''}, device {report.get('device')}; "
             f"spectrum {report['spectrum']}; ideal energy-integrating detector; point source, field collimated to "
             "the detector.", ""]
    if "slab" in report["cases"]:
        lines += markdown_slab(report["cases"]["slab"])
    if "chest" in report["cases"]:
        lines += markdown_chest(report["cases"]["chest"])
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=Path, required=True, help="make_inputs.py's --out (MC-GPU's images beside them)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stage", type=Path, default=ROOT / ".device" / "mcgpu", help="holds tables.npz (prepare.py)")
    ap.add_argument("--backend", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny history counts (a check of the pipeline)")
    ap.add_argument("--cases", default="slab,chest")
    ap.add_argument("--slab-photons", type=float)
    ap.add_argument("--chest-photons", type=float)
    ap.add_argument("--fast-photons", type=float, help="default: drrfarm's (5e5 on a GPU, 1e5 on the CPU)")
    ap.add_argument("--time-limit", type=float, help="seconds: on the GPU, histories are cut to finish in time")
    args = ap.parse_args(argv)

    photons = dict(QUICK_PHOTONS if args.quick else DEFAULT_PHOTONS[args.backend])
    if args.slab_photons:
        photons["slab"] = int(args.slab_photons)
    if args.chest_photons:
        photons["chest"] = int(args.chest_photons)
    fast_photons = int(args.fast_photons) if args.fast_photons else photons.get("fast")
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.backend)
    t_all = time.perf_counter()
    report: dict[str, Any] = {"backend": args.backend, "quick": args.quick, "spectrum": "90 kVp, 2.5 mm Al (SpekPy)",
                              "cases": {}}
    gpu = getattr(runner.est, "_gpu", None)
    report["device"] = str(getattr(gpu.gpu, "name", "GPU")) if gpu is not None else None
    images: dict[str, np.ndarray] = {}
    deadline = None if args.time_limit is None else t_all + float(args.time_limit)

    def budget(share: float, reserve: float) -> float | None:
        return None if deadline is None else max(1.0, share * (deadline - time.perf_counter() - reserve))

    def write() -> None:
        report["seconds"] = time.perf_counter() - t_all
        (args.out / "mcgpu_compare.json").write_text(json.dumps(_jsonable(report), indent=1))
        (args.out / "mcgpu_compare.md").write_text(markdown(report))
        np.savez_compressed(args.out / "mcgpu_images.npz",
                            **{k: np.asarray(v, dtype=np.float32) for k, v in images.items()})

    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        d = args.inputs / name
        if not (d / "phantom.npz").exists():
            print(f"{name}: no {d / 'phantom.npz'} (run make_inputs.py first); skipped", flush=True)
            continue
        t0 = time.perf_counter()
        case = load_case(d)
        mc = load_mcgpu(d, case["info"])
        if mc is None:
            print(f"{name}: no MC-GPU output in {d}; drrfarm only", flush=True)
        if name == "slab":
            res = run_slab(case, mc, runner, args.stage, photons["slab"], budget(0.2, 60.0))
        elif name == "chest":
            res = run_chest(case, mc, runner, args.stage, photons["chest"], fast_photons, budget(1.0, 30.0))
        else:
            raise SystemExit(f"unknown case {name!r}")
        res["seconds"] = time.perf_counter() - t0
        images.update(res.pop("_images"))
        report["cases"][name] = res
        del case
        write()
        print(json.dumps({name: _jsonable(res.get("comparison", res.get("drrfarm")))})[:2000], flush=True)
    write()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
