"""CT volumes in Hounsfield units, HU -> density, and material segmentation.

Conventions (see the team contracts):

* Patient frame is RAS mm (nibabel's). DICOM and LPS NRRD are converted on load by negating the x and
  y rows of the affine.
* Arrays are indexed ``[i, j, k]``; ``patient_from_ijk`` (4x4) maps a voxel index (voxel centres at
  integer indices) to RAS mm: ``p = patient_from_ijk @ (i, j, k, 1)``.
* ``hu`` is float32; padding values below -1024 HU (e.g. -2048 outside the scan circle) are mapped to
  -1024 HU (air).

Axis order of a DICOM series: ``i`` = column index within a slice (moves along the first direction
cosine of ImageOrientationPatient), ``j`` = row index (second direction cosine), ``k`` = slice index,
slices sorted by ImagePositionPatient projected on the slice normal (row cosine x column cosine),
ascending. The third affine column is the mean step between consecutive slice positions (so gantry
tilt, i.e. positions not along the normal, is represented exactly by a sheared affine).

Inputs are never written to; remote inputs (any fsspec URL: ``s3://``, ``file://``, ``memory://``, ...)
are read into memory and parsed from bytes.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from drrfarm.errors import MaterialError, VolumeError
from drrfarm.inputs import resolve_input

log = logging.getLogger(__name__)

__all__ = [
    "AIR_HU",
    "DensityModel",
    "MaterialVolume",
    "Volume",
    "hu_from_density_g_cm3",
    "hu_to_density_g_cm3",
    "load_volume",
    "read_label_table",
    "segment_by_labels",
    "segment_by_thresholds",
    "validate_material_names",
    "volume_from_array",
]

AIR_HU = -1024.0
"""Lowest HU kept; anything below (scanner padding) is mapped to this value."""

DensityModel = Callable[[np.ndarray], np.ndarray]
"""Maps an HU array to a density array (g/cm3) of the same shape."""

PathLike: TypeAlias = "str | Path"

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_NRRD_SUFFIXES = (".nrrd", ".nhdr")


# --------------------------------------------------------------------------------------------- helpers
def _check_affine(affine: Any, where: str) -> np.ndarray:
    """Return ``affine`` as a (4,4) float64 array or raise VolumeError naming ``where``."""
    try:
        a = np.array(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{where}: affine is not numeric: {exc}") from exc
    if a.shape != (4, 4):
        raise VolumeError(f"{where}: affine must be 4x4, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise VolumeError(f"{where}: affine has non-finite entries")
    if not np.allclose(a[3], (0.0, 0.0, 0.0, 1.0), atol=1e-9):
        raise VolumeError(f"{where}: affine last row must be (0, 0, 0, 1), got {a[3].tolist()}")
    m = a[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    det = float(np.linalg.det(m))
    if np.any(norms <= 0) or abs(det) <= 1e-6 * float(np.prod(norms)):
        raise VolumeError(
            f"{where}: affine is singular (voxel axes have zero length or are collinear); "
            f"column lengths {norms.tolist()}, det {det:g}"
        )
    return a


def _hash_array(arr: np.ndarray, affine: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    h.update(np.ascontiguousarray(affine, dtype=np.float64).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- Volume
@dataclass(eq=False, repr=False)
class Volume:
    """A CT volume in Hounsfield units on a voxel grid placed in the RAS patient frame.

    hu: (I, J, K) float32 HU; values below -1024 are replaced by -1024 (air) at construction
        (the caller's array is copied when that happens, never modified).
    patient_from_ijk: (4, 4) float64, voxel index -> RAS mm (voxel centres at integer indices).
    source: path/URI it came from, or "<array>".
    sha256: of the input file bytes (NIfTI/NRRD), of the sorted slice files (DICOM), or, when empty at
        construction, of the array (dtype, shape, float32 bytes and the affine).
    """

    hu: np.ndarray
    patient_from_ijk: np.ndarray
    source: str = "<array>"
    sha256: str = ""

    def __post_init__(self) -> None:
        where = self.source
        try:
            hu = np.ascontiguousarray(self.hu, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise VolumeError(f"{where}: voxel data is not numeric: {exc}") from exc
        if hu.ndim != 3:
            raise VolumeError(f"{where}: volume must be 3-D, got shape {hu.shape}")
        if min(hu.shape) == 0:
            raise VolumeError(f"{where}: volume is empty, shape {hu.shape}")
        # float64 accumulation cannot overflow for float32 inputs, so this is all-finite iff finite
        if not np.isfinite(hu.sum(dtype=np.float64)):
            bad = int(np.count_nonzero(~np.isfinite(hu)))
            raise VolumeError(f"{where}: volume has {bad} non-finite voxel(s) (NaN/inf)")
        if float(hu.min()) < AIR_HU:
            hu = np.maximum(hu, np.float32(AIR_HU))
        self.hu = hu
        self.patient_from_ijk = _check_affine(self.patient_from_ijk, where)
        if not self.sha256:
            self.sha256 = _hash_array(self.hu, self.patient_from_ijk)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing_mm)
        return f"Volume(source={self.source!r}, shape={self.shape}, spacing_mm=({sp}), sha256={self.sha256[:12]}…)"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(I, J, K)."""
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along i, j, k in mm (lengths of the affine's first three columns)."""
        n = np.linalg.norm(self.patient_from_ijk[:3, :3], axis=0)
        return (float(n[0]), float(n[1]), float(n[2]))

    def patient_mm_from_ijk(self, ijk: np.ndarray) -> np.ndarray:
        """Map voxel indices (N, 3) (fractional allowed) to RAS mm (N, 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.patient_from_ijk[:3, :3].T + self.patient_from_ijk[:3, 3]

    def ijk_from_patient_mm(self, points_mm: np.ndarray) -> np.ndarray:
        """Map RAS mm (N, 3) to fractional voxel indices (N, 3)."""
        inv = np.linalg.inv(self.patient_from_ijk)
        p = np.asarray(points_mm, dtype=np.float64)
        return p @ inv[:3, :3].T + inv[:3, 3]

    def centre_patient_mm(self) -> np.ndarray:
        """(3,) RAS mm of the centre of the voxel-index box, index ((I-1)/2, (J-1)/2, (K-1)/2)."""
        c = (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        return self.patient_mm_from_ijk(c[None])[0]


def volume_from_array(hu: np.ndarray, patient_from_ijk: np.ndarray, name: str = "<array>") -> Volume:
    """Wrap an (I, J, K) HU array and its (4, 4) RAS affine as a validated :class:`Volume`.

    The array is converted to float32 (no copy if it already is, unless padding must be clamped).
    sha256 covers dtype, shape, the float32 voxel bytes and the affine.
    """
    return Volume(hu=hu, patient_from_ijk=patient_from_ijk, source=str(name))


# ------------------------------------------------------------------------------------ density models
def hu_to_density_g_cm3(hu: np.ndarray) -> np.ndarray:
    """DeepDRR's two-segment fit: rho = max(0, min(1.03 + 0.001029 HU, 1.03 + 0.0005886 HU)) g/cm3.

    Returns float32 of the input's shape. -1000 HU -> 0.001, 0 -> 1.03, 1000 -> 1.6186.
    Any callable with this signature (a :data:`DensityModel`) can be used instead.
    """
    h = np.asarray(hu, dtype=np.float32)
    steep = np.float32(1.03) + np.float32(0.001029) * h
    shallow = np.float32(1.03) + np.float32(0.0005886) * h
    np.minimum(steep, shallow, out=steep)
    np.maximum(steep, np.float32(0.0), out=steep)
    return steep


def hu_from_density_g_cm3(density_g_cm3: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hu_to_density_g_cm3` on its non-clipped range (float32).

    Density 0 maps to about -1001 HU (which the forward model maps back to 0).
    """
    rho = np.asarray(density_g_cm3, dtype=np.float64)
    if np.any(rho < 0) or not np.all(np.isfinite(rho)):
        raise MaterialError("density_g_cm3: must be finite and >= 0")
    hu = np.where(rho <= 1.03, (rho - 1.03) / 0.001029, (rho - 1.03) / 0.0005886)
    return hu.astype(np.float32)


# ------------------------------------------------------------------------------------------- loading
def _is_url(p: PathLike) -> bool:
    return isinstance(p, str) and "://" in p


def _name_has_suffix(name: str, suffixes: Iterable[str]) -> bool:
    low = name.lower()
    return any(low.endswith(s) for s in suffixes)


def _fsspec_fs(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec is a hard dependency
        raise VolumeError(f"{url}: reading URLs needs fsspec ({exc})") from exc
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise VolumeError(f"{url}: cannot open this URL scheme: {exc}") from exc


def _read_bytes_local(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise VolumeError(f"{where}: no such file") from exc
    except OSError as exc:
        raise VolumeError(f"{where}: cannot read: {exc}") from exc


class _Source:
    """Uniform read-only access to a local path or an fsspec URL (whole files read into memory)."""

    def __init__(self, path_or_url: PathLike):
        self.where = str(path_or_url)
        if _is_url(path_or_url):
            self.fs, self.path = _fsspec_fs(str(path_or_url))
            self.local: Path | None = None
        else:
            self.fs, self.path = None, str(path_or_url)
            self.local = Path(path_or_url).expanduser()

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1] if self.local is None else self.local.name

    def exists(self) -> bool:
        if self.local is not None:
            return self.local.exists()
        try:
            return bool(self.fs.exists(self.path))
        except Exception as exc:  # noqa: BLE001 - remote backends raise many types
            raise VolumeError(f"{self.where}: cannot access: {exc}") from exc

    def isdir(self) -> bool:
        if self.local is not None:
            return self.local.is_dir()
        try:
            return bool(self.fs.isdir(self.path))
        except Exception as exc:  # noqa: BLE001
            raise VolumeError(f"{self.where}: cannot access: {exc}") from exc

    def read(self) -> bytes:
        if self.local is not None:
            return _read_bytes_local(self.local, self.where)
        try:
            return bytes(self.fs.cat_file(self.path))
        except FileNotFoundError as exc:
            raise VolumeError(f"{self.where}: no such file") from exc
        except Exception as exc:  # noqa: BLE001
            raise VolumeError(f"{self.where}: cannot read: {exc}") from exc

    def sibling(self, relname: str) -> _Source:
        """A file next to this one (for detached NRRD data)."""
        if self.local is not None:
            p = Path(relname)
            return _Source(p if p.is_absolute() else self.local.parent / p)
        base = self.path.rstrip("/").rsplit("/", 1)[0]
        s = _Source.__new__(_Source)
        s.fs, s.local = self.fs, None
        s.path = relname if relname.startswith("/") else f"{base}/{relname}"
        s.where = f"{self.where.rsplit('/', 1)[0]}/{relname}"
        return s

    def list_files(self) -> list[tuple[str, bytes]]:
        """(name, bytes) of the regular files directly inside this folder, sorted by name."""
        out: list[tuple[str, bytes]] = []
        if self.local is not None:
            try:
                entries = sorted(p for p in self.local.iterdir() if p.is_file())
            except OSError as exc:
                raise VolumeError(f"{self.where}: cannot list folder: {exc}") from exc
            for p in entries:
                out.append((p.name, _read_bytes_local(p, str(p))))
            return out
        try:
            infos = self.fs.ls(self.path, detail=True)
        except Exception as exc:  # noqa: BLE001
            raise VolumeError(f"{self.where}: cannot list folder: {exc}") from exc
        files = sorted(i["name"] for i in infos if i.get("type") == "file")
        for name in files:
            try:
                data = bytes(self.fs.cat_file(name))
            except Exception as exc:  # noqa: BLE001
                raise VolumeError(f"{self.where}: cannot read {name}: {exc}") from exc
            out.append((name.rstrip("/").rsplit("/", 1)[-1], data))
        return out


@dataclass
class _RawImage:
    data: np.ndarray  # (I, J, K), native dtype (or float32 if scaled)
    affine: np.ndarray  # (4, 4) RAS
    sha256: str
    owned: bool = False  # data is a fresh array nobody else references (safe to modify in place)


def _squeeze_to_3d(arr: np.ndarray, where: str) -> np.ndarray:
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise VolumeError(f"{where}: volume must be 3-D, got shape {arr.shape}")
    if min(arr.shape) == 0:
        raise VolumeError(f"{where}: volume is empty, shape {arr.shape}")
    return arr


def _parse_nifti(data: bytes, where: str) -> _RawImage:
    import nibabel as nib

    sha = hashlib.sha256(data).hexdigest()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise VolumeError(f"{where}: corrupt or truncated gzip stream: {exc}") from exc
    if len(data) < 348:
        raise VolumeError(f"{where}: too short to be a NIfTI file ({len(data)} bytes)")
    sizeof_hdr = {int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")}
    if 348 in sizeof_hdr:
        klass: Any = nib.Nifti1Image
    elif 540 in sizeof_hdr:
        klass = nib.Nifti2Image
    else:
        raise VolumeError(f"{where}: not a NIfTI-1/2 file (bad header size field)")
    try:
        img = klass.from_bytes(data)
        proxy = img.dataobj
        slope = float(getattr(proxy, "slope", 1.0))
        inter = float(getattr(proxy, "inter", 0.0))
        raw = np.asanyarray(proxy.get_unscaled())
        affine = np.array(img.affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on corrupt files
        raise VolumeError(f"{where}: corrupt or truncated NIfTI: {type(exc).__name__}: {exc}") from exc
    if raw.dtype.kind not in "biuf":
        raise VolumeError(f"{where}: unsupported NIfTI data type {raw.dtype}")
    if int(img.header["sform_code"]) == 0 and int(img.header["qform_code"]) == 0:
        log.warning("%s: NIfTI has neither sform nor qform; using nibabel's fallback affine", where)
    raw = _squeeze_to_3d(raw, where)
    if slope != 1.0 or inter != 0.0:
        out = raw.astype(np.float32, order="C")
        if slope != 1.0:
            out *= np.float32(slope)
        if inter != 0.0:
            out += np.float32(inter)
        return _RawImage(out, affine, sha, owned=True)
    return _RawImage(raw, affine, sha)


_NRRD_SPACES = {
    # name -> sign of (x, y, z) rows to reach RAS
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "scanner-xyz": (1.0, 1.0, 1.0),
    "3d-right-handed": (1.0, 1.0, 1.0),
}


def _parse_nrrd(src: _Source, header_bytes: bytes) -> _RawImage:
    where = src.where
    try:
        import nrrd
    except ImportError as exc:
        raise VolumeError(f"{where}: reading NRRD needs pynrrd (pip install 'drrfarm[nrrd]')") from exc
    h = hashlib.sha256(header_bytes)
    fh = io.BytesIO(header_bytes)
    try:
        header = nrrd.read_header(fh)
    except Exception as exc:  # noqa: BLE001
        raise VolumeError(f"{where}: corrupt NRRD header: {exc}") from exc
    data_file = header.pop("data file", header.pop("datafile", None))
    if data_file is not None:
        if str(data_file).upper().startswith("LIST") or " " in str(data_file).strip():
            raise VolumeError(f"{where}: multi-file NRRD data ('data file: {data_file}') is not supported")
        data_src = src.sibling(str(data_file))
        payload = data_src.read()
        h.update(payload)
        fh = io.BytesIO(payload)
    try:
        arr = nrrd.read_data(header, fh, None, index_order="F")
    except Exception as exc:  # noqa: BLE001
        raise VolumeError(f"{where}: corrupt or truncated NRRD data: {type(exc).__name__}: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise VolumeError(f"{where}: unsupported NRRD data type {arr.dtype}")
    arr = _squeeze_to_3d(np.asarray(arr), where)
    space = str(header.get("space", "right-anterior-superior")).lower()
    if space not in _NRRD_SPACES:
        raise VolumeError(f"{where}: unsupported NRRD space {space!r}")
    dirs = header.get("space directions")
    if dirs is None:
        sp = header.get("spacings")
        dirs = np.eye(3) if sp is None else np.diag(np.asarray(sp, dtype=np.float64)[:3])
    dirs = np.asarray(dirs, dtype=np.float64)
    if dirs.shape != (3, 3) or not np.all(np.isfinite(dirs)):
        raise VolumeError(f"{where}: NRRD 'space directions' must be three spatial 3-vectors, got {dirs.tolist()}")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = dirs.T  # row a of 'space directions' is the step of array axis a
    affine[:3, 3] = origin
    affine[:3] *= np.asarray(_NRRD_SPACES[space])[:, None]
    return _RawImage(arr, affine, h.hexdigest())


def _dicom_series(files: Sequence[tuple[str, bytes]], where: str, series_uid: str | None) -> _RawImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    slices: list[tuple[str, bytes, Any]] = []
    for name, data in files:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=False)
        except (InvalidDicomError, EOFError, ValueError, TypeError, OSError, AttributeError):
            continue  # not DICOM (e.g. an XML annotation next to the slices)
        if "PixelData" not in ds:
            continue
        slices.append((name, data, ds))
    if not slices:
        raise VolumeError(f"{where}: no readable DICOM image slices in this folder")

    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, _, ds in slices})
    if series_uid is not None:
        slices = [s for s in slices if str(s[2].get("SeriesInstanceUID", "")) == series_uid]
        if not slices:
            raise VolumeError(f"{where}: no slices of series {series_uid}; series present: {uids}")
    elif len(uids) > 1:
        raise VolumeError(f"{where}: folder holds {len(uids)} DICOM series {uids}; pass series_uid=")

    def req(ds: Any, name: str, key: str) -> Any:
        v = ds.get(key)
        if v is None:
            raise VolumeError(f"{where}/{name}: DICOM slice lacks {key}")
        return v

    first_name, _, first = slices[0]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeError(f"{where}/{first_name}: multi-frame DICOM is not supported (needs one file per slice)")
    iop0 = np.asarray(req(first, first_name, "ImageOrientationPatient"), dtype=np.float64)
    ps0 = np.asarray(req(first, first_name, "PixelSpacing"), dtype=np.float64)
    rows0, cols0 = int(req(first, first_name, "Rows")), int(req(first, first_name, "Columns"))
    if iop0.shape != (6,) or ps0.shape != (2,) or np.any(ps0 <= 0):
        raise VolumeError(f"{where}/{first_name}: bad ImageOrientationPatient/PixelSpacing")
    row_dir, col_dir = iop0[:3], iop0[3:]  # row_dir: along a row (column index grows)
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 1e-6:
        raise VolumeError(f"{where}/{first_name}: ImageOrientationPatient axes are collinear")
    normal /= np.linalg.norm(normal)

    positions = []
    for name, _, ds in slices:
        iop = np.asarray(req(ds, name, "ImageOrientationPatient"), dtype=np.float64)
        if iop.shape != (6,) or np.max(np.abs(iop - iop0)) > 1e-4:
            raise VolumeError(f"{where}/{name}: inconsistent ImageOrientationPatient {iop.tolist()} vs {iop0.tolist()}")
        ps = np.asarray(req(ds, name, "PixelSpacing"), dtype=np.float64)
        if ps.shape != (2,) or np.max(np.abs(ps - ps0)) > 1e-4:
            raise VolumeError(f"{where}/{name}: inconsistent PixelSpacing {ps.tolist()} vs {ps0.tolist()}")
        if int(req(ds, name, "Rows")) != rows0 or int(req(ds, name, "Columns")) != cols0:
            raise VolumeError(f"{where}/{name}: slice size differs from {rows0}x{cols0}")
        ipp = np.asarray(req(ds, name, "ImagePositionPatient"), dtype=np.float64)
        if ipp.shape != (3,):
            raise VolumeError(f"{where}/{name}: bad ImagePositionPatient")
        positions.append(ipp)
    pos = np.asarray(positions)
    order = np.argsort(pos @ normal, kind="stable")
    slices = [slices[i] for i in order]
    pos = pos[order]
    n = len(slices)
    if n < 2:
        raise VolumeError(f"{where}: a DICOM series needs at least 2 slices to define the slice step, got {n}")
    steps = np.diff(pos, axis=0)
    along = steps @ normal
    if np.any(along <= 1e-6):
        dup = [slices[i + 1][0] for i in np.nonzero(along <= 1e-6)[0]]
        raise VolumeError(f"{where}: duplicate slice positions (e.g. {dup[:3]})")
    step = (pos[-1] - pos[0]) / (n - 1)
    dev = float(np.max(np.linalg.norm(steps - step, axis=1)))
    if dev > max(1e-2, 1e-3 * float(np.linalg.norm(step))):
        raise VolumeError(
            f"{where}: inconsistent slice spacing (steps {along.min():.4g}..{along.max():.4g} mm along the "
            f"normal; missing slice?)"
        )

    hu = np.empty((cols0, rows0, n), dtype=np.float32)  # [i=column, j=row, k=slice]
    h = hashlib.sha256()
    for k, (name, data, ds) in enumerate(slices):
        h.update(data)
        try:
            px = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - missing decoders, corrupt pixel data, ...
            raise VolumeError(f"{where}/{name}: cannot decode pixel data: {exc}") from exc
        if px.shape != (rows0, cols0):
            raise VolumeError(f"{where}/{name}: pixel array shape {px.shape} != ({rows0}, {cols0})")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        inter = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        sl = px.T.astype(np.float32)
        if slope != 1.0:
            sl *= np.float32(slope)
        if inter != 0.0:
            sl += np.float32(inter)
        hu[:, :, k] = sl

    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps0[1]  # PixelSpacing = (row spacing, column spacing)
    lps[:3, 1] = col_dir * ps0[0]
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return _RawImage(hu, ras, h.hexdigest(), owned=True)


def _read_raw(path_or_url: PathLike, series_uid: str | None = None) -> _RawImage:
    """Read any supported image into its native array + RAS affine + sha256 (no HU handling)."""
    src = _Source(path_or_url)
    where = src.where
    if not src.exists():
        raise VolumeError(f"{where}: no such file or folder")
    if src.isdir():
        return _dicom_series(src.list_files(), where, series_uid)
    name = src.name
    if _name_has_suffix(name, (".nhdr",)):
        return _parse_nrrd(src, src.read())
    data = src.read()
    if _name_has_suffix(name, (".nrrd",)) or data[:4] == b"NRRD":
        return _parse_nrrd(src, data)
    if (
        _name_has_suffix(name, _NIFTI_SUFFIXES)
        or data[:2] == b"\x1f\x8b"
        or data[344:348]
        in (
            b"n+1\x00",
            b"n+2\x00",
        )
    ):
        return _parse_nifti(data, where)
    if data[128:132] == b"DICM":
        raise VolumeError(f"{where}: a single DICOM file; pass the folder holding the whole series")
    raise VolumeError(f"{where}: unrecognised format (expected .nii/.nii.gz, .nrrd/.nhdr or a DICOM folder)")


def load_volume(path_or_url: PathLike, *, series_uid: str | None = None) -> Volume:
    """Load a CT in HU: NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or a folder holding one DICOM series.

    ``path_or_url`` may be a local path or any fsspec URL (``s3://``, ``file://``, ``memory://``, ...);
    URLs are read into memory. Nothing is ever written next to the input. ``series_uid`` selects one
    series when a DICOM folder holds several. ``sample:chest_ct`` names the sample CT (resolved by
    :func:`drrfarm.inputs.resolve_input`, the one place that knows input names).
    """
    path_or_url = resolve_input(path_or_url)
    raw = _read_raw(path_or_url, series_uid=series_uid)
    hu = np.ascontiguousarray(raw.data, dtype=np.float32)
    if hu is raw.data and not (raw.owned and hu.flags.writeable):
        hu = hu.copy()  # never clamp in place in a buffer we do not own
    if not np.isfinite(hu.sum(dtype=np.float64)):
        bad = int(np.count_nonzero(~np.isfinite(hu)))
        raise VolumeError(f"{path_or_url}: volume has {bad} non-finite voxel(s) (NaN/inf)")
    np.maximum(hu, np.float32(AIR_HU), out=hu)
    return Volume(hu=hu, patient_from_ijk=raw.affine, source=str(path_or_url), sha256=raw.sha256)


# ------------------------------------------------------------------------------------------ materials
def validate_material_names(names: Iterable[str], where: str) -> None:
    """Raise MaterialError if a name is unknown to :mod:`drrfarm.materials`.

    A name passes if it is in ``known_materials()`` (case-insensitive, spaces = underscores) or if
    ``nominal_density_g_cm3``/``mass_attenuation_cm2_g`` accept it (element symbols, formulas). The check
    is skipped when the materials module cannot be imported.
    """
    names = list(names)
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise MaterialError(f"{where}: material names must be non-empty strings, got {n!r}")
    import importlib

    try:
        materials = importlib.import_module("drrfarm.materials")
    except ImportError:
        return
    known_fn = getattr(materials, "known_materials", None)
    if known_fn is None:
        return
    known = {str(k).strip().lower().replace(" ", "_") for k in known_fn()}
    for n in names:
        if n.strip().lower().replace(" ", "_") in known:
            continue
        ok = False
        for fn_name, args in (
            ("nominal_density_g_cm3", (n,)),
            ("mass_attenuation_cm2_g", (n, np.array([60.0]))),
        ):
            fn = getattr(materials, fn_name, None)
            if fn is None:
                continue
            try:
                fn(*args)
                ok = True
                break
            except Exception:  # noqa: BLE001, S112 - any failure means "not a material"
                continue
        if not ok:
            shown = ", ".join(sorted(known)[:30])
            raise MaterialError(f"{where}: unknown material {n!r} (known: {shown}, ...)")


@dataclass(eq=False, repr=False)
class MaterialVolume:
    """Per-material density channels on a voxel grid.

    material_names: M names known to drrfarm.materials (unique).
    densities_g_cm3: (M, I, J, K) float32; density of material m where the voxel is m, else 0. Partial
        volumes (phantoms) may have several non-zero channels in one voxel.
    patient_from_ijk: (4, 4) float64 RAS affine of the grid.
    volume_sha256: sha256 of the source volume (or phantom description).
    provenance: how it was made (segmentation method and parameters); part of :meth:`content_key`.
    """

    material_names: list[str]
    densities_g_cm3: np.ndarray
    patient_from_ijk: np.ndarray
    volume_sha256: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"MaterialVolume({self.volume_sha256[:12]})"
        self.material_names = [str(n) for n in self.material_names]
        if len(set(self.material_names)) != len(self.material_names):
            raise MaterialError(f"{where}: material_names must be unique, got {self.material_names}")
        d = np.asarray(self.densities_g_cm3, dtype=np.float32)
        if d.ndim != 4 or d.shape[0] != len(self.material_names):
            raise MaterialError(
                f"{where}: densities_g_cm3 must be (M={len(self.material_names)}, I, J, K), got {d.shape}"
            )
        if min(d.shape[1:]) == 0:
            raise VolumeError(f"{where}: empty grid {d.shape[1:]}")
        if not np.isfinite(d.sum(dtype=np.float64)) or float(d.min()) < 0:
            raise MaterialError(f"{where}: densities_g_cm3 must be finite and >= 0")
        self.densities_g_cm3 = d
        self.patient_from_ijk = _check_affine(self.patient_from_ijk, where)

    def __repr__(self) -> str:
        return (
            f"MaterialVolume(materials={self.material_names}, shape={self.shape}, "
            f"volume_sha256={self.volume_sha256[:12]}…)"
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(I, J, K)."""
        return tuple(int(n) for n in self.densities_g_cm3.shape[1:])  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        n = np.linalg.norm(self.patient_from_ijk[:3, :3], axis=0)
        return (float(n[0]), float(n[1]), float(n[2]))

    def centre_patient_mm(self) -> np.ndarray:
        """(3,) RAS mm of the centre of the voxel-index box."""
        c = (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        return self.patient_from_ijk[:3, :3] @ c + self.patient_from_ijk[:3, 3]

    def content_key(self) -> str:
        """sha256 over volume_sha256, material names, affine and provenance (cheap; no voxel hashing)."""
        import json

        h = hashlib.sha256()
        h.update(self.volume_sha256.encode())
        h.update(json.dumps(self.material_names).encode())
        h.update(np.ascontiguousarray(self.patient_from_ijk).tobytes())
        h.update(json.dumps(self.provenance, sort_keys=True, default=str).encode())
        h.update(str(self.densities_g_cm3.shape).encode())
        return h.hexdigest()


def _apply_density(volume: Volume, density: DensityModel) -> np.ndarray:
    name = getattr(density, "__name__", repr(density))
    try:
        rho = np.asarray(density(volume.hu), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001
        raise MaterialError(f"density model {name}: failed on {volume.source}: {exc}") from exc
    if rho.shape != volume.hu.shape:
        raise MaterialError(f"density model {name}: returned shape {rho.shape}, expected {volume.hu.shape}")
    if not np.isfinite(rho.sum(dtype=np.float64)) or float(rho.min()) < 0:
        raise MaterialError(f"density model {name}: returned negative or non-finite densities")
    return rho


def _channels_from_index(index: np.ndarray, lut: np.ndarray, names: list[str], rho: np.ndarray) -> np.ndarray:
    """densities[c] = rho where lut[index] == c (index: small ints, lut: index -> channel)."""
    ch = lut.astype(np.int16)[index]
    out = np.zeros((len(names),) + rho.shape, dtype=np.float32)
    for c in range(len(names)):
        np.copyto(out[c], rho, where=(ch == c))
    return out


def segment_by_thresholds(
    volume: Volume,
    thresholds_hu: Sequence[tuple[float, str]] = ((-800.0, "air"), (350.0, "soft_tissue")),
    above: str = "bone",
    density: DensityModel = hu_to_density_g_cm3,
) -> MaterialVolume:
    """Label each voxel by HU bands: HU <= t0 -> m0; t0 < HU <= t1 -> m1; ...; HU > t_last -> ``above``.

    Defaults (DeepDRR): air <= -800 < soft_tissue <= 350 < bone. Thresholds must be strictly increasing;
    a name used for several bands becomes one channel. Densities come from ``density(hu)``.
    """
    try:
        ts = [(float(t), str(m)) for t, m in thresholds_hu]
    except (TypeError, ValueError) as exc:
        raise MaterialError(f"thresholds_hu: expected (HU, material) pairs, got {thresholds_hu!r}") from exc
    values = np.array([t for t, _ in ts], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise MaterialError(f"thresholds_hu: thresholds must be finite, got {values.tolist()}")
    if np.any(np.diff(values) <= 0):
        raise MaterialError(f"thresholds_hu: thresholds must be strictly increasing, got {values.tolist()}")
    band_names = [m for _, m in ts] + [str(above)]
    validate_material_names(band_names, "thresholds_hu/above")
    names: list[str] = []
    for m in band_names:
        if m not in names:
            names.append(m)
    lut = np.array([names.index(m) for m in band_names], dtype=np.int64)
    rho = _apply_density(volume, density)
    # band index = number of thresholds strictly below HU  (HU == t falls in the lower band)
    band = np.zeros(volume.shape, dtype=np.int8)
    for t in values.astype(np.float32):
        band += volume.hu > t
    dens = _channels_from_index(band, lut, names, rho)
    del band, rho
    return MaterialVolume(
        material_names=names,
        densities_g_cm3=dens,
        patient_from_ijk=volume.patient_from_ijk.copy(),
        volume_sha256=volume.sha256,
        provenance={
            "method": "thresholds",
            "thresholds_hu": [[t, m] for t, m in ts],
            "above": str(above),
            "density": getattr(density, "__qualname__", repr(density)),
        },
    )


def read_label_table(table: Mapping[int, str] | PathLike) -> dict[int, str]:
    """Normalise a label table: a ``{label: material}`` dict or a CSV with columns ``label,material``.

    Extra CSV columns are ignored; blank lines and lines starting with '#' are skipped.
    """
    if isinstance(table, Mapping):
        out: dict[int, str] = {}
        for k, v in table.items():
            try:
                ki = int(k)
            except (TypeError, ValueError) as exc:
                raise MaterialError(f"table: label {k!r} is not an integer") from exc
            if ki != k and not (isinstance(k, str) and str(ki) == k.strip()):
                raise MaterialError(f"table: label {k!r} is not an integer")
            if ki in out:
                raise MaterialError(f"table: label {ki} listed twice")
            out[ki] = str(v).strip()
        return out
    where = str(table)
    text = _Source(table).read().decode("utf-8-sig", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(lines)
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]
    if "label" not in cols or "material" not in cols:
        raise MaterialError(f"{where}: label table CSV needs columns 'label,material', got {cols}")
    reader.fieldnames = cols
    out = {}
    for n, row in enumerate(reader, start=2):
        raw_label = (row.get("label") or "").strip()
        try:
            lab = int(raw_label)
        except ValueError as exc:
            raise MaterialError(f"{where}: line {n}: label {raw_label!r} is not an integer") from exc
        mat = (row.get("material") or "").strip()
        if not mat:
            raise MaterialError(f"{where}: line {n}: empty material for label {lab}")
        if lab in out:
            raise MaterialError(f"{where}: line {n}: label {lab} listed twice")
        out[lab] = mat
    if not out:
        raise MaterialError(f"{where}: label table is empty")
    return out


def _label_array(label_map: Volume | np.ndarray | PathLike, volume: Volume) -> tuple[np.ndarray, str, str]:
    """(labels (I,J,K) integer array, name for messages, sha256 of the label source)."""
    if isinstance(label_map, Volume):
        arr, affine, where = label_map.hu, label_map.patient_from_ijk, label_map.source
        sha = label_map.sha256
    elif isinstance(label_map, np.ndarray):
        arr, affine, where = label_map, None, "label_map <array>"
        sha = _hash_array(arr, volume.patient_from_ijk) if arr.ndim == 3 else ""
    elif isinstance(label_map, (str, Path)):
        raw = _read_raw(label_map)
        arr, affine, where, sha = raw.data, raw.affine, str(label_map), raw.sha256
    else:
        raise MaterialError(f"label_map: expected Volume, ndarray or path, got {type(label_map).__name__}")
    if arr.shape != volume.shape:
        raise VolumeError(f"{where}: label map shape {arr.shape} != volume shape {volume.shape} ({volume.source})")
    if affine is not None and not np.allclose(affine, volume.patient_from_ijk, rtol=0, atol=1e-3):
        raise VolumeError(
            f"{where}: label map affine differs from the volume's ({volume.source}) by up to "
            f"{float(np.max(np.abs(affine - volume.patient_from_ijk))):.4g} mm; resample it onto the CT grid"
        )
    if arr.dtype.kind == "f":
        if not np.isfinite(arr.sum(dtype=np.float64)) or not np.array_equal(arr, np.round(arr)):
            raise VolumeError(f"{where}: label map values must be integers")
        lo, hi = float(arr.min()), float(arr.max())
        arr = arr.astype(np.int32 if lo >= -(2**31) and hi < 2**31 else np.int64)
    elif arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind not in "iu":
        raise VolumeError(f"{where}: label map must hold integers, got {arr.dtype}")
    return np.ascontiguousarray(arr), where, sha  # same layout as volume.hu: fast masked copies


def segment_by_labels(
    volume: Volume,
    label_map: Volume | np.ndarray | PathLike,
    table: Mapping[int, str] | PathLike,
    density: DensityModel = hu_to_density_g_cm3,
    default: str | None = None,
) -> MaterialVolume:
    """Assign materials from an integer label map on the same grid as ``volume``.

    label_map: (I, J, K) array (assumed on the volume's grid), a Volume, or a path/URL (shape and affine
        must match the volume's within 1e-3 mm). table: ``{label: material}`` or a CSV path with columns
        ``label,material``. Labels present in the map but not in the table raise MaterialError unless
        ``default`` names a material for them. Channels follow the table's materials in label order
        (then ``default``), one channel per distinct name, present in the map or not.
    """
    tab = read_label_table(table)
    validate_material_names(tab.values(), "table" if isinstance(table, Mapping) else f"table {table}")
    if default is not None:
        validate_material_names([default], "default")
    labels, where, label_sha = _label_array(label_map, volume)

    lo, hi = int(labels.min()), int(labels.max())
    span = hi - lo + 1
    if span <= 1 << 20:
        flat = labels.reshape(-1)
        counts = np.zeros(span, dtype=np.int64)
        for s in range(0, flat.size, 1 << 22):  # chunked: bincount copies its input to intp
            counts += np.bincount(flat[s : s + (1 << 22)].astype(np.int64) - lo, minlength=span)
        present = (np.nonzero(counts)[0] + lo).tolist()
    else:
        present = np.unique(labels).tolist()
    missing = [lab for lab in present if lab not in tab]
    if missing and default is None:
        raise MaterialError(
            f"{where}: label(s) {missing[:20]}{' ...' if len(missing) > 20 else ''} not in the label table "
            f"and no default material given"
        )
    names: list[str] = []
    for lab in sorted(tab):
        if tab[lab] not in names:
            names.append(tab[lab])
    if default is not None and default not in names:
        names.append(default)
    rho = _apply_density(volume, density)
    if span <= 1 << 20:
        lut = np.full(span, -1, dtype=np.int64)
        for lab in range(lo, hi + 1):
            m = tab.get(lab, default)
            if m is not None:
                lut[lab - lo] = names.index(m)
        index = labels - lo if lo != 0 else labels
    else:
        uniq = np.asarray(present)
        lut = np.array([names.index(tab.get(int(u), default)) for u in uniq], dtype=np.int64)  # type: ignore[arg-type]
        index = np.searchsorted(uniq, labels)
    dens = _channels_from_index(index, lut, names, rho)
    return MaterialVolume(
        material_names=names,
        densities_g_cm3=dens,
        patient_from_ijk=volume.patient_from_ijk.copy(),
        volume_sha256=volume.sha256,
        provenance={
            "method": "labels",
            "label_map": where,
            "label_sha256": label_sha,
            "table": {str(k): v for k, v in sorted(tab.items())},
            "default": default,
            "density": getattr(density, "__qualname__", repr(density)),
        },
    )
