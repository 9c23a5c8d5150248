"""Sweep-spec sections for what is rendered *with* the CT: ``tools``, ``labels`` and ``landmarks``.

* ``tools``: meshes (built-in K-wire, screw or cylinder, or a mesh file) with a material, a density,
  a mode (``add`` / ``replace``) and a pose: a fixed ``world_from_mesh`` or a planned trajectory
  (``tip_mm`` / ``base_mm`` in the patient or world frame) with random advance, twist, tip jitter
  and tilt, drawn per image by :func:`drrfarm.meshes.sample_tool_pose`;
* ``labels``: a CT label map's labels projected to per-image masks (optionally projected
  thickness), plus the tools' masks;
* ``landmarks``: 3D points (Slicer markups JSON / FCSV file, or an inline list) projected per image.

Validated on the :class:`~drrfarm.farm.validator.Validator` primitives (every failure names the file, key path
and reason) when :mod:`drrfarm.farm.spec` reads a spec, or alone by :func:`parse_tools`;
the sections enter the spec's content hash only when present, so specs without them keep their hash.
``{volume_id}`` in ``labels.label_map`` and ``landmarks.file`` is replaced by each volume's id.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from drrfarm.errors import DrrfarmError
from drrfarm.farm.validator import Validator, join
from drrfarm.landmarks import FRAMES as LANDMARK_FRAMES
from drrfarm.landmarks import load_landmarks
from drrfarm.materials import canonical_material_name
from drrfarm.meshes import BUILTIN_TOOLS, MESH_SUFFIXES
from drrfarm.meshes import MODES as TOOL_MODES

POSE_FRAMES = ("patient", "world")  # the frame of a tool's pose: the CT's (RAS mm) or the C-arm's world
_TOOL_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
VOLUME_ID_FIELD = "{volume_id}"
_NOT_SHAPE = {"material", "density_g_cm3", "mode", "name"}  # generator arguments set by their own keys


@dataclass(frozen=True)
class Draw:
    """A number drawn per image: ``kind`` "fixed" (``a``), "uniform" (``a``..``b``) or "normal"
    (mean ``a``, std ``b``, optional ``clip``)."""

    kind: str
    a: float = 0.0
    b: float = 0.0
    clip: tuple[float, float] | None = None

    def for_sampler(self) -> Any:
        """The argument :func:`drrfarm.meshes.sample_tool_pose` takes."""
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return {"uniform": (self.a, self.b)}
        return {"normal": (self.a, self.b), "clip": self.clip}

    def content(self) -> dict[str, Any]:
        return {"kind": self.kind, "a": self.a, "b": self.b, "clip": list(self.clip) if self.clip else None}


@dataclass(frozen=True)
class ToolPose:
    """A fixed ``world_from_mesh`` (16 floats, row-major) or a trajectory ``tip_mm`` -> ``base_mm``."""

    frame: str = "patient"
    world_from_mesh: tuple[float, ...] | None = None
    tip_mm: tuple[float, float, float] | None = None
    base_mm: tuple[float, float, float] | None = None
    advance_mm: Draw = Draw("fixed")
    twist_deg: Draw = Draw("fixed")
    tip_jitter_mm: float = 0.0
    angle_jitter_deg: float = 0.0

    @property
    def is_random(self) -> bool:
        return (self.world_from_mesh is None and (self.tip_jitter_mm > 0 or self.angle_jitter_deg > 0
                                                  or self.advance_mm.kind != "fixed"
                                                  or self.twist_deg.kind != "fixed"))

    def content(self) -> dict[str, Any]:
        return {"frame": self.frame, "world_from_mesh": list(self.world_from_mesh) if self.world_from_mesh else None,
                "tip_mm": list(self.tip_mm) if self.tip_mm else None,
                "base_mm": list(self.base_mm) if self.base_mm else None,
                "advance_mm": self.advance_mm.content(), "twist_deg": self.twist_deg.content(),
                "tip_jitter_mm": self.tip_jitter_mm, "angle_jitter_deg": self.angle_jitter_deg}


@dataclass(frozen=True)
class ToolSpec:
    """One tool: ``mesh`` is a built-in name (:data:`drrfarm.meshes.BUILTIN_TOOLS`) or a file path (``path`` as
    written, ``resolved`` to open). ``shape``: the built-in's size arguments. ``material`` /
    ``mode`` None: the built-in's default (files: material required, mode ``add``)."""

    name: str
    mesh: str
    resolved: str | None = None
    shape: tuple[tuple[str, float], ...] = ()
    scale_to_mm: float = 1.0
    model_tip_mm: tuple[float, float, float] | None = None
    model_base_mm: tuple[float, float, float] | None = None
    material: str | None = None
    density_g_cm3: float | None = None
    mode: str | None = None
    pose: ToolPose = ToolPose()

    @property
    def is_builtin(self) -> bool:
        return self.resolved is None

    def content(self) -> dict[str, Any]:
        return {"name": self.name, "mesh": self.mesh, "shape": [list(kv) for kv in self.shape],
                "scale_to_mm": self.scale_to_mm,
                "model_tip_mm": list(self.model_tip_mm) if self.model_tip_mm else None,
                "model_base_mm": list(self.model_base_mm) if self.model_base_mm else None,
                "material": self.material, "density_g_cm3": self.density_g_cm3, "mode": self.mode,
                "pose": self.pose.content()}


@dataclass(frozen=True)
class LabelsSpec:
    """Label masks: ``label_map`` (as written; ``{volume_id}`` replaced per volume) and the
    ``values`` to project (``((value, name), ...)``; empty: every non-zero value); ``thickness``:
    also the projected thickness (mm); ``tools``: masks (and thickness) of the tools too."""

    label_map: str | None = None
    label_map_resolved: str | None = None
    values: tuple[tuple[int, str], ...] = ()
    thickness: bool = False
    tools: bool = True

    def content(self) -> dict[str, Any]:
        return {"label_map": self.label_map, "values": [list(v) for v in self.values],
                "thickness": self.thickness, "tools": self.tools}


@dataclass(frozen=True)
class LandmarksSpec:
    """Landmarks: a Slicer markups JSON / FCSV ``file`` (``{volume_id}`` replaced per volume) or
    inline ``points`` (``((name, (x, y, z)), ...)`` in ``frame``), plus optionally every tool's tip
    and base (``tool_tips``)."""

    file: str | None = None
    file_resolved: str | None = None
    points: tuple[tuple[str, tuple[float, float, float]], ...] = ()
    frame: str = "RAS"
    tool_tips: bool = False

    def content(self) -> dict[str, Any]:
        return {"file": self.file, "points": [[n, list(p)] for n, p in self.points], "frame": self.frame,
                "tool_tips": self.tool_tips}


# ----------------------------------------------------------------------------------------------
# validation (called by drrfarm.farm.spec.SpecValidator.spec)


def draw(v: Validator, value: Any, path: str, *, lo: float | None = None) -> Draw:
    """A number, ``{uniform: [lo, hi]}`` or ``{normal: {mean, std, clip}}`` (no grids for tools)."""
    if isinstance(value, list):
        v.fail(path, "a list of values is not supported here (tool poses are drawn per image); "
                     "use a number, {uniform: [lo, hi]} or {normal: {mean, std, clip}}")
    axis = v.axis(value, path, lo=lo)
    if axis.kind == "values":
        if len(axis.values) != 1:
            v.fail(path, "a grid of values ({range: ...} or {values: [...]}) is not supported here (tool poses are "
                         "drawn per image); use a number, {uniform: [lo, hi]} or {normal: {mean, std, clip}}")
        return Draw("fixed", axis.values[0])
    if axis.kind == "uniform":
        return Draw("uniform", axis.low, axis.high)
    return Draw("normal", axis.mean, axis.std, axis.clip)


def tool_pose(v: Validator, value: Any, path: str, has_axis: bool) -> ToolPose:
    m = v.mapping(value, path, ["frame", "world_from_mesh", "tip_mm", "base_mm", "advance_mm", "twist_deg",
                                "tip_jitter_mm", "angle_jitter_deg"])
    frame = v.choice(m.get("frame", "patient"), join(path, "frame"), POSE_FRAMES)
    if ("world_from_mesh" in m) == ("tip_mm" in m or "base_mm" in m):
        v.fail(path, "give exactly one of world_from_mesh (4x4) or a trajectory (tip_mm and base_mm)")
    if "world_from_mesh" in m:
        extra = [k for k in ("advance_mm", "twist_deg", "tip_jitter_mm", "angle_jitter_deg") if k in m]
        if extra:
            v.fail(join(path, extra[0]), "only allowed with a trajectory (tip_mm, base_mm)")
        return ToolPose(frame=frame, world_from_mesh=matrix4(v, m["world_from_mesh"], join(path, "world_from_mesh")))
    for key in ("tip_mm", "base_mm"):
        if key not in m:
            v.fail(join(path, key), "required with a trajectory")
    if not has_axis:
        v.fail(join(path, "tip_mm"), "a trajectory needs a linear tool (a built-in, or a mesh file with "
                                     "model_tip_mm and model_base_mm)")
    tip = v.vec3(m["tip_mm"], join(path, "tip_mm"))
    base = v.vec3(m["base_mm"], join(path, "base_mm"))
    if tip == base:
        v.fail(join(path, "base_mm"), "the trajectory's tip and base coincide")
    return ToolPose(frame=frame, tip_mm=tip, base_mm=base,
                    advance_mm=draw(v, m.get("advance_mm", 0.0), join(path, "advance_mm")),
                    twist_deg=draw(v, m.get("twist_deg", 0.0), join(path, "twist_deg")),
                    tip_jitter_mm=v.number(m.get("tip_jitter_mm", 0.0), join(path, "tip_jitter_mm"), lo=0.0,
                                           hi=1000.0),
                    angle_jitter_deg=v.number(m.get("angle_jitter_deg", 0.0), join(path, "angle_jitter_deg"),
                                              lo=0.0, hi=180.0))


def matrix4(v: Validator, value: Any, path: str) -> tuple[float, ...]:
    """A rigid 4x4 (nested rows or 16 numbers), last row [0, 0, 0, 1], rotation orthonormal."""
    flat = v.matrix(value, path, 4, 4)
    T = np.asarray(flat).reshape(4, 4)
    if not np.allclose(T[3], [0, 0, 0, 1]):
        v.fail(path, "the last row must be [0, 0, 0, 1]")
    if not (np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-6) and np.linalg.det(T[:3, :3]) > 0):
        v.fail(path, "the upper-left 3x3 block must be a rotation (a rigid pose)")
    return tuple(flat)


def tools(v: Validator, value: Any, path: str) -> tuple[ToolSpec, ...]:
    items = v.seq(value, path)
    out: list[ToolSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        p = join(path, i)
        m = v.mapping(item, p, ["name", "mesh", "size", "scale_to_mm", "model_tip_mm", "model_base_mm", "material",
                                "density_g_cm3", "mode", "pose"], required=["mesh", "pose"])
        mesh = v.string(m["mesh"], join(p, "mesh"))
        builtin = mesh in BUILTIN_TOOLS
        name = v.string(m.get("name", mesh), join(p, "name"))
        if not _TOOL_NAME_RE.match(name):
            v.fail(join(p, "name"), f"tool name {name!r} must be 1-64 letters, digits, '_', '.', '-' "
                                    "(starting with a letter)")
        if name in seen:
            v.fail(join(p, "name"), f"duplicate tool name {name!r}; give each tool a unique name")
        seen.add(name)
        resolved = None
        shape: list[tuple[str, float]] = []
        if builtin:
            for key in ("scale_to_mm", "model_tip_mm", "model_base_mm"):
                if key in m:
                    v.fail(join(p, key), f"only for mesh files, not the built-in {mesh!r}")
            params = [a for a in inspect.signature(BUILTIN_TOOLS[mesh]).parameters if a not in _NOT_SHAPE]
            required = [a for a, prm in inspect.signature(BUILTIN_TOOLS[mesh]).parameters.items()
                        if prm.default is inspect.Parameter.empty]
            sizes = v.mapping(m.get("size", {}), join(p, "size"), params, required=required)
            for key, x in sizes.items():
                kp = join(join(p, "size"), key)
                if key == "sections":
                    shape.append((key, float(v.integer(x, kp, lo=3, hi=4096))))
                else:
                    shape.append((key, v.number(x, kp, lo=0.0, lo_open=True, hi=10_000.0)))
            shape.sort()
        else:
            if not mesh.lower().endswith(MESH_SUFFIXES):
                v.fail(join(p, "mesh"), f"{mesh!r} is neither a built-in tool ({', '.join(BUILTIN_TOOLS)}) nor a "
                                        f"mesh file ({', '.join(MESH_SUFFIXES)})")
            if "size" in m:
                v.fail(join(p, "size"), "only for built-in tools; scale a mesh file with scale_to_mm")
            if "material" not in m:
                v.fail(join(p, "material"), "required for a mesh file")
            resolved, _ = v.resolve_path(mesh)
        material = v.string(m["material"], join(p, "material")) if "material" in m else None
        if material is not None:
            _check_material(v, material, join(p, "material"))
        density = v.number(m["density_g_cm3"], join(p, "density_g_cm3"), lo=0.0, lo_open=True, hi=30.0) \
            if "density_g_cm3" in m else None
        mode = v.choice(m["mode"], join(p, "mode"), TOOL_MODES) if "mode" in m else None
        scale = v.number(m.get("scale_to_mm", 1.0), join(p, "scale_to_mm"), lo=0.0, lo_open=True)
        mtip = v.vec3(m["model_tip_mm"], join(p, "model_tip_mm")) if "model_tip_mm" in m else None
        mbase = v.vec3(m["model_base_mm"], join(p, "model_base_mm")) if "model_base_mm" in m else None
        if (mtip is None) != (mbase is None):
            v.fail(join(p, "model_tip_mm" if mtip is None else "model_base_mm"),
                   "model_tip_mm and model_base_mm go together")
        pose = tool_pose(v, m["pose"], join(p, "pose"), builtin or mtip is not None)
        out.append(ToolSpec(name=name, mesh=mesh, resolved=resolved, shape=tuple(shape), scale_to_mm=scale,
                            model_tip_mm=mtip, model_base_mm=mbase, material=material, density_g_cm3=density,
                            mode=mode, pose=pose))
    return tuple(out)


def parse_tools(items: Any, source: str = "--tool", base_dir: str | None = None) -> tuple[ToolSpec, ...]:
    """Validate a list of ``tools:`` items (the sweep spec's syntax) outside a spec, e.g. from
    ``drrfarm render --tool``. Relative mesh paths resolve against ``base_dir`` (default: the current
    directory); a failure raises :class:`~drrfarm.errors.SpecError` naming ``source`` and the key path."""
    return tools(Validator(source, Path(base_dir) if base_dir else Path.cwd()), items, "tools")


def _check_material(v: Validator, name: str, path: str) -> None:
    try:
        canonical_material_name(name)
    except DrrfarmError as exc:
        v.fail(path, str(exc))


def labels(v: Validator, value: Any, path: str, n_tools: int) -> LabelsSpec:
    m = v.mapping(value, path, ["label_map", "values", "thickness", "tools"])
    label_map = v.string(m["label_map"], join(path, "label_map")) if "label_map" in m else None
    resolved = v.resolve_path(label_map)[0] if label_map is not None else None
    values: list[tuple[int, str]] = []
    if "values" in m:
        vp = join(path, "values")
        if label_map is None:
            v.fail(vp, "needs label_map")
        raw = m["values"]
        if isinstance(raw, dict):
            if not raw:
                v.fail(vp, "must name at least one label")
            for key, nm in raw.items():
                kp = join(vp, str(key))
                if isinstance(key, str) and re.fullmatch(r"\d+", key.strip()):
                    key = int(key)
                values.append((v.integer(key, kp, lo=1), v.string(nm, kp)))
        else:
            for i, x in enumerate(v.seq(v.as_list(raw), vp)):
                val = v.integer(x, join(vp, i), lo=1)
                values.append((val, f"label_{val}"))
        if len({val for val, _ in values}) != len(values):
            v.fail(vp, "a label value is listed twice")
        if len({nm for _, nm in values}) != len(values):
            v.fail(vp, "a label name is used twice")
    thickness = v.boolean(m.get("thickness", False), join(path, "thickness"))
    with_tools = v.boolean(m.get("tools", True), join(path, "tools"))
    if label_map is None and not (with_tools and n_tools):
        v.fail(path, "nothing to project: give label_map, or tools (with labels.tools: true)")
    return LabelsSpec(label_map=label_map, label_map_resolved=resolved, values=tuple(values), thickness=thickness,
                      tools=with_tools)


def landmarks(v: Validator, value: Any, path: str, n_tools: int) -> LandmarksSpec:
    if isinstance(value, list):
        value = {"points": value}
    m = v.mapping(value, path, ["file", "points", "frame", "tool_tips"])
    tool_tips = v.boolean(m.get("tool_tips", False), join(path, "tool_tips"))
    if tool_tips and not n_tools:
        v.fail(join(path, "tool_tips"), "needs tools")
    if "file" in m and "points" in m:
        v.fail(path, "give file or points, not both")
    if "file" not in m and "points" not in m and not tool_tips:
        v.fail(path, "give file (Slicer .mrk.json / .fcsv), points, or tool_tips: true")
    frame = v.choice(m.get("frame", "RAS"), join(path, "frame"), LANDMARK_FRAMES)
    if "frame" in m and "points" not in m:
        v.fail(join(path, "frame"), "only for inline points (files carry their own coordinate system)")
    file = resolved = None
    if "file" in m:
        file = v.string(m["file"], join(path, "file"))
        low = file.lower()
        if not (low.endswith(".json") or low.endswith(".fcsv")):
            v.fail(join(path, "file"), "must be a Slicer markups .mrk.json / .json or a .fcsv file")
        resolved = v.resolve_path(file)[0]
        if VOLUME_ID_FIELD not in file and "://" not in resolved:
            _check_landmark_file(v, resolved, join(path, "file"))
    points: list[tuple[str, tuple[float, float, float]]] = []
    if "points" in m:
        pp = join(path, "points")
        for i, item in enumerate(v.seq(m["points"], pp)):
            ip = join(pp, i)
            if isinstance(item, list):
                item = {"position_mm": item}
            q = v.mapping(item, ip, ["name", "position_mm"], required=["position_mm"])
            nm = v.string(q.get("name", f"P{i + 1}"), join(ip, "name"))
            points.append((nm, v.vec3(q["position_mm"], join(ip, "position_mm"))))
        names = [n for n, _ in points]
        if len(set(names)) != len(names):
            v.fail(pp, "landmark names must be unique")
    return LandmarksSpec(file=file, file_resolved=resolved, points=tuple(points), frame=frame, tool_tips=tool_tips)


def _check_landmark_file(v: Validator, path: str, key_path: str) -> None:
    try:
        load_landmarks(path)
    except DrrfarmError as exc:
        v.fail(key_path, str(exc))


def for_volume(text: str | None, volume_id: str) -> str | None:
    """``text`` with ``{volume_id}`` replaced."""
    return None if text is None else text.replace(VOLUME_ID_FIELD, volume_id)
