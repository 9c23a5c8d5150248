"""drrfarm: physically realistic DRR datasets from CT scans, rendered on a Ray farm.

From Python (units: mm, degrees, keV; images are float32 (H, W) or (B, H, W) arrays)::

    import drrfarm

    ct = drrfarm.load_ct("sample:chest_ct")                      # or a NIfTI/NRRD/DICOM path, URL, array + affine
    drr = drrfarm.Renderer(ct, spectrum="90KV_AL40", physics=drrfarm.Physics(photons=10_000))
    image = drr.render(drrfarm.CArm(height=256, width=256, pixel_mm=1.164).camera(alpha_deg=30), seed=1)

The public names below are the objects the CLI and the farm use, imported on first access (so
``import drrfarm`` stays light): :func:`load_ct`, :class:`Volume`, :func:`segment_by_thresholds`,
:func:`segment_by_labels`, :class:`MaterialVolume`, :class:`CArm`, :class:`Camera`,
:func:`get_spectrum`, :class:`Spectrum`, :class:`Physics`, :class:`Renderer`, :func:`tool_mesh`,
:func:`load_mesh` and :class:`Mesh`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from drrfarm.errors import (
    BackendError,
    DrrfarmError,
    GeometryError,
    LandmarkError,
    MaterialError,
    MeshError,
    PhysicsError,
    SampleDataError,
    SpecError,
    SpectrumError,
    StorageError,
    TrackingError,
    VolumeError,
)

__version__ = "0.1.0"

#: Public name -> the module that owns it (imported on first access).
_LAZY = {
    "load_ct": "drrfarm.api",
    "Renderer": "drrfarm.api",
    "tool_mesh": "drrfarm.api",
    "Volume": "drrfarm.volume",
    "MaterialVolume": "drrfarm.volume",
    "segment_by_thresholds": "drrfarm.volume",
    "segment_by_labels": "drrfarm.volume",
    "CArm": "drrfarm.geometry",
    "Camera": "drrfarm.geometry",
    "Spectrum": "drrfarm.spectrum",
    "get_spectrum": "drrfarm.spectrum",
    "Physics": "drrfarm.physics",
    "Mesh": "drrfarm.meshes",
    "load_mesh": "drrfarm.meshes",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'drrfarm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover
    from drrfarm.api import Renderer, load_ct, tool_mesh
    from drrfarm.geometry import Camera, CArm
    from drrfarm.meshes import Mesh, load_mesh
    from drrfarm.physics import Physics
    from drrfarm.spectrum import Spectrum, get_spectrum
    from drrfarm.volume import MaterialVolume, Volume, segment_by_labels, segment_by_thresholds

__all__ = [
    "CArm",
    "Camera",
    "MaterialVolume",
    "Mesh",
    "Physics",
    "Renderer",
    "Spectrum",
    "Volume",
    "get_spectrum",
    "load_ct",
    "load_mesh",
    "segment_by_labels",
    "segment_by_thresholds",
    "tool_mesh",
    "BackendError",
    "DrrfarmError",
    "GeometryError",
    "LandmarkError",
    "MaterialError",
    "MeshError",
    "PhysicsError",
    "SampleDataError",
    "SpecError",
    "SpectrumError",
    "StorageError",
    "TrackingError",
    "VolumeError",
    "__version__",
]
