"""Shared geometry for the scatter tests (CPU and GPU): water slabs and a bone-in-water phantom."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from drrfarm.errors import SpectrumError
from drrfarm.geometry import Camera
from drrfarm.scatter import ScatterVolume
from drrfarm.spectrum import Spectrum


def mono(energy_kev: float) -> Spectrum:
    return Spectrum(np.array([float(energy_kev)]), np.array([1.0]), name=f"mono{energy_kev:g}")


def slab_volume(thickness_mm: float, lateral_mm: float, sdd_mm: float, gap_mm: float, voxel_mm: float = 10.0,
                material: str = "water") -> ScatterVolume:
    """A uniform slab on the beam axis (camera z), its exit face ``gap_mm`` before the detector."""
    n = (int(round(lateral_mm / voxel_mm)), int(round(lateral_mm / voxel_mm)), int(round(thickness_mm / voxel_mm)))
    sp = np.array([voxel_mm, voxel_mm, thickness_mm / n[2]])
    A = np.eye(4)
    A[:3, :3] = np.diag(sp)
    centre = np.array([0.0, 0.0, sdd_mm - gap_mm - thickness_mm / 2.0])
    A[:3, 3] = centre - sp * (np.asarray(n) - 1) / 2.0
    return ScatterVolume(np.ones((1, *n), np.float32), A, [material])


def axis_camera(field_mm: float, pixels: int, sdd_mm: float = 1000.0) -> Camera:
    """Source at the origin looking along +z; a square detector of ``field_mm`` at ``sdd_mm``."""
    pix = field_mm / pixels
    f = sdd_mm / pix
    K = np.array([[f, 0.0, (pixels - 1) / 2.0], [0.0, f, (pixels - 1) / 2.0], [0.0, 0.0, 1.0]])
    return Camera(K, np.eye(3), np.zeros(3), pixels, pixels, pix)


def bone_in_water_volume(centre_z_mm: float = 600.0) -> ScatterVolume:
    """A 18 cm water cylinder (15 cm long, axis along the beam) with a bone rod and an air pocket: three
    single-material channels; its centre ``centre_z_mm`` from the source on the beam axis."""
    n = (40, 40, 30)
    sp = 5.0
    i, j, k = np.meshgrid(*(np.arange(s) for s in n), indexing="ij")
    r2 = (i - 19.5) ** 2 + (j - 19.5) ** 2
    water = (r2 < 18.0**2).astype(np.float32)
    bone = ((i - 25) ** 2 + (k - 15) ** 2 < 16).astype(np.float32)
    air = ((i - 12) ** 2 + (j - 22) ** 2 + (k - 10) ** 2 < 25).astype(np.float32)
    water[bone > 0] = 0.0
    water[air > 0] = 0.0
    dens = np.stack([air * 0.0012, water * 1.0, bone * 1.85])
    A = np.eye(4)
    A[:3, :3] = np.eye(3) * sp
    A[:3, 3] = np.array([0.0, 0.0, centre_z_mm]) - sp * (np.asarray(n) - 1) / 2.0
    return ScatterVolume(dens, A, ["air", "water", "cortical_bone"])


TABLES_NPZ_ENV = "DRRFARM_SCATTER_TABLES_NPZ"


def table_key(spectrum: str, materials: list[str], detector: str = "ideal") -> str:
    return f"{spectrum}|{','.join(materials)}|{detector}"


def tables_for(spectrum: str, materials: list[str], detector: str = "ideal") -> Any:
    """Transport tables of a spectrum string (``get_spectrum``'s, or ``tube:<kVp>:<mm Al>``), computed
    here when xraydb, xraylib and SpekPy are installed, else read from ``$DRRFARM_SCATTER_TABLES_NPZ``
    (written by ``benchmarks/device/prepare_scatter.py`` for GPU hosts without them)."""
    from drrfarm.physics import Physics
    from drrfarm.scatter.tables import load_tables, transport_tables

    try:
        from drrfarm.spectrum import get_spectrum

        if spectrum.startswith("tube:"):  # "tube:<kVp>:<mm Al>"
            _, kvp, al = spectrum.split(":")
            spec = get_spectrum({"kvp": float(kvp), "al_mm": float(al)})
        else:
            spec = get_spectrum(spectrum)
        return transport_tables(spec, materials, Physics(detector=detector))
    except (ImportError, SpectrumError):
        path = os.environ.get(TABLES_NPZ_ENV)
        if not path:
            raise
    return load_tables(path, table_key(spectrum, materials, detector))
