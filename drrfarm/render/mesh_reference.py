"""CPU reference for meshes in a render: BVH, ray/triangle intervals, additive and replacing meshes.

Per ray (the reference's rays: from the camera's source through each pixel centre, unit world
direction ``d``, ``t`` in world mm, clipped to ``[0, t_detector]``) and per mesh:

1. **Candidates** from a bounding-volume hierarchy over the mesh's triangles (model frame; the ray
   is moved into the model frame by ``mesh_from_world``, which keeps ``t``): axis-aligned boxes,
   median split of the triangle centroids along the widest axis, at most ``leaf_size`` triangles
   per leaf, nodes stored depth-first (left child = node + 1). Traversal is breadth-first and
   vectorised over (ray, node) pairs.
2. **Hits** by the Möller–Trumbore test, barycentric bounds widened by ``EPS_BARY`` so a ray through
   a shared edge or vertex is never lost between two triangles; each hit is an *entry* (``+1``,
   ray against the outward normal) or an *exit* (``-1``).
3. **Clusters**: hits of one ray within ``CLUSTER_TOL(t) = 1e-9 (1 + |t|)`` mm are one crossing:
   all entries -> one entry, all exits -> one exit, both -> a graze (dropped).
4. **Intervals**: a running count of entries minus exits, started at the number of shells the
   source is inside (``-min`` of the prefix sums, if negative); an interval opens where the count
   leaves 0 and closes where it returns to 0, is closed at ``t_detector`` if still open, and is
   clipped to ``[0, t_detector]``. The chord is the summed interval length.

Render rules (:func:`line_integrals_with_meshes`):

* every mesh adds ``density × chord / 10`` (g/cm²) to its material's channel (channels are matched
  by canonical material name; a material the CT lacks gets a new channel after the CT's);
* a ``replace`` mesh also removes the CT: the union of the replacing meshes' intervals is formed
  per ray, and every CT sample of the reference march (trilinear midpoints ``t_k`` or Joseph slice
  crossings ``t_c``) whose ``t`` lies in a closed interval ``[t_in, t_out]`` is skipped. This is done
  by marching exactly those samples (same points and weights as :mod:`drrfarm.render.reference`)
  and subtracting their sum, so ``reference.py`` stays as it is. Replacement applies to the CT only,
  never to another mesh.

The CUDA twin is ``kernels/mesh.cu``; :func:`pack_scene` lays a scene out for it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from drrfarm import physics as phys
from drrfarm.errors import BackendError
from drrfarm.materials import canonical_material_name
from drrfarm.render import reference

EPS_BARY = 1e-9  # barycentric slack: edge/vertex hits are found on every adjacent triangle, then merged
DET_TOL = 1e-15  # |det| <= DET_TOL |e1| |e2| |d|: ray parallel to the triangle's plane
CLUSTER_REL = 1e-9  # hits closer than 1e-9 (1 + |t|) mm are one crossing
BOX_PAD_REL = 1e-9  # node boxes padded by BOX_PAD_REL * (1 + |coordinate|) mm
RAYS_PER_TRACE = 1 << 16
SAMPLES_PER_FETCH = 1 << 20


# ------------------------------------------------------------------------------------------------ meshes per image

def meshes_per_image(meshes: Any, n_images: int) -> list[list[Any]] | None:
    """``meshes`` as one list per image, or None when no image has a mesh.

    ``meshes``: None, a list of meshes (every image), or a list of ``n_images`` lists.
    """
    if not meshes:
        return None
    items = list(meshes)
    if isinstance(items[0], (list, tuple)):
        if len(items) != n_images:
            raise BackendError(f"meshes: need one list per camera ({n_images}), got {len(items)}")
        per = [list(m) for m in items]
    else:
        per = [items] * n_images
    return per if any(per) else None


def output_material_names(material_names: Sequence[str], meshes: Sequence[Any]) -> list[str]:
    """Line-integral channels with ``meshes``: the CT's materials, then mesh materials it lacks."""
    return mesh_material_channels(meshes, material_names)[0]



# ------------------------------------------------------------------------------------------------ BVH

@dataclass(frozen=True)
class Bvh:
    """Flattened BVH over a mesh's triangles, model frame (mm).

    lo, hi: (N, 3) float64 node boxes (padded outward). index: (N,) int64, for an inner node the
    right child (the left child is node + 1), for a leaf the first triangle slot. count: (N,) int64,
    0 for inner nodes, the number of triangle slots for leaves. order: (F,) int64 face index of each
    slot. v0, e1, e2: (F, 3) float64 per slot: the first vertex and the two edges ``v1 - v0``,
    ``v2 - v0`` (outward normal ``e1 × e2``).
    """

    lo: np.ndarray
    hi: np.ndarray
    index: np.ndarray
    count: np.ndarray
    order: np.ndarray
    v0: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    depth: int

    @property
    def n_nodes(self) -> int:
        return int(len(self.lo))

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.lo, self.hi, self.index, self.count, self.order, self.v0,
                                           self.e1, self.e2)))


def build_bvh(triangles_mm: np.ndarray, leaf_size: int = 4) -> Bvh:
    """Median-split BVH over triangles (F, 3, 3) (float64 mm); see :class:`Bvh`."""
    tri = np.asarray(triangles_mm, dtype=np.float64)
    if tri.ndim != 3 or tri.shape[1:] != (3, 3) or len(tri) == 0:
        raise ValueError(f"triangles must be (F>0, 3, 3), got {tri.shape}")
    leaf_size = max(1, int(leaf_size))
    tlo = tri.min(axis=1)
    thi = tri.max(axis=1)
    cent = tri.mean(axis=1)
    order = np.arange(len(tri), dtype=np.int64)
    lo_l: list[np.ndarray] = []
    hi_l: list[np.ndarray] = []
    index_l: list[int] = []
    count_l: list[int] = []
    max_depth = 0

    def build(start: int, end: int, depth: int) -> int:
        nonlocal max_depth
        max_depth = max(max_depth, depth)
        node = len(lo_l)
        idx = order[start:end]
        lo_l.append(tlo[idx].min(axis=0))
        hi_l.append(thi[idx].max(axis=0))
        index_l.append(start)
        count_l.append(end - start)
        n = end - start
        if n <= leaf_size:
            return node
        c = cent[idx]
        ext = c.max(axis=0) - c.min(axis=0)
        axis = int(np.argmax(ext))
        if ext[axis] <= 0.0:  # identical centroids: cannot split
            return node
        mid = n // 2
        part = np.argpartition(c[:, axis], mid)
        order[start:end] = idx[part]
        build(start, start + mid, depth + 1)
        right = build(start + mid, end, depth + 1)
        index_l[node] = right
        count_l[node] = 0
        return node

    build(0, len(tri), 0)
    lo = np.asarray(lo_l)
    hi = np.asarray(hi_l)
    lo = lo - BOX_PAD_REL * (1.0 + np.abs(lo))
    hi = hi + BOX_PAD_REL * (1.0 + np.abs(hi))
    t = tri[order]
    return Bvh(lo, hi, np.asarray(index_l, dtype=np.int64), np.asarray(count_l, dtype=np.int64), order,
               np.ascontiguousarray(t[:, 0]), np.ascontiguousarray(t[:, 1] - t[:, 0]),
               np.ascontiguousarray(t[:, 2] - t[:, 0]), max_depth)


_BVH_CACHE: OrderedDict[str, Bvh] = OrderedDict()
_BVH_CACHE_SIZE = 64


def mesh_bvh(mesh: Any) -> Bvh:
    """The (cached, by geometry hash) model-frame BVH of a :class:`drrfarm.meshes.Mesh`."""
    key = mesh.geometry_sha256
    bvh = _BVH_CACHE.get(key)
    if bvh is None:
        bvh = build_bvh(mesh.triangles_model_mm())
        _BVH_CACHE[key] = bvh
        while len(_BVH_CACHE) > _BVH_CACHE_SIZE:
            _BVH_CACHE.popitem(last=False)
    else:
        _BVH_CACHE.move_to_end(key)
    return bvh


# ------------------------------------------------------------------------------------------ traversal

def _candidates(bvh: Bvh, o: np.ndarray, d: np.ndarray, t_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ray, triangle slot) pairs whose leaf box the ray segment [0, t_max] meets."""
    with np.errstate(divide="ignore"):
        inv = 1.0 / d
    rays = np.arange(len(o))
    nodes = np.zeros(len(o), dtype=np.int64)
    out_r: list[np.ndarray] = []
    out_s: list[np.ndarray] = []
    while rays.size:
        oo = o[rays]
        ii = inv[rays]
        with np.errstate(invalid="ignore"):
            ta = (bvh.lo[nodes] - oo) * ii
            tb = (bvh.hi[nodes] - oo) * ii
        # 0 * inf (ray in a box face's plane, parallel to it) -> NaN: no constraint from that axis
        near = np.where(np.isnan(ta) | np.isnan(tb), -np.inf, np.minimum(ta, tb)).max(axis=1)
        far = np.where(np.isnan(ta) | np.isnan(tb), np.inf, np.maximum(ta, tb)).min(axis=1)
        hit = (near <= far) & (far >= 0.0) & (near <= t_max[rays])
        rays = rays[hit]
        nodes = nodes[hit]
        cnt = bvh.count[nodes]
        leaf = cnt > 0
        if leaf.any():
            lr = rays[leaf]
            lc = cnt[leaf]
            first = bvh.index[nodes[leaf]]
            total = int(lc.sum())
            within = np.arange(total) - np.repeat(np.cumsum(lc) - lc, lc)
            out_r.append(np.repeat(lr, lc))
            out_s.append(np.repeat(first, lc) + within)
        inner = ~leaf
        ir = rays[inner]
        inn = nodes[inner]
        rays = np.concatenate([ir, ir])
        nodes = np.concatenate([inn + 1, bvh.index[inn]])
    if not out_r:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(out_r), np.concatenate(out_s)


def _hits(bvh: Bvh, o: np.ndarray, d: np.ndarray, t_max: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Möller–Trumbore on the BVH candidates: (ray, t, sign) with sign +1 entry, -1 exit."""
    r, s = _candidates(bvh, o, d, t_max)
    if r.size == 0:
        return r, np.zeros(0), np.zeros(0, dtype=np.int64)
    dd = d[r]
    e1 = bvh.e1[s]
    e2 = bvh.e2[s]
    p = np.cross(dd, e2)
    det = np.einsum("ij,ij->i", e1, p)
    scale = np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1) * np.linalg.norm(dd, axis=1)
    ok = np.abs(det) > DET_TOL * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    tv = o[r] - bvh.v0[s]
    u = np.einsum("ij,ij->i", tv, p) * inv
    q = np.cross(tv, e1)
    v = np.einsum("ij,ij->i", dd, q) * inv
    t = np.einsum("ij,ij->i", e2, q) * inv
    hit = ok & (u >= -EPS_BARY) & (v >= -EPS_BARY) & (u + v <= 1.0 + EPS_BARY) & (t > 0.0) & (t <= t_max[r])
    sign = np.where(det > 0.0, 1, -1).astype(np.int64)  # det = -d.n: > 0 entering
    return r[hit], t[hit], sign[hit]


@dataclass(frozen=True)
class Intervals:
    """Sorted, disjoint inside-intervals of rays: ``ray`` (K,) int64, ``t_in``/``t_out`` (K,) float64 mm.

    Sorted by (ray, t_in); ``n_rays`` rays in all.
    """

    ray: np.ndarray
    t_in: np.ndarray
    t_out: np.ndarray
    n_rays: int

    @classmethod
    def empty(cls, n_rays: int) -> Intervals:
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0), int(n_rays))

    def __len__(self) -> int:
        return int(self.ray.size)

    def chord_mm(self) -> np.ndarray:
        """(n_rays,) summed interval length per ray."""
        return np.bincount(self.ray, weights=self.t_out - self.t_in, minlength=self.n_rays)

    def per_ray_counts(self) -> np.ndarray:
        return np.bincount(self.ray, minlength=self.n_rays)


def intervals_from_events(ray: np.ndarray, t: np.ndarray, sign: np.ndarray, t_max: np.ndarray,
                          n_rays: int) -> Intervals:
    """Inside-intervals from crossing events (ray, t, sign +1 in / -1 out); see the module doc (step 4).

    Events at equal ``t`` are ordered entries first, so touching intervals merge.
    """
    if ray.size == 0:
        return Intervals.empty(n_rays)
    o = np.lexsort((-sign, t, ray))
    ray, t, sign = ray[o], t[o], sign[o]
    first = np.r_[True, ray[1:] != ray[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:] - 1, ray.size - 1]
    gid = np.cumsum(first) - 1
    cs = np.cumsum(sign)
    prefix = cs - (cs - sign)[starts][gid]
    offset = np.maximum(0, -np.minimum.reduceat(prefix, starts))
    after = prefix + offset[gid]
    before = after - sign
    opens = (before <= 0) & (after > 0)
    closes = (before > 0) & (after <= 0)
    g_ray = ray[starts]
    pre_open = offset > 0
    still_open = after[ends] > 0
    in_r = np.concatenate([ray[opens], g_ray[pre_open]])
    in_t = np.concatenate([t[opens], np.full(int(pre_open.sum()), -np.inf)])
    out_r = np.concatenate([ray[closes], g_ray[still_open]])
    out_t = np.concatenate([t[closes], np.full(int(still_open.sum()), np.inf)])
    oi = np.lexsort((in_t, in_r))
    oo = np.lexsort((out_t, out_r))
    in_r, in_t, out_t = in_r[oi], in_t[oi], out_t[oo]
    assert in_r.size == out_t.size and np.array_equal(in_r, out_r[oo]), "unbalanced interval events"
    a = np.maximum(in_t, 0.0)
    b = np.minimum(out_t, t_max[in_r])
    keep = b > a
    return Intervals(in_r[keep], a[keep], b[keep], int(n_rays))


def _cluster(ray: np.ndarray, t: np.ndarray, sign: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge hits of one ray closer than CLUSTER_REL (1 + |t|) into single crossings (module doc, step 3)."""
    if ray.size == 0:
        return ray, t, sign
    o = np.lexsort((t, ray))
    ray, t, sign = ray[o], t[o], sign[o]
    new = np.r_[True, (ray[1:] != ray[:-1]) | (t[1:] - t[:-1] > CLUSTER_REL * (1.0 + np.abs(t[:-1])))]
    cid = np.cumsum(new) - 1
    n = int(cid[-1]) + 1
    pos = np.bincount(cid, weights=(sign > 0), minlength=n) > 0
    neg = np.bincount(cid, weights=(sign < 0), minlength=n) > 0
    keep = pos ^ neg
    heads = np.flatnonzero(new)
    return ray[heads][keep], t[heads][keep], np.where(pos, 1, -1)[keep].astype(np.int64)


def trace_mesh(mesh: Any, source_world_mm: np.ndarray, dirs_world: np.ndarray, t_max: np.ndarray,
               bvh: Bvh | None = None, rays: np.ndarray | None = None) -> Intervals:
    """Inside-intervals of rays ``source + t d`` (dirs (R, 3) unit world, t_max (R,)) through one mesh.

    ``rays``: optional indices of the only rays that can meet the mesh (the others are skipped).
    """
    bvh = bvh if bvh is not None else mesh_bvh(mesh)
    T = np.linalg.inv(mesh.world_from_mesh)
    src = np.asarray(source_world_mm, dtype=np.float64)
    dirs_world = np.asarray(dirs_world, dtype=np.float64)
    t_max = np.asarray(t_max, dtype=np.float64)
    R = len(dirs_world)
    sel = np.arange(R) if rays is None else np.asarray(rays, dtype=np.int64)
    rs, ts, ss = [], [], []
    o_model = T[:3, :3] @ src + T[:3, 3]
    for start in range(0, len(sel), RAYS_PER_TRACE):
        idx = sel[start : start + RAYS_PER_TRACE]
        d = dirs_world[idx] @ T[:3, :3].T
        o = np.broadcast_to(o_model, d.shape)
        r, t, s = _hits(bvh, o, d, t_max[idx])
        rs.append(idx[r])
        ts.append(t)
        ss.append(s)
    if not rs:
        return Intervals.empty(R)
    r, t, s = _cluster(np.concatenate(rs), np.concatenate(ts), np.concatenate(ss))
    return intervals_from_events(r, t, s, t_max, R)


def pixel_window(mesh: Any, camera: Any) -> np.ndarray | None:
    """Flat indices of the pixels whose rays can meet the mesh (the bounding rectangle of its projected
    world box, one pixel of margin), or None when part of the box is at or behind the source."""
    lo, hi = mesh.bounds_world_mm()
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    if np.any(camera.depth(corners) <= 1e-6):
        return None
    uv = camera.project(corners)
    H, W = int(camera.height), int(camera.width)
    u0 = max(int(np.floor(uv[:, 0].min())) - 1, 0)
    u1 = min(int(np.ceil(uv[:, 0].max())) + 1, W - 1)
    v0 = max(int(np.floor(uv[:, 1].min())) - 1, 0)
    v1 = min(int(np.ceil(uv[:, 1].max())) + 1, H - 1)
    if u1 < u0 or v1 < v0:
        return np.zeros(0, dtype=np.int64)
    vv, uu = np.mgrid[v0 : v1 + 1, u0 : u1 + 1]
    return (vv * W + uu).reshape(-1)


def union(intervals: Sequence[Intervals], n_rays: int, t_max: np.ndarray) -> Intervals:
    """Per-ray union of several interval sets (overlapping or touching intervals merge)."""
    parts = [iv for iv in intervals if len(iv)]
    if not parts:
        return Intervals.empty(n_rays)
    if len(parts) == 1:
        return parts[0]
    ray = np.concatenate([np.r_[iv.ray, iv.ray] for iv in parts])
    t = np.concatenate([np.r_[iv.t_in, iv.t_out] for iv in parts])
    sign = np.concatenate([np.r_[np.ones(len(iv), np.int64), -np.ones(len(iv), np.int64)] for iv in parts])
    return intervals_from_events(ray, t, sign, t_max, n_rays)


# ------------------------------------------------------------------------------------------ the pass

@dataclass
class MeshPass:
    """What the meshes do to one image: per-mesh intervals and chords, and the replacing union.

    chords_mm: (n_meshes, H, W) float64 path length through each mesh. intervals: per mesh.
    replace: union of the ``replace`` meshes' intervals (used to skip CT samples).
    """

    meshes: list[Any]
    intervals: list[Intervals]
    replace: Intervals
    chords_mm: np.ndarray
    height: int
    width: int

    def material_channels(self, material_names: Sequence[str]) -> tuple[list[str], list[int]]:
        """Output material names (the CT's, then new mesh materials) and each mesh's channel."""
        return mesh_material_channels(self.meshes, material_names)

    def mesh_line_integrals(self, material_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """(names, (M_out, H, W) float64 g/cm²): every mesh's ``density × chord / 10`` in its channel."""
        names, channel = self.material_channels(material_names)
        out = np.zeros((len(names), self.height, self.width), dtype=np.float64)
        for m, c, chord in zip(self.meshes, channel, self.chords_mm, strict=True):
            out[c] += m.density_g_cm3 * chord / 10.0
        return names, out


def mesh_material_channels(meshes: Sequence[Any], material_names: Sequence[str]) -> tuple[list[str], list[int]]:
    """Output material names (the CT's, then mesh materials the CT lacks, matched by canonical
    name) and each mesh's channel index."""
    names = list(material_names)
    canon = [canonical_material_name(n) for n in names]
    channel = []
    for m in meshes:
        c = canonical_material_name(m.material)
        if c not in canon:
            canon.append(c)
            names.append(m.material)
        channel.append(canon.index(c))
    return names, channel


def camera_rays_world(camera: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference's rays in world: source (3,), unit directions (H*W, 3), t to the detector (H*W,)."""
    dirs = camera.ray_directions_world().reshape(-1, 3)
    t_det = np.asarray(camera.detector_distance_along_ray(dirs), dtype=np.float64).reshape(-1)
    return np.asarray(camera.source_world_mm, dtype=np.float64), dirs, t_det


def trace_meshes(meshes: Sequence[Any], camera: Any) -> MeshPass:
    """Trace every mesh for one camera (:class:`MeshPass`)."""
    src, dirs, t_det = camera_rays_world(camera)
    R = len(dirs)
    ivs = [trace_mesh(m, src, dirs, t_det, rays=pixel_window(m, camera)) for m in meshes]
    rep = union([iv for m, iv in zip(meshes, ivs, strict=True) if m.mode == "replace"], R, t_det)
    chords = np.stack([iv.chord_mm() for iv in ivs]) if ivs else np.zeros((0, R))
    return MeshPass(list(meshes), ivs, rep, chords.reshape(len(ivs), camera.height, camera.width),
                    int(camera.height), int(camera.width))


# ---------------------------------------------------------------------------- CT inside the intervals

def ct_line_integrals_inside(volume: reference.PackedVolume, world_from_ijk: np.ndarray,
                             spacing_mm: tuple[float, float, float], camera: Any, intervals: Intervals,
                             method: str = "trilinear", step_voxels: float = 0.5) -> np.ndarray:
    """The part of the reference's CT line integrals whose samples lie inside ``intervals``: (M, R) float64.

    Exactly the samples :func:`drrfarm.render.reference.line_integrals` takes (same ``t``, same
    float32 positions, same weights), restricted to ``t`` in a closed interval.
    """
    import torch

    M = volume.n_materials
    M_inv = reference.ijk_from_world(world_from_ijk)
    src, dirs, t_det = reference.camera_rays_ijk(camera, M_inv)
    R = len(dirs)
    out = np.zeros((M, R), dtype=np.float64)
    if len(intervals) == 0:
        return out
    t0, t1 = reference.clip_rays_to_box(src, dirs, volume.shape, t_det)
    r = intervals.ray
    a, b = intervals.t_in, intervals.t_out
    if method == "joseph":
        axis = np.argmax(np.abs(dirs), axis=1)
        rows = np.arange(R)
        d_a = dirs[rows, axis]
        s_a = src[axis]
        a0 = s_a + t0 * d_a
        a1 = s_a + t1 * d_a
        c_lo = np.ceil(np.minimum(a0, a1))
        c_hi = np.floor(np.maximum(a0, a1))
        n = np.where(t1 > t0, np.maximum(c_hi - c_lo + 1, 0), 0).astype(np.int64)
        # per interval: slices c with t_c = (c - s_a) / d_a in [a, b]
        ca = s_a[r] + a * d_a[r]
        cb = s_a[r] + b * d_a[r]
        j_lo = np.ceil(np.minimum(ca, cb)) - c_lo[r]
        j_hi = np.floor(np.maximum(ca, cb)) - c_lo[r]
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = np.where(n > 0, 1.0 / np.abs(d_a), 0.0) / 10.0
            t_first = (c_lo - s_a) / d_a
            first = src[None, :] + t_first[:, None] * dirs
            first[rows, axis] = c_lo
            per_slice = dirs / d_a[:, None]
        offset = 0.0
        base = volume.normalised(first[r]).astype(np.float32)
        step = volume.normalised_direction(per_slice[r]).astype(np.float32)
    else:
        h0 = step_voxels * float(min(spacing_mm))
        length = np.maximum(t1 - t0, 0.0)
        n = np.ceil(length / h0).astype(np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = np.where(n > 0, length / np.maximum(n, 1), 0.0)
            j_lo = np.ceil((a - t0[r]) / h[r] - 0.5)
            j_hi = np.floor((b - t0[r]) / h[r] - 0.5)
        weight = h / 10.0
        offset = 0.5
        base = volume.normalised(src[None, :] + t0[r, None] * dirs[r]).astype(np.float32)
        step = volume.normalised_direction(h[r, None] * dirs[r]).astype(np.float32)
    nr = n[r]
    j_lo = np.where(nr > 0, np.clip(np.nan_to_num(j_lo, nan=0.0), 0, np.maximum(nr - 1, 0)), 0).astype(np.int64)
    j_hi = np.where(nr > 0, np.clip(np.nan_to_num(j_hi, nan=-1.0), -1, nr - 1), -1).astype(np.int64)
    cnt = np.maximum(j_hi - j_lo + 1, 0)
    total = int(cnt.sum())
    if total == 0:
        return out
    rep = np.repeat(np.arange(len(r)), cnt)
    j = np.repeat(j_lo, cnt) + (np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    base_t = torch.from_numpy(base)
    step_t = torch.from_numpy(step)
    sums = np.zeros((M, len(r)), dtype=np.float64)
    for start in range(0, total, SAMPLES_PER_FETCH):
        sl = slice(start, start + SAMPLES_PER_FETCH)
        rr = torch.from_numpy(rep[sl])
        k = torch.from_numpy(j[sl].astype(np.float32) + np.float32(offset))
        grid = torch.addcmul(base_t[rr], k[:, None], step_t[rr])
        vals = reference._fetch(volume, grid[None])[:, 0].to(torch.float64).numpy()  # (M, S)
        for m in range(M):
            sums[m] += np.bincount(rep[sl], weights=vals[m], minlength=len(r))
    for m in range(M):
        out[m] = np.bincount(r, weights=sums[m], minlength=R) * weight
    return out


def line_integrals_with_meshes(volume: reference.PackedVolume, world_from_ijk: np.ndarray,
                               spacing_mm: tuple[float, float, float], material_names: Sequence[str],
                               camera: Any, meshes: Sequence[Any], method: str = "trilinear",
                               step_voxels: float = 0.5, mesh_pass: MeshPass | None = None,
                               ) -> tuple[list[str], np.ndarray, MeshPass]:
    """CT + meshes for one camera: ``(material names, (M_out, H, W) float64 g/cm², MeshPass)``.

    The first ``len(material_names)`` channels are the CT's (minus what replacing meshes remove,
    plus meshes of those materials); further channels are mesh materials the CT lacks.
    """
    A = reference.line_integrals(volume, world_from_ijk, spacing_mm, camera, method=method,
                                 step_voxels=step_voxels)
    mp = mesh_pass if mesh_pass is not None else trace_meshes(meshes, camera)
    if len(mp.replace):
        inside = ct_line_integrals_inside(volume, world_from_ijk, spacing_mm, camera, mp.replace, method,
                                          step_voxels)
        A = np.maximum(A - inside.reshape(A.shape), 0.0)
    names, mesh_A = mp.mesh_line_integrals(material_names)
    out = mesh_A
    out[: A.shape[0]] += A
    return names, out, mp


# ------------------------------------------------------------------------------- CPU backend helpers

def cpu_line_integrals(handle: Any, cameras: Sequence[Any], physics: Any, meshes: Any
                       ) -> tuple[list[str], np.ndarray]:
    """Line integrals with meshes on a :class:`drrfarm.render.cpu.CpuVolume`: ``(names, (B, M_out, H, W))``.

    ``meshes``: a list of :class:`~drrfarm.meshes.Mesh` for every image, or one list per camera
    (poses and meshes may differ per image). The channels are the CT's materials, then every mesh
    material of the call the CT lacks (in order of first appearance); zero where an image lacks one.
    """
    per = meshes_per_image(meshes, len(cameras)) or [[] for _ in cameras]
    names_all = mesh_material_channels([m for ms in per for m in ms], handle.material_names)[0]
    outs = []
    for cam, ms in zip(cameras, per, strict=True):
        names, A, _ = line_integrals_with_meshes(handle.densities, handle.world_from_ijk, handle.spacing_mm,
                                                 handle.material_names, cam, ms, physics.method,
                                                 physics.step_voxels)
        outs.append(widen_channels(A, names, names_all))
    return names_all, np.stack(outs).astype(np.float32)


def widen_channels(values: np.ndarray, names: Sequence[str], names_all: Sequence[str]) -> np.ndarray:
    """(..., len(names), H, W) line integrals -> (..., len(names_all), H, W), zero in the channels
    ``names`` lacks (materials matched by canonical name; ``names_all`` contains every name)."""
    canon_all = [canonical_material_name(n) for n in names_all]
    index = [canon_all.index(canonical_material_name(n)) for n in names]
    if index == list(range(len(names_all))):
        return values
    out = np.zeros((*values.shape[:-3], len(names_all), *values.shape[-2:]), dtype=values.dtype)
    out[..., index, :, :] = values
    return out


def cpu_render(handle: Any, cameras: Sequence[Any], spectrum: Any, physics: Any, seeds: Sequence[int],
               meshes: Any) -> np.ndarray:
    """Images (B, H, W) float32 with meshes: the CPU backend's ``render`` plus meshes (reference)."""
    if len(seeds) != len(cameras):
        raise phys.PhysicsError(f"seeds: need one seed per camera ({len(cameras)}), got {len(seeds)}")
    per = meshes_per_image(meshes, len(cameras)) or [[] for _ in cameras]
    images = []
    tables_cache: dict[tuple[str, ...], Any] = {}
    for cam, seed, ms in zip(cameras, seeds, per, strict=True):
        names, A, _ = line_integrals_with_meshes(handle.densities, handle.world_from_ijk, handle.spacing_mm,
                                                 handle.material_names, cam, ms, physics.method,
                                                 physics.step_voxels)
        key = tuple(names)
        if key not in tables_cache:
            tables_cache[key] = phys.detector_tables(spectrum, names, physics)
        images.append(phys.finish_image(A, tables_cache[key], physics, cam, seed))
    return np.stack(images)


# ------------------------------------------------------------------------------------ GPU packing

MESH_MODE_CODES = {"add": 0, "replace": 1}


def pack_scene(meshes: Sequence[Any], material_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Lay out a scene's BVHs for ``kernels/mesh.cu`` (all meshes concatenated).

    Returns ``nodes`` (N_total, 8) float32: lo.xyz, index (int32 bits), hi.xyz, count (int32 bits),
    boxes rounded outward to float32; ``tris`` (F_total, 9) float64: v0, e1, e2 per slot;
    ``meshes`` (n, 4) int32: node offset, slot offset, mode (0 add, 1 replace), material channel;
    ``density`` (n,) float32; ``names``: the output material names (object array).
    Per image the kernel also needs each mesh's ``mesh_from_world`` (:func:`pack_poses`).
    """
    bvhs = [mesh_bvh(m) for m in meshes]
    names, channel = mesh_material_channels(meshes, material_names)
    node_rows, tri_rows, mesh_rows = [], [], []
    n_off = s_off = 0
    for m, bvh, c in zip(meshes, bvhs, channel, strict=True):
        # float32 rounds to nearest: step outward where that moved a face inward (boxes must still contain)
        lo = bvh.lo.astype(np.float32)
        hi = bvh.hi.astype(np.float32)
        lo = np.where(lo.astype(np.float64) > bvh.lo, np.nextafter(lo, np.float32(-np.inf)), lo)
        hi = np.where(hi.astype(np.float64) < bvh.hi, np.nextafter(hi, np.float32(np.inf)), hi)
        rows = np.zeros((bvh.n_nodes, 8), dtype=np.float32)
        rows[:, 0:3] = lo
        rows[:, 4:7] = hi
        rows[:, 3] = bvh.index.astype(np.int32).view(np.float32)
        rows[:, 7] = bvh.count.astype(np.int32).view(np.float32)
        node_rows.append(rows)
        tri_rows.append(np.concatenate([bvh.v0, bvh.e1, bvh.e2], axis=1))
        mesh_rows.append((n_off, s_off, MESH_MODE_CODES[m.mode], c))
        n_off += bvh.n_nodes
        s_off += len(bvh.v0)
    return {
        "nodes": np.ascontiguousarray(np.concatenate(node_rows) if node_rows else np.zeros((0, 8), np.float32)),
        "tris": np.ascontiguousarray(np.concatenate(tri_rows) if tri_rows else np.zeros((0, 9))),
        "meshes": np.asarray(mesh_rows, dtype=np.int32).reshape(-1, 4),
        "density": np.asarray([m.density_g_cm3 for m in meshes], dtype=np.float32),
        "names": np.asarray(names, dtype=object),
        "max_depth": np.asarray(max([b.depth for b in bvhs], default=0), dtype=np.int32),
    }


def pack_poses(meshes_per_image: Sequence[Sequence[Any]]) -> np.ndarray:
    """(B, n, 12) float64: each mesh's ``mesh_from_world`` (3x4, row-major) per image."""
    out = []
    for ms in meshes_per_image:
        out.append([np.linalg.inv(m.world_from_mesh)[:3].reshape(-1) for m in ms])
    return np.asarray(out, dtype=np.float64)


def pack_cameras(cameras: Sequence[Any]) -> np.ndarray:
    """(B, 16) float64 per image: ``R^T K^-1`` (9, row-major), source (3), sdd_mm, 3 zeros."""
    out = np.zeros((len(cameras), 16), dtype=np.float64)
    for i, c in enumerate(cameras):
        out[i, 0:9] = (np.asarray(c.R).T @ np.linalg.inv(np.asarray(c.K))).reshape(-1)
        out[i, 9:12] = c.source_world_mm
        out[i, 12] = c.sdd_mm
    return out
