"""Render actors: one per GPU (or per ``cpus_per_actor`` CPUs), each rendering whole shards.

:class:`RenderWorker` is a plain class (usable and testable without Ray); :func:`render_actor_class`
wraps it with ``ray.remote`` and :func:`actor_options` picks its resources: ``num_gpus=1`` and the
node's CPUs per GPU with the CUDA backend (Ray pins the actor to its GPU through
``CUDA_VISIBLE_DEVICES``), else ``num_cpus`` with the CPU backend.

The actor is a shell around compile -> render -> sink: what the spec means in the domain's objects comes
from :mod:`drrfarm.farm.compile`, the images from a :mod:`drrfarm.render` backend, the files from a
:class:`~drrfarm.sinks.ShardSink`.

A shard's journey through an actor (a threaded actor: ``concurrency`` shards at once, each on its own
thread, so one renders while the others are encoded and written):

1. compile (:mod:`drrfarm.farm.compile`): the shard's cameras, physics, spectrum and rows on the host;
2. render. CUDA backend: the batch is enqueued (``render_async``) into a slot of the actor's
   :class:`~drrfarm.render.cuda.ImageRing` -- reusable GPU + page-locked buffers, quantised to the
   stored dtype on the GPU (uint16: bit for bit what the CPU quantiser makes of the float render), so
   half the bytes cross the bus and nothing is allocated per shard; for uint16 Parquet the GPU also
   makes the codec's delta transform (:class:`~drrfarm.sinks.parquet.DeltaPlanes`) -- and the thread
   sleeps on the batch's event while other threads enqueue the next shards: the GPU always has work
   queued. CPU backend (and shards with tools): ``Backend.render`` under a lock, float32;
3. encode (:meth:`~drrfarm.sinks.ShardSink.prepare`: a shard's images coded on the actor's encoder
   pool, a few per task -- zstd of the GPU's delta planes for Parquet, PNGs otherwise; zstd and zlib
   release the GIL, so a shard is coded on the cores the actor reserved);
   the ring slot is released as soon as the bytes are encoded;
4. commit (:meth:`~drrfarm.sinks.ShardSink.commit`): files, then the manifest entry. ``render_shard``
   returns once the shard is committed, with where its time went (``render_s``, ``copy_s``,
   ``encode_s``, ``write_s``).

Volumes stay resident: the first shard of a volume loads the CT, segments it and ``prepare``\\ s it
on the backend (or :meth:`RenderWorker.start` does, before the sweep's clock starts); later shards of
that volume reuse the handle. Each result lists the volumes the actor holds so the driver can route
shards to actors that already have their volume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import drrfarm
from drrfarm.errors import BackendError, DrrfarmError, StorageError
from drrfarm.farm.compile import (
    CameraCache,
    cameras_for,
    image_rows,
    load_material_volume,
    physics_for,
    scatter_columns,
    spectrum_request,
    storage_scale,
)
from drrfarm.farm.plan import Pose, ShardTask
from drrfarm.farm.scene import VolumeScene
from drrfarm.farm.spec import SweepSpec
from drrfarm.inputs import resolve_input
from drrfarm.physics import Physics
from drrfarm.render import get_backend
from drrfarm.sinks import ShardSink
from drrfarm.sinks.parquet import DeltaPlanes, encode_parquet
from drrfarm.spectrum import Spectrum, get_spectrum


class _Resident:
    __slots__ = ("handle", "info", "scene")

    def __init__(self, handle: Any, info: dict[str, Any], scene: VolumeScene | None = None) -> None:
        self.handle = handle
        self.info = info
        self.scene = scene  # None without tools/labels/landmarks


@dataclass
class RenderedShard:
    """A shard's images on the host, ready to encode: ``images`` (B, H, W) in the stored dtype (uint16
    with ``image_scale``, possibly as :class:`~drrfarm.sinks.parquet.DeltaPlanes`) or float32; ``release``
    gives their buffer back once they are encoded."""

    images: np.ndarray | DeltaPlanes
    rows: list[dict[str, Any]]
    info: dict[str, Any]
    image_scale: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    release: Any = None

    def done(self) -> None:
        if self.release is not None:
            release, self.release = self.release, None
            release()


def default_encode_threads() -> int:
    """Encoder threads of a worker: the CPUs this process may use (Ray sets the affinity of none, so all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class RenderWorker:
    """Renders whole shards of one sweep and commits them through the sinks.

    ``spec``: the sweep (its ``output`` says where shards go); ``run_id``: provenance run id written
    into each shard's file metadata; ``backend``: "cpu" | "cuda" | "auto"; ``concurrency``: shards this
    worker works on at once (the driver's in-flight bound; on the CUDA backend also the number of
    reusable image buffers); ``max_volumes``: volumes kept resident (LRU); ``warm_up``: start the
    backend and build the spectra in the constructor (so the first shard is not slower than the
    others); ``encode_threads``: threads that code a shard's images (default: this process's CPUs);
    ``switch_interval_s``: the GIL switch interval to set for this process (:func:`sys.setswitchinterval`;
    a render actor owns its process; None leaves it).
    """

    def __init__(self, spec: SweepSpec, run_id: str | None = None, backend: str = "cpu",
                 concurrency: int = 2, max_volumes: int = 2, backend_options: dict[str, Any] | None = None,
                 warm_up: bool = True, encode_threads: int | None = None,
                 switch_interval_s: float | None = None) -> None:
        if switch_interval_s is not None:
            sys.setswitchinterval(float(switch_interval_s))

        self.spec = spec
        self.run_id = run_id
        self.backend_name = backend
        self._backend_options = dict(backend_options or {})
        self._backend: Any = None
        self.max_volumes = max(1, int(max_volumes))
        self._volumes: OrderedDict[int, _Resident] = OrderedDict()
        self._spectra: dict[int, Spectrum] = {}
        self._physics: dict[int, Physics] = {}  # by photon setting
        self._cameras = CameraCache(spec)
        self._render_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._volume_lock = threading.Lock()
        self.sink = ShardSink(spec.output.url, formats=spec.output.formats, image_dtype=spec.output.image_dtype)
        self.concurrency = max(1, int(concurrency))
        self.encode_threads = max(1, int(encode_threads or default_encode_threads()))
        self._encoder = ThreadPoolExecutor(self.encode_threads, thread_name_prefix="drrfarm-encode") \
            if self.encode_threads > 1 else None
        self._ring: Any = None  # ImageRing of the CUDA backend, made with the backend
        self.shards_done = 0
        self.images_done = 0
        self.started = time.time()
        self._static_info: dict[str, Any] | None = None
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

            # one-off set-up of zstd, the Parquet writer and pyarrow's conversions (which import pandas)
            encode_parquet(np.zeros((2, 2, 2), np.uint16), [{"image_index": 0}, {"image_index": 1}], {})
        if "png" in self.spec.output.formats:
            with contextlib.suppress(ImportError):
                import PIL.PngImagePlugin  # noqa: F401

    def start(self, volume_indices: list[int] | tuple[int, ...] = (), poses: list[Pose] | tuple[Pose, ...] = ()
              ) -> dict[str, Any]:
        """Make ``volume_indices`` resident and allocate the image buffers (the driver calls this before the
        sweep's clock starts); returns :meth:`info`. ``poses``: a sample of the sweep's poses, whose volume
        layouts a GPU backend builds now (:meth:`~drrfarm.render.cuda.CudaBackend.warm_layouts`). A volume
        that fails to load is left to its shards, which report the error."""
        errors = {}
        if self._ring is not None:
            img = self.spec.image
            self._ring.reserve((self.spec.output.shard_size, img.height, img.width), self._device_dtype())
        cameras: list[Any] | None = None  # of ``poses``, built once for every volume
        for v in volume_indices:
            try:
                res, _ = self._resident(int(v))
            except Exception as exc:  # noqa: BLE001 - the shards of this volume fail with the same error
                errors[int(v)] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            warm = getattr(self.backend(), "warm_layouts", None)
            if poses and warm is not None:
                with contextlib.suppress(DrrfarmError):  # a pose that cannot render fails its own shard
                    cameras = cameras if cameras is not None else cameras_for(self.spec, poses)
                    warm(res.handle, cameras, self.physics(0))
        info = self.info()
        if errors:
            info["preload_errors"] = errors
        return info

    # -- identity / health ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Where this worker runs: host, pid, Ray actor/node ids, GPUs, backend, resident volumes."""
        d = dict(self._identity())
        d.update({"backend": self._backend.name if self._backend is not None else self.backend_name,
                  "resident_volumes": self.resident_volumes(), "shards_done": self.shards_done,
                  "images_done": self.images_done})
        if self._backend is not None and hasattr(self._backend, "cache_stats"):
            d["backend_cache"] = dict(self._backend.cache_stats())
        if d["backend"] == "cuda" and "gpu_name" not in d:
            d["gpu_name"] = _gpu_name()
            if self._static_info is not None:
                self._static_info["gpu_name"] = d["gpu_name"]
        return d

    def _identity(self) -> dict[str, Any]:
        """What does not change while this process lives (asked of Ray once)."""
        if self._static_info is not None:
            return self._static_info
        d: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                             "actor_id": None, "node_id": None, "gpu_ids": [], "encode_threads": self.encode_threads}
        try:
            import ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                d["actor_id"] = ctx.get_actor_id()
                d["node_id"] = ctx.get_node_id()
                d["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
        except Exception:  # noqa: BLE001 - info is best effort
            pass
        self._static_info = d
        return d

    def ping(self) -> bool:
        return True

    def resident_volumes(self) -> list[int]:
        with self._state_lock:
            return list(self._volumes)

    # -- resources ---------------------------------------------------------------------------------
    def backend(self) -> Any:
        if self._backend is None:
            try:
                backend = get_backend(self.backend_name, **self._backend_options)
            except DrrfarmError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise BackendError(f"backend {self.backend_name!r} failed to start: {exc}") from exc
            if hasattr(backend, "image_ring"):
                self._ring = backend.image_ring(self.concurrency)
            self._backend = backend
        return self._backend

    def volume(self, index: int) -> tuple[Any, dict[str, Any], bool]:
        """``(backend handle, volume info, loaded_now)`` of volume ``index`` of the spec."""
        res, loaded = self._resident(index)
        return res.handle, res.info, loaded

    def scene(self, index: int) -> VolumeScene | None:
        """The :class:`~drrfarm.farm.scene.VolumeScene` of volume ``index`` (None without tools/labels/landmarks)."""
        return self._resident(index)[0].scene

    def _resident(self, index: int) -> tuple[_Resident, bool]:
        with self._state_lock:
            res = self._volumes.get(index)
            if res is not None:
                self._volumes.move_to_end(index)
                return res, False
        with self._volume_lock:  # one load at a time: concurrent shards of a new volume load it once
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
                scene = VolumeScene(self.spec, index, wfp, resolve_input)
            res = _Resident(handle, info, scene)
            with self._state_lock:
                self._volumes[index] = res
                while len(self._volumes) > self.max_volumes:
                    self._volumes.popitem(last=False)
            return res, True

    def spectrum(self, index: int) -> Spectrum:
        s = self._spectra.get(index)
        if s is None:
            s = get_spectrum(spectrum_request(self.spec.spectra.items[index], self.spec.spectra.n_bins))
            self._spectra[index] = s
        return s

    def physics(self, index: int) -> Physics:
        """The :class:`~drrfarm.physics.Physics` of photon setting ``index`` of the spec (built once)."""
        p = self._physics.get(index)
        if p is None:
            p = self._physics.setdefault(index, physics_for(self.spec, self.spec.detector.photons[index]))
        return p

    def _device_dtype(self) -> str:
        """The dtype the GPU writes: the stored one, except float32 where PNGs are quantised from it."""
        stored = self.spec.output.image_dtype
        if stored == "uint16" or (stored == "float16" and "png" not in self.spec.output.formats):
            return stored
        return "float32"

    # -- work --------------------------------------------------------------------------------------
    def render_images(self, task: ShardTask) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
        """Render one shard's images: ``(images (B,H,W) float32, rows, info)`` (no writing)."""
        shard = self._render(task, stored_dtype=False)
        try:
            return np.array(shard.images, dtype=np.float32, copy=True), shard.rows, shard.info
        finally:
            shard.done()

    def _render(self, task: ShardTask, stored_dtype: bool = True) -> RenderedShard:
        """Render one shard into host memory: the GPU fast path (stored dtype, ring buffers) where it
        applies and ``stored_dtype`` allows, else ``Backend.render`` (float32)."""
        t0 = time.perf_counter()
        handle, vinfo, loaded = self.volume(task.volume_index)
        spectrum = self.spectrum(task.spectrum_index)
        photons = self.spec.detector.photons[task.photons_index]
        physics = self.physics(task.photons_index)
        cameras, columns = zip(*self._cameras.get_many(task.poses), strict=True)
        cameras = list(cameras)
        scene = self.scene(task.volume_index)
        tools = [scene.tools_for(p.index) for p in task.poses] if scene is not None and scene.tools else None
        backend = self.backend()
        rows = image_rows(self.spec, task, cameras, spectrum, photons, vinfo["volume_id"], vinfo["sha256"],
                          list(columns))
        scale = storage_scale(self.spec.detector.output)
        seconds: dict[str, float] = {}
        release = None
        scatter_before = getattr(backend, "scatter_seconds", 0.0)
        t1 = time.perf_counter()
        if self._ring is not None and not tools:
            dtype = self._device_dtype() if stored_dtype else "float32"
            with self._render_lock:
                tallies = backend.scatter_tallies(handle, cameras, [spectrum] * len(cameras), physics,
                                                  list(task.seeds))
            slot = self._ring.acquire((len(cameras), cameras[0].height, cameras[0].width), dtype)
            planes = dtype == "uint16" and self.sink.takes_delta_planes
            try:
                out, host = slot.plane_views(len(cameras)) if planes else slot.views(len(cameras))
                t2 = time.perf_counter()
                job = backend.render_async(handle, cameras, spectrum, physics, list(task.seeds), dtype=dtype,
                                           out=out, host_out=host, scatter=tallies,
                                           host_layout="delta_planes" if planes else "images")
                job.wait()
                seconds.update(job.gpu_seconds())
                seconds["ring_wait_s"] = t2 - t1
                seconds["gpu_wait_s"] = time.perf_counter() - t2
            except BaseException:
                self._ring.release(slot)
                raise
            images = DeltaPlanes(host, cameras[0].height, cameras[0].width) if planes else host
            ring = self._ring
            release = lambda: ring.release(slot)  # noqa: E731
        else:
            with self._render_lock:
                t2 = time.perf_counter()
                if tools:
                    images = backend.render(handle, cameras, spectrum, physics, list(task.seeds), meshes=tools)
                else:
                    images = backend.render(handle, cameras, spectrum, physics, list(task.seeds))
                seconds["render_s"] = time.perf_counter() - t2
                seconds["lock_wait_s"] = t2 - t1
            images = np.ascontiguousarray(images, dtype=np.float32)
        shard = RenderedShard(images, rows, {}, scale if images.dtype == np.uint16 else None, seconds, release)
        try:
            seconds["setup_s"] = t1 - t0
            scatter_s = getattr(backend, "scatter_seconds", 0.0) - scatter_before
            scatter = scatter_columns(physics, backend.name, scatter_s, len(rows))
            for i, r in enumerate(rows):
                r["image_scale"] = scale
                r.update(scatter)
                if scene is not None:
                    r.update(scene.annotate(cameras[i], tools[i] if tools else []))
            shard.info = {"volume": vinfo, "volume_loaded": loaded, "scatter_s": float(scatter_s)}
            if scene is not None:
                shard.info["file_metadata"] = scene.file_metadata()
        except BaseException:
            shard.done()  # the buffer goes back to the ring
            raise
        return shard

    def render_shard(self, task: ShardTask) -> dict[str, Any]:
        """Render, encode and commit one shard; returns its stats once the manifest entry exists."""
        started = time.time()
        t0 = time.perf_counter()
        shard = self._render(task)
        t1 = time.perf_counter()
        try:
            meta = {**self.file_metadata, **(shard.info.get("file_metadata") or {})}
            try:
                files, entry = self.sink.prepare(task.shard_id, shard.images, shard.rows, meta,
                                                 image_scale=shard.image_scale, executor=self._encoder)
            except DrrfarmError:
                raise
            except Exception as exc:  # an encoding bug or MemoryError: still a StorageError for the driver
                raise StorageError(f"shard {task.shard_id}: encoding failed: {type(exc).__name__}: {exc}") from exc
        finally:
            shard.done()
        t2 = time.perf_counter()
        entry = self.sink.commit(files, entry)
        t3 = time.perf_counter()
        with self._state_lock:
            self.shards_done += 1
            self.images_done += len(shard.rows)
        stats = self.info()
        stats.update({
            "shard_id": task.shard_id, "shard_index": task.shard_index, "attempt": task.attempt,
            "images": len(shard.rows), "volume_index": task.volume_index,
            "volume_loaded": shard.info["volume_loaded"], "volume_info": shard.info["volume"],
            "render_s": shard.seconds.get("render_s", t1 - t0), "copy_s": shard.seconds.get("copy_s", 0.0),
            "encode_s": t2 - t1, "write_s": t3 - t2, "wait_s": shard.seconds.get("lock_wait_s", 0.0),
            "timings": shard.seconds, "scatter_s": shard.info["scatter_s"], "seconds": t3 - t0, "started": started,
            "bytes": int(sum(entry.bytes.values())), "entry": _entry_dict(entry),
        })
        return stats

    def close(self) -> None:
        """Stop the encoder pool and free the image buffers."""
        if self._encoder is not None:
            self._encoder.shutdown(wait=True)
        if self._ring is not None:
            self._ring.close()


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
    if dataclasses.is_dataclass(entry):
        return dataclasses.asdict(entry)
    return {"repr": repr(entry)}


@functools.cache
def remote_class(cls: type) -> Any:
    """``ray.remote(cls)``, made once per class (Ray is imported here, not at module import)."""
    import ray

    return ray.remote(cls)


def render_actor_class() -> Any:
    """``ray.remote(RenderWorker)``."""
    return remote_class(RenderWorker)


def actor_options(use_gpu: bool, cpus_per_actor: float = 1.0, max_restarts: int = 3, max_concurrency: int = 2,
                  runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ray options of a render actor: one GPU and ``cpus_per_actor`` CPUs (CUDA backend: the CPUs it
    encodes with) or ``cpus_per_actor`` CPUs.

    ``max_task_retries=0``: the driver retries failed shards itself (and counts them);
    ``max_restarts``: Ray recreates a crashed actor (its constructor reloads nothing until needed).
    """
    opts: dict[str, Any] = {"max_restarts": int(max_restarts), "max_task_retries": 0,
                            "max_concurrency": int(max_concurrency)}
    if use_gpu:
        opts.update(num_gpus=1, num_cpus=cpus_per_actor)
    else:
        opts.update(num_cpus=cpus_per_actor, num_gpus=0)
    if runtime_env:
        opts["runtime_env"] = runtime_env
    return opts


def __getattr__(name: str) -> Any:
    if name == "RenderActor":
        return render_actor_class()
    raise AttributeError(name)


__all__ = ["RenderWorker", "RenderedShard", "actor_options", "default_encode_threads", "remote_class",
           "render_actor_class"]
