"""Surface meshes of tools and implants (K-wires, screws, plates) placed in the C-arm's world.

A :class:`Mesh` is a closed triangle surface (model frame, mm) with a material, a density and a
pose ``world_from_mesh`` (4x4, rigid). It enters a render in one of two modes:

* ``"add"`` (additive): its material's line integral grows by ``density × chord / 10`` (g/cm²) along
  each ray, on top of the CT (a tool lying on or above the patient, a wire in air);
* ``"replace"`` (replacing): additionally the CT's own contribution inside the mesh is removed, so
  an implant *replaces* the bone it sits in (samples of the CT march whose ``t`` falls inside the
  mesh's entry/exit intervals are skipped; see :mod:`drrfarm.render.mesh_reference`).

Meshes are read with trimesh (STL, OBJ, PLY, OFF, GLB; several bodies in one file are merged) and
must be *watertight* (every edge shared by exactly two faces, consistent winding): the path
length through a surface is only defined for closed ones, so :func:`load_mesh` raises
:class:`MeshError` naming the file otherwise. An inside-out surface (negative volume) is flipped.

Posing: a 4x4 ``world_from_mesh``, or for linear tools (K-wires, screws, drills) an alignment of the
tool's model axis (``base_mm`` -> ``tip_mm``) onto a world trajectory (``base_world`` -> ``tip_world``)
with an *advance* along the trajectory and a *twist* about it: :func:`align_linear_tool`,
:meth:`Mesh.aligned`. Generated tools (:func:`cylinder_mesh`, :func:`kwire_mesh`,
:func:`screw_mesh`) carry their tip and base so they can be aligned directly.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from drrfarm.errors import DrrfarmError, MeshError
from drrfarm.materials import canonical_material_name, nominal_density_g_cm3

__all__ = [
    "BUILTIN_TOOLS",
    "MODES",
    "Mesh",
    "MeshError",
    "align_linear_tool",
    "check_watertight",
    "cylinder_mesh",
    "kwire_mesh",
    "load_mesh",
    "mesh_from_arrays",
    "rotation_between",
    "sample_tool_pose",
    "screw_mesh",
]

MODES = ("add", "replace")
_MODE_ALIASES = {
    "add": "add", "additive": "add",
    "replace": "replace", "replacing": "replace", "subtractive": "replace", "subtract": "replace",
}
MESH_SUFFIXES = (".stl", ".obj", ".ply", ".off", ".glb", ".gltf")


# ---------------------------------------------------------------------------------------------- helpers

def _vec3(value: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise MeshError(f"{name}: expected 3 numbers ({exc})") from exc
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise MeshError(f"{name}: expected 3 finite numbers, got {value!r}")
    return arr


def _rigid(T: Any, name: str) -> np.ndarray:
    """Validate a 4x4 rigid transform (rotation + translation); snap the rotation to orthonormal."""
    try:
        T = np.array(T, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MeshError(f"{name}: expected a 4x4 matrix ({exc})") from exc
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise MeshError(f"{name}: expected a finite 4x4 matrix, got shape {T.shape}")
    if np.max(np.abs(T[3] - [0.0, 0.0, 0.0, 1.0])) > 1e-9:
        raise MeshError(f"{name}: last row must be [0, 0, 0, 1]")
    R = T[:3, :3]
    err = float(np.max(np.abs(R @ R.T - np.eye(3))))
    if err > 1e-5 or np.linalg.det(R) <= 0:
        raise MeshError(f"{name}: the 3x3 part must be a proper rotation (max |R R^T - I| = {err:.2g}, "
                        f"det = {np.linalg.det(R):.3g}); scale the mesh with scale_to_mm instead")
    U, _, Vt = np.linalg.svd(R)
    T[:3, :3] = U @ Vt
    return T


def rotation_between(a: Any, b: Any) -> np.ndarray:
    """(3,3) the smallest rotation taking direction ``a`` to direction ``b`` (both (3,), any length)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    v = np.cross(a, b)
    c = float(a @ b)
    if c < -1.0 + 1e-12:  # opposite: half turn about any axis perpendicular to a
        e = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
        e /= np.linalg.norm(e)
        return 2.0 * np.outer(e, e) - np.eye(3)
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def _axis_rotation(axis: np.ndarray, deg: float) -> np.ndarray:
    """(3,3) right-handed rotation by ``deg`` about the unit vector ``axis`` (Rodrigues)."""
    k = axis / np.linalg.norm(axis)
    a = math.radians(deg)
    K = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(a) * K + (1.0 - math.cos(a)) * (K @ K)


def align_linear_tool(
    tip_model_mm: Any,
    base_model_mm: Any,
    tip_world_mm: Any,
    base_world_mm: Any,
    advance_mm: float = 0.0,
    twist_deg: float = 0.0,
) -> np.ndarray:
    """(4,4) world_from_mesh putting a linear tool on a world trajectory.

    The model axis ``base_model -> tip_model`` is turned onto the trajectory direction
    ``w = unit(tip_world - base_world)`` by the smallest rotation, then twisted by ``twist_deg``
    (right-handed about ``w``), and the model tip is placed at ``tip_world + advance_mm * w``:
    ``advance_mm > 0`` pushes the tool further along the trajectory (deeper), ``< 0`` pulls it back.
    The tool's own length is kept (only the trajectory's direction and the tip point are used).
    """
    tm = _vec3(tip_model_mm, "tip_model_mm")
    bm = _vec3(base_model_mm, "base_model_mm")
    tw = _vec3(tip_world_mm, "tip_world_mm")
    bw = _vec3(base_world_mm, "base_world_mm")
    if np.linalg.norm(tm - bm) <= 0:
        raise MeshError("tip_model_mm/base_model_mm: tool tip and base coincide; the axis is undefined")
    if np.linalg.norm(tw - bw) <= 0:
        raise MeshError("tip_world_mm/base_world_mm: trajectory tip and base coincide; the direction is undefined")
    if not (math.isfinite(float(advance_mm)) and math.isfinite(float(twist_deg))):
        raise MeshError(f"advance_mm/twist_deg: must be finite, got {advance_mm!r}, {twist_deg!r}")
    w = (tw - bw) / np.linalg.norm(tw - bw)
    R = _axis_rotation(w, float(twist_deg)) @ rotation_between(tm - bm, w)
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = tw + float(advance_mm) * w - R @ tm
    return T


# -------------------------------------------------------------------------------------------- the Mesh

@dataclass(frozen=True, eq=False)
class Mesh:
    """A closed triangle mesh with material, density, render mode and pose.

    vertices_mm: (V, 3) float64, model frame (mm). faces: (F, 3) int64 vertex indices, outward
    (counter-clockwise seen from outside) winding. material: a name known to
    :mod:`drrfarm.materials`. density_g_cm3: > 0. mode: ``"add"`` or ``"replace"``.
    world_from_mesh: (4, 4) rigid pose. tip_mm / base_mm: optional (3,) model-frame points of a
    linear tool's tip and base (for :meth:`aligned` and tip landmarks).
    """

    vertices_mm: np.ndarray
    faces: np.ndarray
    material: str
    density_g_cm3: float
    mode: str = "add"
    world_from_mesh: np.ndarray = field(default_factory=lambda: np.eye(4))
    name: str = "mesh"
    source: str = "<array>"
    tip_mm: np.ndarray | None = None
    base_mm: np.ndarray | None = None

    def __post_init__(self) -> None:
        where = f"{self.source}" if self.source != "<array>" else f"mesh {self.name!r}"
        v = np.ascontiguousarray(np.asarray(self.vertices_mm, dtype=np.float64))
        f = np.ascontiguousarray(np.asarray(self.faces, dtype=np.int64))
        if v.ndim != 2 or v.shape[1] != 3 or len(v) < 4 or not np.all(np.isfinite(v)):
            raise MeshError(f"{where}: vertices must be a finite (V>=4, 3) array, got shape {v.shape}")
        if f.ndim != 2 or f.shape[1] != 3 or len(f) < 4 or f.min() < 0 or f.max() >= len(v):
            raise MeshError(f"{where}: faces must be (F>=4, 3) indices into the {len(v)} vertices")
        v.setflags(write=False)
        f.setflags(write=False)
        object.__setattr__(self, "vertices_mm", v)
        object.__setattr__(self, "faces", f)
        mode = _MODE_ALIASES.get(str(self.mode).strip().lower())
        if mode is None:
            raise MeshError(f"{where}: mode must be one of {MODES} (or additive/replacing), got {self.mode!r}")
        object.__setattr__(self, "mode", mode)
        try:
            canonical_material_name(self.material)
        except DrrfarmError as exc:
            raise MeshError(f"{where}: material: {exc}") from exc
        rho = float(self.density_g_cm3)
        if not (math.isfinite(rho) and rho > 0):
            raise MeshError(f"{where}: density_g_cm3 must be a positive number, got {self.density_g_cm3!r}")
        object.__setattr__(self, "density_g_cm3", rho)
        object.__setattr__(self, "world_from_mesh", _rigid(self.world_from_mesh, f"{where}: world_from_mesh"))
        for key in ("tip_mm", "base_mm"):
            val = getattr(self, key)
            if val is not None:
                object.__setattr__(self, key, _vec3(val, f"{where}: {key}"))

    # -- geometry ---------------------------------------------------------------------------------

    @property
    def n_triangles(self) -> int:
        return int(len(self.faces))

    @property
    def geometry_sha256(self) -> str:
        """sha256 of the vertex and face arrays (the model-frame shape, independent of pose)."""
        cached = self.__dict__.get("_geometry_sha256")
        if cached is None:
            h = hashlib.sha256()
            h.update(self.vertices_mm.tobytes())
            h.update(self.faces.tobytes())
            cached = h.hexdigest()
            object.__setattr__(self, "_geometry_sha256", cached)
        return cached

    def triangles_model_mm(self) -> np.ndarray:
        """(F, 3, 3) vertex coordinates of each triangle, model frame."""
        return self.vertices_mm[self.faces]

    def vertices_world_mm(self) -> np.ndarray:
        """(V, 3) vertices in world mm."""
        T = self.world_from_mesh
        return self.vertices_mm @ T[:3, :3].T + T[:3, 3]

    def triangles_world_mm(self) -> np.ndarray:
        """(F, 3, 3) triangles in world mm."""
        return self.vertices_world_mm()[self.faces]

    def bounds_world_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world bounding box (lo (3,), hi (3,))."""
        v = self.vertices_world_mm()
        return v.min(axis=0), v.max(axis=0)

    @property
    def volume_mm3(self) -> float:
        """Enclosed volume (mm³; divergence theorem over the faces)."""
        t = self.triangles_model_mm()
        return float(np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6.0)

    def point_world_mm(self, point_model_mm: Any) -> np.ndarray:
        """(3,) a model-frame point in world mm."""
        p = _vec3(point_model_mm, "point_model_mm")
        T = self.world_from_mesh
        return T[:3, :3] @ p + T[:3, 3]

    def tip_world_mm(self) -> np.ndarray:
        """(3,) a linear tool's tip (``tip_mm``) in world mm."""
        if self.tip_mm is None:
            raise MeshError(f"mesh {self.name!r}: has no tip_mm (not a linear tool)")
        return self.point_world_mm(self.tip_mm)

    def base_world_mm(self) -> np.ndarray:
        """(3,) a linear tool's base (``base_mm``) in world mm."""
        if self.base_mm is None:
            raise MeshError(f"mesh {self.name!r}: has no base_mm (not a linear tool)")
        return self.point_world_mm(self.base_mm)

    # -- posing -----------------------------------------------------------------------------------

    def posed(self, world_from_mesh: Any) -> Mesh:
        """Copy with another 4x4 pose (the geometry arrays are shared, not copied)."""
        return replace(self, world_from_mesh=world_from_mesh)

    def aligned(self, tip_world_mm: Any, base_world_mm: Any, advance_mm: float = 0.0,
                twist_deg: float = 0.0) -> Mesh:
        """Copy posed on the trajectory ``base_world -> tip_world`` (see :func:`align_linear_tool`)."""
        if self.tip_mm is None or self.base_mm is None:
            raise MeshError(f"mesh {self.name!r}: aligning needs tip_mm and base_mm (model frame)")
        T = align_linear_tool(self.tip_mm, self.base_mm, tip_world_mm, base_world_mm, advance_mm, twist_deg)
        return self.posed(T)

    # -- identity ---------------------------------------------------------------------------------

    def content_key(self) -> str:
        """sha256 over geometry, pose, material, density and mode."""
        h = hashlib.sha256(self.geometry_sha256.encode())
        h.update(np.ascontiguousarray(self.world_from_mesh).tobytes())
        h.update(f"|{self.material}|{self.density_g_cm3!r}|{self.mode}".encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (for per-image metadata and provenance)."""
        return {
            "name": self.name,
            "source": self.source,
            "geometry_sha256": self.geometry_sha256,
            "material": self.material,
            "density_g_cm3": self.density_g_cm3,
            "mode": self.mode,
            "world_from_mesh": self.world_from_mesh.tolist(),
            "n_triangles": self.n_triangles,
        }

    def __repr__(self) -> str:
        return (f"Mesh({self.name!r}, {self.n_triangles} triangles, {self.material} "
                f"{self.density_g_cm3:g} g/cm3, mode={self.mode})")


# --------------------------------------------------------------------------------------- watertightness

def check_watertight(vertices: np.ndarray, faces: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check that a triangle surface is closed and consistently wound; return (vertices, faces).

    Raises :class:`MeshError` naming ``where`` if an edge is not shared by exactly two faces, the
    winding is inconsistent, or the enclosed volume is zero. A closed surface wound inward (negative
    volume) is returned with its faces flipped.
    """
    import trimesh

    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    tm = trimesh.Trimesh(vertices=v, faces=f, process=True, validate=False)
    if len(tm.faces) < 4:
        raise MeshError(f"{where}: not a closed surface (only {len(tm.faces)} non-degenerate triangles)")
    _, counts = np.unique(tm.edges_sorted, axis=0, return_counts=True)
    open_edges = int(np.sum(counts == 1))
    nonmanifold = int(np.sum(counts > 2))
    if open_edges or nonmanifold or not tm.is_watertight:
        raise MeshError(
            f"{where}: mesh is not watertight ({open_edges} open edge(s), {nonmanifold} edge(s) shared by more "
            "than two faces); a chord length through it is undefined. Close the holes first (e.g. "
            "trimesh.repair.fill_holes, MeshLab 'Close Holes') or export the tool as a closed solid"
        )
    if not tm.is_winding_consistent:
        raise MeshError(f"{where}: mesh faces are not consistently wound (some normals point inward); "
                        "fix the orientation (e.g. trimesh.repair.fix_winding)")
    vol = float(tm.volume)
    scale = float(np.max(np.ptp(tm.vertices, axis=0))) if len(tm.vertices) else 0.0
    if not abs(vol) > 1e-12 * max(scale, 1e-12) ** 3:
        raise MeshError(f"{where}: mesh encloses no volume (flat or degenerate)")
    faces_out = np.asarray(tm.faces, dtype=np.int64)
    if vol < 0:
        faces_out = faces_out[:, ::-1].copy()
    return np.asarray(tm.vertices, dtype=np.float64), faces_out


# ------------------------------------------------------------------------------------------- loading

def _default_density(material: str, density_g_cm3: float | None) -> float:
    if density_g_cm3 is not None:
        return float(density_g_cm3)
    return float(nominal_density_g_cm3(material))


def mesh_from_arrays(
    vertices_mm: Any,
    faces: Any,
    material: str,
    density_g_cm3: float | None = None,
    mode: str = "add",
    world_from_mesh: Any = None,
    name: str = "mesh",
    source: str = "<array>",
    tip_mm: Any = None,
    base_mm: Any = None,
    check: bool = True,
) -> Mesh:
    """A :class:`Mesh` from vertex (V, 3) and face (F, 3) arrays; watertightness checked unless ``check=False``.

    ``density_g_cm3`` None takes the material's nominal density (``materials.nominal_density_g_cm3``).
    """
    v = np.asarray(vertices_mm, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    where = source if source != "<array>" else f"mesh {name!r}"
    if check:
        v, f = check_watertight(v, f, where)
    try:
        rho = _default_density(material, density_g_cm3)
    except DrrfarmError as exc:
        raise MeshError(f"{where}: material: {exc}") from exc
    return Mesh(v, f, material, rho, mode, np.eye(4) if world_from_mesh is None else world_from_mesh,
                name, source, tip_mm, base_mm)


def load_mesh(
    path: str | os.PathLike[str],
    material: str,
    density_g_cm3: float | None = None,
    mode: str = "add",
    world_from_mesh: Any = None,
    scale_to_mm: float = 1.0,
    name: str | None = None,
    tip_mm: Any = None,
    base_mm: Any = None,
) -> Mesh:
    """Read an STL / OBJ / PLY (/ OFF / GLB) file into a watertight :class:`Mesh` (model frame, mm).

    ``material``: a :mod:`drrfarm.materials` name; ``density_g_cm3`` in g/cm³ (None: the material's
    nominal density); ``mode`` ``"add"`` or ``"replace"``; ``world_from_mesh``: (4, 4) rigid pose (world mm);
    ``tip_mm`` / ``base_mm``: (3,) model-frame points of a linear tool (mm, after scaling).
    ``scale_to_mm`` multiplies the file's coordinates (1000 for a file in metres). Several bodies
    in one file are merged into one mesh (each must be closed). Raises :class:`MeshError` naming
    the file when it is missing, unreadable, empty or not watertight.
    """
    import trimesh

    p = Path(path)
    where = str(p)
    if p.suffix.lower() not in MESH_SUFFIXES:
        raise MeshError(f"{where}: unsupported mesh format {p.suffix!r}; use one of {MESH_SUFFIXES}")
    if not p.is_file():
        raise MeshError(f"{where}: mesh file not found")
    s = float(scale_to_mm)
    if not (math.isfinite(s) and s > 0):
        raise MeshError(f"{where}: scale_to_mm must be positive, got {scale_to_mm!r}")
    try:
        loaded = trimesh.load(str(p), force="mesh", process=True)
    except Exception as exc:  # trimesh raises many types for malformed files
        raise MeshError(f"{where}: cannot read mesh ({type(exc).__name__}: {exc})") from exc
    if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0:
        raise MeshError(f"{where}: file holds no triangles")
    v = np.asarray(loaded.vertices, dtype=np.float64) * s
    f = np.asarray(loaded.faces, dtype=np.int64)
    return mesh_from_arrays(v, f, material, density_g_cm3, mode, world_from_mesh, name or p.stem, where,
                            tip_mm, base_mm)


# ------------------------------------------------------------------------------------ generated tools

def _revolved(profile_rz: list[tuple[float, float]], sections: int, material: str, density_g_cm3: float | None,
              mode: str, name: str, length_mm: float) -> Mesh:
    """Solid of revolution about the model z axis of a (r, z) profile that starts and ends on the axis."""
    import trimesh

    tm = trimesh.creation.revolve(np.asarray(profile_rz, dtype=np.float64), sections=int(sections))
    return mesh_from_arrays(tm.vertices, tm.faces, material, density_g_cm3, mode, None, name, "<generated>",
                            tip_mm=(0.0, 0.0, length_mm), base_mm=(0.0, 0.0, 0.0))


def _positive(value: float, name: str) -> float:
    x = float(value)
    if not (math.isfinite(x) and x > 0):
        raise MeshError(f"{name}: must be a positive number, got {value!r}")
    return x


def cylinder_mesh(
    radius_mm: float,
    length_mm: float,
    sections: int = 64,
    material: str = "steel",
    density_g_cm3: float | None = None,
    mode: str = "add",
    name: str = "cylinder",
) -> Mesh:
    """Closed polygonal cylinder (``sections``-gon, vertices on the circle at angles 2πk/sections).

    Model frame: axis +z from the base (z = 0) to the tip (z = length_mm), centred on x = y = 0.
    The polygon is *inscribed*: its apothem is ``radius_mm * cos(π / sections)``.
    """
    import trimesh

    r = _positive(radius_mm, "radius_mm")
    h = _positive(length_mm, "length_mm")
    tm = trimesh.creation.cylinder(radius=r, height=h, sections=int(sections))
    v = np.asarray(tm.vertices, dtype=np.float64) + [0.0, 0.0, h / 2.0]
    return mesh_from_arrays(v, tm.faces, material, density_g_cm3, mode, None, name, "<generated>",
                            tip_mm=(0.0, 0.0, h), base_mm=(0.0, 0.0, 0.0))


def kwire_mesh(
    diameter_mm: float = 1.6,
    length_mm: float = 150.0,
    tip_length_mm: float = 3.0,
    sections: int = 24,
    material: str = "steel",
    density_g_cm3: float | None = None,
    mode: str = "replace",
    name: str = "kwire",
) -> Mesh:
    """Kirschner wire: a cylinder with a conical (trocar-like) tip; base at z = 0, tip at z = length_mm."""
    r = _positive(diameter_mm, "diameter_mm") / 2.0
    L = _positive(length_mm, "length_mm")
    tl = _positive(tip_length_mm, "tip_length_mm")
    if tl >= L:
        raise MeshError(f"tip_length_mm: must be shorter than length_mm ({L:g}), got {tl:g}")
    profile = [(0.0, 0.0), (r, 0.0), (r, L - tl), (0.0, L)]
    return _revolved(profile, sections, material, density_g_cm3, mode, name, L)


def screw_mesh(
    diameter_mm: float = 6.5,
    length_mm: float = 45.0,
    head_diameter_mm: float = 11.0,
    head_length_mm: float = 4.0,
    tip_length_mm: float = 3.0,
    sections: int = 32,
    material: str = "titanium",
    density_g_cm3: float | None = None,
    mode: str = "replace",
    name: str = "screw",
) -> Mesh:
    """Bone screw as a solid of revolution (no helical thread): head, shaft, conical tip.

    Model frame: axis +z; base = top of the head (z = 0), head down to z = head_length_mm, shaft of
    ``diameter_mm`` down to the cone, tip at z = length_mm (total length, head included).
    """
    r = _positive(diameter_mm, "diameter_mm") / 2.0
    rh = _positive(head_diameter_mm, "head_diameter_mm") / 2.0
    L = _positive(length_mm, "length_mm")
    hl = _positive(head_length_mm, "head_length_mm")
    tl = _positive(tip_length_mm, "tip_length_mm")
    if hl + tl >= L:
        raise MeshError(f"length_mm: {L:g} must exceed head_length_mm + tip_length_mm ({hl + tl:g})")
    profile = [(0.0, 0.0), (rh, 0.0), (rh, hl), (r, hl), (r, L - tl), (0.0, L)]
    return _revolved(profile, sections, material, density_g_cm3, mode, name, L)


#: Built-in tools by name (``drrfarm.tool_mesh``, ``drrfarm render --tool``): name -> generator.
BUILTIN_TOOLS: dict[str, Callable[..., Mesh]] = {"kwire": kwire_mesh, "screw": screw_mesh, "cylinder": cylinder_mesh}


# -------------------------------------------------------------------------------- pose distributions

def _draw(spec: Any, rng: np.random.Generator, name: str) -> float:
    """One draw from a number, ``(lo, hi)`` (uniform), ``{"uniform": (lo, hi)}`` or ``{"normal": (mu, sigma)}``
    (a dict may add ``"clip": (lo, hi)``)."""
    if isinstance(spec, dict):
        keys = set(spec) - {"clip"}
        if keys == {"uniform"}:
            lo, hi = (float(x) for x in spec["uniform"])
            x = float(rng.uniform(lo, hi))
        elif keys == {"normal"}:
            mu, sigma = (float(x) for x in spec["normal"])
            x = float(rng.normal(mu, sigma))
        else:
            raise MeshError(f"{name}: expected a number, (lo, hi), {{'uniform': (lo, hi)}} or "
                            f"{{'normal': (mu, sigma)}}, got {spec!r}")
        if spec.get("clip") is not None:
            lo, hi = (float(v) for v in spec["clip"])
            x = min(max(x, lo), hi)
        return x
    if np.isscalar(spec):
        return float(spec)  # type: ignore[arg-type]
    try:
        lo, hi = (float(x) for x in spec)
    except (TypeError, ValueError) as exc:
        raise MeshError(f"{name}: expected a number or (lo, hi), got {spec!r}") from exc
    if lo > hi:
        raise MeshError(f"{name}: lower bound {lo:g} exceeds upper bound {hi:g}")
    return float(rng.uniform(lo, hi))


def sample_tool_pose(
    mesh: Mesh,
    tip_mm: Any,
    base_mm: Any,
    rng: np.random.Generator,
    advance_mm: Any = 0.0,
    twist_deg: Any = 0.0,
    tip_jitter_mm: float = 0.0,
    angle_jitter_deg: float = 0.0,
    world_from_patient: Any = None,
) -> Mesh:
    """A linear tool posed on a randomly perturbed trajectory (one draw; deterministic given ``rng``).

    ``tip_mm``/``base_mm``: the planned trajectory (world mm, or patient RAS mm if ``world_from_patient``
    is given). Draw order: tip offset (uniform per axis in ±tip_jitter_mm), tilt (a rotation of the
    direction by an angle uniform in [0, angle_jitter_deg] about a uniformly random perpendicular axis),
    advance, twist; ``advance_mm``/``twist_deg`` take a number, ``(lo, hi)``, ``{"uniform": ...}`` or
    ``{"normal": (mu, sigma), "clip": (lo, hi)}``. Typical: a K-wire on a planned path with
    ``advance_mm=(-30, 0)`` (partially inserted).
    """
    tip = _vec3(tip_mm, "tip_mm")
    base = _vec3(base_mm, "base_mm")
    if world_from_patient is not None:
        T = np.asarray(world_from_patient, dtype=np.float64)
        tip, base = T[:3, :3] @ tip + T[:3, 3], T[:3, :3] @ base + T[:3, 3]
    j = float(tip_jitter_mm)
    tip = tip + (rng.uniform(-j, j, 3) if j > 0 else 0.0)
    axis = tip - base
    length = float(np.linalg.norm(axis))
    if length <= 0:
        raise MeshError("tip_mm/base_mm: trajectory tip and base coincide")
    w = axis / length
    if angle_jitter_deg > 0:
        perp = np.cross(w, rng.normal(size=3))
        perp /= np.linalg.norm(perp)
        w = _axis_rotation(perp, float(rng.uniform(0.0, float(angle_jitter_deg)))) @ w
    adv = _draw(advance_mm, rng, "advance_mm")
    tw = _draw(twist_deg, rng, "twist_deg")
    return mesh.aligned(tip, tip - length * w, adv, tw)


#: Built-in tool shapes (a sweep spec's ``tools[].mesh``, :func:`drrfarm.api.tool_mesh`): name -> generator.
BUILTIN_TOOLS: dict[str, Callable[..., Mesh]] = {"kwire": kwire_mesh, "screw": screw_mesh,
                                                 "cylinder": cylinder_mesh}
