"""Per-image 2D label masks (and projected thickness) from a CT label map and from meshes.

From a label map (e.g. TotalSegmentator labels on the CT's grid), for each requested label ``L``
and camera, with the reference renderer's rays (:mod:`drrfarm.render.reference`):

* the **mask** is the footprint of the label's solid, defined as the region where the trilinearly
  interpolated indicator ``1[label == L]`` is at least ½ (the renderer's own interpolation, so the
  mask's edge sits on the voxelised surface, not half a voxel outside it): a pixel is set when its
  ray has a march sample with indicator ≥ ½;
* the **thickness** (mm) is the line integral of the interpolated indicator, ``Σ f(p_k) h_k``, at
  the reference's trilinear sample points — the projected thickness of the label.

Each label is marched on its own bounding box (plus one voxel of margin), so small structures
cost little. Meshes give exact masks (chord > 0) and thicknesses (the chord) via
:func:`mesh_label_images`.

Storage: :meth:`LabelImages.pack_bits` packs up to 16 masks per uint16 plane (bit ``i % 16`` of
plane ``i // 16`` is label ``i``), for PNG channels or Parquet columns; :func:`unpack_bits` inverts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from drrfarm.errors import VolumeError
from drrfarm.inputs import resolve_input
from drrfarm.render import reference
from drrfarm.render.mesh_reference import trace_meshes
from drrfarm.sinks.annotations import pack_mask_bits, unpack_mask_bits
from drrfarm.volume import Volume, load_volume

__all__ = ["LabelImages", "LabelProjector", "mesh_label_images", "unpack_bits"]

MASK_LEVEL = 0.5  # the label's surface: interpolated indicator = 1/2


@dataclass
class LabelImages:
    """Masks and (optionally) projected thicknesses of named labels for one image.

    names: L names. masks: (L, H, W) bool. thickness_mm: (L, H, W) float32 or None.
    """

    names: list[str]
    masks: np.ndarray
    thickness_mm: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks, dtype=bool)
        if self.masks.ndim != 3 or self.masks.shape[0] != len(self.names):
            raise ValueError(f"masks must be (L={len(self.names)}, H, W), got {self.masks.shape}")
        if self.thickness_mm is not None:
            self.thickness_mm = np.asarray(self.thickness_mm, dtype=np.float32)
            if self.thickness_mm.shape != self.masks.shape:
                raise ValueError(f"thickness_mm must be {self.masks.shape}, got {self.thickness_mm.shape}")

    def __getitem__(self, name: str) -> np.ndarray:
        return self.masks[self.names.index(name)]

    def concat(self, other: LabelImages) -> LabelImages:
        """These labels followed by ``other``'s (thickness kept only if both have it)."""
        th = None
        if self.thickness_mm is not None and other.thickness_mm is not None:
            th = np.concatenate([self.thickness_mm, other.thickness_mm])
        return LabelImages(self.names + other.names, np.concatenate([self.masks, other.masks]), th)

    def pack_bits(self) -> np.ndarray:
        """(ceil(L / 16), H, W) uint16: bit ``i % 16`` of plane ``i // 16`` is mask ``i``."""
        return pack_mask_bits(self.masks)

    def areas_px(self) -> dict[str, int]:
        """Mask area (pixels) per label name."""
        return {n: int(m.sum()) for n, m in zip(self.names, self.masks, strict=True)}


def unpack_bits(planes: np.ndarray, n_labels: int) -> np.ndarray:
    """Inverse of :meth:`LabelImages.pack_bits`: (P, H, W) uint16 -> (n_labels, H, W) bool."""
    return unpack_mask_bits(planes, n_labels)


@dataclass(frozen=True)
class _Crop:
    name: str
    value: int
    packed: reference.PackedVolume
    world_from_ijk: np.ndarray


def _label_array(label_map: Any, patient_from_ijk: Any) -> tuple[np.ndarray, np.ndarray, str]:
    """(labels (I,J,K) int64, patient_from_ijk (4,4), where) from an array, a Volume or a path."""
    where = "<array>"
    if isinstance(label_map, (str, bytes)) or hasattr(label_map, "__fspath__"):
        where = str(label_map)
        label_map = load_volume(resolve_input(label_map))
    if isinstance(label_map, Volume):
        where = label_map.source
        affine = label_map.patient_from_ijk if patient_from_ijk is None else patient_from_ijk
        arr = np.rint(np.asarray(label_map.hu, dtype=np.float64))
    else:
        if patient_from_ijk is None:
            raise VolumeError("label map: an array needs patient_from_ijk (4x4)")
        affine = patient_from_ijk
        arr = np.asarray(label_map)
        if arr.dtype.kind == "f":
            arr = np.rint(arr)
    affine = np.asarray(affine, dtype=np.float64)
    if arr.ndim != 3 or affine.shape != (4, 4):
        raise VolumeError(f"{where}: label map must be (I, J, K) with a 4x4 affine, got {arr.shape}, {affine.shape}")
    return arr.astype(np.int64), affine, where


class LabelProjector:
    """A label map placed in the world, ready to project label masks for any camera.

    label_map: (I, J, K) integer array (with ``patient_from_ijk``), a :class:`drrfarm.volume.Volume`
    (values rounded), or a path loadable by :func:`drrfarm.volume.load_volume`.
    world_from_patient: (4, 4), as given to the renderer's ``prepare``.
    labels: label values to project (list), or ``{value: name}``; None = every non-zero value present.
    Names default to ``label_<value>``.
    """

    def __init__(self, label_map: Any, world_from_patient: Any, labels: Sequence[int] | Mapping[int, str] | None = None,
                 patient_from_ijk: Any = None) -> None:
        arr, affine, where = _label_array(label_map, patient_from_ijk)
        self.source = where
        W = np.asarray(world_from_patient, dtype=np.float64)
        if W.shape != (4, 4):
            raise VolumeError(f"{where}: world_from_patient must be 4x4, got {W.shape}")
        world_from_ijk = W @ affine
        self.spacing_mm = tuple(float(s) for s in np.linalg.norm(world_from_ijk[:3, :3], axis=0))
        present = np.unique(arr)
        if labels is None:
            table = {int(v): f"label_{int(v)}" for v in present if v != 0}
        elif isinstance(labels, Mapping):
            table = {int(k): str(v) for k, v in labels.items()}
        else:
            table = {int(v): f"label_{int(v)}" for v in labels}
        self.crops: list[_Crop] = []
        self.missing: list[str] = []
        for value, name in table.items():
            idx = np.argwhere(arr == value)
            if idx.size == 0:
                self.missing.append(name)  # absent from this scan: an empty mask
                self.crops.append(_Crop(name, value, None, world_from_ijk))  # type: ignore[arg-type]
                continue
            lo = np.maximum(idx.min(axis=0) - 1, 0)
            hi = np.minimum(idx.max(axis=0) + 2, arr.shape)
            sub = (arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == value).astype(np.float32)
            shift = np.eye(4)
            shift[:3, 3] = lo
            self.crops.append(_Crop(name, value, reference.pack_volume(sub[None]), world_from_ijk @ shift))

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.crops]

    def project(self, camera: Any, thickness: bool = False, step_voxels: float = 0.5) -> LabelImages:
        """Masks (and thickness in mm if asked) of every label for one camera."""
        H, W = int(camera.height), int(camera.width)
        dirs_world = camera.ray_directions_world().reshape(-1, 3)
        t_det = np.asarray(camera.detector_distance_along_ray(dirs_world), dtype=np.float64).reshape(-1)
        masks = np.zeros((len(self.crops), H * W), dtype=bool)
        thick = np.zeros((len(self.crops), H * W), dtype=np.float32) if thickness else None
        h0 = step_voxels * float(min(self.spacing_mm))
        for i, crop in enumerate(self.crops):
            if crop.packed is None:
                continue
            mx, sm = _march_max_sum(crop.packed, crop.world_from_ijk, camera, dirs_world, t_det, h0)
            masks[i] = mx >= MASK_LEVEL
            if thick is not None:
                thick[i] = sm
        return LabelImages(self.names, masks.reshape(-1, H, W),
                           None if thick is None else thick.reshape(-1, H, W))


def _march_max_sum(volume: reference.PackedVolume, world_from_ijk: np.ndarray, camera: Any, dirs_world: np.ndarray,
                   t_det: np.ndarray, h0_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Max and ``Σ f h`` (mm) of a one-channel volume along each ray (the reference's trilinear midpoints)."""
    import torch

    M_inv = reference.ijk_from_world(world_from_ijk)
    A = M_inv[:3, :3]
    src = A @ camera.source_world_mm + M_inv[:3, 3]
    dirs = dirs_world @ A.T
    reference.check_source_outside(camera, M_inv, volume.shape)
    t0, t1 = reference.clip_rays_to_box(src, dirs, volume.shape, t_det)
    R = len(dirs)
    mx = np.zeros(R, dtype=np.float64)
    sm = np.zeros(R, dtype=np.float64)
    for rays, values, h in reference.trilinear_samples(volume, src, dirs, t0, t1, h0_mm):
        vals = values[0]  # (r, S)
        mx[rays] = vals.amax(dim=1).to(torch.float64).numpy()
        sm[rays] = vals.sum(dim=1, dtype=torch.float64).numpy() * h
    return mx, sm


def mesh_label_images(meshes: Sequence[Any], camera: Any, thickness: bool = True, mesh_pass: Any = None
                      ) -> LabelImages:
    """Exact masks (chord > 0) and thicknesses (chord, mm) of meshes for one camera, named by ``mesh.name``.

    ``mesh_pass``: a :class:`drrfarm.render.mesh_reference.MeshPass` of the same camera to reuse.
    """
    mp = mesh_pass if mesh_pass is not None else trace_meshes(meshes, camera)
    chords = mp.chords_mm
    names = [m.name for m in mp.meshes]
    return LabelImages(names, chords > 0.0, chords.astype(np.float32) if thickness else None)
