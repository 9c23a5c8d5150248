"""MC-GPU v1.3 file formats and the frame shared by ``make_inputs.py`` and ``compare.py`` (numpy only).

MC-GPU v1.3 (the FDA's GPU Monte Carlo for X-ray imaging, public domain) reads:

* an input file of fixed sections (``#[SECTION ... v.<date>]`` headers, one value per line, ``#`` starts a
  comment): histories (or seconds of simulation when < 95 000), RANECU seed, GPU id, threads per block,
  histories per thread; spectrum file, focal spot (cm), beam direction, polar and azimuthal apertures (negative:
  the cone covers the detector exactly); image file name, pixels (Nx Nz), detector size (cm), source-detector
  distance (cm); CT trajectory; dose tallies; the voxel file; up to 15 material files;
* a spectrum file: lines ``E_low[eV] probability`` of consecutive bins (energy uniform inside a bin), closed by
  ``E_max -1``;
* a voxel file (penEasy 2008): a ``[SECTION VOXELS HEADER v.2008-04-13]`` header (voxels in X, Y, Z; voxel size
  in cm; columns of material and density) then one ``material density`` line per voxel, X fastest, then Y,
  then Z; materials are 1-based indices into the material list, densities g/cm³ (> 1e-9). The voxels fill
  ``[0, Nx dx] x [0, Ny dy] x [0, Nz dz]``: the box's lower corner is the origin.

It writes ``<image name>`` (ASCII, a header then ``primary Compton Rayleigh multiple`` per pixel) and
``<image name>.raw``: five float32 images of Nx x Nz pixels, X fastest (total, primary, single Compton, single
Rayleigh, multiple scatter), in eV/cm² per emitted history (energy fluence on an ideal, 100 % absorbing
detector plane). The detector sits ``sdd`` ahead of the focal spot, normal to the beam direction; with the
beam along +Y its pixel (ix, iz) spans X and Z increasing.

**The frame.** Each case is written in an MC-GPU frame whose axes are drrfarm's camera axes: X = camera x
(image u), Y = camera z (the principal ray, so MC-GPU's beam is +Y and its detector is not rotated),
Z = -camera y (image -v), shifted so the voxel box starts at the origin. drrfarm's image row v is then MC-GPU's
row ``Nz - 1 - v``. The CT grid must be axis-aligned in that frame (the AP view and the slab are).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: MC-GPU material file (PENELOPE 2006, MC-GPU v1.3's ``MC-GPU_material_files``) for each drrfarm material;
#: the closest of the shipped files by partial mass attenuation (``prepare.py`` writes the check).
MCGPU_MATERIAL = {
    "water": "water__5-120keV.mcgpu",
    "air": "air__5-120keV.mcgpu",
    "soft_tissue": "muscle_ICRP110__5-120keV.mcgpu",
    "bone": "bone_ICRP110__5-120keV.mcgpu",
    "cortical_bone": "bone_ICRP110__5-120keV.mcgpu",
}
SPECTRUM_KEY = "tube:90:2.5"  # 90 kVp, 2.5 mm Al, SpekPy as drrfarm.spectrum gives it
SPECTRUM_FILE = "spectrum_90kV_Al2.5.json"
TABLES_FILE = "tables.npz"
DENSITY_QUANTUM = 1e-5  # g/cm³: densities are written with 5 decimals (and given to drrfarm identically)
IMAGE_NAMES = ("total", "primary", "compton", "rayleigh", "multiple")


def table_key(materials: list[str], detector: str = "ideal") -> str:
    """Key of drrfarm's transport tables in ``tables.npz`` (as ``tests/scatter_cases.table_key``)."""
    return f"{SPECTRUM_KEY}|{','.join(materials)}|{detector}"


# ------------------------------------------------------------------------------------------- spectrum

def read_spectrum(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(energies keV, weights) recorded by ``prepare.py`` (drrfarm's bins and photon fractions)."""
    d = json.loads(Path(path).read_text())
    return np.asarray(d["energies_kev"], dtype=np.float64), np.asarray(d["weights"], dtype=np.float64)


def spectrum_edges_kev(energies_kev: np.ndarray) -> np.ndarray:
    """(B + 1,) bin edges around drrfarm's bin centres (midpoints; the outer bins symmetric)."""
    e = np.asarray(energies_kev, dtype=np.float64)
    if e.size == 1:
        return np.array([e[0] - 0.05, e[0] + 0.05])
    mid = 0.5 * (e[1:] + e[:-1])
    return np.concatenate([[e[0] - (mid[0] - e[0])], mid, [e[-1] + (e[-1] - mid[-1])]])


def write_spectrum(path: str | Path, energies_kev: np.ndarray, weights: np.ndarray, title: str) -> float:
    """MC-GPU spectrum file of drrfarm's bins (each bin centred on drrfarm's energy); returns the mean energy
    in eV as MC-GPU computes it (``sum p (E_lo + E_hi) / 2 / sum p``)."""
    edges = spectrum_edges_kev(energies_kev) * 1e3
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    lines = [f"# {title}", "# drrfarm's bins (centres), MC-GPU samples uniformly inside each bin",
             "# Energy [eV]   probability"]
    lines += [f"{lo:.4f} {w:.10e}" for lo, w in zip(edges[:-1], p, strict=True)]
    lines.append(f"{edges[-1]:.4f} -1")
    Path(path).write_text("\n".join(lines) + "\n")
    return float(np.sum(p * 0.5 * (edges[:-1] + edges[1:])))


# ----------------------------------------------------------------------------------------------- frame

@dataclass(frozen=True)
class Frame:
    """drrfarm world (mm) -> MC-GPU coordinates (mm; the file wants cm): ``p_mc = Q @ p_world + offset``.

    ``axis_of``: for MC axis b (X, Y, Z), the voxel-index axis (i, j, k) that runs along it; ``flip``: whether
    that index runs against the MC axis; ``spacing_mm``: voxel size along X, Y, Z; ``shape_mc``: (Nx, Ny, Nz).
    """

    Q: np.ndarray
    offset_mm: np.ndarray
    axis_of: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    spacing_mm: np.ndarray
    shape_mc: tuple[int, int, int]

    def to_mc(self, points_world_mm: np.ndarray) -> np.ndarray:
        return np.asarray(points_world_mm, dtype=np.float64) @ self.Q.T + self.offset_mm

    def array_to_mc(self, arr_ijk: np.ndarray) -> np.ndarray:
        """(I, J, K) voxel array -> (Nz, Ny, Nx): C order is MC-GPU's file order (X fastest)."""
        a = np.asarray(arr_ijk)
        for b in range(3):
            if self.flip[b]:
                a = np.flip(a, axis=self.axis_of[b])
        return np.transpose(a, (self.axis_of[2], self.axis_of[1], self.axis_of[0]))

    def to_dict(self) -> dict[str, Any]:
        return {"Q": self.Q.tolist(), "offset_mm": self.offset_mm.tolist(), "axis_of": list(self.axis_of),
                "flip": list(self.flip), "spacing_mm": self.spacing_mm.tolist(), "shape_mc": list(self.shape_mc)}


def camera_frame_rotation(R: np.ndarray) -> np.ndarray:
    """Rows: camera x, camera z (beam), -camera y in world coordinates (a proper rotation)."""
    R = np.asarray(R, dtype=np.float64)
    return np.stack([R[0], R[2], -R[1]])


def frame_for(world_from_ijk: np.ndarray, shape: tuple[int, int, int], R: np.ndarray, tol: float = 1e-6) -> Frame:
    """The MC-GPU frame of a voxel grid seen by a camera of rotation ``R`` (world -> camera)."""
    A = np.asarray(world_from_ijk, dtype=np.float64)
    Q = camera_frame_rotation(R)
    M = Q @ A[:3, :3]  # column a: MC displacement of one step along index axis a
    axis_of = [-1, -1, -1]
    flip = [False, False, False]
    spacing = np.zeros(3)
    for a in range(3):
        col = M[:, a]
        b = int(np.argmax(np.abs(col)))
        if np.any(np.abs(np.delete(col, b)) > tol * np.abs(col[b])) or axis_of[b] != -1:
            raise ValueError("the voxel grid is not axis-aligned with the camera (MC-GPU needs an axis-aligned grid): "
                             f"Q @ world_from_ijk = {np.round(M, 6).tolist()}")
        axis_of[b] = a
        flip[b] = bool(col[b] < 0)
        spacing[b] = abs(col[b])
    n = np.asarray(shape, dtype=np.float64)
    corners = np.array([[x, y, z] for x in (-0.5, n[0] - 0.5) for y in (-0.5, n[1] - 0.5) for z in (-0.5, n[2] - 0.5)])
    world = corners @ A[:3, :3].T + A[:3, 3]
    offset = -(world @ Q.T).min(axis=0)
    shape_mc = tuple(int(shape[axis_of[b]]) for b in range(3))
    return Frame(Q, offset, tuple(axis_of), tuple(flip), spacing, shape_mc)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- voxels

def quantize_density(density_g_cm3: np.ndarray) -> np.ndarray:
    """int32 densities in units of ``DENSITY_QUANTUM``, at least 1 (MC-GPU rejects a density <= 1e-9; an empty
    voxel gets 1e-5 g/cm³, negligible)."""
    q = np.rint(np.asarray(density_g_cm3, dtype=np.float64) / DENSITY_QUANTUM)
    if q.max(initial=0) >= 1e6:
        raise ValueError("densities of 10 g/cm³ or more do not fit the 5-decimal voxel format")
    return np.maximum(q, 1).astype(np.int32)


def write_voxels(path: str | Path, material_mc: np.ndarray, density_q_mc: np.ndarray, spacing_mm: np.ndarray,
                 chunk: int = 1 << 24) -> int:
    """The penEasy voxel file of (Nz, Ny, Nx) arrays: 1-based material (1..9) and quantized density.

    Each voxel line is exactly ``"M D.DDDDD\\n"`` (10 bytes), built with numpy (35 M voxels in a few seconds).
    Returns the bytes written.
    """
    mat = np.asarray(material_mc)
    dq = np.asarray(density_q_mc)
    nz, ny, nx = mat.shape
    if mat.min() < 1 or mat.max() > 9:
        raise ValueError("materials must be 1..9 for the one-digit voxel format")
    sx, sy, sz = (float(s) / 10.0 for s in spacing_mm)
    header = (
        "# drrfarm benchmarks/mcgpu/make_inputs.py: material (1-based) and density (g/cm3) per voxel\n"
        "# Voxel order: X runs first, then Y, then Z.\n"
        "[SECTION VOXELS HEADER v.2008-04-13]\n"
        f"{nx} {ny} {nz}   No. OF VOXELS IN X,Y,Z\n"
        f"{sx:.8e} {sy:.8e} {sz:.8e}   VOXEL SIZE (cm) ALONG X,Y,Z\n"
        "1                  COLUMN NUMBER WHERE MATERIAL ID IS LOCATED\n"
        "2                  COLUMN NUMBER WHERE THE MASS DENSITY IS LOCATED\n"
        "0                  BLANK LINES AT END OF X,Y-CYCLES (1=YES,0=NO)\n"
        "[END OF VXH SECTION]\n"
    )
    flat_m = mat.reshape(-1)
    flat_d = dq.reshape(-1)
    total = 0
    with open(path, "wb") as f:
        total += f.write(header.encode())
        for s in range(0, flat_m.size, chunk):
            m = flat_m[s : s + chunk].astype(np.uint8)
            d = flat_d[s : s + chunk].astype(np.int64)
            line = np.empty((m.size, 10), dtype=np.uint8)
            line[:, 0] = ord("0") + m
            line[:, 1] = ord(" ")
            line[:, 3] = ord(".")
            line[:, 9] = ord("\n")
            line[:, 2] = ord("0") + d // 100000
            for c, p in zip(range(4, 9), (10000, 1000, 100, 10, 1), strict=True):
                line[:, c] = ord("0") + (d // p) % 10
            total += f.write(line.tobytes())
    return total


def read_voxels(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(material (Nz, Ny, Nx) int, density (Nz, Ny, Nx) float, voxel size cm (3,)): the reader MC-GPU's
    ``load_voxels`` implies (header up to ``[END OF VXH SECTION``, then ``material density`` per line; blank
    and ``#`` lines skipped). For checks of small files."""
    lines = Path(path).read_text().splitlines()
    i = next(n for n, s in enumerate(lines) if "[SECTION VOXELS" in s)
    nx, ny, nz = (int(v) for v in lines[i + 1].split()[:3])
    size = np.array([float(v) for v in lines[i + 2].split()[:3]])
    j = next(n for n, s in enumerate(lines) if "[END OF VXH SECTION" in s)
    body = [s for s in lines[j + 1 :] if s.strip() and not s.lstrip().startswith("#")]
    data = np.array([s.split()[:2] for s in body], dtype=np.float64)
    if data.shape[0] != nx * ny * nz:
        raise ValueError(f"{path}: {data.shape[0]} voxel lines, expected {nx * ny * nz}")
    return data[:, 0].astype(int).reshape(nz, ny, nx), data[:, 1].reshape(nz, ny, nx), size


# ----------------------------------------------------------------------------------------- input file

def write_input(path: str | Path, *, budget: float, seed: int, spectrum: str, source_cm: np.ndarray,
                image: str, pixels: tuple[int, int], size_cm: tuple[float, float], sdd_cm: float, voxels: str,
                materials: list[str], threads_per_block: int = 128, histories_per_thread: int = 1,
                title: str = "") -> None:
    """An MC-GPU v1.3 input file: one projection, beam along +Y, the cone collimated to the detector (negative
    apertures), no dose tallies. ``budget``: histories (>= 1e5) or seconds of simulation (< 95 000, after a speed
    test; GPU builds only). ``histories_per_thread``: 1 keeps the speed test short (the run itself raises it so
    that at most 65 000 blocks are launched)."""
    if len(materials) > 15:
        raise ValueError("MC-GPU v1.3 takes at most 15 materials")
    budget_text = f"{int(budget)}" if budget >= 95000 else f"{float(budget):g}"
    x, y, z = (float(v) for v in source_cm)
    mats = "\n".join(f"{m:<60s} # {i + 1}. MATERIAL FILE" for i, m in enumerate(materials))
    text = f"""# >>>> INPUT FILE FOR MC-GPU v1.3 >>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>
#   {title}
#   written by drrfarm benchmarks/mcgpu/make_inputs.py

#[SECTION SIMULATION CONFIG v.2009-05-12]
{budget_text:<30s} # TOTAL NUMBER OF HISTORIES, OR SIMULATION TIME IN SECONDS IF VALUE < 100000
{int(seed):<30d} # RANDOM SEED (ranecu PRNG)
0                              # GPU NUMBER TO USE WHEN MPI IS NOT USED
{int(threads_per_block):<30d} # GPU THREADS PER CUDA BLOCK (multiple of 32)
{int(histories_per_thread):<30d} # SIMULATED HISTORIES PER GPU THREAD

#[SECTION SOURCE v.2011-07-12]
{spectrum:<30s} # X-RAY ENERGY SPECTRUM FILE
{x:.6f} {y:.6f} {z:.6f}        # SOURCE POSITION: X Y Z [cm]
0.0 1.0 0.0                    # SOURCE DIRECTION COSINES: U V W
-1.0 -1.0                      # POLAR AND AZIMUTHAL APERTURES [deg] (negative: the beam covers the detector)

#[SECTION IMAGE DETECTOR v.2009-12-02]
{image:<30s} # OUTPUT IMAGE FILE NAME
{int(pixels[0])} {int(pixels[1])}                          # NUMBER OF PIXELS IN THE IMAGE: Nx Nz
{size_cm[0]:.6f} {size_cm[1]:.6f}            # IMAGE SIZE (width, height): Dx Dz [cm]
{sdd_cm:.6f}                     # SOURCE-TO-DETECTOR DISTANCE (detector in front of the source, normal to the beam)

#[SECTION CT SCAN TRAJECTORY v.2011-10-25]
1                              # NUMBER OF PROJECTIONS (1: a single radiograph)
0.0                            # ANGLE BETWEEN PROJECTIONS [degrees]
0.0 360.0                      # ANGLES OF INTEREST
{sdd_cm / 2:.6f}                      # SOURCE-TO-ROTATION AXIS DISTANCE
0.0                            # VERTICAL TRANSLATION BETWEEN PROJECTIONS

#[SECTION DOSE DEPOSITION v.2012-12-12]
NO                             # TALLY MATERIAL DOSE? [YES/NO]
NO                             # TALLY 3D VOXEL DOSE? [YES/NO]

#[SECTION VOXELIZED GEOMETRY FILE v.2009-11-30]
{voxels:<30s} # VOXEL GEOMETRY FILE (penEasy 2008 format)

#[SECTION MATERIAL FILE LIST v.2009-11-30]
{mats}

# >>>> END INPUT FILE >>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>>
"""
    for line in text.splitlines():
        if len(line) >= 249:
            raise ValueError(f"MC-GPU reads lines of at most 249 characters: {line[:60]}...")
    Path(path).write_text(text)


# ---------------------------------------------------------------------------------------------- output

def read_image(raw_path: str | Path, nx: int, nz: int) -> dict[str, np.ndarray]:
    """MC-GPU's ``.raw`` output as (Nz, Nx) float64 images in drrfarm's orientation (row v = MC-GPU row
    Nz - 1 - v), eV/cm² per history: total, primary, compton, rayleigh, multiple, plus scatter = the last three."""
    data = np.fromfile(raw_path, dtype="<f4")
    if data.size != 5 * nx * nz:
        raise ValueError(f"{raw_path}: {data.size} floats, expected 5 x {nx} x {nz}")
    imgs = data.astype(np.float64).reshape(5, nz, nx)[:, ::-1, :]
    out = dict(zip(IMAGE_NAMES, imgs, strict=True))
    out["scatter"] = out["compton"] + out["rayleigh"] + out["multiple"]
    return out


def read_header(ascii_path: str | Path) -> dict[str, float]:
    """Numbers from the ASCII image file's comments: histories simulated, seconds, speed, pixel size (cm), pixels."""
    text = Path(ascii_path).read_text(errors="replace")
    out: dict[str, float] = {}
    for key, pattern in (("histories", r"Simulated x rays:\s*([0-9]+)"),
                         ("seconds", r"Simulation time \[s\]:\s*([0-9.eE+-]+)"),
                         ("histories_per_s", r"Speed \[x-rays/sec\]:\s*([0-9.eE+-]+)"),
                         ("detected_energy_percent", r"Fraction of energy detected.*?:\s*([0-9.eE+-]+)%")):
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1))
    m = re.search(r"Pixel size:\s*([0-9.eE+-]+)\s*x\s*([0-9.eE+-]+)", text)
    if m:
        out["pixel_x_cm"], out["pixel_z_cm"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"Number of pixels in X and Z:\s*([0-9]+)\s+([0-9]+)", text)
    if m:
        out["nx"], out["nz"] = float(m.group(1)), float(m.group(2))
    return out


def write_fake_output(stem: str | Path, images: dict[str, np.ndarray], histories: int, pixel_cm: tuple[float, float],
                      seconds: float = 1.0) -> None:
    """Write ``stem`` (ASCII) and ``stem.raw`` as MC-GPU's ``report_image`` does, from (Nz, Nx) images in
    drrfarm's orientation (eV/cm² per history) — for testing the reader without a GPU."""
    primary, compton, rayleigh, multiple = (np.asarray(images[k], dtype=np.float64)[::-1] for k in
                                            ("primary", "compton", "rayleigh", "multiple"))
    nz, nx = primary.shape
    total = primary + compton + rayleigh + multiple
    np.concatenate([a.reshape(-1) for a in (total, primary, compton, rayleigh, multiple)]).astype("<f4").tofile(
        f"{stem}.raw")
    lines = ["# ", "#  Image created counting the energy arriving at each pixel: ideal energy integrating detector.",
             "#  Pixel value units: eV/cm^2 per history (energy fluence).",
             f"#  Pixel size:  {pixel_cm[0]:f} x {pixel_cm[1]:f} = {pixel_cm[0] * pixel_cm[1]:f} cm^2",
             f"#  Number of pixels in X and Z:  {nx}  {nz}",
             "#  [NON-SCATTERED] [COMPTON] [RAYLEIGH] [MULTIPLE-SCATTING]"]
    for j in range(nz):
        for i in range(nx):
            lines.append(f"{primary[j, i]:.8f} {compton[j, i]:.8f} {rayleigh[j, i]:.8f} {multiple[j, i]:.8f}")
        lines.append("")
    lines += ["#   *** Simulation REPORT: ***", f"#       Simulated x rays:    {int(histories)}",
              f"#       Simulation time [s]: {seconds:.2f}", f"#       Speed [x-rays/sec]:  {histories / seconds:.2f}"]
    Path(stem).write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ normalisation

def rectangle_solid_angle_sr(width_cm: float, height_cm: float, distance_cm: float) -> float:
    """Solid angle of a W x H rectangle centred on the normal at distance D: the cone MC-GPU samples isotropically."""
    w, h, d = float(width_cm), float(height_cm), float(distance_cm)
    return 4.0 * float(np.arctan(w * h / (2.0 * d * np.sqrt(4.0 * d * d + w * w + h * h))))


def open_field_factor(width_cm: float, height_cm: float, sdd_cm: float, mean_energy_ev: float) -> float:
    """Multiply MC-GPU's eV/cm² per history by this to get drrfarm's τ units (signal relative to the open field on
    the principal ray, as drrfarm's ``solid_angle=True`` tallies): ``Ω D² / Ē``."""
    return rectangle_solid_angle_sr(width_cm, height_cm, sdd_cm) * sdd_cm * sdd_cm / float(mean_energy_ev)


def block_mean(a: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """(H, W) -> (H/fy, W/fx) means of fy x fx blocks (H, W divisible)."""
    h, w = a.shape
    if h % fy or w % fx:
        raise ValueError(f"{a.shape} is not divisible by ({fy}, {fx})")
    return a.reshape(h // fy, fy, w // fx, fx).mean(axis=(1, 3))
