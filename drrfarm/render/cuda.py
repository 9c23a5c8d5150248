"""The CUDA backend: the reference renderer's fast twin (pycuda, layered texture objects).

What runs on the GPU, per pixel of every image of a batch (``kernels/drr.cu``): ray set-up from
K, R, t in float64; clipping to the volume's box and to the detector (never marching from the
source); per-material line integrals by Joseph slice stepping or the uniform trilinear march, at
the same sample points as :mod:`drrfarm.render.reference`; the polyenergetic detector model of
:mod:`drrfarm.physics` (tables per image, so one launch may mix spectra); cos³ fall-off; Poisson and
Gaussian noise from a Philox4x32-10 stream keyed by the image's seed; the output transform; and
the cast to float32, float16 or uint16 (``physics.UINT16_SCALE``). By default these run as three
kernels (ray records in float64 → a sample march with ≤ 32 registers, so that enough warps hide the
texture latency → detector/noise/output); ``fused=True`` runs them as one kernel (same results).

Volumes are uploaded once per content key (:func:`drrfarm.render.cpu.volume_key`) into layered 2D
textures of half floats, one *layout* per slice axis, built on demand: 2 bytes per channel per voxel
per layout, the channels being 1 (one material), 2, or 4 (three or four materials; two textures of
4 for five to eight). A 512×512×600 CT with 3 materials takes 1.26 GB per layout and 3.77 GB with all
three layouts resident (≤ 4 GB). Layouts are kept in an LRU (:class:`drrfarm.gpu.resident_cache.ResidentCache`)
bounded by ``memory_budget_bytes``. Per stream, the split pipeline also keeps scratch of 48 B (ray
record) + 4·M B (line integrals) per pixel of a chunk of at most 16 M pixels (≈ 0.96 GB for M = 3).

The GPU, its context, kernel modules, events and host buffers come from :mod:`drrfarm.gpu.device`
(the device's primary context, shared with PyTorch and with the mesh and scatter kernels); layered
textures from :mod:`drrfarm.gpu.textures`; the parameter record from :mod:`drrfarm.gpu.layouts`.

Results: :meth:`CudaBackend.render_async` returns a :class:`RenderJob` whose ``images`` stay on the
GPU (``__cuda_array_interface__``: ``torch.as_tensor(job.images, device="cuda")`` shares the memory;
:meth:`RenderJob.torch` does that after waiting) and, optionally, are copied asynchronously on the
job's stream into pinned host memory, so rendering overlaps encoding and writing.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pycuda.driver as drv

from drrfarm import physics as phys
from drrfarm.errors import BackendError, PhysicsError
from drrfarm.gpu import textures
from drrfarm.gpu.device import GpuDevice, StagingBuffers, blocking_event, free_in_context, pagelocked
from drrfarm.gpu.layouts import (
    DRR_CAM_STRIDE,
    DRR_INFO_STRIDE,
    DRR_PARAMS_DTYPE,
    MESH_CAM_STRIDE,
    MESH_MAX_HITS,
    MESH_POSE_STRIDE,
)
from drrfarm.gpu.resident_cache import ResidentCache
from drrfarm.render import reference
from drrfarm.render.cpu import spacing_of, volume_key
from drrfarm.render.cuda_plan import bytes_per_voxel, channels_for, layout_dims, plan_batch, tables_block
from drrfarm.render.mesh_cuda import MeshTracer
from drrfarm.render.mesh_reference import (
    meshes_per_image,
    output_material_names,
    pack_cameras,
    pack_poses,
    widen_channels,
)
from drrfarm.scatter import ScatterEstimator, ScatterVolume

if TYPE_CHECKING:
    from drrfarm.geometry import Camera
    from drrfarm.meshes import Mesh
    from drrfarm.spectrum import Spectrum
    from drrfarm.volume import MaterialVolume

OUTPUT_CODES = {"line_integral": 0, "transmission": 1, "intensity": 2, "neglog": 3}
DTYPE_CODES = {"float32": 0, "float16": 1, "uint16": 2}
HOST_LAYOUTS = ("images", "delta_planes")  # what render_async copies to the host
SPLIT_CHUNK_PIXELS = 16 << 20  # pixels per chunk of the split pipeline (48 B of ray record each)
SCRATCH_STREAMS = 4  # streams whose scratch buffers are kept
MESH_CHUNK_BYTES = 768 << 20  # scratch per chunk of a mesh render (ray records, CT, chords, intervals)
MAX_MESH_MATERIALS = 8  # channels drr_finish_m8 holds
BLOCK = (16, 16)


# ------------------------------------------------------------------------------------ results

class DeviceImages:
    """A C-contiguous image buffer on the GPU, usable from PyTorch without a copy.

    ``torch.as_tensor(images, device="cuda")`` (``__cuda_array_interface__``) shares the memory;
    the buffer lives while this object (or a tensor made from it) does.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, device_index: int, alloc: Any = None,
                 ptr: int | None = None, owner: Any = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.device_index = device_index
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._alloc = alloc if alloc is not None else (drv.mem_alloc(max(self.nbytes, 1)) if ptr is None else None)
        self.ptr = int(self._alloc) if self._alloc is not None else int(ptr or 0)
        self._owner = owner
        if self._alloc is not None:  # freed in the GPU's context whichever thread drops the last reference
            self._finalizer = weakref.finalize(self, free_in_context, device_index, self._alloc)

    def free(self) -> None:
        """Release the GPU memory now (in the device's context); the buffer is unusable afterwards."""
        if self._alloc is not None:
            self._finalizer()
            self._alloc = None
            self.ptr = 0

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:  # noqa: N802
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": None}

    def torch(self) -> Any:
        """A torch tensor sharing this buffer (no copy)."""
        import torch

        return torch.as_tensor(self, device=f"cuda:{self.device_index}")

    def to_numpy(self) -> np.ndarray:
        """A host copy (waits for the work queued before it on the default stream)."""
        out = np.empty(self.shape, dtype=self.dtype)
        with GpuDevice.get(self.device_index).context():
            drv.memcpy_dtoh(out, self.ptr)
        return out


def _wrap_out(out: Any, shape: tuple[int, ...], dtype: np.dtype, device_index: int) -> DeviceImages:
    if isinstance(out, DeviceImages):
        img = out
    else:
        cai = getattr(out, "__cuda_array_interface__", None)
        if cai is None:
            raise BackendError("out: expected DeviceImages or a CUDA array (e.g. a torch CUDA tensor)")
        strides = cai.get("strides")
        contiguous = strides is None or tuple(strides) == tuple(
            int(np.prod(cai["shape"][i + 1:])) * np.dtype(cai["typestr"]).itemsize for i in range(len(cai["shape"])))
        if not contiguous:
            raise BackendError("out: the output array must be C-contiguous")
        img = DeviceImages(tuple(cai["shape"]), np.dtype(cai["typestr"]), device_index, ptr=int(cai["data"][0]),
                           owner=out)
    if img.shape != tuple(shape) or img.dtype != dtype:
        raise BackendError(f"out: expected shape {tuple(shape)} and dtype {dtype}, got {img.shape} {img.dtype}")
    return img


class RenderJob:
    """A batch in flight: ``images`` on the GPU, ``host`` (pinned) once :meth:`wait` returns."""

    def __init__(self, gpu: GpuDevice, images: DeviceImages, host: np.ndarray | None, event: Any, scale: float | None,
                 keep: list[Any], mesh_overflow: Any = None, started: Any = None, rendered: Any = None) -> None:
        self._gpu = gpu
        self.images = images
        self.host = host
        self.event = event
        self.scale = scale
        self._keep = keep
        self._mesh_overflow = mesh_overflow  # device u32[2] of mesh.cu (hit lists, unions), or None
        self._started = started  # events: launch start, kernels done (before the copy to host)
        self._rendered = rendered
        self._gpu_seconds: dict[str, float] = {}

    def done(self) -> bool:
        if self.event is None:
            return True
        with self._gpu.context():
            return bool(self.event.query())

    def wait(self) -> np.ndarray | None:
        """Block until the render (and the copy to host, if any) finished; returns ``host``.

        Raises :class:`BackendError` when a ray of a mesh render had more mesh crossings than the
        kernel holds (its image would be wrong). Events and scratch are released here, in the GPU's
        context (pycuda cannot free them from another thread later)."""
        overflow = None
        if self.event is not None:
            with self._gpu.context():
                self.event.synchronize()
                if self._started is not None and self._rendered is not None:
                    self._gpu_seconds = {"render_s": self._rendered.time_since(self._started) / 1e3,
                                         "copy_s": self.event.time_since(self._rendered) / 1e3}
                if self._mesh_overflow is not None:
                    overflow = drv.from_device(self._mesh_overflow, (2,), np.uint32)
                    self._mesh_overflow.free()
                    self._mesh_overflow = None
                self._keep = []
                self.event = self._started = self._rendered = None
        if overflow is not None and overflow.any():
            raise BackendError(
                f"meshes: {int(overflow[0])} ray(s) crossed more mesh surfaces than the kernel holds "
                f"({MESH_MAX_HITS} hits per mesh) and {int(overflow[1])} ray(s) more separate replacing "
                "intervals than mesh_kmax; raise CudaBackend(mesh_kmax=...) or simplify the meshes")
        return self.host

    def gpu_seconds(self) -> dict[str, float]:
        """After :meth:`wait`: the GPU's time on this batch, ``render_s`` (kernels) and ``copy_s`` (to host)."""
        return dict(self._gpu_seconds)

    def torch(self) -> Any:
        """Wait, then the images as a torch CUDA tensor sharing the GPU buffer (no copy)."""
        self.wait()
        return self.images.torch()


class ImageSlot:
    """One reusable pair of image buffers: ``device`` (:class:`DeviceImages`) and ``host`` (page-locked)."""

    __slots__ = ("device", "host", "shape", "dtype")

    def __init__(self, device: DeviceImages, host: np.ndarray) -> None:
        self.device = device
        self.host = host
        self.shape = device.shape
        self.dtype = device.dtype

    def fits(self, shape: tuple[int, ...], dtype: np.dtype) -> bool:
        """True when a batch of ``shape`` (batch size up to this slot's) and ``dtype`` fits."""
        return self.dtype == dtype and self.shape[1:] == tuple(shape[1:]) and self.shape[0] >= shape[0]

    def views(self, n: int) -> tuple[DeviceImages, np.ndarray]:
        """``out`` and ``host_out`` arguments of :meth:`CudaBackend.render_async` for ``n`` images."""
        dev = self.device if n == self.shape[0] else DeviceImages(
            (n, *self.shape[1:]), self.dtype, self.device.device_index, ptr=self.device.ptr, owner=self.device)
        return dev, self.host[:n]

    def plane_views(self, n: int) -> tuple[DeviceImages, np.ndarray]:
        """As :meth:`views`, with ``host_out`` for ``host_layout="delta_planes"``: (n, 2·H·W) uint8 (uint16 slots)."""
        dev, host = self.views(n)
        return dev, host.reshape(n, -1).view(np.uint8)


class ImageRing:
    """A bounded set of reusable image buffers (GPU output + page-locked host copy) for a render loop.

    Allocating page-locked memory costs milliseconds per megabyte and freeing it on the wrong thread
    leaks it, so a farm worker renders every batch into a slot of this ring, hands the host copy to its
    encoder and releases the slot once the bytes are encoded. :meth:`acquire` blocks while
    ``slots`` are in use (backpressure). Slots are allocated on first need and freed by :meth:`close`.
    """

    def __init__(self, device_index: int, slots: int) -> None:
        if slots < 1:
            raise BackendError(f"ImageRing: slots must be >= 1, got {slots}")
        self.device_index = int(device_index)
        self.slots = int(slots)
        self._free: list[ImageSlot] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()

    def acquire(self, shape: tuple[int, ...], dtype: Any) -> ImageSlot:
        """A slot for a (B, H, W) batch of ``dtype`` (blocks while every slot is in use)."""
        shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        stale: ImageSlot | None = None
        with self._cond:
            while True:
                if self._closed:
                    raise BackendError("ImageRing is closed")
                fit = next((s for s in self._free if s.fits(shape, dtype)), None)
                if fit is not None:
                    self._free.remove(fit)
                    return fit
                if self._count < self.slots:
                    self._count += 1
                    break
                if self._free:  # a slot of another shape: replace it
                    stale = self._free.pop(0)
                    break
                self._cond.wait()
        if stale is not None:
            _free_slot(stale)
        try:
            with GpuDevice.get(self.device_index).context():
                dev = DeviceImages(shape, dtype, self.device_index)
            return ImageSlot(dev, pagelocked(shape, dtype, self.device_index))
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def reserve(self, shape: tuple[int, ...], dtype: Any) -> None:
        """Allocate every slot for (B, H, W) batches of ``dtype`` now (page-locking is slow: do it before
        the clock starts rather than on the first shards)."""
        taken = [self.acquire(shape, dtype) for _ in range(self.slots)]
        for slot in taken:
            self.release(slot)

    def release(self, slot: ImageSlot) -> None:
        """Give a slot back (its host array must no longer be read)."""
        with self._cond:
            if self._closed:
                _free_slot(slot)
                self._count -= 1
            else:
                self._free.append(slot)
            self._cond.notify()

    def close(self) -> None:
        """Free the idle slots now (slots still out are freed when released)."""
        with self._cond:
            self._closed = True
            idle, self._free = self._free, []
            self._count -= len(idle)
            self._cond.notify_all()
        for s in idle:
            _free_slot(s)


def _free_slot(slot: ImageSlot) -> None:
    """Free a slot's GPU buffer now; its page-locked array is freed (in the GPU's context) once unreferenced."""
    slot.device.free()
    slot.host = None  # type: ignore[assignment]


# ------------------------------------------------------------------------------------ resident volumes

@dataclass
class _Layout:
    axis: int
    arrays: list[int]
    tex_linear: list[int]
    tex_point: list[int]
    nbytes: int

    def free(self) -> None:
        for h in self.tex_linear + self.tex_point:
            textures.destroy_texture_object(h)
        for a in self.arrays:
            textures.destroy_array(a)
        self.arrays, self.tex_linear, self.tex_point = [], [], []


class CudaVolume:
    """A prepared volume: its layouts on the GPU and what is needed to build more."""

    def __init__(self, key: str, gpu: GpuDevice, densities: np.ndarray, world_from_ijk: np.ndarray,
                 material_names: list[str]) -> None:
        self.key = key
        self._gpu = gpu
        self.densities = densities  # host (M, I, J, K) float32, kept to build further layouts
        self.world_from_ijk = np.asarray(world_from_ijk, dtype=np.float64)
        self.ijk_from_world = reference.ijk_from_world(self.world_from_ijk)
        self.spacing_mm = spacing_of(self.world_from_ijk)
        self.material_names = list(material_names)
        self.shape: tuple[int, int, int] = tuple(int(n) for n in densities.shape[1:])  # type: ignore[assignment]
        self.n_materials = int(densities.shape[0])
        self.channels, self.n_textures = channels_for(self.n_materials)
        self.layouts: dict[int, _Layout] = {}

    @property
    def layout_nbytes(self) -> int:
        return int(np.prod(self.shape)) * bytes_per_voxel(self.n_materials)

    @property
    def nbytes(self) -> int:
        return sum(lay.nbytes for lay in self.layouts.values())

    def release_layout(self, axis: int) -> None:
        lay = self.layouts.pop(axis, None)
        if lay is not None:
            with self._gpu.context():
                lay.free()

    def release(self) -> None:
        for axis in list(self.layouts):
            self.release_layout(axis)


# ------------------------------------------------------------------------------------ the backend

class CudaBackend:
    """Renderer on one NVIDIA GPU (chosen by ``device`` index) through pycuda.

    ``memory_budget_bytes``: bound of the resident volume layouts (default half the GPU's memory).
    ``exact_interpolation``: bilinear weights in fp32 from four point fetches instead of the texture
    unit's 8-bit filter weights (4x the fetches; matches the reference per material to fp16 storage
    precision). ``joseph_layouts=False``: keep one layout per volume (the principal rays' axis) and
    sample rays dominant along another axis trilinearly from it (same points, two fetches per slice).
    ``fused``: one kernel from camera to stored pixel; ``False`` (default, faster): three kernels,
    ray set-up (float64) -> sample march (few registers, so more warps hide texture latency) ->
    detector/noise/output, through per-stream scratch (48 B of ray record and 4·M B of line
    integrals per pixel, in chunks of ``SPLIT_CHUNK_PIXELS``).
    ``defines``/``block``: kernel build options and the thread block (for tuning).
    ``mesh_kmax``: separate replacing-mesh intervals kept per ray (1..16; more raise an error).

    Meshes (``meshes=`` of :meth:`render` / :meth:`line_integrals`) run in the split pipeline:
    ``mesh_trace`` (``kernels/mesh.cu``: chords and the replacing union per pixel) -> ray records ->
    CT march -> ``drr_mesh_ct_*`` (the CT minus its samples inside replacing meshes, widened to the
    mesh materials' channels) -> ``mesh_add_chords`` -> detector/noise/output. Images without meshes
    take the unchanged fast path.
    """

    name = "cuda"

    def __init__(self, device: int = 0, memory_budget_bytes: int | None = None, exact_interpolation: bool = False,
                 defines: dict[str, int] | None = None, block: tuple[int, int] = BLOCK,
                 joseph_layouts: bool = True, fused: bool = False, mesh_kmax: int = 8) -> None:
        self._gpu = GpuDevice.get(int(device))
        self.mesh_kmax = int(mesh_kmax)
        self._mesh_tracer: MeshTracer | None = None
        self._scenes: OrderedDict[tuple, Any] = OrderedDict()
        self.device_index = int(device)
        self.exact_interpolation = bool(exact_interpolation)
        self.joseph_layouts = bool(joseph_layouts)
        self.fused = bool(fused)
        self.defines = dict(defines or {})
        self.block = (int(block[0]), int(block[1]), 1)
        with self._gpu.context():
            free, total = drv.mem_get_info()
        self.memory_budget_bytes = int(memory_budget_bytes) if memory_budget_bytes else int(0.5 * total)
        self._cache = ResidentCache(self.memory_budget_bytes)
        module, how = self._gpu.module("drr.cu", self.defines)
        self._module = module
        self.kernel_source = how
        self._functions: dict[str, Any] = {}
        self._staging = StagingBuffers()
        self._scatter: ScatterEstimator | None = None  # the CT's scatter on this GPU, made on first use
        self._scratch: dict[Any, list[Any]] = {}
        self._tables_cache: dict[tuple, phys.DetectorTables] = {}
        self._stream = None
        self._lock = self._gpu.lock
        self._ring = ImageRing(self.device_index, 2)  # the buffers of render() (float32 to host)

    # -- helpers -------------------------------------------------------------------------------

    @property
    def device_name(self) -> str:
        return self._gpu.name

    def _fn(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self._module.get_function(name)
        return fn

    def stream(self) -> Any:
        """This backend's default CUDA stream (created on first use)."""
        if self._stream is None:
            self._stream = self._gpu.new_stream()
        return self._stream

    def new_stream(self) -> Any:
        return self._gpu.new_stream()

    def allocate(self, shape: tuple[int, ...], dtype: Any = "float16") -> DeviceImages:
        """A reusable device image buffer (pass as ``out=``)."""
        with self._gpu.context():
            return DeviceImages(shape, np.dtype(dtype), self.device_index)

    def pinned(self, shape: tuple[int, ...], dtype: Any = "float16") -> np.ndarray:
        """A reusable page-locked host array (pass as ``host_out=``)."""
        return pagelocked(tuple(shape), dtype, self.device_index)

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of GPU memory."""
        with self._gpu.context():
            return drv.mem_get_info()

    # -- volumes -------------------------------------------------------------------------------

    def prepare(self, material_volume: MaterialVolume, world_from_patient: np.ndarray | None = None,
                layouts: Sequence[int] = ()) -> CudaVolume:
        """Make a volume resident (cached by content); ``layouts`` lists slice axes to build now
        (others are built on first use)."""
        wfp = np.eye(4) if world_from_patient is None else np.asarray(world_from_patient, dtype=np.float64)
        key = volume_key(material_volume, wfp)
        with self._lock:
            vol = self._cache.get(key)
            if vol is None:
                dens = np.ascontiguousarray(material_volume.densities_g_cm3, dtype=np.float32)
                world_from_ijk = wfp @ np.asarray(material_volume.patient_from_ijk, dtype=np.float64)
                vol = CudaVolume(key, self._gpu, dens, world_from_ijk, list(material_volume.material_names))
                self._cache.put(key, vol)
            if layouts:
                self._ensure_layouts(vol, set(int(a) for a in layouts))
            return vol

    def warm_layouts(self, vol: CudaVolume, cameras: Sequence[Camera], physics: phys.Physics) -> list[int]:
        """Build now the slice layouts that renders of ``cameras`` (same size) with ``physics`` use -- else the
        first render that needs one builds it, holding up every render queued behind it; returns the axes."""
        if not cameras:
            return []
        h0 = float(physics.step_voxels) * float(min(vol.spacing_mm))
        _, principal, corner_axes = plan_batch(cameras, vol.ijk_from_world, h0, vol.shape)
        axes = set(principal.tolist())
        if physics.method == "joseph" and self.joseph_layouts:
            axes |= corner_axes
        with self._lock:
            self._ensure_layouts(vol, axes)
        return sorted(axes)

    def _ensure_layouts(self, vol: CudaVolume, axes: set[int]) -> None:
        missing = sorted(a for a in axes if a not in vol.layouts)
        if not missing:
            return
        extra = len(missing) * vol.layout_nbytes
        over = self._cache.make_room(extra, keep={vol.key})
        if over > 0:
            for a in [a for a in vol.layouts if a not in axes]:
                vol.release_layout(a)
            over = max(0, self._cache.bytes_resident() + extra - self.memory_budget_bytes)
            if over > 0:
                warnings.warn(
                    f"backend 'cuda': volume layouts need {extra / 2**30:.2f} GiB more than the budget "
                    f"({self.memory_budget_bytes / 2**30:.2f} GiB) allows; building them anyway",
                    stacklevel=3,
                )
        for a in missing:
            vol.layouts[a] = self._build_layout(vol, a)

    def _build_layout(self, vol: CudaVolume, axis: int) -> _Layout:
        X, Y, L = layout_dims(vol.shape, axis)
        C, NT, M = vol.channels, vol.n_textures, vol.n_materials
        texel = 2 * C
        I, J, K = vol.shape
        per_layer_src = M * X * Y * 4
        per_layer_pack = X * Y * texel
        chunk = max(1, min(L, (256 << 20) // (per_layer_src + per_layer_pack)))
        pack = self._fn("pack_layout")
        arrays: list[int] = []
        with self._gpu.context():
            d_src = drv.mem_alloc(per_layer_src * chunk)
            d_pack = drv.mem_alloc(per_layer_pack * chunk)
            try:
                for _ in range(NT):
                    arrays.append(textures.create_layered_array(X, Y, L, C))
                for l0 in range(0, L, chunk):
                    nl = min(chunk, L - l0)
                    sl: list[slice] = [slice(None)] * 4
                    sl[1 + axis] = slice(l0, l0 + nl)
                    host = np.ascontiguousarray(vol.densities[tuple(sl)])
                    drv.memcpy_htod(d_src, host)
                    n = nl * X * Y
                    grid = (max(1, min(65535, (n + 255) // 256)), 1, 1)
                    for t in range(NT):
                        pack(d_src, d_pack, np.int32(M), np.int32(4 * t), np.int32(C), np.int32(I), np.int32(J),
                             np.int32(K), np.int32(axis), np.int32(nl), block=(256, 1, 1), grid=grid)
                        drv.Context.synchronize()
                        textures.copy_device_to_layers(int(d_pack), arrays[t], X * texel, Y, l0, nl)
                drv.Context.synchronize()
                tex_lin = [textures.create_texture_object(a, linear=True) for a in arrays]
                tex_pt = [textures.create_texture_object(a, linear=False) for a in arrays]
            except BaseException:
                for a in arrays:
                    textures.destroy_array(a)
                raise
            finally:
                d_src.free()
                d_pack.free()
        return _Layout(axis, arrays, tex_lin, tex_pt, X * Y * L * texel * NT)

    def cache_stats(self) -> dict[str, int]:
        stats = self._cache.stats()
        with self._lock:
            stats["layouts"] = sum(len(v.layouts) for v in self._cache._entries.values())
        return stats

    def evict(self, handle: CudaVolume) -> None:
        with self._lock:
            self._cache.evict(handle.key)

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
        self._ring.close()
        self._ring = ImageRing(self.device_index, 2)

    # -- rendering -----------------------------------------------------------------------------

    def _tables(self, spectrum: Any, names: list[str], physics: phys.Physics) -> phys.DetectorTables:
        if isinstance(spectrum, phys.DetectorTables):
            return spectrum
        key = (spectrum.key() if hasattr(spectrum, "key") else id(spectrum), tuple(names), physics.detector,
               physics.csi_thickness_mm)
        tab = self._tables_cache.get(key)
        if tab is None:
            tab = self._tables_cache[key] = phys.detector_tables(spectrum, names, physics)
        return tab

    def _launch(self, vol: CudaVolume, cameras: Sequence[Camera], physics: phys.Physics, *, mode: int,
                spectra: Any = None, seeds: Sequence[int] | None = None, dtype: str = "float32",
                to_host: bool = True, out: Any = None, host_out: np.ndarray | None = None,
                stream: Any = None, meshes: Sequence[Sequence[Mesh]] | None = None,
                scatter: np.ndarray | None = None, host_layout: str = "images") -> RenderJob:
        """One launch. ``meshes``: one list per camera, all of one scene (same meshes, own poses);
        ``scatter``: (B, 2, H_t, W_t) scatter signal and counts tallies added before the noise (mode 1);
        ``host_layout``: see :meth:`CudaBackend.render_async`."""
        B = len(cameras)
        if B == 0:
            raise BackendError("cameras: need at least one camera")
        H, W = int(cameras[0].height), int(cameras[0].width)
        if any(int(c.height) != H or int(c.width) != W for c in cameras):
            raise BackendError("cameras: one launch renders images of one size; group cameras by (height, width)")
        if B > 65535:
            raise BackendError(f"cameras: at most 65535 images per launch, got {B}")
        method = physics.method
        M = vol.n_materials
        if meshes and (len(meshes) != B or len({scene_key(ms) for ms in meshes}) != 1 or not meshes[0]):
            raise BackendError("meshes: one launch needs one non-empty list per camera, all of one scene "
                               "(the same meshes in the same order; poses may differ)")
        names = output_material_names(vol.material_names, meshes[0]) if meshes else list(vol.material_names)
        M_out = len(names)
        if M_out > MAX_MESH_MATERIALS:
            raise BackendError(f"meshes: at most {MAX_MESH_MATERIALS} materials in one render, got {M_out} ({names})")
        h0 = float(physics.step_voxels) * float(min(vol.spacing_mm))
        cams, principal, corner_axes = plan_batch(cameras, vol.ijk_from_world, h0, vol.shape)
        info = np.zeros((B, DRR_INFO_STRIDE), dtype=np.uint32)
        axes = set(principal.tolist())
        if method == "joseph" and self.joseph_layouts:
            axes |= corner_axes

        if mode == 1:
            spec_list = list(spectra) if isinstance(spectra, (list, tuple)) else [spectra]
            if len(spec_list) not in (1, B):
                raise PhysicsError(f"spectrum: give one spectrum or one per camera ({B}), got {len(spec_list)}")
            uniq: list[phys.DetectorTables] = []
            index: dict[int, int] = {}
            for i in range(B):
                s = spec_list[i if len(spec_list) == B else 0]
                tab = self._tables(s, names, physics)
                if id(tab) not in index:
                    index[id(tab)] = len(uniq)
                    uniq.append(tab)
                info[i, 0] = index[id(tab)]
            tables, nbmax, tstride = tables_block(uniq, M_out)
            if seeds is None or len(seeds) != B:
                raise PhysicsError(f"seeds: need one seed per camera ({B}), got {0 if seeds is None else len(seeds)}")
            for i, seed in enumerate(seeds):
                s64 = int(seed) & (2**64 - 1)
                info[i, 1] = s64 & 0xFFFFFFFF
                info[i, 2] = s64 >> 32
            out_shape: tuple[int, ...] = (B, H, W)
            out_dtype = np.dtype(dtype)
        else:
            tables, nbmax, tstride = np.zeros((1, 4), dtype=np.float32), 0, 4
            out_shape = (B, M_out, H, W)
            out_dtype = np.dtype(np.float32)
            dtype = "float32"
        info[:, 3] = principal.astype(np.uint32)
        if dtype not in DTYPE_CODES:
            raise BackendError(f"dtype: choose one of {sorted(DTYPE_CODES)}, got {dtype!r}")
        if host_layout not in HOST_LAYOUTS:
            raise BackendError(f"host_layout: choose one of {list(HOST_LAYOUTS)}, got {host_layout!r}")
        planes = host_layout == "delta_planes"
        if planes and (mode != 1 or dtype != "uint16" or not to_host):
            raise BackendError("host_layout 'delta_planes' needs uint16 images copied to the host")
        host_shape = (B, 2 * H * W) if planes else out_shape
        host_dtype = np.dtype(np.uint8) if planes else out_dtype

        params = np.zeros((), dtype=DRR_PARAMS_DTYPE)
        with self._lock:
            self._ensure_layouts(vol, axes)
            with self._gpu.context():
                stream = stream if stream is not None else self.stream()
                # per-launch parameters: one pinned staging buffer -> one async copy
                blobs = [cams.tobytes(), info.tobytes(), tables.tobytes()]
                if meshes:  # mesh.cu's camera records and per-image poses
                    blobs += [pack_cameras(cameras).tobytes(), np.ascontiguousarray(pack_poses(meshes)).tobytes()]
                if scatter is not None:
                    scatter = np.ascontiguousarray(scatter, dtype=np.float32)
                    if mode != 1 or scatter.ndim != 4 or scatter.shape[:2] != (B, 2):
                        raise BackendError(f"scatter: need (B={B}, 2, H_t, W_t) tallies for an image launch, "
                                           f"got {scatter.shape}")
                    blobs.append(scatter.tobytes())
                offsets, total = [], 0
                for blob in blobs:
                    offsets.append(total)
                    total += (len(blob) + 255) // 256 * 256
                slot = self._staging.acquire(total)
                host, dev = slot[1], slot[2]
                for off, blob in zip(offsets, blobs, strict=True):
                    host[off : off + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
                started = drv.Event()
                started.record(stream)
                drv.memcpy_htod_async(dev, host[:total], stream)
                base = int(dev)
                images = _wrap_out(out, out_shape, out_dtype, self.device_index) if out is not None else \
                    DeviceImages(out_shape, out_dtype, self.device_index)
                keep: list[Any] = [slot]
                mesh_overflow = None
                mesh_run = None
                if meshes:
                    scene = self._scene(meshes[0], vol.material_names)
                    mesh_overflow = drv.mem_alloc(8)
                    drv.memset_d32_async(mesh_overflow, 0, 2, stream)
                    keep.append(mesh_overflow)
                    mesh_run = _MeshRun(self._tracer(), scene, base + offsets[3], base + offsets[4], int(mesh_overflow),
                                        M_out, self.mesh_kmax, any(m.mode == "replace" for m in meshes[0]))

                p = params
                p["cams"], p["info"], p["tables"] = base + offsets[0], base + offsets[1], base + offsets[2]
                p["out"] = images.ptr
                tex = [0] * 6
                texp = [0] * 6
                for a, lay in vol.layouts.items():
                    for t in range(vol.n_textures):
                        tex[a * 2 + t] = lay.tex_linear[t]
                        texp[a * 2 + t] = lay.tex_point[t]
                p["tex"], p["texp"] = tex, texp
                p["nI"], p["nJ"], p["nK"] = vol.shape
                p["M"], p["H"], p["W"], p["B"] = M, H, W, B
                p["tstride"], p["nbmax"], p["mode"] = tstride, nbmax, mode
                p["output"] = OUTPUT_CODES[physics.output]
                p["out_dtype"] = DTYPE_CODES[dtype]
                scale = phys.UINT16_SCALE[physics.output] if dtype == "uint16" else None
                p["scale"] = scale or 1.0
                p["scale64"] = scale or 1.0
                p["photons"] = float(physics.photons) if physics.photons else 0.0
                p["sigma_e"] = float(physics.electronic_noise) if physics.photons else 0.0
                p["tau_min"] = 0.5 / physics.photons if physics.photons else phys.NOISELESS_TAU_MIN
                p["solid_angle"] = int(bool(physics.solid_angle))
                if scatter is not None:
                    p["scatter"] = base + offsets[-1]
                    p["scatter_h"], p["scatter_w"] = scatter.shape[2], scatter.shape[3]
                neglog = mode == 1 and physics.output == "neglog"
                if neglog:
                    scratch, minmax = self._scratch_for(stream, B * H * W, B)
                    p["scratch"], p["minmax"] = int(scratch), int(minmax)
                    self._fn("drr_minmax_init")(minmax, np.int32(B), block=(256, 1, 1),
                                                grid=((B + 255) // 256, 1), stream=stream)
                interp = "exact" if self.exact_interpolation else "hw"
                bx, by, _ = self.block
                grid = ((W + bx - 1) // bx, (H + by - 1) // by, B)
                shared = int(tstride * 4)
                if mode == 1 and self.fused and mesh_run is None:
                    kname = f"drr_{method}_c{vol.channels}_t{vol.n_textures}_{interp}"
                    self._fn(kname)(params[()], block=self.block, grid=grid, stream=stream, shared=shared)
                else:
                    self._split(params, method, vol, interp, mode, B, H, W, out_dtype, stream, shared, mesh_run)
                if neglog:
                    n = B * H * W
                    self._fn("drr_neglog_finish")(params[()], block=(256, 1, 1),
                                                  grid=(max(1, min(65535, (n + 255) // 256)), 1), stream=stream)
                source = images.ptr
                if planes:
                    source = self._buffer(stream, "delta_planes", B * H * W * 2)
                    n = B * H * W
                    self._fn("delta_planes_u16")(np.uintp(images.ptr), source, np.int32(B), np.int32(H), np.int32(W),
                                                 block=(256, 1, 1), grid=(max(1, min(65535, (n + 255) // 256)), 1),
                                                 stream=stream)
                rendered = drv.Event()
                rendered.record(stream)
                host_arr = None
                if to_host:
                    host_arr = host_out if host_out is not None else \
                        pagelocked(host_shape, host_dtype, self.device_index)
                    if host_arr.shape != host_shape or host_arr.dtype != host_dtype:
                        raise BackendError(f"host_out: expected {host_shape} {host_dtype}, got "
                                           f"{host_arr.shape} {host_arr.dtype}")
                    drv.memcpy_dtoh_async(host_arr, source, stream)
                event = blocking_event()
                event.record(stream)
                slot[3] = event
        return RenderJob(self._gpu, images, host_arr, event, scale, keep, mesh_overflow, started, rendered)

    def _split(self, params: np.ndarray, method: str, vol: CudaVolume, interp: str, mode: int, B: int, H: int,
               W: int, out_dtype: np.dtype, stream: Any, shared: int, mesh: _MeshRun | None = None) -> None:
        """Ray records -> march -> (meshes) -> (mode 1) finish, in chunks of images that bound the scratch memory."""
        M = vol.n_materials
        M_out = mesh.n_channels if mesh is not None else M
        per_chunk = max(1, min(B, SPLIT_CHUNK_PIXELS // (H * W)))
        if mesh is not None:
            per_chunk = max(1, min(per_chunk, MESH_CHUNK_BYTES // (H * W * mesh.bytes_per_pixel(M))))
        rays = self._buffer(stream, "rays", per_chunk * H * W * 48)
        lint = self._buffer(stream, "lint", per_chunk * H * W * M_out * 4) if mode == 1 else None
        if mesh is not None:
            ct = self._buffer(stream, "mesh_ct", per_chunk * H * W * M * 4)
            chords = self._buffer(stream, "mesh_chords", per_chunk * H * W * mesh.scene.n_meshes * 4)
            intervals = self._buffer(stream, "mesh_intervals", per_chunk * H * W * mesh.kmax * 16) \
                if mesh.replace else None
            n_intervals = self._buffer(stream, "mesh_n_intervals", per_chunk * H * W * 4) if mesh.replace else None
            fn_mesh_ct = self._fn(f"drr_mesh_ct_{method}_c{vol.channels}_t{vol.n_textures}_{interp}")
        bx, by, _ = self.block
        fn_rays = self._fn(f"drr_rays_{method}")
        fn_march = self._fn(f"drr_march_{method}_c{vol.channels}_t{vol.n_textures}_{interp}")
        fn_finish = self._fn("drr_finish_m4" if M_out <= 4 else "drr_finish_m8")
        base = params.copy()
        out_item = out_dtype.itemsize
        for i0 in range(0, B, per_chunk):
            n = min(per_chunk, B - i0)
            q = base.copy()
            q["cams"] = int(base["cams"]) + i0 * DRR_CAM_STRIDE * 8
            q["info"] = int(base["info"]) + i0 * DRR_INFO_STRIDE * 4
            q["B"] = n
            q["rays"] = int(rays)
            if base["scratch"]:
                q["scratch"] = int(base["scratch"]) + i0 * H * W * 4
                q["minmax"] = int(base["minmax"]) + i0 * 8
            grid = ((W + bx - 1) // bx, (H + by - 1) // by, n)
            fn_rays(q[()], block=self.block, grid=grid, stream=stream)
            march = q.copy()
            target = int(lint) if mode == 1 else int(base["out"]) + i0 * M_out * H * W * 4
            march["out"] = target if mesh is None else int(ct)
            fn_march(march[()], block=self.block, grid=grid, stream=stream)
            if mesh is not None:
                mp = mesh.tracer.params(
                    mesh.scene, mesh.cams_ptr + i0 * MESH_CAM_BYTES, mesh.poses_ptr + i0 * mesh.pose_bytes, H, W, n,
                    chords=int(chords), M=M_out, intervals=int(intervals or 0), n_intervals=int(n_intervals or 0),
                    overflow=mesh.overflow_ptr, kmax=mesh.kmax)
                mesh.tracer.trace_device(mp, stream)
                # pointers first, then the ints (no padding question in the argument buffer)
                fn_mesh_ct(march[()], ct, np.uintp(int(intervals or 0)), np.uintp(int(n_intervals or 0)),
                           np.uintp(target), np.int32(mesh.kmax), np.int32(M_out), block=self.block, grid=grid,
                           stream=stream)
                mp["lint"] = target
                mesh.tracer.add_chords_device(mp, stream)
            if mode == 1:
                q["lint"] = int(lint)
                q["M"] = M_out
                q["out"] = int(base["out"]) + i0 * H * W * out_item
                fn_finish(q[()], block=(16, 16, 1), grid=((W + 15) // 16, (H + 15) // 16, n), stream=stream,
                          shared=shared)

    def _tracer(self) -> MeshTracer:
        """The mesh tracer (``kernels/mesh.cu``) on this backend's GPU, loaded on first use."""
        if self._mesh_tracer is None:
            self._mesh_tracer = MeshTracer(self.device_index)
        return self._mesh_tracer

    def _scene(self, meshes: Sequence[Mesh], material_names: Sequence[str]) -> Any:
        """The uploaded scene of ``meshes`` (cached by geometry, material, density and mode)."""
        key = (scene_key(meshes), tuple(material_names))
        scene = self._scenes.get(key)
        if scene is None:
            scene = self._scenes[key] = self._tracer().upload(meshes, material_names)
            while len(self._scenes) > MESH_SCENES_CACHED:
                self._scenes.popitem(last=False)  # buffers are freed with the scene object
        else:
            self._scenes.move_to_end(key)
        return scene

    def _buffer(self, stream: Any, name: str, nbytes: int) -> Any:
        """A per-stream scratch buffer of at least ``nbytes`` (grown, never shrunk). Buffers of the
        least recently used streams beyond ``SCRATCH_STREAMS`` are freed (after their work finished)."""
        key = (name, id(stream))
        cur = self._scratch.pop(key, None)
        if cur is None or cur[0] < nbytes:
            cur = [nbytes, drv.mem_alloc(max(nbytes, 1)), stream]
        self._scratch[key] = cur  # most recent last
        streams = list(dict.fromkeys(k[1] for k in self._scratch))
        for old in streams[:-SCRATCH_STREAMS]:
            for k in [k for k in self._scratch if k[1] == old]:
                entry = self._scratch.pop(k)
                entry[2].synchronize()
                entry[1].free()
        return cur[1]

    def _scratch_for(self, stream: Any, n_pixels: int, n_images: int) -> tuple[Any, Any]:
        return self._buffer(stream, "neglog", 4 * n_pixels), self._buffer(stream, "minmax", 8 * n_images)

    def render_async(self, handle: CudaVolume, cameras: Sequence[Camera], spectrum: Any, physics: phys.Physics,
                     seeds: Sequence[int], *, dtype: str = "float32", to_host: bool = True, out: Any = None,
                     host_out: np.ndarray | None = None, stream: Any = None,
                     meshes: Sequence[Sequence[Mesh]] | None = None, scatter: np.ndarray | None = None,
                     host_layout: str = "images") -> RenderJob:
        """Enqueue one batch; returns at once.

        ``spectrum``: a :class:`~drrfarm.spectrum.Spectrum` or precomputed
        :class:`~drrfarm.physics.DetectorTables` (for this volume's materials and ``physics.detector``),
        or a list of them, one per camera (one launch mixes spectra). ``dtype``: ``float32``,
        ``float16`` or ``uint16`` (value = round(x / ``job.scale``)). ``out``: reuse a
        :class:`DeviceImages` or write into any CUDA array (e.g. a torch tensor); ``host_out``: reuse
        a pinned array (from :meth:`pinned`). ``to_host=False`` keeps the images on the GPU only.
        ``meshes``: one list per camera, all of one scene (the same meshes, each image its own poses).
        ``scatter``: (B, 2, H_t, W_t) float32 scatter signal and counts tallies (:meth:`scatter_tallies`),
        interpolated to the detector and added before the noise. ``host_layout``: ``images`` -- the host
        copy is the (B, H, W) images; ``delta_planes`` (uint16 only) -- the host copy is (B, 2·H·W) uint8, each
        image in the Parquet delta codecs' transform (:func:`drrfarm.sinks.parquet.delta_planes`, made on
        the GPU so the CPU only compresses), while ``out`` holds the images.
        """
        return self._launch(handle, cameras, physics, mode=1, spectra=spectrum, seeds=seeds, dtype=dtype,
                            to_host=to_host, out=out, host_out=host_out, stream=stream,
                            meshes=meshes_per_image(meshes, len(cameras)), scatter=scatter, host_layout=host_layout)

    def render(self, handle: CudaVolume, cameras: Sequence[Camera], spectrum: Spectrum | Sequence[Spectrum],
               physics: phys.Physics, seeds: Sequence[int],
               meshes: Sequence[Mesh] | Sequence[Sequence[Mesh]] | None = None) -> np.ndarray:
        """Output images (B, H, W) float32 (the :class:`~drrfarm.render.Backend` contract)."""
        if len(seeds) != len(cameras):
            raise PhysicsError(f"seeds: need one seed per camera ({len(cameras)}), got {len(seeds)}")
        spectra = spectrum if isinstance(spectrum, (list, tuple)) else [spectrum] * len(cameras)
        scatter = self.scatter_tallies(handle, cameras, spectra, physics, seeds)

        def run(idx: list[int], per: list[list[Any]] | None) -> np.ndarray:
            return self._grouped([cameras[i] for i in idx], lambda sub: self._render_copy(
                handle, [cameras[idx[i]] for i in sub], [spectra[idx[i]] for i in sub], physics,
                [seeds[idx[i]] for i in sub], meshes=[per[i] for i in sub] if per else None,
                scatter=None if scatter is None else scatter[[idx[i] for i in sub]]),
                lambda h, w: (h, w))

        return self._by_scene(cameras, meshes, run, lambda h, w: (h, w))

    def _render_copy(self, handle: CudaVolume, cameras: list[Camera], spectra: list[Any], physics: phys.Physics,
                     seeds: list[int], **kwargs: Any) -> np.ndarray:
        """One launch into a reused buffer pair of :attr:`_ring`, waited for and copied out: (B, H, W) float32."""
        shape = (len(cameras), int(cameras[0].height), int(cameras[0].width))
        slot = self._ring.acquire(shape, np.float32)
        try:
            out, host = slot.views(shape[0])
            self.render_async(handle, cameras, spectra, physics, seeds, out=out, host_out=host, **kwargs).wait()
            return np.array(host, copy=True)
        finally:
            self._ring.release(slot)

    def image_ring(self, slots: int) -> ImageRing:
        """A new :class:`ImageRing` of ``slots`` reusable buffer pairs on this backend's GPU (the caller closes it)."""
        return ImageRing(self.device_index, slots)

    def scatter_tallies(self, handle: CudaVolume, cameras: Sequence[Camera], spectra: Sequence[Any],
                        physics: phys.Physics, seeds: Sequence[int]) -> np.ndarray | None:
        """(B, 2, H_t, W_t) float32 scatter signal and counts of the CT (:mod:`drrfarm.scatter`, on this GPU)
        for ``physics.scatter`` = ``fast`` / ``monte_carlo``; None for ``none``. Adds to :attr:`scatter_seconds`."""
        if physics.scatter == "none":
            return None
        if self._scatter is None:
            self._scatter = ScatterEstimator("cuda", self.device_index)

        def volume() -> ScatterVolume:
            return ScatterVolume(handle.densities, handle.world_from_ijk, handle.material_names)

        out: np.ndarray | None = None  # one tally shape for the call: it follows the detector size and mode
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(spectra):
            groups.setdefault(id(s), []).append(i)
        for idx in groups.values():
            if isinstance(spectra[idx[0]], phys.DetectorTables):
                raise BackendError("scatter: needs a Spectrum (not precomputed detector tables) to build its tables")
            images = self._scatter.estimate(handle.key, volume, [cameras[i] for i in idx], spectra[idx[0]], physics,
                                            [seeds[i] for i in idx])
            if out is None:
                out = np.zeros((len(cameras), 2, *images[0].signal_tally.shape), dtype=np.float32)
            for i, s in zip(idx, images, strict=True):
                out[i, 0], out[i, 1] = s.signal_tally, s.counts_tally
        return out

    @property
    def scatter_seconds(self) -> float:
        """Time spent on scatter since construction."""
        return self._scatter.seconds if self._scatter is not None else 0.0

    def line_integrals(self, handle: CudaVolume, cameras: Sequence[Camera], physics: phys.Physics,
                       meshes: Sequence[Mesh] | Sequence[Sequence[Mesh]] | None = None) -> np.ndarray:
        """Per-material line integrals (B, M, H, W) float32 in g/cm² (with ``meshes``: the channels of
        :func:`drrfarm.render.output_material_names` over every mesh of the call; zero where an image
        lacks a material)."""
        per_all = meshes_per_image(meshes, len(cameras))
        names_all = output_material_names(handle.material_names, [m for ms in per_all for m in ms]) if per_all \
            else list(handle.material_names)

        def run(idx: list[int], per: list[list[Any]] | None) -> np.ndarray:
            names = output_material_names(handle.material_names, per[0]) if per else list(handle.material_names)
            part = self._grouped([cameras[i] for i in idx], lambda sub: self._launch(
                handle, [cameras[idx[i]] for i in sub], physics, mode=0,
                meshes=[per[i] for i in sub] if per else None).wait(), lambda h, w: (len(names), h, w))
            return part if names == names_all else widen_channels(part, names, names_all)

        return self._by_scene(cameras, meshes, run, lambda h, w: (len(names_all), h, w))

    def _by_scene(self, cameras: Sequence[Camera], meshes: Any, run: Any, tail: Any) -> np.ndarray:
        """``run(indices, meshes per image or None)`` for each group of images sharing a mesh scene."""
        per = meshes_per_image(meshes, len(cameras))
        if per is None:
            return run(list(range(len(cameras))), None)
        groups: dict[tuple, list[int]] = {}
        for i, ms in enumerate(per):
            groups.setdefault(scene_key(ms), []).append(i)
        if len(groups) == 1:
            return run(list(range(len(cameras))), per)
        H, W = int(cameras[0].height), int(cameras[0].width)
        result = np.empty((len(cameras), *tail(H, W)), dtype=np.float32)
        for idx in groups.values():
            result[idx] = run(idx, [per[i] for i in idx] if per[idx[0]] else None)
        return result

    def _grouped(self, cameras: Sequence[Camera], run: Any, tail: Any) -> np.ndarray:
        if not cameras:
            raise BackendError("cameras: need at least one camera")
        sizes = {(int(c.height), int(c.width)) for c in cameras}
        if len(sizes) > 1:
            raise BackendError(f"cameras: all images of one call must share a size, got {sorted(sizes)}")
        H, W = sizes.pop()
        per_launch = max(1, (64 << 20) // max(1, H * W))  # bound a launch's output to ~64 M pixels
        result = np.empty((len(cameras), *tail(H, W)), dtype=np.float32)
        for start in range(0, len(cameras), per_launch):
            idx = list(range(start, min(len(cameras), start + per_launch)))
            result[start : start + len(idx)] = run(idx)
        return result


# ------------------------------------------------------------------------------------ meshes

MESH_CAM_BYTES = MESH_CAM_STRIDE * 8  # mesh.cu camera record
MESH_SCENES_CACHED = 16


def scene_key(meshes: Sequence[Mesh]) -> tuple:
    """What makes two images' meshes one scene on the GPU: each mesh's geometry, material, density and
    mode, in order (poses may differ)."""
    return tuple((m.geometry_sha256, m.material, float(m.density_g_cm3), m.mode) for m in meshes)


@dataclass
class _MeshRun:
    """The meshes of one launch: tracer, uploaded scene, device pointers of the per-image records."""

    tracer: Any
    scene: Any
    cams_ptr: int
    poses_ptr: int
    overflow_ptr: int
    n_channels: int
    kmax: int
    replace: bool

    @property
    def pose_bytes(self) -> int:
        return self.scene.n_meshes * MESH_POSE_STRIDE * 8

    def bytes_per_pixel(self, n_ct_materials: int) -> int:
        """Scratch bytes per pixel: ray record, line integrals (CT and widened), chords, intervals."""
        return 48 + 4 * n_ct_materials + 4 * self.n_channels + 4 * self.scene.n_meshes + (16 * self.kmax + 4) * \
            int(self.replace)
