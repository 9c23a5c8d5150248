"""The few CUDA driver calls pycuda does not wrap: layered CUDA arrays and texture *objects*.

pycuda (2026.1) wraps only texture references, which device code built by CUDA 12+ can no longer
use, and it does not expose a pycuda ``Array``'s ``CUarray`` handle. So layered half-float arrays,
their uploads and the texture objects over them are made here with ``ctypes`` on ``libcuda.so.1``
(the driver every CUDA machine has). Every call runs in the caller's current context (the device's
primary context, pushed by :mod:`drrfarm.gpu.device`). Struct layouts follow ``cuda.h`` (checked
by ``tests/test_kernels_compile.py`` against the local header when nvcc is present).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

from drrfarm.errors import BackendError

# enums from cuda.h
CU_AD_FORMAT_HALF = 0x10
CUDA_ARRAY3D_LAYERED = 0x01
CU_MEMORYTYPE_HOST = 1
CU_MEMORYTYPE_DEVICE = 2
CU_MEMORYTYPE_ARRAY = 3
CU_RESOURCE_TYPE_ARRAY = 0
CU_TR_ADDRESS_MODE_CLAMP = 1
CU_TR_FILTER_MODE_POINT = 0
CU_TR_FILTER_MODE_LINEAR = 1

#: Layered 2D texture limits of every GPU since compute capability 5.0 (width, height, layers).
MAX_LAYERED_2D = (32768, 32768, 2048)


class CudaArray3DDescriptor(ctypes.Structure):
    """CUDA_ARRAY3D_DESCRIPTOR (v2)."""

    _fields_ = [
        ("Width", ctypes.c_size_t),
        ("Height", ctypes.c_size_t),
        ("Depth", ctypes.c_size_t),
        ("Format", ctypes.c_int),
        ("NumChannels", ctypes.c_uint),
        ("Flags", ctypes.c_uint),
    ]


class CudaMemcpy3D(ctypes.Structure):
    """CUDA_MEMCPY3D (v2)."""

    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t),
        ("srcY", ctypes.c_size_t),
        ("srcZ", ctypes.c_size_t),
        ("srcLOD", ctypes.c_size_t),
        ("srcMemoryType", ctypes.c_int),
        ("srcHost", ctypes.c_void_p),
        ("srcDevice", ctypes.c_uint64),
        ("srcArray", ctypes.c_void_p),
        ("reserved0", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("srcHeight", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t),
        ("dstY", ctypes.c_size_t),
        ("dstZ", ctypes.c_size_t),
        ("dstLOD", ctypes.c_size_t),
        ("dstMemoryType", ctypes.c_int),
        ("dstHost", ctypes.c_void_p),
        ("dstDevice", ctypes.c_uint64),
        ("dstArray", ctypes.c_void_p),
        ("reserved1", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t),
        ("dstHeight", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t),
        ("Height", ctypes.c_size_t),
        ("Depth", ctypes.c_size_t),
    ]


class _ResArray(ctypes.Structure):
    _fields_ = [("hArray", ctypes.c_void_p)]


class _ResUnion(ctypes.Union):
    _fields_ = [("array", _ResArray), ("reserved", ctypes.c_int * 32)]


class CudaResourceDesc(ctypes.Structure):
    """CUDA_RESOURCE_DESC (array resources only)."""

    _fields_ = [("resType", ctypes.c_int), ("res", _ResUnion), ("flags", ctypes.c_uint)]


class CudaTextureDesc(ctypes.Structure):
    """CUDA_TEXTURE_DESC."""

    _fields_ = [
        ("addressMode", ctypes.c_int * 3),
        ("filterMode", ctypes.c_int),
        ("flags", ctypes.c_uint),
        ("maxAnisotropy", ctypes.c_uint),
        ("mipmapFilterMode", ctypes.c_int),
        ("mipmapLevelBias", ctypes.c_float),
        ("minMipmapLevelClamp", ctypes.c_float),
        ("maxMipmapLevelClamp", ctypes.c_float),
        ("borderColor", ctypes.c_float * 4),
        ("reserved", ctypes.c_int * 12),
    ]


_LIB: Any = None


def libcuda() -> Any:
    """The driver library (loaded once)."""
    global _LIB
    if _LIB is None:
        names = ["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda") or ""]
        last: Exception | None = None
        for name in names:
            if not name:
                continue
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError as exc:
                last = exc
        else:
            raise BackendError(f"backend 'cuda': cannot load the CUDA driver library libcuda.so.1 ({last})")
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuArray3DCreate_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(CudaArray3DDescriptor)]
        lib.cuArrayDestroy.argtypes = [ctypes.c_void_p]
        lib.cuMemcpy3D_v2.argtypes = [ctypes.POINTER(CudaMemcpy3D)]
        lib.cuMemcpy3DAsync_v2.argtypes = [ctypes.POINTER(CudaMemcpy3D), ctypes.c_void_p]
        lib.cuTexObjectCreate.argtypes = [
            ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(CudaResourceDesc), ctypes.POINTER(CudaTextureDesc),
            ctypes.c_void_p,
        ]
        lib.cuTexObjectDestroy.argtypes = [ctypes.c_uint64]
        _LIB = lib
    return _LIB


def check(status: int, what: str) -> None:
    """Raise BackendError naming the call when a driver call failed."""
    if status != 0:
        msg = ctypes.c_char_p()
        try:
            libcuda().cuGetErrorString(status, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else "unknown error"
        except Exception:  # noqa: BLE001
            text = "unknown error"
        raise BackendError(f"backend 'cuda': {what} failed with CUDA error {status} ({text})")


def create_layered_array(width: int, height: int, layers: int, channels: int) -> int:
    """A layered 2D CUDA array of half-float texels with 1, 2 or 4 channels; returns the CUarray handle."""
    if channels not in (1, 2, 4):
        raise BackendError(f"backend 'cuda': a texture has 1, 2 or 4 channels, not {channels}")
    limits = MAX_LAYERED_2D
    if width > limits[0] or height > limits[1] or layers > limits[2]:
        raise BackendError(
            f"backend 'cuda': volume layout {width}x{height} with {layers} layers exceeds the layered-texture "
            f"limits {limits} (width, height, layers)"
        )
    desc = CudaArray3DDescriptor(width, height, layers, CU_AD_FORMAT_HALF, channels, CUDA_ARRAY3D_LAYERED)
    handle = ctypes.c_void_p()
    check(libcuda().cuArray3DCreate_v2(ctypes.byref(handle), ctypes.byref(desc)), "cuArray3DCreate")
    return int(handle.value or 0)


def destroy_array(handle: int) -> None:
    check(libcuda().cuArrayDestroy(ctypes.c_void_p(handle)), "cuArrayDestroy")


def copy_device_to_layers(src_ptr: int, array: int, width_bytes: int, height: int, layer0: int, n_layers: int,
                          stream: int | None = None) -> None:
    """Copy ``n_layers`` tightly packed layers (each ``height`` rows of ``width_bytes``) from device
    memory into ``array`` starting at layer ``layer0``."""
    c = CudaMemcpy3D()
    c.srcMemoryType = CU_MEMORYTYPE_DEVICE
    c.srcDevice = int(src_ptr)
    c.srcPitch = int(width_bytes)
    c.srcHeight = int(height)
    c.dstMemoryType = CU_MEMORYTYPE_ARRAY
    c.dstArray = ctypes.c_void_p(array)
    c.dstZ = int(layer0)
    c.WidthInBytes = int(width_bytes)
    c.Height = int(height)
    c.Depth = int(n_layers)
    if stream is None:
        check(libcuda().cuMemcpy3D_v2(ctypes.byref(c)), "cuMemcpy3D (device -> layered array)")
    else:
        check(libcuda().cuMemcpy3DAsync_v2(ctypes.byref(c), ctypes.c_void_p(stream)), "cuMemcpy3DAsync")


def create_texture_object(array: int, linear: bool) -> int:
    """Texture object over a CUDA array: unnormalised coordinates, clamp-to-edge on every axis,
    bilinear (``linear``) or point filtering, values returned as float. Returns the 64-bit handle."""
    res = CudaResourceDesc()
    res.resType = CU_RESOURCE_TYPE_ARRAY
    res.res.array.hArray = ctypes.c_void_p(array)
    tex = CudaTextureDesc()
    for i in range(3):
        tex.addressMode[i] = CU_TR_ADDRESS_MODE_CLAMP
    tex.filterMode = CU_TR_FILTER_MODE_LINEAR if linear else CU_TR_FILTER_MODE_POINT
    tex.flags = 0  # unnormalised coordinates, read as float
    out = ctypes.c_uint64()
    check(libcuda().cuTexObjectCreate(ctypes.byref(out), ctypes.byref(res), ctypes.byref(tex), None),
          "cuTexObjectCreate")
    return int(out.value)


def destroy_texture_object(handle: int) -> None:
    check(libcuda().cuTexObjectDestroy(ctypes.c_uint64(handle)), "cuTexObjectDestroy")


def struct_sizes() -> dict[str, int]:
    """sizeof of each mirrored struct (for the layout check against cuda.h)."""
    return {
        "CUDA_ARRAY3D_DESCRIPTOR": ctypes.sizeof(CudaArray3DDescriptor),
        "CUDA_MEMCPY3D": ctypes.sizeof(CudaMemcpy3D),
        "CUDA_RESOURCE_DESC": ctypes.sizeof(CudaResourceDesc),
        "CUDA_TEXTURE_DESC": ctypes.sizeof(CudaTextureDesc),
    }


def struct_offsets() -> dict[str, int]:
    """Offsets of the fields whose placement matters most (checked against cuda.h)."""
    return {
        "CUDA_MEMCPY3D.dstZ": CudaMemcpy3D.dstZ.offset,
        "CUDA_MEMCPY3D.dstArray": CudaMemcpy3D.dstArray.offset,
        "CUDA_MEMCPY3D.srcDevice": CudaMemcpy3D.srcDevice.offset,
        "CUDA_MEMCPY3D.WidthInBytes": CudaMemcpy3D.WidthInBytes.offset,
        "CUDA_RESOURCE_DESC.res": CudaResourceDesc.res.offset,
        "CUDA_RESOURCE_DESC.flags": CudaResourceDesc.flags.offset,
        "CUDA_TEXTURE_DESC.filterMode": CudaTextureDesc.filterMode.offset,
        "CUDA_TEXTURE_DESC.flags": CudaTextureDesc.flags.offset,
        "CUDA_TEXTURE_DESC.borderColor": CudaTextureDesc.borderColor.offset,
    }
