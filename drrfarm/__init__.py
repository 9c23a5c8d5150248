"""drrfarm: physically realistic DRR datasets from CT scans, rendered on a Ray farm."""

from __future__ import annotations

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

__all__ = [
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
