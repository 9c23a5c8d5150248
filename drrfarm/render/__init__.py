"""Render backends: ``prepare`` a volume once, then ``render`` batches of cameras.

A backend owns a resident copy of each prepared volume (cached by content) and turns cameras, a
spectrum and :class:`drrfarm.physics.Physics` into images. ``cpu`` is the reference
(:mod:`drrfarm.render.reference`, the executable spec); ``cuda`` is its fast twin.

Meshes (:class:`drrfarm.meshes.Mesh`: tools, implants) enter ``render`` and ``line_integrals`` in
the same pass as the CT: ``meshes`` is one list for every image, or one list per camera (poses may
differ per image). Additive meshes add ``density × chord / 10`` (g/cm²) to their material's channel;
replacing meshes also remove the CT's samples inside them (:mod:`drrfarm.render.mesh_reference`).
Line-integral channels are then :func:`output_material_names` of every mesh of the call: the CT's
materials, followed by the mesh materials the CT lacks (zero in images without them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from drrfarm.errors import BackendError
from drrfarm.render.cpu import CpuBackend
from drrfarm.render.mesh_reference import meshes_per_image, output_material_names

if TYPE_CHECKING:
    from drrfarm.geometry import Camera
    from drrfarm.meshes import Mesh
    from drrfarm.physics import Physics
    from drrfarm.spectrum import Spectrum
    from drrfarm.volume import MaterialVolume

__all__ = ["Backend", "cuda_available", "get_backend", "meshes_per_image", "output_material_names"]

#: Backend names :func:`get_backend` takes (``auto``: CUDA when a GPU is present, else the CPU).
BACKENDS = ("auto", "cpu", "cuda")


class Backend(Protocol):
    """What the farm and the CLI need from a renderer."""

    name: str

    def prepare(self, material_volume: MaterialVolume, world_from_patient: np.ndarray) -> Any:
        """Make ``material_volume`` resident (cached by content) and return a handle."""

    def line_integrals(self, handle: Any, cameras: Sequence[Camera], physics: Physics,
                       meshes: Sequence[Mesh] | Sequence[Sequence[Mesh]] | None = None) -> np.ndarray:
        """Per-material line integrals: (B, M, H, W) float32 g/cm² (M: :func:`output_material_names`)."""

    def render(self, handle: Any, cameras: Sequence[Camera], spectrum: Spectrum, physics: Physics,
               seeds: Sequence[int], meshes: Sequence[Mesh] | Sequence[Sequence[Mesh]] | None = None) -> np.ndarray:
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
        return CpuBackend(**options)
    if name == "cuda":
        try:  # imports pycuda
            from drrfarm.render.cuda import CudaBackend
        except ImportError as exc:
            raise BackendError(
                f"backend: 'cuda' needs pycuda and an NVIDIA GPU (pip install 'drrfarm[cuda]'): {exc}"
            ) from exc
        return CudaBackend(**options)
    raise BackendError(f"backend: unknown backend {name!r}; choose 'auto', 'cpu' or 'cuda'")
