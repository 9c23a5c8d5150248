"""CPU reference renderer: the executable specification of every backend.

Per ray (world mm, unit direction ``d`` from the source ``s`` through a pixel centre):

1. Transform to voxel index space ``ijk = M (s + t d)`` with ``M = ijk_from_world``; voxel centres
   sit at integer indices and the volume's box is ``[-0.5, n - 0.5]`` on each axis.
2. Clip ``t`` to the box (slab test), to ``t >= 0`` (the source is never inside the box: that is
   rejected up front) and to the detector plane. Nothing is marched outside ``[t0, t1]``.
3. Sample per-material densities ``ρ_m`` (g/cm³) with trilinear interpolation, indices clamped
   to the edge voxels, and accumulate ``A_m = Σ_k ρ_m(p_k) h_k / 10`` (g/cm²; mm → cm), by one of:

   * ``trilinear`` — uniform march: ``N = ceil((t1 - t0) / h0)`` steps of ``h = (t1 - t0) / N``
     with ``h0 = step_voxels × min(spacing)``, sampled at the midpoints
     ``t_k = t0 + (k + ½) h`` (positions computed from ``t``, never accumulated);
   * ``joseph`` — slice stepping along the ray's dominant index axis ``a`` (largest ``|Δijk_a|``
     per mm, chosen per ray, so AP, lateral and oblique rays all work): one sample on each voxel
     slice plane ``ijk_a = c`` (bilinear in the other two axes) with ``t_c ∈ [t0, t1]``, each
     weighted by the ray length per slice ``h = 1 / |Δijk_a per mm|``.

4. The detector/noise/output step is :func:`drrfarm.physics.finish_image`.

Implemented with torch on the CPU (``grid_sample`` does the trilinear fetches), batched over rays.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from drrfarm.errors import GeometryError

RAYS_PER_CHUNK = 4096


def ijk_from_world(world_from_ijk: np.ndarray) -> np.ndarray:
    """Inverse of the 4x4 voxel-to-world affine."""
    return np.linalg.inv(np.asarray(world_from_ijk, dtype=np.float64))


def check_source_outside(camera: Any, ijk_from_world_4x4: np.ndarray, shape: tuple[int, int, int]) -> None:
    """Reject a camera whose source lies inside the volume's box (rays must start outside)."""
    s = ijk_from_world_4x4[:3, :3] @ camera.source_world_mm + ijk_from_world_4x4[:3, 3]
    inside = all(-0.5 < s[a] < shape[a] - 0.5 for a in range(3))
    if inside:
        raise GeometryError(
            f"source: the X-ray source at {np.round(camera.source_world_mm, 2).tolist()} mm (world) lies "
            "inside the volume; move the source farther away (increase sid_mm) or the volume"
        )


def clip_rays_to_box(
    src_ijk: np.ndarray, dir_ijk: np.ndarray, shape: tuple[int, int, int], t_max: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Slab test against ``[-0.5, n-0.5]³``: entry/exit ``t`` (mm) per ray, clipped to [0, t_max].

    ``src_ijk``: (3,), ``dir_ijk``: (R, 3) index units per mm; returns ``(t0, t1)`` each (R,);
    rays that miss have ``t1 <= t0``.
    """
    lo = -0.5 - src_ijk
    hi = np.asarray(shape, dtype=np.float64) - 0.5 - src_ijk
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dir_ijk
        ta = lo * inv
        tb = hi * inv
    t_near = np.minimum(ta, tb)
    t_far = np.maximum(ta, tb)
    # Axis-parallel rays: inside the slab → no constraint, outside → miss.
    parallel = dir_ijk == 0
    inside = (src_ijk > -0.5) & (src_ijk < np.asarray(shape) - 0.5)
    t_near = np.where(parallel, np.where(inside, -np.inf, np.inf), t_near)
    t_far = np.where(parallel, np.where(inside, np.inf, -np.inf), t_far)
    t0 = np.maximum(t_near.max(axis=1), 0.0)
    t1 = np.minimum(t_far.min(axis=1), t_max)
    return t0, t1


@dataclass(frozen=True)
class PackedVolume:
    """Material densities laid out for sampling: a (1, M, K+2, J+2, I+2) float32 tensor.

    The grid is stored k-major (so ``grid_sample``'s (x, y, z) are (i, j, k)) and padded by one
    edge-replicated voxel on every side: inside ``[-1, n]`` this is exactly clamp-to-edge
    trilinear interpolation, and points far outside read 0 (used to switch samples off).
    """

    tensor: Any
    shape: tuple[int, int, int]  # (I, J, K) of the unpadded grid

    @property
    def n_materials(self) -> int:
        return int(self.tensor.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.tensor.numel() * self.tensor.element_size())

    def normalised(self, points_ijk: np.ndarray) -> np.ndarray:
        """Index coordinates (..., 3) → grid_sample coordinates (..., 3) of the padded grid."""
        n = np.asarray(self.shape, dtype=np.float64)
        return (np.asarray(points_ijk, dtype=np.float64) + 1.0) * (2.0 / (n + 1.0)) - 1.0

    def normalised_direction(self, dirs_ijk: np.ndarray) -> np.ndarray:
        n = np.asarray(self.shape, dtype=np.float64)
        return np.asarray(dirs_ijk, dtype=np.float64) * (2.0 / (n + 1.0))


def pack_volume(densities_g_cm3: np.ndarray) -> PackedVolume:
    """(M, I, J, K) densities → :class:`PackedVolume` (one copy, done once per resident volume)."""
    import torch
    import torch.nn.functional as F

    dens = np.asarray(densities_g_cm3, dtype=np.float32)
    if dens.ndim != 4:
        raise ValueError(f"densities must be (M, I, J, K), got shape {dens.shape}")
    t = torch.from_numpy(np.ascontiguousarray(dens.transpose(0, 3, 2, 1)))  # (M, K, J, I)
    padded = F.pad(t[None], (1, 1, 1, 1, 1, 1), mode="replicate").contiguous()
    return PackedVolume(padded, tuple(int(x) for x in dens.shape[1:]))  # type: ignore[arg-type]


OFF_GRID = 4.0  # normalised coordinate of switched-off samples (outside the padded grid → 0)


def _fetch(volume: PackedVolume, grid: Any) -> Any:
    """Trilinear fetch at (R, S, 3) normalised points → (M, R, S) float32."""
    import torch.nn.functional as F

    out = F.grid_sample(volume.tensor, grid[None, None], mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out[0, :, 0]


def sample_densities(volume: PackedVolume, points_ijk: np.ndarray) -> np.ndarray:
    """Densities (M, ...) at index points (..., 3), clamp-to-edge trilinear; float32."""
    import torch

    pts = np.asarray(points_ijk, dtype=np.float64)
    n = np.asarray(volume.shape, dtype=np.float64) - 1.0
    grid = volume.normalised(np.clip(pts, 0.0, n)).reshape(1, -1, 3).astype(np.float32)
    out = _fetch(volume, torch.from_numpy(grid))[:, 0].numpy()
    return out.reshape((volume.n_materials,) + pts.shape[:-1])


def _accumulate(volume: PackedVolume, grid: Any, valid: Any) -> np.ndarray:
    """Sum of the samples of each ray: grid (r, S, 3) normalised, valid (r, S) → (M, r) float64."""
    import torch

    grid.masked_fill_(~valid[..., None], OFF_GRID)
    return _fetch(volume, grid).sum(dim=2, dtype=torch.float64).numpy()


def trilinear_samples(volume: PackedVolume, src: np.ndarray, dirs: np.ndarray, t0: np.ndarray, t1: np.ndarray,
                      h0_mm: float) -> Iterator[tuple[np.ndarray, Any, np.ndarray]]:
    """The uniform march's samples, in buckets of rays: yields ``(rays, values, h)``.

    ``rays``: (r,) indices into ``dirs``; ``values``: (M, r, S) float32 densities at the midpoints
    ``t_k = t0 + (k + ½) h`` (0 past each ray's last step); ``h``: (r,) step of each ray in mm.
    Rays are bucketed by step count so short rays do not pay for long ones.
    """
    import torch

    length = np.maximum(t1 - t0, 0.0)
    n_steps = np.ceil(length / h0_mm).astype(np.int64)
    idx = np.nonzero(n_steps > 0)[0]
    if len(idx) == 0:
        return
    n = n_steps[idx]
    h = length[idx] / n
    # Entry point and per-step displacement in normalised coordinates (computed in float64 once).
    entry = torch.from_numpy(volume.normalised(src[None, :] + t0[idx, None] * dirs[idx]).astype(np.float32))
    step = torch.from_numpy(volume.normalised_direction(h[:, None] * dirs[idx]).astype(np.float32))
    order = np.argsort(n)
    budget = RAYS_PER_CHUNK * 512
    start = 0
    while start < len(order):
        stop = start
        while stop < len(order) and int(n[order[stop]]) * (stop - start + 1) <= budget:
            stop += 1
        stop = max(stop, start + 1)
        sel = order[start:stop]
        n_max = int(n[sel].max())
        sel_t = torch.from_numpy(sel)
        k = torch.arange(n_max, dtype=torch.float32) + 0.5
        # positions from the step index (never accumulated): entry + (k + 1/2) * step
        grid = torch.addcmul(entry[sel_t, None, :], k[None, :, None], step[sel_t, None, :])
        valid = torch.arange(n_max)[None, :] < torch.from_numpy(n[sel])[:, None]
        grid.masked_fill_(~valid[..., None], OFF_GRID)
        yield idx[sel], _fetch(volume, grid), h[sel]
        start = stop


def _trilinear_chunk(volume: PackedVolume, src: np.ndarray, dirs: np.ndarray, t0: np.ndarray, t1: np.ndarray,
                     h0_mm: float) -> np.ndarray:
    """Uniform midpoint march for a chunk of rays → (M, R) line integrals in g/cm²."""
    import torch

    out = np.zeros((volume.n_materials, dirs.shape[0]), dtype=np.float64)
    for rays, values, h in trilinear_samples(volume, src, dirs, t0, t1, h0_mm):
        out[:, rays] = values.sum(dim=2, dtype=torch.float64).numpy() * h[None, :] / 10.0
    return out


def _joseph_chunk(volume: PackedVolume, src: np.ndarray, dirs: np.ndarray, t0: np.ndarray,
                  t1: np.ndarray) -> np.ndarray:
    """Slice stepping (Joseph) for a chunk of rays → (M, R) line integrals in g/cm²."""
    import torch

    out = np.zeros((volume.n_materials, dirs.shape[0]), dtype=np.float64)
    hit = t1 > t0
    axis = np.argmax(np.abs(dirs), axis=1)
    rows = np.arange(dirs.shape[0])
    d_a = dirs[rows, axis]
    s_a = src[axis]
    a0 = s_a + t0 * d_a
    a1 = s_a + t1 * d_a
    c_lo = np.ceil(np.minimum(a0, a1))
    c_hi = np.floor(np.maximum(a0, a1))
    n_slices = np.where(hit, np.maximum(c_hi - c_lo + 1, 0), 0).astype(np.int64)
    idx = np.nonzero(n_slices > 0)[0]
    if len(idx) == 0:
        return out
    h = 1.0 / np.abs(d_a[idx])  # mm of ray per slice
    # First slice's point and the displacement from one slice to the next (exactly 1 along the axis).
    t_first = (c_lo[idx] - s_a[idx]) / d_a[idx]
    first = src[None, :] + t_first[:, None] * dirs[idx]
    first[np.arange(len(idx)), axis[idx]] = c_lo[idx]
    per_slice = dirs[idx] / d_a[idx, None]
    first_n = torch.from_numpy(volume.normalised(first).astype(np.float32))
    step_n = torch.from_numpy(volume.normalised_direction(per_slice).astype(np.float32))
    for start in range(0, len(idx), RAYS_PER_CHUNK):
        sel = slice(start, start + RAYS_PER_CHUNK)
        n_sel = n_slices[idx[sel]]
        n_max = int(n_sel.max())
        c = torch.arange(n_max, dtype=torch.float32)
        grid = torch.addcmul(first_n[sel, None, :], c[None, :, None], step_n[sel, None, :])
        valid = torch.arange(n_max)[None, :] < torch.from_numpy(n_sel)[:, None]
        out[:, idx[sel]] = _accumulate(volume, grid, valid) * h[sel][None, :] / 10.0
    return out


def camera_rays_ijk(camera: Any, ijk_from_world_4x4: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source (3,), per-pixel directions (H*W, 3) in index units per world mm, and t to the detector."""
    dirs_world = camera.ray_directions_world().reshape(-1, 3)
    A = ijk_from_world_4x4[:3, :3]
    src = A @ camera.source_world_mm + ijk_from_world_4x4[:3, 3]
    dirs = dirs_world @ A.T
    t_det = camera.detector_distance_along_ray(dirs_world)
    return src, dirs, np.asarray(t_det, dtype=np.float64).reshape(-1)


def line_integrals(
    volume: Any,
    world_from_ijk: np.ndarray,
    spacing_mm: tuple[float, float, float],
    camera: Any,
    method: str = "trilinear",
    step_voxels: float = 0.5,
) -> np.ndarray:
    """Per-material line integrals of one camera: (M, H, W) float64 in g/cm².

    ``volume``: the material densities (g/cm³) packed by :func:`pack_volume`.
    """
    M_inv = ijk_from_world(world_from_ijk)
    shape = volume.shape
    check_source_outside(camera, M_inv, shape)
    src, dirs, t_det = camera_rays_ijk(camera, M_inv)
    t0, t1 = clip_rays_to_box(src, dirs, shape, t_det)
    out = np.zeros((volume.n_materials, dirs.shape[0]), dtype=np.float64)
    h0 = step_voxels * float(min(spacing_mm))
    for start in range(0, dirs.shape[0], RAYS_PER_CHUNK * 4):
        sl = slice(start, start + RAYS_PER_CHUNK * 4)
        if method == "joseph":
            out[:, sl] = _joseph_chunk(volume, src, dirs[sl], t0[sl], t1[sl])
        else:
            out[:, sl] = _trilinear_chunk(volume, src, dirs[sl], t0[sl], t1[sl], h0)
    return out.reshape(volume.n_materials, camera.height, camera.width)


def ray_lengths_in_box(camera: Any, world_from_ijk: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Length (mm) of each pixel's ray inside the volume's box: (H, W). Useful for checks."""
    M_inv = ijk_from_world(world_from_ijk)
    src, dirs, t_det = camera_rays_ijk(camera, M_inv)
    t0, t1 = clip_rays_to_box(src, dirs, shape, t_det)
    return np.maximum(t1 - t0, 0.0).reshape(camera.height, camera.width)

