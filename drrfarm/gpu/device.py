"""One GPU through pycuda: its primary context, loaded kernel modules, streams, events and host buffers.

Context: the device's *primary* context (``retain_primary_context``), pushed around every call and
popped after, so PyTorch (which uses the same primary context) and drrfarm share a process in any
import order. Kernels come from :mod:`drrfarm.gpu.build` (disk cache, prebuilt fat binary, nvcc or
NVRTC). The renderer (:mod:`drrfarm.render.cuda`), the mesh tracer and the scatter Monte Carlo all
take their GPU from :meth:`GpuDevice.get`, so they share one context per device.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pycuda.driver as drv

from drrfarm.errors import BackendError
from drrfarm.gpu.build import load_kernel_image


class GpuDevice:
    """One GPU: its retained primary context and the loaded kernel modules."""

    _registry: dict[int, GpuDevice] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def get(cls, index: int) -> GpuDevice:
        with cls._registry_lock:
            gpu = cls._registry.get(index)
            if gpu is None:
                gpu = cls._registry[index] = cls(index)
            return gpu

    def __init__(self, index: int) -> None:
        drv.init()
        count = drv.Device.count()
        if not 0 <= index < count:
            raise BackendError(f"device: GPU index {index} out of range (this machine has {count} CUDA device(s))")
        self.index = index
        self.device = drv.Device(index)
        self.name = self.device.name()
        major, minor = self.device.compute_capability()
        self.arch = f"sm_{major}{minor}"
        self.primary = self.device.retain_primary_context()
        self.lock = threading.RLock()
        self._modules: dict[tuple, tuple[Any, str]] = {}

    @contextmanager
    def context(self) -> Iterator[GpuDevice]:
        self.primary.push()
        try:
            yield self
        finally:
            drv.Context.pop()

    def module(self, kernel: str | Path, defines: dict[str, int] | None = None) -> tuple[Any, str]:
        """The loaded module of ``kernel`` (a name of :data:`drrfarm.gpu.build.KERNELS`) built with
        ``defines``, loaded once per device: ``(module, how it was built)``."""
        key = (str(kernel), *sorted((defines or {}).items()))
        if key not in self._modules:
            image, how = load_kernel_image(kernel, self.arch, dict(defines or {}))
            with self.context():
                self._modules[key] = (drv.module_from_buffer(image), how)
        return self._modules[key]

    def new_stream(self) -> Any:
        """A new CUDA stream in this GPU's context."""
        with self.context():
            return drv.Stream()


def free_in_context(device_index: int, allocation: Any) -> None:
    """Free a pycuda device or page-locked host allocation with the GPU's primary context current.

    pycuda frees an allocation dropped on another thread only if its context is current there, else it
    leaks it (``... in out-of-thread context could not be cleaned up``); render results are released on
    writer threads, so every buffer drrfarm allocates is freed through here."""
    gpu = GpuDevice.get(device_index)
    with gpu.context():
        allocation.free()


def blocking_event() -> Any:
    """A CUDA event whose ``synchronize`` sleeps: with one context on a many-core host CUDA's default is to
    spin, and every thread waiting for a render would burn a core the encoders need."""
    return drv.Event(drv.event_flags.BLOCKING_SYNC)


def pagelocked(shape: tuple[int, ...], dtype: Any, device_index: int) -> np.ndarray:
    """A page-locked host array whose memory is freed in the GPU's context when the array is dropped."""
    gpu = GpuDevice.get(device_index)
    with gpu.context():
        arr = drv.pagelocked_empty(tuple(int(s) for s in shape), np.dtype(dtype))
    weakref.finalize(arr, free_in_context, device_index, arr.base)
    return arr


class StagingBuffers:
    """Reusable pinned-host + device buffers for per-launch parameters (reused once their event passed).

    A slot is ``[nbytes, host, device, event]``: fill ``host``, copy it to ``device`` on a stream and set
    ``event`` (recorded after the work that reads it); the slot is free again once the event passed.
    Call in the GPU's context."""

    def __init__(self) -> None:
        self._slots: list[list[Any]] = []  # [nbytes, host, dev, event]

    def acquire(self, nbytes: int) -> list[Any]:
        for slot in self._slots:
            if slot[0] >= nbytes and (slot[3] is None or slot[3].query()):
                slot[3] = None
                return slot
        size = max(4096, 1 << (int(nbytes) - 1).bit_length())
        slot = [size, drv.pagelocked_empty(size, np.uint8), drv.mem_alloc(size), None]
        self._slots.append(slot)
        return slot
