"""The CPU backend: the reference renderer behind the :class:`~drrfarm.render.Backend` protocol."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from drrfarm import physics as phys
from drrfarm.render import mesh_reference, reference
from drrfarm.render.mesh_reference import meshes_per_image
from drrfarm.scatter import ScatterEstimator, ScatterImage, ScatterVolume

if TYPE_CHECKING:
    from drrfarm.geometry import Camera
    from drrfarm.meshes import Mesh
    from drrfarm.spectrum import Spectrum
    from drrfarm.volume import MaterialVolume


@dataclass
class CpuVolume:
    """A prepared volume: packed material densities and the volume's placement."""

    key: str
    densities: reference.PackedVolume
    world_from_ijk: np.ndarray
    spacing_mm: tuple[float, float, float]
    material_names: list[str]

    @property
    def nbytes(self) -> int:
        return self.densities.nbytes


def volume_key(material_volume: MaterialVolume, world_from_patient: np.ndarray) -> str:
    """Content key of a prepared volume: voxels' hash, materials and placement."""
    h = hashlib.sha256()
    h.update(str(material_volume.volume_sha256).encode())
    h.update("|".join(material_volume.material_names).encode())
    h.update(np.ascontiguousarray(material_volume.patient_from_ijk, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(world_from_patient, dtype=np.float64).tobytes())
    h.update(str(material_volume.densities_g_cm3.shape).encode())
    return h.hexdigest()


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (mm) along each index axis of a 4x4 affine."""
    s = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return float(s[0]), float(s[1]), float(s[2])


class CpuBackend:
    """Reference renderer on the CPU (torch), with an LRU volume cache bounded in bytes."""

    name = "cpu"

    def __init__(self, memory_budget_bytes: int = 8 << 30, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        self.memory_budget_bytes = int(memory_budget_bytes)
        self._cache: OrderedDict[str, CpuVolume] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._scatter: ScatterEstimator | None = None  # made on first use

    def prepare(self, material_volume: MaterialVolume, world_from_patient: np.ndarray | None = None) -> CpuVolume:
        world_from_patient = np.eye(4) if world_from_patient is None else np.asarray(world_from_patient, float)
        key = volume_key(material_volume, world_from_patient)
        if key in self._cache:
            self._hits += 1
            self._cache.move_to_end(key)
            return self._cache[key]
        self._misses += 1
        world_from_ijk = world_from_patient @ np.asarray(material_volume.patient_from_ijk, dtype=np.float64)
        densities = reference.pack_volume(material_volume.densities_g_cm3)
        handle = CpuVolume(key, densities, world_from_ijk, spacing_of(world_from_ijk),
                           list(material_volume.material_names))
        self._cache[key] = handle
        while len(self._cache) > 1 and sum(v.nbytes for v in self._cache.values()) > self.memory_budget_bytes:
            self._cache.popitem(last=False)
        return handle

    def line_integrals(self, handle: CpuVolume, cameras: Sequence[Camera], physics: phys.Physics,
                       meshes: Sequence[Mesh] | Sequence[Sequence[Mesh]] | None = None) -> np.ndarray:
        """(B, M, H, W) float32 g/cm²; with ``meshes`` the channels are
        :func:`drrfarm.render.output_material_names` (:mod:`drrfarm.render.mesh_reference`)."""
        if meshes_per_image(meshes, len(cameras)) is not None:
            return mesh_reference.cpu_line_integrals(handle, cameras, physics, meshes)[1]
        return np.stack([
            reference.line_integrals(handle.densities, handle.world_from_ijk, handle.spacing_mm, cam,
                                     method=physics.method, step_voxels=physics.step_voxels)
            for cam in cameras
        ]).astype(np.float32)

    def render(self, handle: CpuVolume, cameras: Sequence[Camera], spectrum: Spectrum, physics: phys.Physics,
               seeds: Sequence[int], meshes: Sequence[Mesh] | Sequence[Sequence[Mesh]] | None = None) -> np.ndarray:
        """(B, H, W) float32 images; ``meshes`` (one list, or one list per camera) render in the same pass;
        ``physics.scatter`` adds the CT's scatter (:mod:`drrfarm.scatter`) before the noise."""
        with_meshes = meshes_per_image(meshes, len(cameras)) is not None
        if physics.scatter == "none" and with_meshes:
            return mesh_reference.cpu_render(handle, cameras, spectrum, physics, seeds, meshes)
        if len(seeds) != len(cameras):
            raise phys.PhysicsError(f"seeds: need one seed per camera ({len(cameras)}), got {len(seeds)}")
        scatter = self.scatter(handle, cameras, spectrum, physics, seeds)
        names, A_all = (mesh_reference.cpu_line_integrals(handle, cameras, physics, meshes) if with_meshes
                        else (handle.material_names, None))
        tables = phys.detector_tables(spectrum, names, physics)
        images = []
        for b, (cam, seed) in enumerate(zip(cameras, seeds, strict=True)):
            A = A_all[b] if A_all is not None else reference.line_integrals(
                handle.densities, handle.world_from_ijk, handle.spacing_mm, cam, method=physics.method,
                step_voxels=physics.step_voxels)
            images.append(phys.finish_image(A, tables, physics, cam, seed, scatter[b] if scatter else None))
        return np.stack(images)

    def scatter(self, handle: CpuVolume, cameras: Sequence[Camera], spectrum: Spectrum, physics: phys.Physics,
                seeds: Sequence[int]) -> list[ScatterImage] | None:
        """The CT's scatter images (:class:`drrfarm.scatter.ScatterImage`), or None for ``scatter: none``.
        Their cost adds to :attr:`scatter_seconds`."""
        if physics.scatter == "none":
            return None
        if self._scatter is None:
            self._scatter = ScatterEstimator("cpu")

        def volume() -> ScatterVolume:  # a (M, I, J, K) view of the packed grid, no copy
            dens = handle.densities.tensor[0, :, 1:-1, 1:-1, 1:-1].numpy().transpose(0, 3, 2, 1)
            return ScatterVolume(dens, handle.world_from_ijk, handle.material_names)

        return self._scatter.estimate(handle.key, volume, cameras, spectrum, physics, seeds)

    @property
    def scatter_seconds(self) -> float:
        """Time spent on scatter since construction."""
        return self._scatter.seconds if self._scatter is not None else 0.0

    def cache_stats(self) -> dict[str, int]:
        return {
            "hits": self._hits,
            "misses": self._misses,
            "volumes": len(self._cache),
            "bytes_resident": sum(v.nbytes for v in self._cache.values()),
        }
