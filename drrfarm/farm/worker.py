"""Render actors: one per GPU (or per ``cpus_per_actor`` CPUs), each rendering whole shards.

:class:`RenderWorker` is a plain class (usable and testable without Ray); :func:`render_actor_class`
wraps it with ``ray.remote`` and :func:`actor_options` picks its resources: ``num_gpus=1`` with the
CUDA backend (Ray pins the actor to its GPU through ``CUDA_VISIBLE_DEVICES``), else ``num_cpus``
with the CPU backend. The actor runs as a threaded actor with ``max_concurrency`` = the driver's
in-flight bound: a lock serialises rendering, while the previous shard is encoded and committed by
the sinks' :class:`AsyncShardWriter` in its own thread — so the device keeps rendering while the
last shard is written, and :meth:`RenderWorker.render_shard` returns only once its shard is
committed (the manifest entry exists).

Volumes stay resident: the first shard of a volume loads the CT, segments it and ``prepare``\\ s it
on the backend; later shards of that volume reuse the handle. Each result lists the volumes the
actor holds so the driver can route shards to actors that already have their volume.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

import drrfarm
from drrfarm.errors import BackendError, DrrfarmError
from drrfarm.farm.plan import Pose, ShardTask
from drrfarm.farm.spec import SpectrumItem, SweepSpec, VolumeSpec


def resolve_input(path: str, relpath: str | None = None) -> str:
    """Local path / URL to open for a spec input: ``sample:<name>`` -> :mod:`drrfarm.samples`; a
    local path missing on this node falls back to ``relpath`` under the current directory."""
    if path.startswith("sample:"):
        from drrfarm.samples import resolve_sample

        return str(resolve_sample(path))
    if "://" in path:
        return path
    if not os.path.exists(path) and relpath and os.path.exists(relpath):
        return os.path.abspath(relpath)
    return path


def spectrum_request(item: SpectrumItem, n_bins: int | None) -> str | dict[str, Any]:
    """Argument for :func:`drrfarm.spectrum.get_spectrum` for one spectrum of the spec."""
    req = item.request()
    if n_bins is None or item.kind == "mono":
        return req
    if item.kind == "preset":
        return {"preset": item.name, "bins": n_bins}
    assert isinstance(req, dict)
    return {**req, "bins": n_bins}


def physics_for(spec: SweepSpec, photons: float | None) -> Any:
    """The :class:`drrfarm.physics.Physics` of one photon setting of ``spec``."""
    from drrfarm.physics import Physics

    d = spec.detector
    return Physics(detector=d.model, output=d.output, photons=float(photons) if photons is not None else None,
                   electronic_noise=d.electronic_noise,
                   csi_thickness_mm=d.csi_thickness_mm, solid_angle=d.solid_angle,
                   step_voxels=spec.physics.step_voxels, method=spec.physics.method,
                   **scatter_options(spec))


def scatter_columns(physics: Any, backend_name: str, seconds: float, n_images: int) -> dict[str, Any]:
    """Per-image scatter columns: the mode, the Monte Carlo histories used and the seconds spent (its cost)."""
    if physics.scatter == "none":
        return {"scatter": "none"}
    from drrfarm.scatter import photons_for

    photons = photons_for(physics, "cuda" if backend_name == "cuda" else "cpu")
    return {"scatter": physics.scatter, "scatter_photons": photons, "scatter_seconds": seconds / max(1, n_images)}


def scatter_options(spec: SweepSpec) -> dict[str, Any]:
    """The :class:`drrfarm.physics.Physics` scatter fields of ``spec`` (none without a ``scatter`` section)."""
    s = spec.scatter
    if s is None:
        return {}
    return {"scatter": s.mode, "scatter_photons": s.photons, "scatter_bins": s.bins}


def camera_for(spec: SweepSpec, pose: Pose) -> Any:
    """The :class:`drrfarm.geometry.Camera` of one pose (image size/pixel from ``spec.image``)."""
    from drrfarm.geometry import Camera, CArm

    img = spec.image
    if pose.kind == "explicit":
        P = np.asarray(pose.P, dtype=np.float64).reshape(3, 4)
        return Camera.from_projection(P, img.height, img.width, img.pixel_mm)
    carm = spec.poses.carm
    enforce = carm.enforce_limits if carm is not None else True
    arm = CArm(sdd_mm=pose.sdd_mm or 1020.0, sid_mm=pose.sid_mm or 530.0, height=img.height, width=img.width,
               pixel_mm=img.pixel_mm, enforce_limits=enforce)
    return arm.camera(pose.alpha_deg, pose.beta_deg, pose.gamma_deg, pose.isocentre_world_mm)


def load_material_volume(vspec: VolumeSpec) -> tuple[Any, Any, np.ndarray]:
    """Load and segment one volume of the spec: ``(Volume, MaterialVolume, world_from_patient (4,4))``."""
    from drrfarm.geometry import world_from_patient_default
    from drrfarm.volume import load_volume, segment_by_labels, segment_by_thresholds

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
    from drrfarm.physics import UINT16_SCALE

    return float(UINT16_SCALE[output])


def _flat(a: Any) -> list[float]:
    return [float(x) for x in np.asarray(a, dtype=np.float64).ravel()]


def image_rows(spec: SweepSpec, task: ShardTask, cameras: list[Any], spectrum: Any, photons: float | None,
               volume_id: str, volume_sha256: str) -> list[dict[str, Any]]:
    """Per-image metadata rows (the columns every shard carries, see the sinks contract)."""
    rows = []
    for pose, cam, idx, seed in zip(task.poses, cameras, task.image_indices, task.seeds, strict=True):
        carm = pose.kind == "carm"
        rows.append({
            "image_index": int(idx), "seed": int(seed), "shard_id": task.shard_id, "sweep_id": task.sweep_id,
            "volume_id": volume_id, "volume_sha256": volume_sha256,
            "height": int(cam.height), "width": int(cam.width), "pixel_mm": float(cam.pixel_mm),
            "K": _flat(cam.K), "R": _flat(cam.R), "t": _flat(cam.t), "P": _flat(cam.P),
            "source_world_mm": _flat(cam.source_world_mm),
            "alpha_deg": float(pose.alpha_deg) if carm else None,
            "beta_deg": float(pose.beta_deg) if carm else None,
            "gamma_deg": float(pose.gamma_deg) if carm else None,
            "isocentre_world_mm": list(pose.isocentre_world_mm) if carm else None,
            "sdd_mm": float(cam.sdd_mm),
            "kvp": float(spectrum.kvp) if spectrum.kvp is not None else None,
            "al_mm": float(spectrum.al_mm or 0.0), "cu_mm": float(spectrum.cu_mm or 0.0),
            "spectrum_name": str(spectrum.name), "mean_energy_kev": float(spectrum.mean_energy_kev),
            "photons": int(photons) if photons is not None else None,
            "detector": spec.detector.model, "output": spec.detector.output,
            "sid_mm": float(pose.sid_mm) if carm and pose.sid_mm is not None else None,
            "pose_index": int(pose.index),
        })
    return rows


class _Resident:
    __slots__ = ("handle", "info", "scene")

    def __init__(self, handle: Any, info: dict[str, Any], scene: Any = None) -> None:
        self.handle = handle
        self.info = info
        self.scene = scene  # drrfarm.farm.scene.VolumeScene, or None without tools/labels/landmarks


class RenderWorker:
    """Renders whole shards of one sweep and commits them through the sinks.

    ``spec``: the sweep (its ``output`` says where shards go); ``run_id``: provenance run id written
    into each shard's file metadata; ``backend``: "cpu" | "cuda" | "auto"; ``write_pending``: bound of
    the writer's queue; ``max_volumes``: volumes kept resident (LRU); ``warm_up``: start the backend and
    build the spectra in the constructor (so the first shard is not slower than the others).
    """

    def __init__(self, spec: SweepSpec, run_id: str | None = None, backend: str = "cpu",
                 write_pending: int = 2, max_volumes: int = 2, backend_options: dict[str, Any] | None = None,
                 warm_up: bool = True) -> None:
        from drrfarm.sinks import AsyncShardWriter, ShardSink

        self.spec = spec
        self.run_id = run_id
        self.backend_name = backend
        self._backend_options = dict(backend_options or {})
        self._backend: Any = None
        self.max_volumes = max(1, int(max_volumes))
        self._volumes: OrderedDict[int, _Resident] = OrderedDict()
        self._spectra: dict[int, Any] = {}
        self._render_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self.sink = ShardSink(spec.output.url, formats=spec.output.formats, image_dtype=spec.output.image_dtype)
        self._write_pending = max(1, int(write_pending))
        self._writer_cls = AsyncShardWriter
        self.writer = AsyncShardWriter(self.sink, max_pending=self._write_pending)
        self.shards_done = 0
        self.images_done = 0
        self.started = time.time()
        self.file_metadata = {"spec_sha256": spec.sha256, "drrfarm_version": drrfarm.__version__,
                              "mlflow_run_id": run_id or "", "sweep_id": spec.sweep_id}
        if warm_up:
            self.warm_up()

    def warm_up(self) -> None:
        """Pay one-off costs before the first shard: backend start, spectra, encoder imports."""
        self.backend()
        for i in range(len(self.spec.spectra.items)):
            self.spectrum(i)
        with contextlib.suppress(ImportError):
            import pyarrow.parquet  # noqa: F401
        if "png" in self.spec.output.formats:
            with contextlib.suppress(ImportError):
                import PIL.PngImagePlugin  # noqa: F401

    # -- identity / health ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Where this worker runs: host, pid, Ray actor/node ids, GPUs, backend, resident volumes."""
        d: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                             "backend": self._backend.name if self._backend is not None else self.backend_name,
                             "resident_volumes": self.resident_volumes(), "shards_done": self.shards_done,
                             "images_done": self.images_done, "actor_id": None, "node_id": None, "gpu_ids": []}
        try:
            import ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                d["actor_id"] = ctx.get_actor_id()
                d["node_id"] = ctx.get_node_id()
                d["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
        except Exception:  # noqa: BLE001 - info is best effort
            pass
        if self._backend is not None and hasattr(self._backend, "cache_stats"):
            d["backend_cache"] = dict(self._backend.cache_stats())
        if d["backend"] == "cuda":
            d["gpu_name"] = _gpu_name()
        return d

    def ping(self) -> bool:
        return True

    def resident_volumes(self) -> list[int]:
        with self._state_lock:
            return list(self._volumes)

    # -- resources ---------------------------------------------------------------------------------
    def backend(self) -> Any:
        if self._backend is None:
            from drrfarm.render import get_backend

            try:
                self._backend = get_backend(self.backend_name, **self._backend_options)
            except DrrfarmError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise BackendError(f"backend {self.backend_name!r} failed to start: {exc}") from exc
        return self._backend

    def volume(self, index: int) -> tuple[Any, dict[str, Any], bool]:
        """``(backend handle, volume info, loaded_now)`` of volume ``index`` of the spec."""
        res, loaded = self._resident(index)
        return res.handle, res.info, loaded

    def scene(self, index: int) -> Any:
        """The :class:`~drrfarm.farm.scene.VolumeScene` of volume ``index`` (None without tools/labels/landmarks)."""
        return self._resident(index)[0].scene

    def _resident(self, index: int) -> tuple[_Resident, bool]:
        with self._state_lock:
            res = self._volumes.get(index)
            if res is not None:
                self._volumes.move_to_end(index)
                return res, False
        vspec = self.spec.volumes[index]
        t0 = time.perf_counter()
        volume, mv, wfp = load_material_volume(vspec)
        handle = self.backend().prepare(mv, wfp)
        info = {"volume_index": index, "volume_id": vspec.id, "uri": vspec.path, "resolved": volume.source,
                "sha256": volume.sha256, "shape": [int(s) for s in volume.hu.shape],
                "spacing_mm": [float(s) for s in volume.spacing_mm],
                "materials": list(mv.material_names), "load_s": time.perf_counter() - t0}
        del volume, mv
        scene = None
        if self.spec.tools or self.spec.has_annotations:
            from drrfarm.farm.scene import VolumeScene

            scene = VolumeScene(self.spec, index, wfp, resolve_input)
        res = _Resident(handle, info, scene)
        with self._state_lock:
            self._volumes[index] = res
            while len(self._volumes) > self.max_volumes:
                self._volumes.popitem(last=False)
        return res, True

    def spectrum(self, index: int) -> Any:
        s = self._spectra.get(index)
        if s is None:
            from drrfarm.spectrum import get_spectrum

            s = get_spectrum(spectrum_request(self.spec.spectra.items[index], self.spec.spectra.n_bins))
            self._spectra[index] = s
        return s

    # -- work --------------------------------------------------------------------------------------
    def render_images(self, task: ShardTask) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
        """Render one shard's images: ``(images (B,H,W) float32, rows, info)`` (no writing)."""
        handle, vinfo, loaded = self.volume(task.volume_index)
        spectrum = self.spectrum(task.spectrum_index)
        photons = self.spec.detector.photons[task.photons_index]
        physics = physics_for(self.spec, photons)
        cameras = [camera_for(self.spec, p) for p in task.poses]
        scene = self.scene(task.volume_index)
        tools = [scene.tools_for(p.index) for p in task.poses] if scene is not None and scene.tools else None
        backend = self.backend()
        scatter_before = getattr(backend, "scatter_seconds", 0.0)
        if tools:
            images = backend.render(handle, cameras, spectrum, physics, list(task.seeds), meshes=tools)
        else:
            images = backend.render(handle, cameras, spectrum, physics, list(task.seeds))
        images = np.ascontiguousarray(images, dtype=np.float32)
        rows = image_rows(self.spec, task, cameras, spectrum, photons, vinfo["volume_id"], vinfo["sha256"])
        scale = storage_scale(self.spec.detector.output)
        scatter_s = getattr(backend, "scatter_seconds", 0.0) - scatter_before
        scatter = scatter_columns(physics, backend.name, scatter_s, len(rows))
        for i, r in enumerate(rows):
            r["image_scale"] = scale
            r.update(scatter)
            if scene is not None:
                r.update(scene.annotate(cameras[i], tools[i] if tools else []))
        info = {"volume": vinfo, "volume_loaded": loaded, "scatter_s": float(scatter_s)}
        if scene is not None:
            info["file_metadata"] = scene.file_metadata()
        return images, rows, info

    def _replace_writer(self, failed: Any) -> None:
        """An AsyncShardWriter re-raises its first failure forever: swap in a fresh one."""
        with self._state_lock:
            if self.writer is not failed:
                return
            self.writer = self._writer_cls(self.sink, max_pending=self._write_pending)

        def _drain() -> None:
            with contextlib.suppress(Exception):
                failed.close()

        threading.Thread(target=_drain, name="drrfarm-writer-drain", daemon=True).start()

    def _submit(self, shard_id: str, images: np.ndarray, rows: list[dict[str, Any]],
                extra_metadata: dict[str, str] | None = None) -> tuple[Any, Any]:
        writer = self.writer
        meta = {**self.file_metadata, **(extra_metadata or {})}
        try:
            return writer, writer.submit(shard_id, images, rows, meta)
        except DrrfarmError:
            # an earlier shard's failure surfacing here: this shard was never queued; retry on a new writer
            self._replace_writer(writer)
            writer = self.writer
            return writer, writer.submit(shard_id, images, rows, meta)

    def render_shard(self, task: ShardTask) -> dict[str, Any]:
        """Render and commit one shard; returns its stats once the manifest entry exists."""
        t0 = time.perf_counter()
        with self._render_lock:
            t1 = time.perf_counter()
            images, rows, info = self.render_images(task)
            t2 = time.perf_counter()
            writer, future = self._submit(task.shard_id, images, rows, info.get("file_metadata"))
        try:
            entry = future.result()
        except BaseException:
            self._replace_writer(writer)
            raise
        t3 = time.perf_counter()
        with self._state_lock:
            self.shards_done += 1
            self.images_done += len(rows)
        stats = self.info()
        stats.update({
            "shard_id": task.shard_id, "shard_index": task.shard_index, "attempt": task.attempt,
            "images": len(rows), "volume_index": task.volume_index, "volume_loaded": info["volume_loaded"],
            "volume_info": info["volume"], "wait_s": t1 - t0, "render_s": t2 - t1, "write_s": t3 - t2,
            "scatter_s": info["scatter_s"],
            "seconds": t3 - t0, "entry": _entry_dict(entry),
        })
        return stats

    def close(self) -> None:
        """Drain and stop the writer."""
        self.writer.close()


def _gpu_name() -> str | None:
    """Name of the (first visible) GPU, or None."""
    try:
        import pycuda.driver as drv

        drv.init()
        return str(drv.Device(0).name())
    except Exception:  # noqa: BLE001 - informational only
        return None


def _entry_dict(entry: Any) -> dict[str, Any]:
    if entry is None:
        return {}
    if isinstance(entry, dict):
        return dict(entry)
    to_dict = getattr(entry, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    import dataclasses

    if dataclasses.is_dataclass(entry):
        return dataclasses.asdict(entry)
    return {"repr": repr(entry)}


_ACTOR_CLASS: Any = None


def render_actor_class() -> Any:
    """``ray.remote(RenderWorker)`` (created once; Ray is imported here, not at module import)."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(RenderWorker)
    return _ACTOR_CLASS


def actor_options(use_gpu: bool, cpus_per_actor: float = 1.0, max_restarts: int = 3, max_concurrency: int = 2,
                  runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ray options of a render actor: one GPU (CUDA backend) or ``cpus_per_actor`` CPUs.

    ``max_task_retries=0``: the driver retries failed shards itself (and counts them);
    ``max_restarts``: Ray recreates a crashed actor (its constructor reloads nothing until needed).
    """
    opts: dict[str, Any] = {"max_restarts": int(max_restarts), "max_task_retries": 0,
                            "max_concurrency": int(max_concurrency)}
    if use_gpu:
        opts.update(num_gpus=1, num_cpus=min(1.0, cpus_per_actor))
    else:
        opts.update(num_cpus=cpus_per_actor, num_gpus=0)
    if runtime_env:
        opts["runtime_env"] = runtime_env
    return opts


def __getattr__(name: str) -> Any:
    if name == "RenderActor":
        return render_actor_class()
    raise AttributeError(name)


__all__ = ["RenderWorker", "actor_options", "camera_for", "image_rows", "load_material_volume", "physics_for",
           "render_actor_class", "resolve_input", "spectrum_request"]
