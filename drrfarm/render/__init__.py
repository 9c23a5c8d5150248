"""Render backends: ``prepare`` a volume once, then ``render`` batches of cameras.

A backend owns a resident copy of each prepared volume (cached by content) and turns cameras, a
spectrum and :class:`drrfarm.physics.Physics` into images. ``cpu`` is the reference
(:mod:`drrfarm.render.reference`, the executable spec); ``cuda`` is its fast twin.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from drrfarm.errors import BackendError


class Backend(Protocol):
    """What the farm and the CLI need from a renderer."""

    name: str

    def prepare(self, material_volume: Any, world_from_patient: np.ndarray) -> Any:
        """Make ``material_volume`` resident (cached by content) and return a handle."""

    def line_integrals(self, handle: Any, cameras: list[Any], physics: Any) -> np.ndarray:
        """Per-material line integrals: (B, M, H, W) float32 g/cm²."""

    def render(self, handle: Any, cameras: list[Any], spectrum: Any, physics: Any, seeds: list[int]) -> np.ndarray:
        """Output images: (B, H, W) float32."""

    def cache_stats(self) -> dict[str, int]:
        """Volume cache statistics: hits, misses, volumes, bytes_resident."""


def cuda_available() -> bool:
    """True when pycuda imports and sees at least one GPU."""
    try:
        import pycuda.driver as drv

        drv.init()
        return drv.Device.count() > 0
    except Exception:
        return False


def get_backend(name: str = "auto", **options: Any) -> Backend:
    """Return a backend by name: ``cpu``, ``cuda``, or ``auto`` (CUDA when a GPU is present)."""
    if name == "auto":
        name = "cuda" if cuda_available() else "cpu"
    if name == "cpu":
        from drrfarm.render.cpu import CpuBackend

        return CpuBackend(**options)
    if name == "cuda":
        try:
            from drrfarm.render.cuda import CudaBackend
        except ImportError as exc:
            raise BackendError(
                f"backend: 'cuda' needs pycuda and an NVIDIA GPU (pip install 'drrfarm[cuda]'): {exc}"
            ) from exc
        return CudaBackend(**options)
    raise BackendError(f"backend: unknown backend {name!r}; choose 'auto', 'cpu' or 'cuda'")
