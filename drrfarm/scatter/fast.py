"""The fast scatter estimate's volume and grid: the Monte Carlo on a coarsened volume, its forced-detection
values at the centres of a coarse grid (:mod:`drrfarm.scatter.forced`) interpolated to the detector.

Scatter is a low-frequency signal, so the estimate (1) runs the transport on the volume coarsened to voxels
of about ``FAST_VOXEL_MM`` (block means of each material's density, integer factors per axis: fewer, larger
voxels that stay in cache), (2) scores each collision's expected scatter on a grid of at most
``FAST_MAX_BINS`` per side, and (3) interpolates that grid bilinearly to the detector. Everything physical
(cross sections, angular distributions, detector model) is the full Monte Carlo's.
"""

from __future__ import annotations

import numpy as np

from drrfarm.scatter.reference import ScatterVolume


def coarsening_factors(volume: ScatterVolume, voxel_mm: float) -> tuple[int, int, int]:
    """Per-axis integer factors that make the voxels at most about ``voxel_mm`` (1 where already coarser)."""
    spacing = np.linalg.norm(np.asarray(volume.world_from_ijk)[:3, :3], axis=0)
    return tuple(max(1, int(voxel_mm // s)) for s in spacing)  # type: ignore[return-value]


def coarsen_volume(volume: ScatterVolume, factors: int | tuple[int, int, int]) -> ScatterVolume:
    """Block-mean the densities by ``factors`` per axis (a grid not divisible by them is padded with
    vacuum, so mass is conserved exactly); the coarse grid starts where the fine one does."""
    f = (int(factors),) * 3 if np.isscalar(factors) else tuple(int(x) for x in factors)  # type: ignore[arg-type]
    if max(f) <= 1:
        return volume
    d = np.asarray(volume.densities_g_cm3, dtype=np.float32)
    M = d.shape[0]
    out = tuple(-(-n // k) for n, k in zip(d.shape[1:], f, strict=True))
    padded = np.pad(d, [(0, 0)] + [(0, o * k - n) for o, k, n in zip(out, f, d.shape[1:], strict=True)])
    blocks = padded.reshape(M, out[0], f[0], out[1], f[1], out[2], f[2])
    coarse = (blocks.sum(axis=(2, 4, 6), dtype=np.float64) / float(np.prod(f))).astype(np.float32)
    # coarse voxel c covers fine voxels [c k, c k + k - 1]: its centre is at fine index c k + (k - 1) / 2
    scale = np.diag([*map(float, f), 1.0])
    scale[:3, 3] = (np.asarray(f, dtype=np.float64) - 1.0) / 2.0
    return ScatterVolume(coarse, volume.world_from_ijk @ scale, list(volume.material_names))


def upsample_bilinear(tally: np.ndarray, height: int, width: int) -> np.ndarray:
    """Tally (H_t, W_t) → detector (H, W): bilinear between bin centres, constant beyond the outer ones.

    Bin b covers detector coordinates [(b) W/W_t - 0.5, (b+1) W/W_t - 0.5); pixel u sits at bin
    coordinate ``(u + 0.5) W_t / W - 0.5``.
    """
    t = np.asarray(tally, dtype=np.float64)
    Ht, Wt = t.shape

    def coords(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1.0)
        i0 = np.minimum(np.floor(c).astype(np.int64), max(n_in - 2, 0))
        return i0, np.minimum(i0 + 1, n_in - 1), c - i0

    v0, v1, wv = coords(height, Ht)
    u0, u1, wu = coords(width, Wt)
    rows = t[v0] * (1.0 - wv)[:, None] + t[v1] * wv[:, None]
    return rows[:, u0] * (1.0 - wu)[None] + rows[:, u1] * wu[None]
