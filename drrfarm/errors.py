"""One exception type per kind of failure, all under :class:`DrrfarmError`.

Raise where the bad input is first seen; the message names the file, field or parameter.
"""

from __future__ import annotations


class DrrfarmError(Exception):
    """Base class of every error drrfarm raises on purpose."""


class VolumeError(DrrfarmError):
    """A CT volume (file, array or affine) cannot be read or is invalid."""


class MaterialError(DrrfarmError):
    """Unknown material, bad composition or bad label table."""


class SpectrumError(DrrfarmError):
    """An X-ray spectrum cannot be built (kVp out of range, bad filtration, bad bins)."""


class GeometryError(DrrfarmError):
    """Impossible camera/C-arm geometry (non-positive distances, singular matrices, source in volume)."""


class PhysicsError(DrrfarmError):
    """Invalid detector, noise or output options."""


class BackendError(DrrfarmError):
    """A render backend is unavailable or failed (e.g. no GPU for backend='cuda')."""


class SampleDataError(DrrfarmError):
    """The sample CT cannot be fetched or fails its checksum."""


class MeshError(DrrfarmError):
    """A mesh (tool/implant) cannot be read, is not watertight, or has a bad material or pose."""


class LandmarkError(DrrfarmError):
    """A landmark file or point list cannot be read; the message names the file or field."""


class SpecError(DrrfarmError):
    """A sweep spec is invalid; the message names the file, the key path and the reason."""


class StorageError(DrrfarmError):
    """An output URL cannot be written/read, or a shard/manifest is corrupt."""


class TrackingError(DrrfarmError):
    """Provenance tracking could not be set up (never raised for transient outages)."""
