"""Compiling a validated sweep spec into the domain's objects, and the rows its images carry.

What a render needs of a :class:`~drrfarm.farm.spec.SweepSpec`, built from the spec's words by the domain's
own constructors: the :class:`~drrfarm.physics.Physics` of a photon setting (:func:`physics_for`), the
:class:`~drrfarm.geometry.Camera` of a pose (:func:`camera_for`, :func:`cameras_for`, cached per pose by
:class:`CameraCache`), the request of a spectrum (:func:`spectrum_request`, for
:func:`drrfarm.spectrum.get_spectrum`), a volume loaded, segmented into a
:class:`~drrfarm.volume.MaterialVolume` and placed (:func:`load_material_volume`, its inputs found by
:func:`drrfarm.inputs.resolve_input`); and the row schema: the per-image metadata columns (:func:`image_rows`,
:func:`camera_columns`, :func:`scatter_columns`) and the fixed uint16 scale (:func:`storage_scale`).

The render actor (:mod:`drrfarm.farm.worker`), the driver's preflight and the stream use these, so a sweep's
images are the same wherever they are rendered.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

from drrfarm.farm.plan import Pose, ShardTask
from drrfarm.farm.spec import SpectrumItem, SweepSpec, VolumeSpec
from drrfarm.geometry import CARM_SDD_MM, CARM_SID_MM, Camera, CArm, world_from_patient_default
from drrfarm.inputs import resolve_input
from drrfarm.physics import UINT16_SCALE, Physics
from drrfarm.scatter import photons_for
from drrfarm.spectrum import Spectrum
from drrfarm.volume import MaterialVolume, Volume, load_volume, segment_by_labels, segment_by_thresholds


def spectrum_request(item: SpectrumItem, n_bins: int | None) -> str | dict[str, Any]:
    """Argument for :func:`drrfarm.spectrum.get_spectrum` for one spectrum of the spec."""
    req = item.request()
    if n_bins is None or item.kind == "mono":
        return req
    if item.kind == "preset":
        return {"preset": item.name, "bins": n_bins}
    assert isinstance(req, dict)
    return {**req, "bins": n_bins}


def physics_for(spec: SweepSpec, photons: float | None) -> Physics:
    """The :class:`drrfarm.physics.Physics` of one photon setting of ``spec``."""
    d = spec.detector
    return Physics(detector=d.model, output=d.output, photons=float(photons) if photons is not None else None,
                   electronic_noise=d.electronic_noise,
                   csi_thickness_mm=d.csi_thickness_mm, solid_angle=d.solid_angle,
                   step_voxels=spec.physics.step_voxels, method=spec.physics.method,
                   **scatter_options(spec))


def scatter_columns(physics: Physics, backend_name: str, seconds: float, n_images: int) -> dict[str, Any]:
    """Per-image scatter columns: the mode, the Monte Carlo histories used and the seconds spent (its cost)."""
    if physics.scatter == "none":
        return {"scatter": "none"}
    photons = photons_for(physics, "cuda" if backend_name == "cuda" else "cpu")
    return {"scatter": physics.scatter, "scatter_photons": photons, "scatter_seconds": seconds / max(1, n_images)}


def scatter_options(spec: SweepSpec) -> dict[str, Any]:
    """The :class:`drrfarm.physics.Physics` scatter fields of ``spec`` (none without a ``scatter`` section)."""
    s = spec.scatter
    if s is None:
        return {}
    return {"scatter": s.mode, "scatter_photons": s.photons, "scatter_bins": s.bins}


def camera_for(spec: SweepSpec, pose: Pose) -> Camera:
    """The :class:`drrfarm.geometry.Camera` of one pose (image size/pixel from ``spec.image``)."""
    return cameras_for(spec, [pose])[0]


def cameras_for(spec: SweepSpec, poses: list[Pose] | tuple[Pose, ...]) -> list[Camera]:
    """The cameras of many poses (as :func:`camera_for` for each): C-arm poses built together, per C-arm."""
    img = spec.image
    cams: list[Any] = [None] * len(poses)  # every slot filled below
    groups: dict[tuple[float, float], list[int]] = {}
    for i, pose in enumerate(poses):
        if pose.kind == "explicit":
            P = np.asarray(pose.P, dtype=np.float64).reshape(3, 4)
            cams[i] = Camera.from_projection(P, img.height, img.width, img.pixel_mm)
        else:
            groups.setdefault((pose.sdd_mm or CARM_SDD_MM, pose.sid_mm or CARM_SID_MM), []).append(i)
    carm = spec.poses.carm
    enforce = carm.enforce_limits if carm is not None else True
    for (sdd, sid), members in groups.items():
        arm = _carm(sdd, sid, img.height, img.width, img.pixel_mm, enforce)
        group = [poses[i] for i in members]
        built = arm.cameras([p.alpha_deg for p in group], [p.beta_deg for p in group],
                            [p.gamma_deg for p in group], [p.isocentre_world_mm for p in group])
        for i, cam in zip(members, built, strict=True):
            cams[i] = cam
    return cams


@functools.lru_cache(maxsize=256)
def _carm(sdd_mm: float, sid_mm: float, height: int, width: int, pixel_mm: float, enforce_limits: bool) -> CArm:
    """The (immutable, validated) C-arm of a pose's distances and the image geometry, built once."""
    return CArm(sdd_mm=sdd_mm, sid_mm=sid_mm, height=height, width=width, pixel_mm=pixel_mm,
                enforce_limits=enforce_limits)


def load_material_volume(vspec: VolumeSpec) -> tuple[Volume, MaterialVolume, np.ndarray]:
    """Load and segment one volume of the spec: ``(Volume, MaterialVolume, world_from_patient (4,4))``."""
    volume = load_volume(resolve_input(vspec.resolved, vspec.relpath))
    m = vspec.materials
    if m.method == "labels":
        table: Any = dict(m.table) if m.table is not None else resolve_input(m.table_path_resolved or "")
        label_map = resolve_input(m.label_map_resolved or "")
        mv = segment_by_labels(volume, label_map, table, default=m.default)
    else:
        mv = segment_by_thresholds(volume, thresholds_hu=m.thresholds_hu, above=m.above)
    wfp = world_from_patient_default(volume.centre_patient_mm(), orientation=vspec.placement.orientation,
                                     isocentre_world_mm=vspec.placement.offset_mm)
    return volume, mv, wfp


def storage_scale(output: str) -> float:
    """Fixed uint16 storage scale of an output transform (``stored = round(value / scale)``), so every
    shard of a sweep shares one scale (:data:`drrfarm.physics.UINT16_SCALE`)."""
    return float(UINT16_SCALE[output])


def camera_columns(cam: Camera) -> dict[str, Any]:
    """The camera's columns of an image row: size, pixel pitch, K, R, t, P and source (flat, row-major)."""
    return cameras_columns([cam])[0]


def cameras_columns(cams: list[Camera]) -> list[dict[str, Any]]:
    """:func:`camera_columns` of many cameras (the matrices flattened together)."""
    if not cams:
        return []
    K = np.stack([c.K for c in cams])
    R = np.stack([c.R for c in cams])
    t = np.stack([c.t for c in cams])
    P = np.matmul(K, np.concatenate([R, t[:, :, None]], axis=2))
    source = -np.matmul(np.swapaxes(R, 1, 2), t[:, :, None])[:, :, 0]
    flat = {name: a.reshape(len(cams), -1).tolist() for name, a in
            (("K", K), ("R", R), ("t", t), ("P", P), ("source_world_mm", source))}
    return [{"height": int(c.height), "width": int(c.width), "pixel_mm": float(c.pixel_mm),
             "K": flat["K"][i], "R": flat["R"][i], "t": flat["t"][i], "P": flat["P"][i],
             "source_world_mm": flat["source_world_mm"][i], "sdd_mm": float(c.sdd_mm)}
            for i, c in enumerate(cams)]


class CameraCache:
    """Cameras (and their row columns) of a sweep's poses, by pose index: every spectrum and photon
    setting of a pose renders the same camera, so each is built and validated once (bounded, FIFO)."""

    def __init__(self, spec: SweepSpec, max_entries: int = 50_000) -> None:
        self.spec = spec
        self.max_entries = max_entries
        self._entries: dict[int, tuple[Camera, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def get_many(self, poses: list[Pose] | tuple[Pose, ...]) -> list[tuple[Camera, dict[str, Any]]]:
        """``(Camera, camera_columns)`` of each pose; the missing ones built together."""
        entries = self._entries
        found = [entries.get(p.index) for p in poses]
        missing = [p for p, e in zip(poses, found, strict=True) if e is None]
        if not missing:
            return found  # type: ignore[return-value]
        cams = cameras_for(self.spec, missing)
        built = dict(zip((p.index for p in missing), zip(cams, cameras_columns(cams), strict=True), strict=True))
        with self._lock:
            for index, entry in built.items():
                if len(entries) >= self.max_entries:
                    entries.pop(next(iter(entries)))
                entries[index] = entry
        return [e if e is not None else built[p.index] for p, e in zip(poses, found, strict=True)]


def image_rows(spec: SweepSpec, task: ShardTask, cameras: list[Camera], spectrum: Spectrum, photons: float | None,
               volume_id: str, volume_sha256: str, columns: list[dict[str, Any]] | None = None
               ) -> list[dict[str, Any]]:
    """Per-image metadata rows (the columns every shard carries, see the sinks contract); ``columns``:
    the cameras' :func:`camera_columns`, if already known."""
    columns = columns or cameras_columns(list(cameras))
    shared = {  # the same in every row of the shard
        "shard_id": task.shard_id, "sweep_id": task.sweep_id, "volume_id": volume_id, "volume_sha256": volume_sha256,
        "kvp": float(spectrum.kvp) if spectrum.kvp is not None else None,
        "al_mm": float(spectrum.al_mm or 0.0), "cu_mm": float(spectrum.cu_mm or 0.0),
        "spectrum_name": str(spectrum.name), "mean_energy_kev": float(spectrum.mean_energy_kev),
        "photons": int(photons) if photons is not None else None,
        "detector": spec.detector.model, "output": spec.detector.output,
    }
    rows = []
    for pose, cols, idx, seed in zip(task.poses, columns, task.image_indices, task.seeds, strict=True):
        carm = pose.kind == "carm"
        rows.append({
            "image_index": int(idx), "seed": int(seed), **shared, **cols,
            "alpha_deg": float(pose.alpha_deg) if carm else None,
            "beta_deg": float(pose.beta_deg) if carm else None,
            "gamma_deg": float(pose.gamma_deg) if carm else None,
            "isocentre_world_mm": list(pose.isocentre_world_mm) if carm else None,
            "sid_mm": float(pose.sid_mm) if carm and pose.sid_mm is not None else None,
            "pose_index": int(pose.index),
        })
    return rows
