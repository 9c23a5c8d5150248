"""Procedural phantoms with closed-form line integrals, written as volumes.

:class:`Sphere`, :class:`Ellipsoid` (axis-aligned), :class:`Cylinder` (along x, y or z, capped) and
:class:`Box` (axis-aligned) primitives in patient RAS mm, painted in order onto a grid by
:class:`Phantom` (a later primitive replaces earlier ones where they overlap). Voxelisation is
anti-aliased (partial-volume fractions from supersampling the voxels the surface passes through), so
voxel line integrals converge to :meth:`Phantom.line_integrals_g_cm2`, which is exact.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from drrfarm.errors import VolumeError
from drrfarm.volume import MaterialVolume, Volume, hu_from_density_g_cm3, validate_material_names

__all__ = [
    "Box",
    "Cylinder",
    "DEFAULT_BEAD_POINTS_MM",
    "Ellipsoid",
    "Phantom",
    "Sphere",
    "bead_phantom",
    "box_chord_mm",
    "cylinder_chord_mm",
    "ellipsoid_chord_mm",
    "inserts_phantom",
    "sphere_chord_mm",
    "sphere_phantom",
]


# ============================================================================ analytic chord lengths
ArrayLike: TypeAlias = "np.ndarray | Sequence[float] | Sequence[Sequence[float]]"


def _rays(origins: ArrayLike, directions: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    o = np.atleast_2d(np.asarray(origins, dtype=np.float64))
    d = np.atleast_2d(np.asarray(directions, dtype=np.float64))
    o, d = np.broadcast_arrays(o, d)
    n = np.linalg.norm(d, axis=-1, keepdims=True)
    if np.any(n == 0) or not np.all(np.isfinite(d)) or not np.all(np.isfinite(o)):
        raise ValueError("ray directions must be finite and non-zero")
    return o, d / n


def _quadric_interval(o: np.ndarray, d: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interval of t where |(o + t d) * scale| <= 1 (o relative to the centre); empty -> (inf, -inf)."""
    os_, ds = o * scale, d * scale
    a = np.sum(ds * ds, axis=-1)
    b = np.sum(os_ * ds, axis=-1)
    c = np.sum(os_ * os_, axis=-1) - 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        t0 = np.where(a > 0, (-b - root) / a, np.where(c <= 0, -np.inf, np.inf))
        t1 = np.where(a > 0, (-b + root) / a, np.where(c <= 0, np.inf, -np.inf))
    hit = (disc > 0) | (a == 0)
    return np.where(hit, t0, np.inf), np.where(hit, t1, -np.inf)


def _slab_interval(o: np.ndarray, d: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interval of t where |o_a + t d_a| <= half_a for every axis a with half_a finite."""
    t0 = np.full(o.shape[:-1], -np.inf)
    t1 = np.full(o.shape[:-1], np.inf)
    for a in range(3):
        if not np.isfinite(half[a]):
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            ta = (-half[a] - o[..., a]) / d[..., a]
            tb = (half[a] - o[..., a]) / d[..., a]
        par = d[..., a] == 0
        inside = np.abs(o[..., a]) <= half[a]
        lo = np.where(par, np.where(inside, -np.inf, np.inf), np.minimum(ta, tb))
        hi = np.where(par, np.where(inside, np.inf, -np.inf), np.maximum(ta, tb))
        t0, t1 = np.maximum(t0, lo), np.minimum(t1, hi)
    return t0, t1


def _chord(t0: np.ndarray, t1: np.ndarray) -> np.ndarray:
    """Length of [t0, t1] ∩ [0, inf) (rays start at their origin)."""
    return np.maximum(0.0, t1 - np.maximum(t0, 0.0))


def sphere_chord_mm(origins: ArrayLike, directions: ArrayLike, centre_mm: ArrayLike, radius_mm: float) -> np.ndarray:
    """(N,) length in mm of each ray (origin (N,3), direction (N,3), normalised here) inside a sphere.

    Rays are half-lines starting at their origin.
    """
    return Sphere(centre_mm, radius_mm).chord_mm(origins, directions)


def ellipsoid_chord_mm(
    origins: ArrayLike, directions: ArrayLike, centre_mm: ArrayLike, semi_axes_mm: ArrayLike
) -> np.ndarray:
    """(N,) chord length in mm through an axis-aligned ellipsoid with semi-axes (a_x, a_y, a_z)."""
    return Ellipsoid(centre_mm, semi_axes_mm).chord_mm(origins, directions)


def cylinder_chord_mm(
    origins: ArrayLike,
    directions: ArrayLike,
    centre_mm: ArrayLike,
    radius_mm: float,
    length_mm: float,
    axis: int | str = "z",
) -> np.ndarray:
    """(N,) chord length in mm through a capped cylinder along ``axis`` (0/1/2 or 'x'/'y'/'z')."""
    return Cylinder(centre_mm, radius_mm, length_mm, axis).chord_mm(origins, directions)


def box_chord_mm(origins: ArrayLike, directions: ArrayLike, centre_mm: ArrayLike, size_mm: ArrayLike) -> np.ndarray:
    """(N,) chord length in mm through an axis-aligned box of full edge lengths ``size_mm``."""
    return Box(centre_mm, size_mm).chord_mm(origins, directions)


# ========================================================================================= primitives
def _vec3(v: ArrayLike, name: str) -> tuple[float, float, float]:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: expected 3 finite numbers, got {v!r}")
    return (float(a[0]), float(a[1]), float(a[2]))


class _Primitive:
    """Shared behaviour; subclasses define ``interval``, ``implicit``, ``lipschitz`` and ``half_extent``."""

    centre_mm: tuple[float, float, float]
    material: str
    density_g_cm3: float

    def _check_common(self) -> None:
        object.__setattr__(self, "centre_mm", _vec3(self.centre_mm, f"{type(self).__name__}.centre_mm"))
        if not (np.isfinite(self.density_g_cm3) and self.density_g_cm3 >= 0):
            raise ValueError(f"{type(self).__name__}.density_g_cm3 must be finite and >= 0")

    def interval(self, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def implicit(self, points_mm: np.ndarray) -> np.ndarray:
        """g(p): < 0 inside, > 0 outside; |g(p) - g(q)| <= lipschitz * |p - q|."""
        raise NotImplementedError

    lipschitz: float = 1.0

    def half_extent_mm(self) -> np.ndarray:
        raise NotImplementedError

    def bounds_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box (lo (3,), hi (3,)) in RAS mm."""
        c = np.asarray(self.centre_mm)
        h = self.half_extent_mm()
        return c - h, c + h

    def contains(self, points_mm: np.ndarray) -> np.ndarray:
        return self.implicit(points_mm) <= 0

    def chord_mm(self, origins: ArrayLike, directions: ArrayLike) -> np.ndarray:
        """(N,) length in mm of each ray (half-line from its origin) inside this primitive."""
        o, d = _rays(origins, directions)
        return _chord(*self.interval(o, d))

    def describe(self) -> dict:
        out = {"type": type(self).__name__}
        for k, v in self.__dict__.items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class Sphere(_Primitive):
    """Sphere of ``radius_mm`` at ``centre_mm`` (RAS) filled with ``material`` at ``density_g_cm3``."""

    centre_mm: tuple[float, float, float]
    radius_mm: float
    material: str = "water"
    density_g_cm3: float = 1.0

    def __post_init__(self) -> None:
        self._check_common()
        if not self.radius_mm > 0:
            raise ValueError("Sphere.radius_mm must be > 0")

    def interval(self, origins, directions):
        o = origins - np.asarray(self.centre_mm)
        return _quadric_interval(o, directions, np.full(3, 1.0 / self.radius_mm))

    def implicit(self, points_mm):
        return np.linalg.norm(points_mm - np.asarray(self.centre_mm), axis=-1) - self.radius_mm

    def half_extent_mm(self):
        return np.full(3, float(self.radius_mm))


@dataclass(frozen=True)
class Ellipsoid(_Primitive):
    """Axis-aligned ellipsoid with semi-axes ``semi_axes_mm`` = (a_x, a_y, a_z)."""

    centre_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    material: str = "water"
    density_g_cm3: float = 1.0

    def __post_init__(self) -> None:
        self._check_common()
        ax = _vec3(self.semi_axes_mm, "Ellipsoid.semi_axes_mm")
        if min(ax) <= 0:
            raise ValueError("Ellipsoid.semi_axes_mm must be > 0")
        object.__setattr__(self, "semi_axes_mm", ax)

    @property
    def lipschitz(self) -> float:  # type: ignore[override]
        return 1.0 / min(self.semi_axes_mm)

    def interval(self, origins, directions):
        o = origins - np.asarray(self.centre_mm)
        return _quadric_interval(o, directions, 1.0 / np.asarray(self.semi_axes_mm))

    def implicit(self, points_mm):
        q = (points_mm - np.asarray(self.centre_mm)) / np.asarray(self.semi_axes_mm)
        return np.linalg.norm(q, axis=-1) - 1.0

    def half_extent_mm(self):
        return np.asarray(self.semi_axes_mm, dtype=np.float64)


_AXES = {"x": 0, "y": 1, "z": 2, 0: 0, 1: 1, 2: 2}


@dataclass(frozen=True)
class Cylinder(_Primitive):
    """Capped circular cylinder of ``radius_mm`` and full ``length_mm`` along ``axis`` (x/y/z or 0/1/2)."""

    centre_mm: tuple[float, float, float]
    radius_mm: float
    length_mm: float
    axis: int | str = "z"
    material: str = "water"
    density_g_cm3: float = 1.0

    def __post_init__(self) -> None:
        self._check_common()
        if self.axis not in _AXES:
            raise ValueError(f"Cylinder.axis must be x, y, z or 0, 1, 2, got {self.axis!r}")
        object.__setattr__(self, "axis", _AXES[self.axis])
        if not (self.radius_mm > 0 and self.length_mm > 0):
            raise ValueError("Cylinder.radius_mm and length_mm must be > 0")

    def _scale(self) -> np.ndarray:
        s = np.full(3, 1.0 / self.radius_mm)
        s[int(self.axis)] = 0.0
        return s

    def interval(self, origins, directions):
        o = origins - np.asarray(self.centre_mm)
        t0, t1 = _quadric_interval(o, directions, self._scale())
        half = np.full(3, np.inf)
        half[int(self.axis)] = self.length_mm / 2.0
        s0, s1 = _slab_interval(o, directions, half)
        return np.maximum(t0, s0), np.minimum(t1, s1)

    def implicit(self, points_mm):
        q = points_mm - np.asarray(self.centre_mm)
        a = int(self.axis)
        radial = np.linalg.norm(np.delete(q, a, axis=-1), axis=-1) - self.radius_mm
        axial = np.abs(q[..., a]) - self.length_mm / 2.0
        return np.maximum(radial, axial)

    def half_extent_mm(self):
        h = np.full(3, float(self.radius_mm))
        h[int(self.axis)] = self.length_mm / 2.0
        return h


@dataclass(frozen=True)
class Box(_Primitive):
    """Axis-aligned box with full edge lengths ``size_mm``."""

    centre_mm: tuple[float, float, float]
    size_mm: tuple[float, float, float]
    material: str = "water"
    density_g_cm3: float = 1.0

    def __post_init__(self) -> None:
        self._check_common()
        sz = _vec3(self.size_mm, "Box.size_mm")
        if min(sz) <= 0:
            raise ValueError("Box.size_mm must be > 0")
        object.__setattr__(self, "size_mm", sz)

    def interval(self, origins, directions):
        o = origins - np.asarray(self.centre_mm)
        return _slab_interval(o, directions, np.asarray(self.size_mm) / 2.0)

    def implicit(self, points_mm):
        q = np.abs(points_mm - np.asarray(self.centre_mm)) - np.asarray(self.size_mm) / 2.0
        return np.max(q, axis=-1)

    def half_extent_mm(self):
        return np.asarray(self.size_mm, dtype=np.float64) / 2.0


Primitive: TypeAlias = "Sphere | Ellipsoid | Cylinder | Box"


# ============================================================================================ Phantom
@dataclass
class Phantom:
    """Primitives painted in order on a grid of ``shape`` voxels (I, J, K) of ``spacing_mm``.

    The grid axes are RAS x, y, z; the centre of the voxel-index box sits at ``centre_mm``. Outside
    every primitive the density is 0 (vacuum). Every primitive must lie inside the grid's extent.
    """

    primitives: Sequence[Primitive]
    shape: tuple[int, int, int] = (128, 128, 128)
    spacing_mm: float | tuple[float, float, float] = 1.0
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    name: str = "phantom"

    def __post_init__(self) -> None:
        self.primitives = list(self.primitives)
        if not self.primitives:
            raise VolumeError(f"{self.name}: a phantom needs at least one primitive")
        shp = tuple(int(n) for n in self.shape)
        if len(shp) != 3 or min(shp) <= 0:
            raise VolumeError(f"{self.name}: shape must be three positive ints, got {self.shape}")
        self.shape = shp  # type: ignore[assignment]
        sp = np.broadcast_to(np.asarray(self.spacing_mm, dtype=np.float64), (3,))
        if np.any(sp <= 0) or not np.all(np.isfinite(sp)):
            raise VolumeError(f"{self.name}: spacing_mm must be > 0, got {self.spacing_mm}")
        self.spacing_mm = (float(sp[0]), float(sp[1]), float(sp[2]))
        self.centre_mm = _vec3(self.centre_mm, f"{self.name}.centre_mm")
        validate_material_names(self.material_names, f"{self.name} primitives")
        inv = np.linalg.inv(self.patient_from_ijk)
        for n, prim in enumerate(self.primitives):
            lo, hi = prim.bounds_mm()
            ijk_lo = inv[:3, :3] @ lo + inv[:3, 3]
            ijk_hi = inv[:3, :3] @ hi + inv[:3, 3]
            if np.any(np.minimum(ijk_lo, ijk_hi) < -0.5) or np.any(np.maximum(ijk_lo, ijk_hi) > np.asarray(shp) - 0.5):
                raise VolumeError(f"{self.name}: primitive {n} ({type(prim).__name__}) extends outside the grid")

    # ------------------------------------------------------------------ description
    @property
    def patient_from_ijk(self) -> np.ndarray:
        """(4, 4) RAS affine: diagonal spacing, voxel-box centre at ``centre_mm``."""
        a = np.eye(4)
        a[:3, :3] = np.diag(self.spacing_mm)
        a[:3, 3] = np.asarray(self.centre_mm) - np.asarray(self.spacing_mm) * (np.asarray(self.shape) - 1) / 2.0
        return a

    @property
    def material_names(self) -> list[str]:
        """Distinct primitive materials, in order of first appearance."""
        names: list[str] = []
        for p in self.primitives:
            if p.material not in names:
                names.append(p.material)
        return names

    def centres_mm(self) -> np.ndarray:
        """(P, 3) primitive centres in RAS mm (e.g. bead positions)."""
        return np.asarray([p.centre_mm for p in self.primitives], dtype=np.float64)

    @property
    def sha256(self) -> str:
        """sha256 of the phantom's JSON description (grid + primitives)."""
        desc = {
            "name": self.name,
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing_mm),  # type: ignore[arg-type]
            "centre_mm": list(self.centre_mm),
            "primitives": [p.describe() for p in self.primitives],
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()

    # -------------------------------------------------------------- analytic integrals
    def line_integrals_g_cm2(self, origins: ArrayLike, directions: ArrayLike, chunk: int = 8192) -> np.ndarray:
        """(M, N) exact line integrals (g/cm2) of each material along N rays (half-lines from origin).

        Overlaps follow the painter rule (the last primitive containing a point owns it).
        """
        o, d = _rays(origins, directions)
        names = self.material_names
        mat = np.array([names.index(p.material) for p in self.primitives])
        rho = np.array([p.density_g_cm3 for p in self.primitives], dtype=np.float64)
        n_rays, n_prim = o.shape[0], len(self.primitives)
        out = np.zeros((len(names), n_rays), dtype=np.float64)
        for s in range(0, n_rays, chunk):
            oc, dc = o[s : s + chunk], d[s : s + chunk]
            t0 = np.empty((oc.shape[0], n_prim))
            t1 = np.empty_like(t0)
            for p, prim in enumerate(self.primitives):
                a, b = prim.interval(oc, dc)
                a = np.maximum(a, 0.0)
                empty = ~(b > a)
                t0[:, p] = np.where(empty, 0.0, a)
                t1[:, p] = np.where(empty, 0.0, b)
            bp = np.sort(np.concatenate([t0, t1], axis=1), axis=1)  # (n, 2P)
            seg = np.diff(bp, axis=1)  # (n, 2P-1)
            mid = 0.5 * (bp[:, 1:] + bp[:, :-1])
            cover = (
                (t0[:, None, :] <= mid[:, :, None])
                & (mid[:, :, None] <= t1[:, None, :])
                & (t1[:, None, :] > t0[:, None, :])
            )  # (n, 2P-1, P)
            any_cover = cover.any(axis=2)
            top = n_prim - 1 - np.argmax(cover[:, :, ::-1], axis=2)  # last covering primitive
            contrib = np.where(any_cover, seg * rho[top], 0.0) / 10.0  # mm -> cm
            for m in range(len(names)):
                out[m, s : s + chunk] = np.sum(np.where(any_cover & (mat[top] == m), contrib, 0.0), axis=1)
        return out

    # ------------------------------------------------------------------- voxelisation
    def _index_box(self, prim: _Primitive, inv: np.ndarray) -> tuple[slice, slice, slice]:
        lo, hi = prim.bounds_mm()
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        ijk = corners @ inv[:3, :3].T + inv[:3, 3]
        a = np.maximum(np.floor(ijk.min(axis=0)).astype(int) - 1, 0)
        b = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 2, np.asarray(self.shape))
        return (slice(a[0], b[0]), slice(a[1], b[1]), slice(a[2], b[2]))

    def densities_g_cm3(self, supersample: int = 4) -> np.ndarray:
        """(M, I, J, K) float32 partial-volume densities (``supersample``^3 samples in boundary voxels)."""
        s = int(supersample)
        if s < 1:
            raise ValueError("supersample must be >= 1")
        A = self.patient_from_ijk
        inv = np.linalg.inv(A)
        names = self.material_names
        mat = [names.index(p.material) for p in self.primitives]
        half_diag = 0.5 * float(np.linalg.norm(np.abs(A[:3, :3]).sum(axis=1)))
        owner = np.full(self.shape, -1, dtype=np.int16)
        boundary = np.zeros(self.shape, dtype=bool)
        boxes = [self._index_box(p, inv) for p in self.primitives]
        for p, (prim, sl) in enumerate(zip(self.primitives, boxes, strict=True)):
            idx = np.stack(np.meshgrid(*[np.arange(x.start, x.stop) for x in sl], indexing="ij"), axis=-1)
            g = prim.implicit(idx @ A[:3, :3].T + A[:3, 3])
            margin = prim.lipschitz * half_diag
            sure_in, sure_out = g < -margin, g > margin
            sub_owner, sub_b = owner[sl], boundary[sl]
            sub_owner[sure_in] = p
            sub_b[sure_in] = False
            sub_b[~sure_in & ~sure_out] = True
        dens = np.zeros((len(names),) + self.shape, dtype=np.float32)
        for p, (prim, sl) in enumerate(zip(self.primitives, boxes, strict=True)):
            full = (owner[sl] == p) & ~boundary[sl]
            dens[mat[p]][sl][full] = prim.density_g_cm3
        # boundary voxels: painter rule on s^3 sub-samples each
        vox = np.argwhere(boundary)
        if vox.size:
            off = (np.arange(s) + 0.5) / s - 0.5
            sub = np.stack(np.meshgrid(off, off, off, indexing="ij"), axis=-1).reshape(-1, 3)  # (s^3, 3)
            los = np.array([[x.start for x in sl] for sl in boxes])
            his = np.array([[x.stop for x in sl] for sl in boxes])
            for c in range(0, len(vox), 8192):
                v = vox[c : c + 8192]
                pts = (v[:, None, :] + sub[None]) @ A[:3, :3].T + A[:3, 3]  # (n, s^3, 3)
                own = np.full(pts.shape[:2], -1, dtype=np.int16)
                for p, prim in enumerate(self.primitives):
                    sel = np.all((v >= los[p]) & (v < his[p]), axis=1)
                    if not sel.any():
                        continue
                    inside = prim.contains(pts[sel])
                    o_sel = own[sel]
                    o_sel[inside] = p
                    own[sel] = o_sel
                for p, prim in enumerate(self.primitives):
                    frac = (own == p).mean(axis=1)
                    hit = frac > 0
                    if hit.any():
                        vv = v[hit]
                        dens[mat[p], vv[:, 0], vv[:, 1], vv[:, 2]] += np.float32(prim.density_g_cm3) * frac[hit].astype(
                            np.float32
                        )
        return dens

    def material_volume(self, supersample: int = 4) -> MaterialVolume:
        """The phantom as a :class:`MaterialVolume` (one channel per distinct material)."""
        return MaterialVolume(
            material_names=self.material_names,
            densities_g_cm3=self.densities_g_cm3(supersample),
            patient_from_ijk=self.patient_from_ijk,
            volume_sha256=self.sha256,
            provenance={"method": "phantom", "name": self.name, "supersample": int(supersample)},
        )

    def volume(self, supersample: int = 4) -> Volume:
        """The phantom as an HU :class:`Volume`: total density -> HU by inverting DeepDRR's density fit.

        Vacuum becomes about -1001 HU (density 0 under :func:`hu_to_density_g_cm3`).
        """
        total = self.densities_g_cm3(supersample).sum(axis=0)
        return Volume(
            hu=hu_from_density_g_cm3(total),
            patient_from_ijk=self.patient_from_ijk,
            source=f"<phantom {self.name}>",
            sha256=self.sha256,
        )


# ====================================================================================== ready-made
DEFAULT_BEAD_POINTS_MM = np.array(
    [
        [30.0, 0.0, -40.0],
        [15.0, 26.0, -30.0],
        [-15.0, 26.0, -20.0],
        [-30.0, 0.0, -10.0],
        [-15.0, -26.0, 0.0],
        [15.0, -26.0, 10.0],
        [30.0, 0.0, 20.0],
        [15.0, 26.0, 30.0],
        [-15.0, 26.0, 40.0],
        [0.0, 0.0, 0.0],
        [40.0, 40.0, 40.0],  # odd one out: breaks every mirror/rotation symmetry of the helix
    ]
)
"""Bead centres (mm, relative to the phantom centre): a helix plus a centre bead and a corner marker."""


def bead_phantom(
    points_mm: ArrayLike | None = None,
    bead_radius_mm: float = 1.5,
    material: str = "iron",
    density_g_cm3: float = 7.874,
    shape: tuple[int, int, int] = (128, 128, 128),
    spacing_mm: float | tuple[float, float, float] = 1.0,
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Phantom:
    """Small dense spheres at known 3-D points for geometry tests.

    points_mm: (N, 3) bead centres relative to ``centre_mm`` (default :data:`DEFAULT_BEAD_POINTS_MM`).
    Bead ``n`` is primitive ``n``; :meth:`Phantom.centres_mm` returns their absolute RAS positions.
    """
    pts = DEFAULT_BEAD_POINTS_MM if points_mm is None else np.asarray(points_mm, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
        raise ValueError(f"points_mm must be (N, 3), got shape {pts.shape}")
    c = np.asarray(_vec3(centre_mm, "centre_mm"))
    beads = [Sphere(tuple(c + p), bead_radius_mm, material, density_g_cm3) for p in pts]
    return Phantom(beads, shape=shape, spacing_mm=spacing_mm, centre_mm=tuple(c), name="beads")


def sphere_phantom(
    radius_mm: float = 40.0,
    material: str = "water",
    density_g_cm3: float = 1.0,
    shape: tuple[int, int, int] = (96, 96, 96),
    spacing_mm: float | tuple[float, float, float] = 1.0,
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Phantom:
    """One sphere at the grid centre."""
    return Phantom(
        [Sphere(centre_mm, radius_mm, material, density_g_cm3)],
        shape=shape,
        spacing_mm=spacing_mm,
        centre_mm=centre_mm,
        name="sphere",
    )


def inserts_phantom(
    shape: tuple[int, int, int] = (128, 128, 96),
    spacing_mm: float | tuple[float, float, float] = 1.0,
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Phantom:
    """Water cylinder (r 50 mm, 80 mm long, along z) with bone, lung, air and aluminium inserts.

    Inserts (painted after the water): a bone cylinder (r 10 mm, along z) at x=+25, a lung ellipsoid
    (12 x 8 x 20 mm semi-axes, density 0.26) at x=-25, an air sphere (r 8 mm) at y=+25 and an
    aluminium box (10 x 6 x 30 mm) at y=-25.
    """
    c = np.asarray(_vec3(centre_mm, "centre_mm"))

    def at(dx: float, dy: float, dz: float = 0.0) -> tuple[float, float, float]:
        return (float(c[0] + dx), float(c[1] + dy), float(c[2] + dz))

    prims: list[Primitive] = [
        Cylinder(at(0, 0), 50.0, 80.0, "z", "water", 1.0),
        Cylinder(at(25, 0), 10.0, 60.0, "z", "bone", 1.92),
        Ellipsoid(at(-25, 0), (12.0, 8.0, 20.0), "lung", 0.26),
        Sphere(at(0, 25), 8.0, "air", 0.0012),
        Box(at(0, -25), (10.0, 6.0, 30.0), "aluminium", 2.699),
    ]
    return Phantom(prims, shape=shape, spacing_mm=spacing_mm, centre_mm=tuple(c), name="inserts")
