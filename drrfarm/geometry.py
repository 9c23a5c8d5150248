"""Projective geometry: pinhole cameras, the mobile C-arm model, CT placement and pose samplers.

Conventions (see docs/geometry.md for the full story):

* Patient frame: RAS mm. World frame: the C-arm (device) frame, mm.
* ``P = K [R | t]`` maps homogeneous world mm to pixels ``(u, v)``, u = column, v = row.
  Pixel centres sit at integer coordinates (``pixel_center = 0.0``): pixel (0, 0)'s centre is u = v = 0.
* Camera frame: x along +u, y along +v, z = principal ray (source -> detector). ``R`` maps world to
  camera (a proper rotation); the source is at ``-R^T t``.
* C-arm at alpha = beta = gamma = 0: source at ``iso - SID * (0, 1, 0)``, principal ray +y,
  image u axis +x, image v axis -z. ``R_device = R_x(beta) @ R_z(-alpha)``; gamma then rolls the
  camera about the principal ray so that positive gamma turns the image content counter-clockwise
  on the display (u to the right, v downward).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from drrfarm.errors import GeometryError

__all__ = [
    "CARM_ALPHA_RANGE_DEG",
    "CARM_BETA_RANGE_DEG",
    "CARM_SDD_MM",
    "CARM_SID_MM",
    "ORIENTATIONS",
    "CArm",
    "Camera",
    "carm_grid",
    "check_source_outside",
    "rot_x",
    "rot_y",
    "rot_z",
    "sample_carm_poses",
    "volume_box_corners_world",
    "world_from_patient_default",
]

# Tolerance on ||R R^T - I||_max accepted for user-supplied rotations (they are then snapped to the
# nearest rotation). Matrices typed with ~6 significant digits pass.
_ORTHO_TOL = 1e-5

#: C-arm defaults (DeepDRR's MobileCArm): source-detector and source-isocentre distances (mm) and the
#: ranges of the orbital (alpha) and angular (beta) angles (degrees) a C-arm with ``enforce_limits`` reaches.
CARM_SDD_MM = 1020.0
CARM_SID_MM = 530.0
CARM_ALPHA_RANGE_DEG = (-40.0, 110.0)
CARM_BETA_RANGE_DEG = (-225.0, 225.0)


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def rot_x(deg: float) -> np.ndarray:
    """(3,3) right-handed rotation by ``deg`` degrees about +x (active: rotates vectors)."""
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rot_y(deg: float) -> np.ndarray:
    """(3,3) right-handed rotation by ``deg`` degrees about +y (active)."""
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_z(deg: float) -> np.ndarray:
    """(3,3) right-handed rotation by ``deg`` degrees about +z (active)."""
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rotations(deg: np.ndarray, axis: int) -> np.ndarray:
    """(N, 3, 3) active rotations by ``deg`` (N,) degrees about +x (``axis`` 0) or +z (2), as :func:`rot_x` /
    :func:`rot_z` build them one by one."""
    c = np.array([math.cos(math.radians(x)) for x in deg.tolist()], dtype=np.float64)
    s = np.array([math.sin(math.radians(x)) for x in deg.tolist()], dtype=np.float64)
    out = np.zeros((deg.size, 3, 3), dtype=np.float64)
    i, j, k = (1, 2, 0) if axis == 0 else (0, 1, 2)
    out[:, i, i] = c
    out[:, i, j] = -s
    out[:, j, i] = s
    out[:, j, j] = c
    out[:, k, k] = 1.0
    return out


def _snap_rotations(R: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotations snapped to the nearest exact rotation, as :class:`Camera` does for one."""
    U, _, Vt = np.linalg.svd(R)
    return np.matmul(U, Vt)


def _finite_array(value: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{name}: cannot be read as a float array ({exc})") from exc
    if arr.shape != shape:
        raise GeometryError(f"{name}: expected shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise GeometryError(f"{name}: contains NaN or infinite values")
    return arr


def _positive_float(value: Any, name: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{name}: expected a positive number, got {value!r}") from exc
    if not math.isfinite(x) or x <= 0.0:
        raise GeometryError(f"{name}: must be a positive finite number, got {value!r}")
    return x


def _finite_float(value: Any, name: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{name}: expected a number, got {value!r}") from exc
    if not math.isfinite(x):
        raise GeometryError(f"{name}: must be finite, got {value!r}")
    return x


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise GeometryError(f"{name}: expected a positive integer, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{name}: expected a positive integer, got {value!r}") from exc
    if not math.isfinite(x) or x != int(x) or x <= 0:
        raise GeometryError(f"{name}: must be a positive integer, got {value!r}")
    return int(x)


def _check_rotation(R: Any, name: str = "R") -> np.ndarray:
    """Validate a proper rotation and snap it to the nearest exact rotation (polar decomposition)."""
    R = _finite_array(R, name, (3, 3))
    err = float(np.max(np.abs(R @ R.T - np.eye(3))))
    if err > _ORTHO_TOL:
        raise GeometryError(f"{name}: not orthonormal (max |R R^T - I| = {err:.3g} > {_ORTHO_TOL:g})")
    if np.linalg.det(R) < 0:
        raise GeometryError(f"{name}: is a reflection (det = -1); a proper rotation (det = +1) is required")
    U, _, Vt = np.linalg.svd(R)
    return U @ Vt


def _pixel_shift(pixel_center: float) -> np.ndarray:
    """(3,3) map from pixel coordinates with pixel (0,0)'s centre at ``pixel_center`` to ours (0.0)."""
    c = _finite_float(pixel_center, "pixel_center")
    return np.array([[1.0, 0.0, -c], [0.0, 1.0, -c], [0.0, 0.0, 1.0]])


def _rq(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RQ decomposition ``M = U @ Q`` (U upper triangular, Q orthogonal) with numpy only.

    Uses the row-flip trick: QR of ``(J M)^T`` with J the exchange matrix.
    """
    J = np.eye(3)[::-1]
    q, r = np.linalg.qr((J @ M).T)
    U = J @ r.T @ J
    Q = J @ q.T
    return U, Q


# ----------------------------------------------------------------------------------------------
# Camera
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Camera:
    """Pinhole camera ``P = K [R | t]`` for a flat detector of ``height`` x ``width`` pixels.

    K: (3,3) intrinsics, upper triangular, positive focal lengths, K[2,2] = 1 (normalised on
    construction). R: (3,3) proper rotation world -> camera. t: (3,) mm. pixel_mm: detector pitch
    along u (mm); ``sdd_mm = K[0,0] * pixel_mm``. When the pitch is unknown (a bare P imported from
    elsewhere) use pixel_mm = 1.0; distances "in mm" along the detector are then in pixel units.
    """

    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    height: int
    width: int
    pixel_mm: float = 1.0

    def __post_init__(self) -> None:
        K = _finite_array(self.K, "K", (3, 3))
        scale = 1e-9 * max(1.0, float(np.max(np.abs(K))))
        if abs(K[1, 0]) > scale or abs(K[2, 0]) > scale or abs(K[2, 1]) > scale:
            raise GeometryError("K: must be upper triangular (K[1,0] = K[2,0] = K[2,1] = 0)")
        if K[2, 2] <= 0.0:
            raise GeometryError(f"K: K[2,2] must be positive, got {K[2, 2]!r}")
        K = K / K[2, 2]
        K[1, 0] = K[2, 0] = K[2, 1] = 0.0
        if K[0, 0] <= 0.0:
            raise GeometryError(f"K: focal length f_x = K[0,0] must be positive, got {K[0, 0]!r}")
        if K[1, 1] <= 0.0:
            raise GeometryError(f"K: focal length f_y = K[1,1] must be positive, got {K[1, 1]!r}")
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "R", _check_rotation(self.R, "R"))
        object.__setattr__(self, "t", _finite_array(self.t, "t", (3,)))
        object.__setattr__(self, "height", _positive_int(self.height, "height"))
        object.__setattr__(self, "width", _positive_int(self.width, "width"))
        object.__setattr__(self, "pixel_mm", _positive_float(self.pixel_mm, "pixel_mm"))

    @classmethod
    def _trusted(cls, K: np.ndarray, R: np.ndarray, t: np.ndarray, height: int, width: int, pixel_mm: float
                 ) -> Camera:
        """A camera from parts that are already valid (K normalised, R an exact rotation, finite t): what
        ``Camera(...)`` would make of them, without checking them again (builders of many cameras)."""
        cam = object.__new__(cls)
        for name, value in (("K", K), ("R", R), ("t", t), ("height", int(height)), ("width", int(width)),
                            ("pixel_mm", float(pixel_mm))):
            object.__setattr__(cam, name, value)
        return cam

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_krt(
        cls,
        K: Any,
        R: Any,
        t: Any,
        height: int,
        width: int,
        pixel_mm: float = 1.0,
        pixel_center: float = 0.0,
    ) -> Camera:
        """Camera from intrinsics K (3,3), rotation R (3,3, world -> camera) and translation t (3,) mm.

        ``pixel_center`` is the coordinate of pixel (0,0)'s centre in the convention K was written in
        (0.5 for tools that put pixel centres at half-integers); K is shifted to ours (0.0).
        """
        K = _finite_array(K, "K", (3, 3))
        return cls(_pixel_shift(pixel_center) @ K, R, t, height, width, pixel_mm)

    @classmethod
    def from_projection(
        cls,
        P: Any,
        height: int,
        width: int,
        pixel_mm: float | None = None,
        pixel_center: float = 0.0,
    ) -> Camera:
        """Camera from a 3x4 projection matrix (any non-zero scale, either sign) by RQ decomposition.

        The result satisfies ``cam.P == P / s`` for some non-zero scalar s, with K[2,2] = 1, positive
        focal lengths and det(R) = +1. ``pixel_mm=None`` means the pitch is unknown: 1.0 is stored, so
        ``sdd_mm`` equals f_x in pixels. ``pixel_center`` as in :meth:`from_krt`.
        """
        P = _finite_array(P, "P", (3, 4))
        P = _pixel_shift(pixel_center) @ P
        M = P[:, :3]
        det = float(np.linalg.det(M))
        norm = float(np.linalg.norm(M))
        if norm == 0.0 or abs(det) <= 1e-12 * norm**3:
            raise GeometryError("P: left 3x3 block is singular; not a finite pinhole projection")
        if det < 0:
            P = -P
            M = -M
        U, Q = _rq(M)
        D = np.diag(np.sign(np.diag(U)))
        U = U @ D
        Q = D @ Q
        t = np.linalg.solve(U, P[:, 3])
        K = U / U[2, 2]
        return cls(K, Q, t, height, width, 1.0 if pixel_mm is None else pixel_mm)

    # -- derived quantities --------------------------------------------------------------------

    @property
    def P(self) -> np.ndarray:  # noqa: N802 (contract name)
        """(3,4) projection matrix K [R | t] (world mm -> homogeneous pixels)."""
        return self.K @ np.hstack([self.R, self.t[:, None]])

    @property
    def source_world_mm(self) -> np.ndarray:
        """(3,) X-ray source (camera centre) in world mm: -R^T t."""
        return -self.R.T @ self.t

    @property
    def principal_ray_world(self) -> np.ndarray:
        """(3,) unit vector along the principal ray (source -> detector) in world: R^T [0,0,1]."""
        return self.R[2].copy()

    @property
    def sdd_mm(self) -> float:
        """Source-to-detector distance: f_x * pixel_mm (in pixel units when pixel_mm was unknown)."""
        return float(self.K[0, 0] * self.pixel_mm)

    @property
    def focal_px(self) -> tuple[float, float]:
        """(f_x, f_y) in pixels."""
        return float(self.K[0, 0]), float(self.K[1, 1])

    @property
    def principal_point(self) -> tuple[float, float]:
        """(c_u, c_v) in pixels (integer pixel-centre convention)."""
        return float(self.K[0, 2]), float(self.K[1, 2])

    # -- rays ----------------------------------------------------------------------------------

    def pixel_rays_world(self, us: Any, vs: Any) -> np.ndarray:
        """Unit world directions (..., 3) float64 from the source through pixel coordinates (us, vs).

        us, vs: broadcastable arrays of u (column) and v (row) coordinates; integers are pixel centres.
        """
        us = np.asarray(us, dtype=np.float64)
        vs = np.asarray(vs, dtype=np.float64)
        us, vs = np.broadcast_arrays(us, vs)
        # world direction = R^T K^{-1} [u, v, 1]: camera z = 1 > 0, i.e. toward the detector.
        M = self.R.T @ np.linalg.inv(self.K)
        world = np.empty((*us.shape, 3), dtype=np.float64)
        for i in range(3):
            world[..., i] = M[i, 0] * us + M[i, 1] * vs + M[i, 2]
        world /= np.sqrt(np.einsum("...i,...i->...", world, world))[..., None]
        return world

    def ray_directions_world(self, us: Any = None, vs: Any = None) -> np.ndarray:
        """Unit world directions from the source through pixel centres.

        Without arguments: (H, W, 3) float64, element [v, u] for pixel centre (u, v). With ``us``/``vs``:
        same as :meth:`pixel_rays_world`.
        """
        if us is None and vs is None:
            vv, uu = np.meshgrid(
                np.arange(self.height, dtype=np.float64),
                np.arange(self.width, dtype=np.float64),
                indexing="ij",
            )
            return self.pixel_rays_world(uu, vv)
        if us is None or vs is None:
            raise GeometryError("us/vs: give both pixel coordinate arrays or neither")
        return self.pixel_rays_world(us, vs)

    def detector_distance_along_ray(self, directions: Any) -> np.ndarray:
        """Distance (mm) from the source to the detector plane along unit world directions (..., 3).

        sdd_mm / (d . principal_ray); +inf where the direction does not point toward the detector.
        """
        d = np.asarray(directions, dtype=np.float64)
        if d.shape[-1:] != (3,):
            raise GeometryError(f"directions: expected shape (..., 3), got {d.shape}")
        cos = d @ self.principal_ray_world
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(cos > 0.0, self.sdd_mm / np.where(cos > 0.0, cos, 1.0), np.inf)
        return out

    # -- projection ----------------------------------------------------------------------------

    def _points(self, points_world: Any) -> tuple[np.ndarray, bool]:
        p = np.asarray(points_world, dtype=np.float64)
        single = p.ndim == 1
        p = np.atleast_2d(p)
        if p.ndim != 2 or p.shape[1] != 3:
            raise GeometryError(f"points_world: expected shape (N, 3) or (3,), got {np.shape(points_world)}")
        return p, single

    def depth(self, points_world: Any) -> np.ndarray:
        """Depth (N,) mm of world points along the principal ray, measured from the source (camera z)."""
        p, single = self._points(points_world)
        z = p @ self.R[2] + self.t[2]
        return z[0] if single else z

    def project(self, points_world: Any) -> np.ndarray:
        """Project world points (N,3) mm to pixel coordinates (N,2) = (u, v); (3,) -> (2,).

        Points at or behind the source (depth <= 0) give NaN.
        """
        p, single = self._points(points_world)
        h = p @ self.P[:, :3].T + self.P[:, 3]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = h[:, :2] / h[:, 2:3]
        uv[h[:, 2] <= 0.0] = np.nan
        return uv[0] if single else uv

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict: K, R, t, P as nested lists, pixel_center 0.0, source, sizes, pitch."""
        return {
            "K": self.K.tolist(),
            "R": self.R.tolist(),
            "t": self.t.tolist(),
            "P": self.P.tolist(),
            "pixel_center": 0.0,
            "source_world_mm": self.source_world_mm.tolist(),
            "principal_ray_world": self.principal_ray_world.tolist(),
            "sdd_mm": self.sdd_mm,
            "height": self.height,
            "width": self.width,
            "pixel_mm": self.pixel_mm,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Camera:
        """Inverse of :meth:`to_dict`. Needs height, width and either K/R/t or P.

        ``pixel_center`` (default 0.0) is honoured. When both K/R/t and P (or source_world_mm) are
        present they must agree, else GeometryError names the key.
        """
        for key in ("height", "width"):
            if key not in d:
                raise GeometryError(f"{key}: missing from camera dict")
        pc = d.get("pixel_center", 0.0)
        pixel_mm = d.get("pixel_mm")
        if all(k in d for k in ("K", "R", "t")):
            cam = cls.from_krt(
                d["K"], d["R"], d["t"], d["height"], d["width"],
                1.0 if pixel_mm is None else pixel_mm, pixel_center=pc,
            )
            if "P" in d:
                P = _pixel_shift(pc) @ _finite_array(d["P"], "P", (3, 4))
                a, b = P / np.linalg.norm(P), cam.P / np.linalg.norm(cam.P)
                if min(np.max(np.abs(a - b)), np.max(np.abs(a + b))) > 1e-6:
                    raise GeometryError("P: does not match K [R | t] in the camera dict")
        elif "P" in d:
            cam = cls.from_projection(d["P"], d["height"], d["width"], pixel_mm, pixel_center=pc)
        else:
            raise GeometryError("K/R/t or P: camera dict needs either K, R and t, or P")
        if "source_world_mm" in d:
            src = _finite_array(d["source_world_mm"], "source_world_mm", (3,))
            if np.max(np.abs(src - cam.source_world_mm)) > 1e-6 * max(1.0, float(np.max(np.abs(src)))):
                raise GeometryError("source_world_mm: does not match -R^T t in the camera dict")
        return cam


# ----------------------------------------------------------------------------------------------
# C-arm
# ----------------------------------------------------------------------------------------------

# Camera axes (rows: camera x = +u, camera y = +v, camera z = principal ray) in world at zero angles.
_R0_CAM_FROM_WORLD = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class CArm:
    """Mobile C-arm with an isocentric source/detector pair (defaults of DeepDRR's MobileCArm).

    sdd_mm: source -> detector; sid_mm: source -> isocentre (must be < sdd_mm). Detector: height x width
    pixels of pixel_mm pitch, centred on the principal ray (principal point ((W-1)/2, (H-1)/2)).
    Angles (degrees): alpha orbital about world z (+ = detector toward world +x, LAO-like for HFS),
    beta angulation about world x (+ = detector toward world +z, cranial for HFS), gamma roll about the
    principal ray (+ = image content turns counter-clockwise on the display). With ``enforce_limits``
    angles outside alpha_range_deg / beta_range_deg raise GeometryError.
    """

    sdd_mm: float = CARM_SDD_MM
    sid_mm: float = CARM_SID_MM
    height: int = 1536
    width: int = 1536
    pixel_mm: float = 0.194
    isocentre_world_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    alpha_range_deg: tuple[float, float] = CARM_ALPHA_RANGE_DEG
    beta_range_deg: tuple[float, float] = CARM_BETA_RANGE_DEG
    enforce_limits: bool = field(default=True)

    def __post_init__(self) -> None:
        sdd = _positive_float(self.sdd_mm, "sdd_mm")
        sid = _positive_float(self.sid_mm, "sid_mm")
        if sdd <= sid:
            raise GeometryError(
                f"sdd_mm: source-detector distance ({sdd:g}) must exceed sid_mm, the source-isocentre "
                f"distance ({sid:g})"
            )
        object.__setattr__(self, "sdd_mm", sdd)
        object.__setattr__(self, "sid_mm", sid)
        object.__setattr__(self, "height", _positive_int(self.height, "height"))
        object.__setattr__(self, "width", _positive_int(self.width, "width"))
        object.__setattr__(self, "pixel_mm", _positive_float(self.pixel_mm, "pixel_mm"))
        iso = _finite_array(self.isocentre_world_mm, "isocentre_world_mm", (3,))
        object.__setattr__(self, "isocentre_world_mm", tuple(float(x) for x in iso))
        for name in ("alpha_range_deg", "beta_range_deg"):
            rng = _finite_array(getattr(self, name), name, (2,))
            if rng[0] > rng[1]:
                raise GeometryError(f"{name}: lower bound {rng[0]:g} exceeds upper bound {rng[1]:g}")
            object.__setattr__(self, name, (float(rng[0]), float(rng[1])))
        object.__setattr__(self, "enforce_limits", bool(self.enforce_limits))

    @property
    def focal_px(self) -> float:
        """Focal length in pixels: sdd_mm / pixel_mm."""
        return self.sdd_mm / self.pixel_mm

    @property
    def K(self) -> np.ndarray:  # noqa: N802 (matches Camera.K)
        """(3,3) intrinsics with the principal point at the detector centre."""
        f = self.focal_px
        return np.array([[f, 0.0, (self.width - 1) / 2.0], [0.0, f, (self.height - 1) / 2.0], [0.0, 0.0, 1.0]])

    def with_size(self, height: int, width: int, pixel_mm: float) -> CArm:
        """Copy with another detector (e.g. 256 x 256 px at 1.164 mm); distances and limits kept."""
        return replace(self, height=height, width=width, pixel_mm=pixel_mm)

    def camera(
        self,
        alpha_deg: float = 0.0,
        beta_deg: float = 0.0,
        gamma_deg: float = 0.0,
        isocentre_world_mm: Any = None,
    ) -> Camera:
        """Camera for the given angles (degrees) and isocentre (default: the C-arm's)."""
        a = _finite_float(alpha_deg, "alpha_deg")
        b = _finite_float(beta_deg, "beta_deg")
        g = _finite_float(gamma_deg, "gamma_deg")
        if self.enforce_limits:
            lo, hi = self.alpha_range_deg
            if not lo <= a <= hi:
                raise GeometryError(f"alpha_deg: {a:g} outside the C-arm range [{lo:g}, {hi:g}]")
            lo, hi = self.beta_range_deg
            if not lo <= b <= hi:
                raise GeometryError(f"beta_deg: {b:g} outside the C-arm range [{lo:g}, {hi:g}]")
        iso = np.asarray(
            _finite_array(
                self.isocentre_world_mm if isocentre_world_mm is None else isocentre_world_mm,
                "isocentre_world_mm",
                (3,),
            )
        )
        return self.cameras([a], [b], [g], iso[None])[0]

    def cameras(self, alpha_deg: Any, beta_deg: Any, gamma_deg: Any, isocentres_world_mm: Any = None) -> list[Camera]:
        """Cameras of many poses at once (the same cameras as :meth:`camera`, one per entry): ``alpha_deg``,
        ``beta_deg``, ``gamma_deg`` (N,) degrees, ``isocentres_world_mm`` (N, 3) mm or None (the C-arm's)."""
        a = np.asarray(alpha_deg, dtype=np.float64).reshape(-1)
        b = np.asarray(beta_deg, dtype=np.float64).reshape(-1)
        g = np.asarray(gamma_deg, dtype=np.float64).reshape(-1)
        n = a.size
        if b.size != n or g.size != n:
            raise GeometryError(f"alpha_deg/beta_deg/gamma_deg: {n}, {b.size} and {g.size} values; give one per pose")
        given = self.isocentre_world_mm if isocentres_world_mm is None else isocentres_world_mm
        try:
            iso = np.broadcast_to(np.asarray(given, dtype=np.float64), (n, 3))
        except ValueError as exc:
            raise GeometryError(f"isocentres_world_mm: expected shape ({n}, 3), got {np.shape(given)}") from exc
        for name, v in (("alpha_deg", a), ("beta_deg", b), ("gamma_deg", g), ("isocentre_world_mm", iso)):
            if not np.all(np.isfinite(v)):
                raise GeometryError(f"{name}: must be finite, got {v[~np.isfinite(v)].ravel()[0]!r}")
        if self.enforce_limits:
            for name, v, (lo, hi) in (("alpha_deg", a, self.alpha_range_deg), ("beta_deg", b, self.beta_range_deg)):
                bad = (v < lo) | (v > hi)
                if bad.any():
                    raise GeometryError(f"{name}: {v[bad][0]:g} outside the C-arm range [{lo:g}, {hi:g}]")
        # R_device = rot_x(beta) @ rot_z(-alpha); the camera axes in world are R_device applied to the
        # zero-angle axes, so world->camera is its transpose. Roll: camera coords (x, y) ->
        # (x cos g + y sin g, -x sin g + y cos g): content turns CCW on the display (v points down), i.e. the
        # detector itself turns by +g from +u toward +v. (math.cos/sin per angle: the same values as rot_x/rot_z.)
        R_device = np.matmul(_rotations(b, 0), _rotations(-a, 2))
        R = np.matmul(_rotations(-g, 2), np.matmul(_R0_CAM_FROM_WORLD, np.swapaxes(R_device, 1, 2)))
        source = iso - self.sid_mm * R_device[:, :, 1]
        t = -np.matmul(R, source[:, :, None])[:, :, 0]
        R = _snap_rotations(R)
        K = self.K
        return [Camera._trusted(K, R[i], t[i], self.height, self.width, self.pixel_mm) for i in range(n)]

    def camera_for_pose(self, pose: Mapping[str, Any]) -> Camera:
        """Camera for a pose dict from :func:`carm_grid` / :func:`sample_carm_poses`.

        Keys alpha_deg, beta_deg, gamma_deg (default 0), isocentre_world_mm (default the C-arm's),
        sdd_mm (None = keep the C-arm's).
        """
        arm = self
        if pose.get("sdd_mm") is not None:
            arm = replace(self, sdd_mm=pose["sdd_mm"])
        return arm.camera(
            pose.get("alpha_deg", 0.0),
            pose.get("beta_deg", 0.0),
            pose.get("gamma_deg", 0.0),
            pose.get("isocentre_world_mm"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of all fields."""
        return {
            "sdd_mm": self.sdd_mm,
            "sid_mm": self.sid_mm,
            "height": self.height,
            "width": self.width,
            "pixel_mm": self.pixel_mm,
            "isocentre_world_mm": list(self.isocentre_world_mm),
            "alpha_range_deg": list(self.alpha_range_deg),
            "beta_range_deg": list(self.beta_range_deg),
            "enforce_limits": self.enforce_limits,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CArm:
        """Inverse of :meth:`to_dict`; missing keys take the defaults, unknown keys raise."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise GeometryError(f"{unknown[0]}: unknown C-arm key (known: {sorted(known)})")
        kw = dict(d)
        for key in ("isocentre_world_mm", "alpha_range_deg", "beta_range_deg"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


# ----------------------------------------------------------------------------------------------
# Placement of the CT in the world
# ----------------------------------------------------------------------------------------------

# Rotation part of world_from_patient (RAS -> world) per patient orientation on the table.
ORIENTATIONS: dict[str, np.ndarray] = {
    "HFS": np.diag([1.0, 1.0, 1.0]),  # head-first supine: identity
    "FFS": np.diag([-1.0, 1.0, -1.0]),  # feet-first supine: 180 deg about world y
    "HFP": np.diag([-1.0, -1.0, 1.0]),  # head-first prone: 180 deg about world z
    "FFP": np.diag([1.0, -1.0, -1.0]),  # feet-first prone: 180 deg about world x
}


def world_from_patient_default(
    volume_or_centre: Any,
    orientation: str = "HFS",
    isocentre_world_mm: Any = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """(4,4) world_from_patient putting the volume centre at the isocentre.

    volume_or_centre: an object with ``centre_patient_mm()`` (drrfarm Volume / MaterialVolume-like) or
    the (3,) RAS centre in mm. world = O @ (p - centre) + isocentre with O from :data:`ORIENTATIONS`:
    HFS identity; FFS diag(-1, 1, -1); HFP diag(-1, -1, 1); FFP diag(1, -1, -1).
    """
    centre_fn = getattr(volume_or_centre, "centre_patient_mm", None)
    centre = centre_fn() if callable(centre_fn) else volume_or_centre
    c = _finite_array(centre, "centre_patient_mm", (3,))
    iso = _finite_array(isocentre_world_mm, "isocentre_world_mm", (3,))
    key = str(orientation).upper()
    if key not in ORIENTATIONS:
        raise GeometryError(f"orientation: unknown patient orientation {orientation!r} (use {sorted(ORIENTATIONS)})")
    O = ORIENTATIONS[key]
    T = np.eye(4)
    T[:3, :3] = O
    T[:3, 3] = iso - O @ c
    return T


def volume_box_corners_world(
    shape_ijk: Sequence[int], patient_from_ijk: Any, world_from_patient: Any
) -> np.ndarray:
    """(8,3) world mm corners of the voxel box (voxel centres at integer indices, box at -0.5 .. n-0.5)."""
    if len(shape_ijk) < 3:
        raise GeometryError(f"shape_ijk: expected 3 dimensions, got {tuple(shape_ijk)}")
    A = _finite_array(patient_from_ijk, "patient_from_ijk", (4, 4))
    W = _finite_array(world_from_patient, "world_from_patient", (4, 4))
    n = [_positive_int(s, "shape_ijk") for s in shape_ijk[-3:]]
    ijk = np.array(list(itertools.product(*[(-0.5, k - 0.5) for k in n])))
    h = np.hstack([ijk, np.ones((8, 1))])
    return (h @ (W @ A).T)[:, :3]


def check_source_outside(camera: Camera, box_corners_world: Any, tol_mm: float = 1e-6) -> None:
    """Raise GeometryError (naming "source") if the camera source lies inside the volume's box.

    box_corners_world: (N,3) world mm points (e.g. the 8 corners of the voxel box, in any order); the
    box is their convex hull. Points on the boundary count as inside.
    """
    pts = np.asarray(box_corners_world, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] < 4 or not np.all(np.isfinite(pts)):
        raise GeometryError(f"box_corners_world: expected finite (N>=4, 3) points, got shape {pts.shape}")
    s = camera.source_world_mm
    size = float(np.max(np.ptp(pts, axis=0)))
    tol = max(tol_mm, 1e-9 * size)
    # Supporting planes of the hull: planes through point triples with all points on one side.
    facets = 0
    for i, j, k in itertools.combinations(range(len(pts)), 3):
        n = np.cross(pts[j] - pts[i], pts[k] - pts[i])
        nn = float(np.linalg.norm(n))
        if nn <= 1e-12 * max(size, 1.0) ** 2:
            continue
        n /= nn
        side = (pts - pts[i]) @ n
        if np.all(side <= tol):
            pass
        elif np.all(side >= -tol):
            n = -n
        else:
            continue
        facets += 1
        if (s - pts[i]) @ n > tol:
            return  # outside this supporting half-space
    if facets == 0:
        raise GeometryError("box_corners_world: points are degenerate (coplanar); not a box")
    raise GeometryError(
        f"source: X-ray source at {np.round(s, 3).tolist()} mm lies inside the volume box; "
        "move the isocentre or increase sid_mm"
    )


# ----------------------------------------------------------------------------------------------
# Pose samplers
# ----------------------------------------------------------------------------------------------


def _angle_list(vals: Any, name: str) -> list[float]:
    try:
        arr = np.atleast_1d(np.asarray(vals, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{name}: expected a list of angles in degrees ({exc})") from exc
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise GeometryError(f"{name}: must be a non-empty 1-D list of finite angles, got {vals!r}")
    return [float(x) for x in arr]


def carm_grid(
    alphas: Iterable[float],
    betas: Iterable[float] = (0.0,),
    gammas: Iterable[float] = (0.0,),
    isocentre_world_mm: Any = (0.0, 0.0, 0.0),
    sdd_mm: float | None = None,
) -> list[dict[str, Any]]:
    """Cartesian grid of poses, alpha outermost then beta then gamma.

    Returns dicts {alpha_deg, beta_deg, gamma_deg, isocentre_world_mm, sdd_mm} (sdd_mm None = C-arm's).
    """
    iso = [float(x) for x in _finite_array(isocentre_world_mm, "isocentre_world_mm", (3,))]
    sdd = None if sdd_mm is None else _positive_float(sdd_mm, "sdd_mm")
    a_list = _angle_list(alphas, "alphas")
    b_list = _angle_list(betas, "betas")
    g_list = _angle_list(gammas, "gammas")
    out = []
    for a, b, g in itertools.product(a_list, b_list, g_list):
        out.append(
            {"alpha_deg": a, "beta_deg": b, "gamma_deg": g, "isocentre_world_mm": list(iso), "sdd_mm": sdd}
        )
    return out


def _angle_sampler(spec: Any, name: str):
    """Return a function rng -> float for a distribution spec (see sample_carm_poses)."""
    if isinstance(spec, Mapping):
        clip = spec.get("clip")
        if clip is not None:
            clo, chi = (float(x) for x in _finite_array(clip, f"{name}.clip", (2,)))
            if clo > chi:
                raise GeometryError(f"{name}.clip: lower bound exceeds upper bound")
        keys = set(spec) - {"clip"}
        if keys == {"normal"}:
            mu, sigma = (float(x) for x in _finite_array(spec["normal"], f"{name}.normal", (2,)))
            if sigma < 0:
                raise GeometryError(f"{name}.normal: sigma must be >= 0, got {sigma:g}")

            def draw(rng: np.random.Generator) -> float:
                return float(rng.normal(mu, sigma))
        elif keys == {"uniform"}:
            lo, hi = (float(x) for x in _finite_array(spec["uniform"], f"{name}.uniform", (2,)))
            if lo > hi:
                raise GeometryError(f"{name}.uniform: lower bound exceeds upper bound")

            def draw(rng: np.random.Generator) -> float:
                return float(rng.uniform(lo, hi))
        else:
            raise GeometryError(f"{name}: expected {{'normal': (mu, sigma)}} or {{'uniform': (lo, hi)}}, got {spec!r}")
        if clip is None:
            return draw
        return lambda rng: float(min(max(draw(rng), clo), chi))
    if np.isscalar(spec):
        value = _finite_float(spec, name)
        return lambda rng: value
    lo, hi = (float(x) for x in _finite_array(spec, name, (2,)))
    if lo > hi:
        raise GeometryError(f"{name}: lower bound {lo:g} exceeds upper bound {hi:g}")
    return lambda rng: float(rng.uniform(lo, hi))


def sample_carm_poses(
    n: int,
    alpha: Any = (-40.0, 110.0),
    beta: Any = (-45.0, 45.0),
    gamma: Any = 0.0,
    iso_jitter_mm: Any = 0.0,
    sdd_range_mm: tuple[float, float] | None = None,
    seed: int = 0,
    isocentre_world_mm: Any = (0.0, 0.0, 0.0),
) -> list[dict[str, Any]]:
    """n random C-arm poses, deterministic given ``seed`` (numpy Generator(PCG64(seed))).

    alpha / beta / gamma (degrees): a number (constant), (lo, hi) uniform, {"uniform": (lo, hi)} or
    {"normal": (mu, sigma)}; a dict may add "clip": (lo, hi). iso_jitter_mm: half-width (scalar or (3,))
    of a uniform offset added to each isocentre coordinate. sdd_range_mm: (lo, hi) uniform SDD, or None
    (pose sdd_mm None = the C-arm's). Poses are drawn one after the other, so the first k poses do not
    depend on n. Returns dicts {alpha_deg, beta_deg, gamma_deg, isocentre_world_mm, sdd_mm}.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise GeometryError(f"n: expected a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise GeometryError(f"seed: expected a non-negative integer, got {seed!r}")
    draw_a = _angle_sampler(alpha, "alpha")
    draw_b = _angle_sampler(beta, "beta")
    draw_g = _angle_sampler(gamma, "gamma")
    jit = np.broadcast_to(np.asarray(iso_jitter_mm, dtype=np.float64), (3,)).copy()
    if not np.all(np.isfinite(jit)) or np.any(jit < 0):
        raise GeometryError(f"iso_jitter_mm: must be finite and >= 0, got {iso_jitter_mm!r}")
    iso0 = _finite_array(isocentre_world_mm, "isocentre_world_mm", (3,))
    sdd_lo = sdd_hi = None
    if sdd_range_mm is not None:
        lohi = _finite_array(sdd_range_mm, "sdd_range_mm", (2,))
        sdd_lo = _positive_float(lohi[0], "sdd_range_mm")
        sdd_hi = _positive_float(lohi[1], "sdd_range_mm")
        if sdd_lo > sdd_hi:
            raise GeometryError("sdd_range_mm: lower bound exceeds upper bound")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    poses = []
    for _ in range(int(n)):
        a = draw_a(rng)
        b = draw_b(rng)
        g = draw_g(rng)
        iso = iso0 + (rng.uniform(-jit, jit) if np.any(jit > 0) else 0.0)
        sdd = float(rng.uniform(sdd_lo, sdd_hi)) if sdd_lo is not None else None
        poses.append(
            {
                "alpha_deg": a,
                "beta_deg": b,
                "gamma_deg": g,
                "isocentre_world_mm": [float(x) for x in iso],
                "sdd_mm": sdd,
            }
        )
    return poses
