"""3D landmarks (Slicer markups, FCSV, lists) projected to 2D pixels with visibility flags.

Points are read in the patient frame, RAS or LPS (Slicer writes its coordinate system into both
file formats; ``.mrk.json`` defaults to LPS, FCSV without a header line to RAS), converted to RAS
(x, y negated for LPS), placed in the world by ``world_from_patient`` (the same 4x4 the renderer
gets), and projected by the camera: ``(u, v) = P X`` (pixel centres at integer coordinates).

Flags per image and point:

* ``in_front``: the point is between the source and the detector (``0 < depth < sdd_mm``, depth
  measured along the principal ray); ``uv`` is NaN when ``depth <= 0``;
* ``in_image``: its projection falls on the detector, ``-0.5 <= u <= W - 0.5`` and
  ``-0.5 <= v <= H - 0.5`` (the outer edges of the edge pixels);
* ``visible = in_front & in_image``. (Occlusion is not a notion for X-rays: every point on a ray
  contributes.)
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from drrfarm.errors import LandmarkError

__all__ = ["LandmarkError", "Landmarks", "ProjectedLandmarks", "landmarks_from_points", "load_landmarks",
           "project_landmarks"]

FRAMES = ("RAS", "LPS")
_LPS_FLIP = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Landmarks:
    """Named 3D points in the patient frame. points_ras_mm: (N, 3) float64 RAS mm."""

    names: tuple[str, ...]
    points_ras_mm: np.ndarray
    source: str = "<list>"

    def __post_init__(self) -> None:
        p = np.asarray(self.points_ras_mm, dtype=np.float64).reshape(-1, 3)
        if len(self.names) != len(p):
            raise LandmarkError(f"{self.source}: {len(self.names)} names for {len(p)} points")
        if not np.all(np.isfinite(p)):
            raise LandmarkError(f"{self.source}: landmark coordinates must be finite")
        object.__setattr__(self, "points_ras_mm", p)
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))

    def __len__(self) -> int:
        return len(self.names)

    def points_lps_mm(self) -> np.ndarray:
        return self.points_ras_mm * _LPS_FLIP

    def world_mm(self, world_from_patient: Any) -> np.ndarray:
        """(N, 3) world mm: ``world_from_patient`` (4x4) applied to the RAS points."""
        T = np.asarray(world_from_patient, dtype=np.float64)
        if T.shape != (4, 4):
            raise LandmarkError(f"world_from_patient: expected 4x4, got {T.shape}")
        return self.points_ras_mm @ T[:3, :3].T + T[:3, 3]

    def concat(self, other: Landmarks) -> Landmarks:
        return Landmarks(self.names + other.names, np.vstack([self.points_ras_mm, other.points_ras_mm]),
                         f"{self.source}+{other.source}")


def _frame(value: str, where: str) -> str:
    v = str(value).strip().upper()
    if v in ("RAS", "0"):
        return "RAS"
    if v in ("LPS", "1"):
        return "LPS"
    raise LandmarkError(f"{where}: coordinate system must be RAS or LPS, got {value!r}")


def _to_ras(points: np.ndarray, frame: str) -> np.ndarray:
    return points * _LPS_FLIP if frame == "LPS" else points


def landmarks_from_points(points_mm: Any, names: Sequence[str] | None = None, frame: str = "RAS",
                          source: str = "<list>") -> Landmarks:
    """Landmarks from a (N, 3) list/array in ``frame`` (RAS or LPS), or a ``{name: (x, y, z)}`` dict."""
    if isinstance(points_mm, dict):
        names = list(points_mm.keys())
        points_mm = list(points_mm.values())
    try:
        p = np.asarray(points_mm, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise LandmarkError(f"{source}: points must be numbers ({exc})") from exc
    if p.size == 0:
        p = p.reshape(0, 3)
    if p.ndim == 1 and p.shape == (3,):
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 3:
        raise LandmarkError(f"{source}: points must be (N, 3), got shape {p.shape}")
    names = [f"P{i + 1}" for i in range(len(p))] if names is None else list(names)
    return Landmarks(tuple(names), _to_ras(p, _frame(frame, source)), source)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LandmarkError(f"{path}: cannot read landmark file ({exc})") from exc


def _load_markups_json(path: Path) -> Landmarks:
    where = str(path)
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise LandmarkError(f"{where}: not valid JSON ({exc})") from exc
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list) or not markups:
        raise LandmarkError(f"{where}: no 'markups' list (expected a Slicer markups .mrk.json file)")
    names: list[str] = []
    pts: list[np.ndarray] = []
    for i, mk in enumerate(markups):
        key = f"{where}: markups[{i}]"
        if not isinstance(mk, dict):
            raise LandmarkError(f"{key}: expected an object")
        frame = _frame(mk.get("coordinateSystem", "LPS"), f"{key}.coordinateSystem")
        units = str(mk.get("coordinateUnits", "mm")).strip().lower()
        if units not in ("mm", "millimeter", "millimetre"):
            raise LandmarkError(f"{key}.coordinateUnits: only mm is supported, got {units!r}")
        for j, cp in enumerate(mk.get("controlPoints") or []):
            ck = f"{key}.controlPoints[{j}]"
            if not isinstance(cp, dict) or "position" not in cp:
                raise LandmarkError(f"{ck}: missing 'position'")
            if str(cp.get("positionStatus", "defined")).lower() not in ("defined", "preview"):
                continue  # undefined / skipped points carry no position
            try:
                p = np.asarray(cp["position"], dtype=np.float64).reshape(3)
            except (TypeError, ValueError) as exc:
                raise LandmarkError(f"{ck}.position: expected 3 numbers ({exc})") from exc
            pts.append(_to_ras(p, frame))
            names.append(str(cp.get("label") or cp.get("id") or f"P{len(names) + 1}"))
    return Landmarks(tuple(names), np.asarray(pts, dtype=np.float64).reshape(-1, 3), where)


def _load_fcsv(path: Path) -> Landmarks:
    where = str(path)
    frame = "RAS"  # files without a CoordinateSystem line predate LPS support: RAS
    columns = ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc",
               "associatedNodeID"]
    names: list[str] = []
    pts: list[np.ndarray] = []
    text = _read_text(path)
    data_lines = []
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            body = s[1:].strip()
            if "=" in body:
                key, value = (x.strip() for x in body.split("=", 1))
                if key.lower() == "coordinatesystem":
                    frame = _frame(value, f"{where}: CoordinateSystem")
                elif key.lower() == "columns":
                    columns = [c.strip() for c in value.split(",")]
            continue
        data_lines.append(s)
    try:
        ix, iy, iz = columns.index("x"), columns.index("y"), columns.index("z")
    except ValueError as exc:
        raise LandmarkError(f"{where}: the columns line has no x, y, z ({columns})") from exc
    il = columns.index("label") if "label" in columns else None
    for n, row in enumerate(csv.reader(io.StringIO("\n".join(data_lines)))):
        try:
            p = np.array([float(row[ix]), float(row[iy]), float(row[iz])])
        except (IndexError, ValueError) as exc:
            raise LandmarkError(f"{where}: data line {n + 1}: cannot read x, y, z ({exc})") from exc
        pts.append(_to_ras(p, frame))
        label = row[il].strip() if il is not None and il < len(row) else ""
        names.append(label or f"P{n + 1}")
    return Landmarks(tuple(names), np.asarray(pts, dtype=np.float64).reshape(-1, 3), where)


def load_landmarks(path: str | os.PathLike[str]) -> Landmarks:
    """Read a Slicer markups file (``.mrk.json`` / ``.json``) or an ``.fcsv`` file, converted to RAS."""
    p = Path(path)
    if not p.is_file():
        raise LandmarkError(f"{p}: landmark file not found")
    name = p.name.lower()
    if name.endswith(".json"):
        return _load_markups_json(p)
    if name.endswith(".fcsv"):
        return _load_fcsv(p)
    raise LandmarkError(f"{p}: unknown landmark format (use .mrk.json, .json or .fcsv)")


@dataclass(frozen=True)
class ProjectedLandmarks:
    """Landmarks in one image. uv: (N, 2) float64 pixels (u = column, v = row; NaN behind the source).

    depth_mm: (N,) along the principal ray from the source. in_front, in_image, visible: (N,) bool.
    """

    names: tuple[str, ...]
    uv: np.ndarray
    depth_mm: np.ndarray
    in_front: np.ndarray
    in_image: np.ndarray

    @property
    def visible(self) -> np.ndarray:
        return self.in_front & self.in_image

    def to_row(self, prefix: str = "landmarks") -> dict[str, Any]:
        """Flat per-image metadata: ``<prefix>_uv`` (2N floats, NaN for none), ``<prefix>_visible``
        (N bools), ``<prefix>_depth_mm`` (N floats). Names belong in the file metadata."""
        return {
            f"{prefix}_uv": [float(x) for x in self.uv.reshape(-1)],
            f"{prefix}_visible": [bool(x) for x in self.visible],
            f"{prefix}_depth_mm": [float(x) for x in self.depth_mm],
        }


def project_landmarks(landmarks: Landmarks | Any, camera: Any, world_from_patient: Any = None) -> ProjectedLandmarks:
    """Project landmarks for one camera.

    ``landmarks``: :class:`Landmarks` (patient RAS; needs ``world_from_patient``), or world points
    (N, 3) mm directly (``world_from_patient`` None).
    """
    if isinstance(landmarks, Landmarks):
        if world_from_patient is None:
            raise LandmarkError("world_from_patient: needed to place patient-frame landmarks in the world")
        X = landmarks.world_mm(world_from_patient)
        names = landmarks.names
    else:
        X = np.asarray(landmarks, dtype=np.float64).reshape(-1, 3)
        if world_from_patient is not None:
            T = np.asarray(world_from_patient, dtype=np.float64)
            X = X @ T[:3, :3].T + T[:3, 3]
        names = tuple(f"P{i + 1}" for i in range(len(X)))
    if len(X) == 0:
        e = np.zeros(0, dtype=bool)
        return ProjectedLandmarks(names, np.zeros((0, 2)), np.zeros(0), e, e)
    P = np.asarray(camera.P, dtype=np.float64)
    h = X @ P[:, :3].T + P[:, 3]
    depth = X @ np.asarray(camera.R)[2] + np.asarray(camera.t)[2]  # camera z (K[2] = [0, 0, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = h[:, :2] / h[:, 2:3]
    uv[depth <= 0.0] = np.nan
    in_front = (depth > 0.0) & (depth < float(camera.sdd_mm))
    H, W = int(camera.height), int(camera.width)
    with np.errstate(invalid="ignore"):
        in_image = (uv[:, 0] >= -0.5) & (uv[:, 0] <= W - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] <= H - 0.5)
    return ProjectedLandmarks(tuple(names), uv, depth, in_front, in_image & (depth > 0.0))
