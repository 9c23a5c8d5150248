"""Tests for drrfarm.volume: loading (NIfTI, DICOM, NRRD, fsspec URLs), validation, density, segmentation."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from drrfarm.errors import MaterialError, VolumeError
from drrfarm.samples import downloads
from drrfarm.volume import (
    MaterialVolume,
    Volume,
    hu_from_density_g_cm3,
    hu_to_density_g_cm3,
    load_volume,
    read_label_table,
    segment_by_labels,
    segment_by_thresholds,
    volume_from_array,
)

OBLIQUE = np.array(
    [
        [0.0, -0.9, 0.1, 12.5],
        [0.8, 0.0, 0.0, -40.0],
        [0.0, 0.05, 2.0, 7.25],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = OBLIQUE) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _small_ct(rng: np.random.Generator, shape=(7, 6, 5)) -> np.ndarray:
    return rng.integers(-1024, 2000, size=shape).astype(np.int16)


# ------------------------------------------------------------------------------------------ density
def test_density_reference_points():
    hu = np.array([-2000.0, -1024.0, -1000.0, -500.0, 0.0, 1000.0, 3000.0])
    rho = hu_to_density_g_cm3(hu)
    assert rho.dtype == np.float32 and rho.shape == hu.shape
    expected = [0.0, 0.0, 0.001, 1.03 - 0.5145, 1.03, 1.6186, 1.03 + 3 * 0.5886]
    np.testing.assert_allclose(rho, expected, atol=2e-6)


def test_density_shallow_segment_above_zero_and_steep_below():
    # the two lines cross at 0 HU: below, the steeper one is the minimum; above, the shallower one
    assert hu_to_density_g_cm3(np.array([-1.0]))[0] == pytest.approx(1.03 - 0.001029, abs=1e-6)
    assert hu_to_density_g_cm3(np.array([1.0]))[0] == pytest.approx(1.03 + 0.0005886, abs=1e-6)


def test_hu_from_density_inverts_the_fit():
    rho = np.array([0.0, 0.001, 0.26, 1.0, 1.03, 1.92, 7.874])
    back = hu_to_density_g_cm3(hu_from_density_g_cm3(rho))
    np.testing.assert_allclose(back, rho, rtol=1e-5, atol=2e-5)
    with pytest.raises(MaterialError):
        hu_from_density_g_cm3(np.array([-0.1]))


# ---------------------------------------------------------------------------------- Volume basics
def test_volume_from_array_padding_and_properties():
    hu = np.full((4, 5, 6), -2048, dtype=np.int16)
    hu[1, 2, 3] = 40
    v = volume_from_array(hu, OBLIQUE)
    assert v.hu.dtype == np.float32 and v.hu.flags.c_contiguous
    assert v.hu.min() == -1024.0 and v.hu[1, 2, 3] == 40.0
    assert hu.min() == -2048  # the caller's array is not modified
    assert v.shape == (4, 5, 6)
    np.testing.assert_allclose(v.spacing_mm, np.linalg.norm(OBLIQUE[:3, :3], axis=0))
    centre = OBLIQUE[:3, :3] @ np.array([1.5, 2.0, 2.5]) + OBLIQUE[:3, 3]
    np.testing.assert_allclose(v.centre_patient_mm(), centre)
    np.testing.assert_allclose(v.ijk_from_patient_mm(v.patient_mm_from_ijk([[1, 2, 3]])), [[1, 2, 3]], atol=1e-9)
    assert len(v.sha256) == 64
    # same data -> same hash, different affine -> different hash
    assert volume_from_array(hu, OBLIQUE).sha256 == v.sha256
    other = OBLIQUE.copy()
    other[0, 3] += 1
    assert volume_from_array(hu, other).sha256 != v.sha256


def test_float32_array_is_not_copied_when_valid():
    hu = np.zeros((3, 3, 3), dtype=np.float32)
    assert volume_from_array(hu, np.eye(4)).hu is hu


@pytest.mark.parametrize(
    ("hu", "affine", "match"),
    [
        (np.zeros((0, 4, 4)), np.eye(4), "empty"),
        (np.zeros((4, 4)), np.eye(4), "3-D"),
        (np.zeros((2, 2, 2, 2)), np.eye(4), "3-D"),
        (np.array([[[0.0, np.nan]]]), np.eye(4), "non-finite"),
        (np.array([[[0.0, np.inf]]]), np.eye(4), "non-finite"),
        (np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
        (np.zeros((2, 2, 2)), np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "singular"),
        (np.zeros((2, 2, 2)), np.eye(3), "4x4"),
        (np.zeros((2, 2, 2)), np.full((4, 4), np.nan), "non-finite"),
    ],
)
def test_volume_from_array_rejects(hu, affine, match):
    with pytest.raises(VolumeError, match=match) as err:
        volume_from_array(hu, affine, name="my-array")
    assert "my-array" in str(err.value)


# ---------------------------------------------------------------------------------------- NIfTI
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    data = _small_ct(rng)
    data[0, 0, 0] = -2048  # padding value
    path = _save_nifti(tmp_path / f"ct{suffix}", data)
    v = load_volume(path)
    expected = data.astype(np.float32)
    expected[0, 0, 0] = -1024.0
    np.testing.assert_array_equal(v.hu, expected)
    np.testing.assert_allclose(v.patient_from_ijk, OBLIQUE, atol=1e-5)
    assert v.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert v.source == str(path)


def test_nifti_scaled_data_and_trailing_singleton(tmp_path):
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4, 1)
    img = nib.Nifti1Image(raw, np.diag([2.0, 3.0, 4.0, 1.0]))
    img.header.set_slope_inter(2.0, -1000.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    v = load_volume(path)
    assert v.shape == (2, 3, 4)
    np.testing.assert_array_equal(v.hu, raw[..., 0] * 2.0 - 1000.0)
    assert v.spacing_mm == (2.0, 3.0, 4.0)


def test_truncated_nifti_gz_raises_naming_file(tmp_path):
    rng = np.random.default_rng(1)
    good = _save_nifti(tmp_path / "good.nii.gz", _small_ct(rng, (20, 20, 20)))
    data = good.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="truncated") as err:
        load_volume(bad)
    assert str(bad) in str(err.value)


def test_truncated_uncompressed_nifti_raises(tmp_path):
    good = _save_nifti(tmp_path / "good.nii", _small_ct(np.random.default_rng(2), (20, 20, 20)))
    bad = tmp_path / "truncated.nii"
    bad.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(VolumeError) as err:
        load_volume(bad)
    assert str(bad) in str(err.value)


def test_garbage_and_missing_files(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(os.urandom(1000))
    with pytest.raises(VolumeError, match=r"junk\.nii\.gz"):
        load_volume(junk)
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(VolumeError, match=r"nope\.nii\.gz.*no such"):
        load_volume(missing)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(VolumeError, match="unrecognised format"):
        load_volume(txt)


def test_nifti_nan_voxels_raise(tmp_path):
    data = np.zeros((4, 4, 4), dtype=np.float32)
    data[1, 1, 1] = np.nan
    path = _save_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(VolumeError, match="non-finite") as err:
        load_volume(path)
    assert "nan.nii.gz" in str(err.value)


def test_nifti_singular_affine_raises(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 2] = affine[:3, 0]  # k axis == i axis
    img = nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), affine)
    img.set_sform(affine, code=2)
    path = tmp_path / "singular.nii"
    nib.save(img, str(path))
    with pytest.raises(VolumeError, match="singular") as err:
        load_volume(path)
    assert "singular.nii" in str(err.value)


def test_nifti_not_3d_raises(tmp_path):
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.int16), np.eye(4)), str(path))
    with pytest.raises(VolumeError, match="3-D"):
        load_volume(path)


def test_read_only_input_dir_is_not_written(tmp_path):
    src = tmp_path / "ro"
    src.mkdir()
    path = _save_nifti(src / "ct.nii.gz", _small_ct(np.random.default_rng(3)))
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    path.chmod(0o444)
    src.chmod(0o555)
    try:
        v = load_volume(path)
        assert v.shape == (7, 6, 5)
        after = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
        assert after == before
        assert src.stat().st_mode & 0o777 == 0o555
    finally:
        src.chmod(0o755)


# ------------------------------------------------------------------------------------ fsspec URLs
def test_memory_url_nifti_and_file_url(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    path = _save_nifti(tmp_path / "ct.nii.gz", _small_ct(np.random.default_rng(4)))
    local = load_volume(path)
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket-vol/scans/ct.nii.gz", path.read_bytes())
    try:
        remote = load_volume("memory://bucket-vol/scans/ct.nii.gz")
        np.testing.assert_array_equal(remote.hu, local.hu)
        np.testing.assert_array_equal(remote.patient_from_ijk, local.patient_from_ijk)
        assert remote.sha256 == local.sha256
        assert remote.source == "memory://bucket-vol/scans/ct.nii.gz"
        with pytest.raises(VolumeError, match="memory://bucket-vol/scans/missing.nii.gz"):
            load_volume("memory://bucket-vol/scans/missing.nii.gz")
    finally:
        fs.rm("/bucket-vol", recursive=True)
    via_file_url = load_volume(path.resolve().as_uri())
    np.testing.assert_array_equal(via_file_url.hu, local.hu)


# ------------------------------------------------------------------------------------------- NRRD
@pytest.mark.parametrize(("space", "signs"), [("left-posterior-superior", (-1, -1, 1)), ("RAS", (1, 1, 1))])
def test_nrrd_spaces(tmp_path, space, signs):
    nrrd = pytest.importorskip("nrrd")
    data = _small_ct(np.random.default_rng(5))
    dirs = np.array([[0.0, 0.8, 0.0], [-0.9, 0.0, 0.05], [0.1, 0.0, 2.0]])  # row a = step of axis a
    origin = np.array([10.0, -20.0, 30.0])
    path = tmp_path / "ct.nrrd"
    nrrd.write(str(path), data, {"space": space, "space directions": dirs, "space origin": origin})
    v = load_volume(path)
    np.testing.assert_array_equal(v.hu, data.astype(np.float32))
    expected = np.eye(4)
    expected[:3, :3] = dirs.T
    expected[:3, 3] = origin
    expected[:3] *= np.array(signs, dtype=float)[:, None]
    np.testing.assert_allclose(v.patient_from_ijk, expected)
    # a voxel's world position agrees with the NRRD definition (LPS -> RAS flips x and y)
    lps_or_ras = origin + np.array([1, 2, 3]) @ dirs
    np.testing.assert_allclose(v.patient_mm_from_ijk([[1, 2, 3]])[0], lps_or_ras * np.array(signs))
    assert v.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_nrrd_detached_header_and_memory_url(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    fsspec = pytest.importorskip("fsspec")
    data = _small_ct(np.random.default_rng(6))
    hdr = tmp_path / "ct.nhdr"
    header = {"space": "left-posterior-superior", "space directions": np.diag([1.0, 2.0, 3.0]), "encoding": "gzip"}
    nrrd.write(str(hdr), data, header, detached_header=True)
    local = load_volume(hdr)
    np.testing.assert_array_equal(local.hu, data.astype(np.float32))
    np.testing.assert_allclose(np.diag(local.patient_from_ijk), [-1.0, -2.0, 3.0, 1.0])
    fs = fsspec.filesystem("memory")
    for p in tmp_path.iterdir():
        fs.pipe(f"/nrrd-test/{p.name}", p.read_bytes())
    try:
        remote = load_volume("memory://nrrd-test/ct.nhdr")
        np.testing.assert_array_equal(remote.hu, local.hu)
        assert remote.sha256 == local.sha256
    finally:
        fs.rm("/nrrd-test", recursive=True)


# ------------------------------------------------------------------------------ real sample data
@pytest.fixture(scope="module")
def chest() -> Volume:
    return load_volume(downloads.chest_ct())


@pytest.fixture(scope="module")
def chest_dicom() -> Volume:
    return load_volume(downloads.chest_ct_dicom())


def test_sample_ct_loads(chest):
    assert chest.shape == (512, 512, 133)
    np.testing.assert_allclose(chest.spacing_mm, (0.703125, 0.703125, 2.5))
    assert chest.sha256 == downloads.CHEST_CT_SHA256
    expected = np.array([[-0.703125, 0, 0, 166.0], [0, 0.703125, 0, -187.59687805], [0, 0, 2.5, -340.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(chest.patient_from_ijk, expected, atol=1e-5)
    assert chest.hu.dtype == np.float32
    assert chest.hu.min() == -1024.0  # the -2048 outside the scan circle became air
    assert chest.hu.max() == 3071.0
    np.testing.assert_allclose(chest.centre_patient_mm(), [-13.6484375, -7.94844055, -175.0], atol=1e-4)


def _signed_permutation(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For an index map ijk_b = M ijk_a that is a signed permutation + integer shift, return (perm, sign, shift)."""
    m = mat[:3, :3]
    assert np.allclose(np.abs(m).sum(axis=1), 1.0, atol=1e-6)
    perm = np.argmax(np.abs(m), axis=1)  # b axis r comes from a axis perm[r]
    sign = np.sign(m[np.arange(3), perm])
    shift = mat[:3, 3]
    assert np.allclose(shift, np.round(shift), atol=1e-3)
    return perm, sign, np.round(shift).astype(int)


def test_dicom_series_matches_nifti(chest, chest_dicom):
    d, n = chest_dicom, chest
    assert d.shape == (512, 512, 133)
    np.testing.assert_allclose(d.spacing_mm, n.spacing_mm, atol=1e-6)
    # the DICOM series' voxel (i, j, k) sits where the NIfTI says it does, to 1e-3 mm
    rng = np.random.default_rng(7)
    ijk_n = np.vstack([rng.integers(0, 512, size=(40, 3)) % [512, 512, 133], [[0, 0, 0], [511, 511, 132]]])
    world = n.patient_mm_from_ijk(ijk_n)
    ijk_d = d.ijk_from_patient_mm(world)
    ijk_d_int = np.round(ijk_d).astype(int)
    np.testing.assert_allclose(d.patient_mm_from_ijk(ijk_d_int), world, atol=1e-3)
    assert np.all((ijk_d_int >= 0) & (ijk_d_int < np.array(d.shape)))
    np.testing.assert_array_equal(
        d.hu[tuple(ijk_d_int.T)],
        n.hu[tuple(ijk_n.T)],
    )
    # and the whole grid: index map is a signed permutation + shift; every voxel identical
    perm, sign, shift = _signed_permutation(np.linalg.inv(d.patient_from_ijk) @ n.patient_from_ijk)
    arr = np.transpose(n.hu, perm)
    for ax in range(3):
        if sign[ax] < 0:
            arr = np.flip(arr, axis=ax)
    np.testing.assert_array_equal(arr, d.hu)
    # centres coincide too
    np.testing.assert_allclose(d.centre_patient_mm(), n.centre_patient_mm(), atol=1e-3)


def test_dicom_sha_is_over_sorted_slices(chest_dicom):
    folder = downloads.chest_ct_dicom()
    files = [p for p in folder.iterdir() if p.suffix == ".dcm"]
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files]
    ordered = [p for _, p in sorted(zip(z, files, strict=True))]  # normal is +z (LPS) for this series
    h = hashlib.sha256()
    for p in ordered:
        h.update(p.read_bytes())
    assert chest_dicom.sha256 == h.hexdigest()


@pytest.fixture(scope="module")
def few_slices(tmp_path_factory) -> Path:
    """Five consecutive slices of the sample series (plus its XML file) in a scratch folder."""
    src = downloads.chest_ct_dicom()
    out = tmp_path_factory.mktemp("dicom5")
    for n in range(60, 65):
        shutil.copy(src / f"1-{n:03d}.dcm", out / f"1-{n:03d}.dcm")
    shutil.copy(src / "069.xml", out / "069.xml")
    return out


def test_dicom_subset_positions_and_rescale(few_slices, chest_dicom):
    v = load_volume(few_slices)
    assert v.shape == (512, 512, 5)
    # these five slices are a contiguous block of the full series: same voxels at the same place
    k0 = int(round(chest_dicom.ijk_from_patient_mm(v.patient_mm_from_ijk([[0, 0, 0]]))[0, 2]))
    np.testing.assert_array_equal(v.hu, chest_dicom.hu[:, :, k0 : k0 + 5])
    np.testing.assert_allclose(v.patient_from_ijk[:3, 3], chest_dicom.patient_mm_from_ijk([[0, 0, k0]])[0], atol=1e-4)


def test_dicom_per_slice_rescale_is_applied(tmp_path, few_slices):
    ref = load_volume(few_slices)
    out = tmp_path / "rescaled"
    shutil.copytree(few_slices, out)
    # re-encode two slices with other slopes/intercepts; the loader must apply each slice's own rescale
    for name, slope, intercept in (("1-062.dcm", 0.5, -1024), ("1-063.dcm", 1, -3000)):
        ds = pydicom.dcmread(out / name)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        stored = (hu - intercept) / slope
        assert np.array_equal(stored, np.round(stored)) and stored.max() < 2**15
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = stored.astype(np.int16).tobytes()
        ds.save_as(out / name)
    v = load_volume(out)
    np.testing.assert_array_equal(v.hu, ref.hu)
    assert v.sha256 != ref.sha256


def test_dicom_missing_slice_and_bad_orientation(tmp_path, few_slices):
    gap = tmp_path / "gap"
    shutil.copytree(few_slices, gap)
    (gap / "1-062.dcm").unlink()
    with pytest.raises(VolumeError, match="inconsistent slice spacing") as err:
        load_volume(gap)
    assert str(gap) in str(err.value)

    tilt = tmp_path / "tilt"
    shutil.copytree(few_slices, tilt)
    ds = pydicom.dcmread(tilt / "1-063.dcm")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, -0.0998334]
    ds.save_as(tilt / "1-063.dcm")
    with pytest.raises(VolumeError, match="inconsistent ImageOrientationPatient") as err:
        load_volume(tilt)
    assert "1-063.dcm" in str(err.value)

    spacing = tmp_path / "spacing"
    shutil.copytree(few_slices, spacing)
    ds = pydicom.dcmread(spacing / "1-061.dcm")
    ds.PixelSpacing = [0.8, 0.8]
    ds.save_as(spacing / "1-061.dcm")
    with pytest.raises(VolumeError, match="inconsistent PixelSpacing") as err:
        load_volume(spacing)
    assert "1-061.dcm" in str(err.value)

    dup = tmp_path / "dup"
    shutil.copytree(few_slices, dup)
    shutil.copy(dup / "1-061.dcm", dup / "copy-of-61.dcm")
    with pytest.raises(VolumeError, match="duplicate slice"):
        load_volume(dup)


def test_dicom_folder_without_slices(tmp_path, few_slices):
    empty = tmp_path / "noslices"
    empty.mkdir()
    shutil.copy(few_slices / "069.xml", empty / "069.xml")
    with pytest.raises(VolumeError, match="no readable DICOM") as err:
        load_volume(empty)
    assert str(empty) in str(err.value)


def test_dicom_read_only_and_memory_url(tmp_path, few_slices):
    fsspec = pytest.importorskip("fsspec")
    ref = load_volume(few_slices)
    ro = tmp_path / "ro"
    shutil.copytree(few_slices, ro)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in ro.iterdir())
    for p in ro.iterdir():
        p.chmod(0o444)
    ro.chmod(0o555)
    try:
        v = load_volume(ro)
        np.testing.assert_array_equal(v.hu, ref.hu)
        assert sorted((p.name, p.stat().st_mtime_ns) for p in ro.iterdir()) == before
    finally:
        ro.chmod(0o755)
    fs = fsspec.filesystem("memory")
    for p in few_slices.iterdir():
        fs.pipe(f"/dicom-bucket/series/{p.name}", p.read_bytes())
    try:
        remote = load_volume("memory://dicom-bucket/series")
        np.testing.assert_array_equal(remote.hu, ref.hu)
        np.testing.assert_allclose(remote.patient_from_ijk, ref.patient_from_ijk)
        assert remote.sha256 == ref.sha256
    finally:
        fs.rm("/dicom-bucket", recursive=True)


# ------------------------------------------------------------------------------- segmentation
def test_thresholds_default_bands():
    hu = np.array([-1024, -800, -799, 0, 350, 351, 2000], dtype=np.float32).reshape(7, 1, 1)
    v = volume_from_array(hu, np.eye(4))
    mv = segment_by_thresholds(v)
    assert mv.material_names == ["air", "soft_tissue", "bone"]
    assert mv.densities_g_cm3.shape == (3, 7, 1, 1) and mv.densities_g_cm3.dtype == np.float32
    rho = hu_to_density_g_cm3(hu)
    band = np.array([0, 0, 1, 1, 1, 2, 2])  # HU == threshold stays in the lower band
    for m in range(3):
        np.testing.assert_array_equal(mv.densities_g_cm3[m, :, 0, 0], np.where(band == m, rho[:, 0, 0], 0))
    assert mv.volume_sha256 == v.sha256
    np.testing.assert_array_equal(mv.patient_from_ijk, v.patient_from_ijk)
    assert mv.provenance["method"] == "thresholds"


def test_thresholds_custom_bands_merge_and_density_model():
    hu = np.linspace(-1000, 1500, 11, dtype=np.float32).reshape(11, 1, 1)
    v = volume_from_array(hu, np.eye(4))
    mv = segment_by_thresholds(
        v,
        thresholds_hu=((-900, "air"), (-200, "lung"), (100, "soft_tissue"), (1000, "bone")),
        above="bone",
        density=lambda h: np.full_like(h, 2.0),
    )
    assert mv.material_names == ["air", "lung", "soft_tissue", "bone"]
    total = mv.densities_g_cm3.sum(axis=0)
    np.testing.assert_array_equal(total, 2.0)
    assert np.count_nonzero(mv.densities_g_cm3, axis=0).max() == 1  # exactly one material per voxel
    np.testing.assert_array_equal(mv.densities_g_cm3[3, :, 0, 0] > 0, hu[:, 0, 0] > 100)


def test_threshold_errors():
    v = volume_from_array(np.zeros((2, 2, 2)), np.eye(4))
    with pytest.raises(MaterialError, match="strictly increasing"):
        segment_by_thresholds(v, thresholds_hu=((300, "air"), (-100, "soft_tissue")))
    with pytest.raises(MaterialError, match="unobtainium"):
        segment_by_thresholds(v, above="unobtainium")
    with pytest.raises(MaterialError, match="density model"):
        segment_by_thresholds(v, density=lambda h: -np.ones_like(h))
    with pytest.raises(MaterialError, match="density model"):
        segment_by_thresholds(v, density=lambda h: np.ones(3))


def test_material_check_skipped_without_materials_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "drrfarm.materials", None)  # import now raises ImportError
    v = volume_from_array(np.zeros((2, 2, 2)), np.eye(4))
    mv = segment_by_thresholds(v, above="unobtainium")
    assert mv.material_names[-1] == "unobtainium"


def test_materials_known_to_materials_module_pass():
    pytest.importorskip("drrfarm.materials")
    v = volume_from_array(np.zeros((2, 2, 2)), np.eye(4))
    mv = segment_by_thresholds(v, thresholds_hu=((-800, "air"), (0, "soft tissue")), above="Ca5(PO4)3OH")
    assert mv.material_names == ["air", "soft tissue", "Ca5(PO4)3OH"]


def test_material_volume_validation():
    with pytest.raises(MaterialError, match="unique"):
        MaterialVolume(["air", "air"], np.zeros((2, 2, 2, 2)), np.eye(4), "x")
    with pytest.raises(MaterialError, match="M=1"):
        MaterialVolume(["air"], np.zeros((2, 2, 2, 2)), np.eye(4), "x")
    with pytest.raises(MaterialError, match=">= 0"):
        MaterialVolume(["air"], -np.ones((1, 2, 2, 2)), np.eye(4), "x")
    with pytest.raises(VolumeError, match="singular"):
        MaterialVolume(["air"], np.zeros((1, 2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]), "x")
    a = MaterialVolume(["air"], np.zeros((1, 2, 2, 2)), np.eye(4), "x", {"method": "a"})
    b = MaterialVolume(["air"], np.zeros((1, 2, 2, 2)), np.eye(4), "x", {"method": "b"})
    assert a.content_key() != b.content_key()


def test_segment_by_labels_array_and_table():
    hu = np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 10
    v = volume_from_array(hu, np.eye(4))
    labels = np.zeros((2, 3, 4), dtype=np.uint8)
    labels[0, 1] = 5
    labels[1, 2] = 7
    mv = segment_by_labels(v, labels, {0: "soft_tissue", 5: "bone", 7: "bone", 9: "lung"})
    assert mv.material_names == ["soft_tissue", "bone", "lung"]
    rho = hu_to_density_g_cm3(hu)
    np.testing.assert_array_equal(mv.densities_g_cm3[0], np.where(labels == 0, rho, 0))
    np.testing.assert_array_equal(mv.densities_g_cm3[1], np.where(labels > 0, rho, 0))
    assert not mv.densities_g_cm3[2].any()  # listed but absent: channel kept, all zero
    assert mv.provenance["method"] == "labels" and len(mv.provenance["label_sha256"]) == 64


def test_segment_by_labels_unlisted_default_and_unknown():
    v = volume_from_array(np.zeros((2, 2, 2)), np.eye(4))
    labels = np.array([0, 3, 4, 4, 0, 0, 0, 250], dtype=np.int32).reshape(2, 2, 2)
    with pytest.raises(MaterialError, match=r"\[4, 250\]"):
        segment_by_labels(v, labels, {0: "air", 3: "bone"})
    mv = segment_by_labels(v, labels, {0: "air", 3: "bone"}, default="soft_tissue")
    assert mv.material_names == ["air", "bone", "soft_tissue"]
    ch = np.argmax(np.stack([np.isin(labels, [0]), labels == 3, np.isin(labels, [4, 250])]), axis=0)
    expected = np.zeros((3, 2, 2, 2), np.float32)
    rho = hu_to_density_g_cm3(np.zeros((2, 2, 2)))
    for c in range(3):
        expected[c][ch == c] = rho[ch == c]
    np.testing.assert_array_equal(mv.densities_g_cm3, expected)
    with pytest.raises(MaterialError, match="kryptonite"):
        segment_by_labels(v, labels, {0: "air", 3: "kryptonite", 4: "bone", 250: "bone"})
    with pytest.raises(MaterialError, match="default"):
        segment_by_labels(v, labels, {0: "air"}, default="kryptonite")
    with pytest.raises(VolumeError, match="integers"):
        segment_by_labels(v, labels + 0.5, {0: "air"})


def test_segment_by_labels_files_and_grid_checks(tmp_path):
    rng = np.random.default_rng(8)
    ct = _save_nifti(tmp_path / "ct.nii.gz", _small_ct(rng))
    v = load_volume(ct)
    labels = rng.integers(0, 3, size=v.shape).astype(np.uint8)
    lab_path = _save_nifti(tmp_path / "labels.nii.gz", labels)
    csv = tmp_path / "table.csv"
    csv.write_text("# label table\nlabel,material,comment\n0,air,outside\n1,soft_tissue,\n2,bone,ribs\n")
    assert read_label_table(csv) == {0: "air", 1: "soft_tissue", 2: "bone"}
    mv = segment_by_labels(v, lab_path, csv)
    assert mv.material_names == ["air", "soft_tissue", "bone"]
    rho = hu_to_density_g_cm3(v.hu)
    for c in range(3):
        np.testing.assert_array_equal(mv.densities_g_cm3[c], np.where(labels == c, rho, 0))
    assert mv.provenance["label_sha256"] == hashlib.sha256(lab_path.read_bytes()).hexdigest()

    wrong_shape = _save_nifti(tmp_path / "labels_small.nii.gz", labels[:-1])
    with pytest.raises(VolumeError, match="shape") as err:
        segment_by_labels(v, wrong_shape, csv)
    assert "labels_small.nii.gz" in str(err.value)
    shifted = OBLIQUE.copy()
    shifted[2, 3] += 0.5
    wrong_affine = _save_nifti(tmp_path / "labels_shifted.nii.gz", labels, shifted)
    with pytest.raises(VolumeError, match="affine") as err:
        segment_by_labels(v, wrong_affine, csv)
    assert "labels_shifted.nii.gz" in str(err.value)
    with pytest.raises(VolumeError, match="shape"):
        segment_by_labels(v, labels[:, :, :2], csv)

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("id,name\n0,air\n")
    with pytest.raises(MaterialError, match="bad.csv"):
        segment_by_labels(v, labels, bad_csv)
    bad_label = tmp_path / "bad_label.csv"
    bad_label.write_text("label,material\nzero,air\n")
    with pytest.raises(MaterialError, match=r"bad_label.csv: line 2"):
        read_label_table(bad_label)


def test_chest_labels_segmentation_slab(chest):
    """Label-based materials on a 10-slice slab of the real CT and label map."""
    lab = nib.load(downloads.chest_ct_labels())
    np.testing.assert_allclose(lab.affine, chest.patient_from_ijk, atol=1e-3)
    k0, k1 = 60, 70
    labels = np.asanyarray(lab.dataobj)[:, :, k0:k1]
    affine = chest.patient_from_ijk.copy()
    affine[:3, 3] = chest.patient_mm_from_ijk([[0, 0, k0]])[0]
    slab = volume_from_array(chest.hu[:, :, k0:k1], affine, name="chest-slab")
    table = downloads.chest_ct_label_table()
    mv = segment_by_labels(slab, labels, table)
    assert mv.material_names == ["soft_tissue", "lung", "air", "bone", "blood", "muscle"]
    d = mv.densities_g_cm3
    np.testing.assert_allclose(d.sum(axis=0), hu_to_density_g_cm3(slab.hu), rtol=0, atol=0)
    lung = d[mv.material_names.index("lung")]
    assert lung[lung > 0].mean() < 0.35  # aerated lung: ~0.1-0.3 g/cm3
    bone = d[mv.material_names.index("bone")]
    assert bone.any() and bone[bone > 0].mean() > 1.1
    # a full-size label map file is also accepted directly
    mv_full = segment_by_labels(chest, downloads.chest_ct_labels(), table)
    assert mv_full.shape == chest.shape and mv_full.provenance["label_sha256"] == downloads.CHEST_CT_LABELS_SHA256
    del mv_full


def test_gz_magic_without_extension(tmp_path):
    path = _save_nifti(tmp_path / "ct.nii.gz", _small_ct(np.random.default_rng(9)))
    odd = tmp_path / "scan.bin"
    odd.write_bytes(path.read_bytes())
    assert load_volume(odd).sha256 == load_volume(path).sha256
    raw = tmp_path / "scan2.img"
    raw.write_bytes(gzip.decompress(path.read_bytes()))
    assert load_volume(raw).shape == (7, 6, 5)


def test_stat_of_inputs_unchanged_by_loading(tmp_path):
    path = _save_nifti(tmp_path / "ct.nii", _small_ct(np.random.default_rng(10)))
    st = path.stat()
    load_volume(path)
    st2 = path.stat()
    assert (st.st_mtime_ns, st.st_size, stat.S_IMODE(st.st_mode)) == (
        st2.st_mtime_ns,
        st2.st_size,
        stat.S_IMODE(st2.st_mode),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii"]
