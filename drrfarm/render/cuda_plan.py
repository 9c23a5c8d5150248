"""CPU-side planning for the CUDA backend (NumPy only, importable without pycuda or a GPU).

Per-image camera records for the kernel, which slice-axis layouts a batch needs, detector tables
packed for the kernel, and the memory a volume takes. The kernel's arithmetic for a ray is mirrored
by :func:`rays_from_block` so that CPU tests check the records against the reference renderer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from drrfarm import physics as phys
from drrfarm.errors import BackendError, PhysicsError
from drrfarm.gpu.layouts import DRR_CAM_STRIDE
from drrfarm.render import reference


def layout_dims(shape: tuple[int, int, int], axis: int) -> tuple[int, int, int]:
    """(texture width X, height Y, layers L) of the layout for slice axis ``axis`` (see drr.cu)."""
    I, J, K = shape
    x = J if axis == 2 else K
    y = J if axis == 0 else I
    return x, y, shape[axis]


def channels_for(n_materials: int) -> tuple[int, int]:
    """(channels per texel, textures) used for ``n_materials`` materials."""
    if n_materials <= 0 or n_materials > 8:
        raise BackendError(f"backend 'cuda': supports 1 to 8 materials, got {n_materials}")
    if n_materials == 1:
        return 1, 1
    if n_materials == 2:
        return 2, 1
    return 4, (1 if n_materials <= 4 else 2)


def bytes_per_voxel(n_materials: int, layouts: int = 1) -> int:
    """GPU bytes per voxel for ``layouts`` resident slice-axis layouts."""
    c, t = channels_for(n_materials)
    return 2 * c * t * layouts


# ------------------------------------------------------------------------------------ geometry on the CPU

def camera_block(camera: Any, ijk_from_world_4x4: np.ndarray, h0_mm: float, tri_axis: int) -> np.ndarray:
    """The kernel's per-image camera record (DRR_CAM_STRIDE float64, layout in drr.cu)."""
    K = np.asarray(camera.K, dtype=np.float64)
    R = np.asarray(camera.R, dtype=np.float64)
    A = ijk_from_world_4x4[:3, :3]
    Kinv = np.linalg.inv(K)
    G = A @ R.T @ Kinv
    src = A @ np.asarray(camera.source_world_mm, dtype=np.float64) + ijk_from_world_4x4[:3, 3]
    out = np.zeros(DRR_CAM_STRIDE, dtype=np.float64)
    out[0:9] = G.ravel()
    out[9:14] = (Kinv[0, 0], Kinv[0, 1], Kinv[0, 2], Kinv[1, 1], Kinv[1, 2])
    out[14:17] = src
    out[17] = camera.sdd_mm
    out[18:22] = (K[0, 0], K[0, 2], K[1, 1], K[1, 2])
    out[22] = h0_mm
    out[23] = tri_axis
    return out


def plan_batch(cameras: Sequence[Any], ijk_from_world_4x4: np.ndarray, h0_mm: float,
               shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """Vectorised :func:`camera_block` for a batch of same-size cameras.

    Returns ``(records (B, DRR_CAM_STRIDE) float64, principal axes (B,), corner axes)`` where the corner
    axes are the dominant axes of the four corner rays of every image: the layouts worth building for
    Joseph stepping. A ray whose dominant axis has no resident layout is still rendered exactly (the
    kernel samples the same points trilinearly from the image's principal-axis layout, two fetches
    instead of one). Raises GeometryError when a source lies inside the volume.
    """
    K = np.stack([np.asarray(c.K, dtype=np.float64) for c in cameras])
    R = np.stack([np.asarray(c.R, dtype=np.float64) for c in cameras])
    t = np.stack([np.asarray(c.t, dtype=np.float64) for c in cameras])
    pixel_mm = np.array([float(c.pixel_mm) for c in cameras])
    A = ijk_from_world_4x4[:3, :3]
    Kinv = np.linalg.inv(K)
    Rt = np.transpose(R, (0, 2, 1))
    G = A[None] @ Rt @ Kinv
    src_world = -(Rt @ t[:, :, None])[:, :, 0]
    src = src_world @ A.T + ijk_from_world_4x4[:3, 3]
    n = np.asarray(shape, dtype=np.float64)
    inside = np.all((src > -0.5) & (src < n - 0.5), axis=1)
    if inside.any():
        reference.check_source_outside(cameras[int(np.argmax(inside))], ijk_from_world_4x4, shape)
    principal = np.argmax(np.abs(R[:, 2, :] @ A.T), axis=1)
    B = len(cameras)
    out = np.zeros((B, DRR_CAM_STRIDE), dtype=np.float64)
    out[:, 0:9] = G.reshape(B, 9)
    out[:, 9:14] = np.stack([Kinv[:, 0, 0], Kinv[:, 0, 1], Kinv[:, 0, 2], Kinv[:, 1, 1], Kinv[:, 1, 2]], axis=1)
    out[:, 14:17] = src
    out[:, 17] = K[:, 0, 0] * pixel_mm
    out[:, 18:22] = np.stack([K[:, 0, 0], K[:, 0, 2], K[:, 1, 1], K[:, 1, 2]], axis=1)
    out[:, 22] = h0_mm
    out[:, 23] = principal
    H, W = int(cameras[0].height), int(cameras[0].width)
    corners = np.array([[0.0, 0.0, 1.0], [W - 1.0, 0.0, 1.0], [0.0, H - 1.0, 1.0], [W - 1.0, H - 1.0, 1.0]]).T
    corner_axes = set(np.unique(np.argmax(np.abs(G @ corners), axis=1)).tolist())
    return out, principal, corner_axes


def _clip_polygon(poly: list[tuple[float, float]], coef: np.ndarray) -> list[tuple[float, float]]:
    """Sutherland–Hodgman: keep the part of ``poly`` where ``coef · (u, v, 1) >= -tol``."""
    if not poly:
        return poly
    tol = 1e-9 * (abs(coef[0]) + abs(coef[1]) + abs(coef[2])) * (1.0 + max(abs(c) for p in poly for c in p))
    out: list[tuple[float, float]] = []
    n = len(poly)
    for i in range(n):
        p, q = poly[i], poly[(i + 1) % n]
        fp = coef[0] * p[0] + coef[1] * p[1] + coef[2]
        fq = coef[0] * q[0] + coef[1] * q[1] + coef[2]
        if fp >= -tol:
            out.append(p)
        if (fp >= -tol) != (fq >= -tol):
            s = fp / (fp - fq)
            out.append((p[0] + s * (q[0] - p[0]), p[1] + s * (q[1] - p[1])))
    return out


def dominant_axes(camera: Any, ijk_from_world_4x4: np.ndarray) -> set[int]:
    """Index axes that are the dominant (largest |Δijk| per mm) axis of at least one pixel's ray.

    Exact, from the image-plane regions ``|d_a| >= |d_b|`` (linear in (u, v) for a fixed sign of
    d_a) clipped to the detector rectangle; ties count for both axes.
    """
    A = ijk_from_world_4x4[:3, :3]
    G = A @ np.asarray(camera.R, dtype=np.float64).T @ np.linalg.inv(np.asarray(camera.K, dtype=np.float64))
    W, H = camera.width, camera.height
    rect = [(0.0, 0.0), (W - 1.0, 0.0), (W - 1.0, H - 1.0), (0.0, H - 1.0)]
    axes: set[int] = set()
    for a in range(3):
        for sgn in (1.0, -1.0):
            poly = rect
            for b in range(3):
                if b == a:
                    continue
                for sb in (1.0, -1.0):
                    poly = _clip_polygon(poly, sgn * G[a] - sb * G[b])
            if poly:
                axes.add(a)
                break
    return axes


def principal_axis(camera: Any, ijk_from_world_4x4: np.ndarray) -> int:
    """Dominant index axis of the principal ray (the trilinear march's layout)."""
    d = ijk_from_world_4x4[:3, :3] @ np.asarray(camera.R, dtype=np.float64)[2]
    return int(np.argmax(np.abs(d)))


def tables_block(tables: Sequence[phys.DetectorTables], n_materials: int) -> tuple[np.ndarray, int, int]:
    """Pack detector tables for the kernel: ``(float32 (S, tstride), nbmax, tstride)``."""
    nbmax = max(int(t.mu_cm2_g.shape[0]) for t in tables)
    tstride = 2 + nbmax * (2 + n_materials)
    tstride += (-tstride) % 4
    out = np.zeros((len(tables), tstride), dtype=np.float32)
    for s, t in enumerate(tables):
        mu = np.asarray(t.mu_cm2_g, dtype=np.float64)
        nb = mu.shape[0]
        if mu.shape != (nb, n_materials):
            raise PhysicsError(f"spectrum tables: μ/ρ table has shape {mu.shape}, expected ({nb}, {n_materials})")
        out[s, 0] = nb
        out[s, 1] = t.open_field_signal
        out[s, 2 : 2 + nb] = t.signal_weights
        out[s, 2 + nbmax : 2 + nbmax + nb] = t.count_weights
        out[s, 2 + 2 * nbmax : 2 + 2 * nbmax + nb * n_materials] = mu.ravel()
    return out, nbmax, tstride


def rays_from_block(block: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's float64 ray set-up from a camera record: source (3,), directions (H*W, 3) in
    index units per mm, distance to the detector (H*W,). Mirrors drr.cu, for tests."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = u.ravel(), v.ravel()
    cx = block[9] * u + block[10] * v + block[11]
    cy = block[12] * v + block[13]
    nrm = np.sqrt(cx * cx + cy * cy + 1.0)
    G = block[0:9].reshape(3, 3)
    d = np.stack([G[r, 0] * u + G[r, 1] * v + G[r, 2] for r in range(3)], axis=1) / nrm[:, None]
    return block[14:17].copy(), d, block[17] * nrm


def count_samples(handle: Any, camera: Any, physics: phys.Physics) -> int:
    """Texture samples the renderer takes for one image (Joseph: slices; trilinear: 2 per step)."""
    src, dirs, t_det = reference.camera_rays_ijk(camera, handle.ijk_from_world)
    t0, t1 = reference.clip_rays_to_box(src, dirs, handle.shape, t_det)
    if physics.method == "joseph":
        axis = np.argmax(np.abs(dirs), axis=1)
        rows = np.arange(len(dirs))
        d_a = dirs[rows, axis]
        a0 = src[axis] + t0 * d_a
        a1 = src[axis] + t1 * d_a
        n = np.floor(np.maximum(a0, a1)) - np.ceil(np.minimum(a0, a1)) + 1
        n = np.where(t1 > t0, np.maximum(n, 0), 0)
        return int(n.sum())
    h0 = physics.step_voxels * min(handle.spacing_mm)
    n = np.ceil(np.maximum(t1 - t0, 0.0) / h0)
    return int(2 * n.sum())
