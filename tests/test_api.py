"""The public Python API (``import drrfarm``): the README's example, and the names it exports."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import drrfarm
from drrfarm.errors import BackendError, GeometryError, MeshError, PhysicsError, SpectrumError, VolumeError

ROOT = Path(__file__).resolve().parents[1]

# A 48 x 48 x 40 CT at 3 mm: water cylinder (0 HU) along z with a bone rod (1200 HU), air around it.
SHAPE = (48, 48, 40)
SPACING_MM = 3.0


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    i, j, _ = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in SHAPE), indexing="ij")
    r = np.hypot(i, j) * SPACING_MM
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[r < 60] = 0.0
    hu[np.hypot(i - 6, j) * SPACING_MM < 12] = 1200.0
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    affine[:3, 3] = -SPACING_MM * (np.asarray(SHAPE) - 1) / 2 + np.array([10.0, -5.0, 30.0])
    return hu, affine


@pytest.fixture(scope="module")
def ct() -> drrfarm.Volume:
    hu, affine = _phantom()
    return drrfarm.load_ct(hu, affine, name="phantom")


@pytest.fixture(scope="module")
def renderer(ct: drrfarm.Volume) -> drrfarm.Renderer:
    return drrfarm.Renderer(ct, backend="cpu", spectrum="mono:60", physics=drrfarm.Physics(photons=5000))


@pytest.fixture(scope="module")
def carm() -> drrfarm.CArm:
    return drrfarm.CArm(height=24, width=20, pixel_mm=12.0)


def _readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)\n```", section, flags=re.S).group(1)


# --------------------------------------------------------------------------------------------- README


def test_readme_example_renders_a_noisy_90kvp_drr_of_the_chest_ct(tmp_path: Path, monkeypatch) -> None:
    code = _readme_python_example()
    assert len(code.strip().splitlines()) <= 10, "the README's example stays at ten lines"
    assert "sample:chest_ct" in code and "90KV_AL40" in code and "photons" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the documented example, as a user runs it
    from PIL import Image

    png = np.asarray(Image.open(tmp_path / "drr.png"))
    meta = json.loads((tmp_path / "drr.json").read_text())
    image = namespace["image"]
    assert image.shape == png.shape == (256, 256) and image.dtype == np.float32
    assert meta["spectrum"]["kvp"] == 90 and meta["physics"]["photons"] == 10_000
    assert meta["physics"]["output"] == "line_integral" and meta["ct"].endswith("cxr.nii.gz")
    np.testing.assert_allclose(png * meta["image_scale"], np.clip(image, 0, None), atol=meta["image_scale"])
    assert 2.0 < float(np.median(image)) < 8.0  # a chest: several mean free paths


# ----------------------------------------------------------------------------------------- the names


def test_import_is_light_and_names_are_the_farms_objects() -> None:
    code = ("import sys, drrfarm; heavy = [m for m in ('torch', 'ray', 'pyarrow', 'mlflow', 'spekpy', 'xraydb') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from drrfarm import api, geometry, meshes, physics, spectrum, volume

    assert drrfarm.Renderer is api.Renderer and drrfarm.load_ct is api.load_ct
    assert drrfarm.Volume is volume.Volume and drrfarm.MaterialVolume is volume.MaterialVolume
    assert drrfarm.segment_by_thresholds is volume.segment_by_thresholds
    assert drrfarm.segment_by_labels is volume.segment_by_labels
    assert drrfarm.CArm is geometry.CArm and drrfarm.Camera is geometry.Camera
    assert drrfarm.Spectrum is spectrum.Spectrum and drrfarm.get_spectrum is spectrum.get_spectrum
    assert drrfarm.Physics is physics.Physics and drrfarm.Mesh is meshes.Mesh and drrfarm.load_mesh is meshes.load_mesh
    assert {"__version__", "DrrfarmError", "VolumeError"} <= set(drrfarm.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        drrfarm.no_such_name  # noqa: B018


@pytest.mark.parametrize("name", [n for n in drrfarm.__all__ if n != "__version__" and not n.endswith("Error")])
def test_public_names_document_units_or_shapes(name: str) -> None:
    obj = getattr(drrfarm, name)
    doc = inspect.getdoc(obj) or ""
    assert re.search(r"\bmm\b|keV|\bkV\b|g/cm|degrees|\(\w+, \w+|HU", doc), f"{name}: docstring names no unit or shape"
    if inspect.isclass(obj):
        for meth_name, meth in vars(obj).items():
            if callable(meth) and not meth_name.startswith("_"):
                assert inspect.getdoc(meth), f"{name}.{meth_name} has no docstring"


# ---------------------------------------------------------------------------------------------- CT


def test_load_ct_from_array_and_affine(ct: drrfarm.Volume) -> None:
    hu, affine = _phantom()
    assert ct.shape == SHAPE and ct.spacing_mm == (SPACING_MM,) * 3 and ct.source == "phantom"
    np.testing.assert_array_equal(ct.patient_from_ijk, affine)
    torch = pytest.importorskip("torch")
    again = drrfarm.load_ct(torch.from_numpy(hu), affine)
    assert again.sha256 == ct.sha256  # same voxels, same affine
    assert drrfarm.load_ct(ct) is ct
    nib = pytest.importorskip("nibabel")
    assert drrfarm.load_ct(nib.Nifti1Image(hu, affine)).sha256 == ct.sha256


@pytest.mark.parametrize(
    ("args", "kwargs", "needle"),
    [
        ((np.zeros((4, 4, 4)),), {}, "affine"),
        (("sample:chest_ct", np.eye(4)), {}, "affine"),
        ((np.zeros((4, 4)), np.eye(4)), {}, "3-D"),
        ((np.zeros((4, 4, 4)), np.diag([1.0, 1.0, 0.0, 1.0])), {}, "singular"),
        ((42,), {}, "source"),
        ((np.zeros((4, 4, 4)), np.eye(4)), {"series_uid": "1.2.3"}, "series_uid"),
        (("/no/such/ct.nii.gz",), {}, "/no/such/ct.nii.gz"),
    ],
)
def test_load_ct_errors_name_the_argument(args: tuple, kwargs: dict, needle: str) -> None:
    with pytest.raises(VolumeError, match=re.escape(needle)):
        drrfarm.load_ct(*args, **kwargs)


# --------------------------------------------------------------------------------------- materials


def test_thresholds_and_label_map_materials(ct: drrfarm.Volume, carm: drrfarm.CArm) -> None:
    cam = carm.camera(alpha_deg=0)
    default = drrfarm.Renderer(ct, backend="cpu")
    assert default.material_names == ["air", "soft_tissue", "bone"]
    two = drrfarm.Renderer(drrfarm.segment_by_thresholds(ct, thresholds_hu=[(-500.0, "air")], above="water"),
                           backend="cpu")
    assert two.material_names == ["air", "water"] and two.volume is None
    labels = np.where(ct.hu > 500, 2, np.where(ct.hu > -500, 1, 0)).astype(np.uint8)
    mats = drrfarm.segment_by_labels(ct, labels, {0: "air", 1: "muscle", 2: "cortical_bone"})
    by_label = drrfarm.Renderer(ct, materials=mats, backend="cpu")
    assert by_label.material_names == ["air", "muscle", "cortical_bone"] and by_label.volume is ct
    A = by_label.line_integrals(cam)
    assert A.shape == (3, 24, 20) and A.dtype == np.float32
    assert A[2].max() > 0 and A[1].max() > A[2].max()  # bone rod inside the water cylinder
    np.testing.assert_allclose(A.sum(0), default.line_integrals(cam).sum(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(VolumeError, match="materials"):
        drrfarm.Renderer(drrfarm.load_ct(np.zeros((4, 4, 4)), np.eye(4)), materials=mats, backend="cpu")
    with pytest.raises(VolumeError, match="materials"):
        drrfarm.Renderer(mats, materials=mats, backend="cpu")


# ----------------------------------------------------------------------------------------- render


def test_batch_equals_single_renders(renderer: drrfarm.Renderer, carm: drrfarm.CArm) -> None:
    cams = [carm.camera(alpha_deg=a, beta_deg=b) for a, b in [(0, 0), (30, 10), (-20, 5)]]
    batch = renderer.render(cams, seed=7)
    assert batch.shape == (3, 24, 20) and batch.dtype == np.float32
    for i, cam in enumerate(cams):
        single = renderer(cam, seed=7 + i)
        assert single.shape == (24, 20)
        np.testing.assert_array_equal(single, batch[i])
    np.testing.assert_array_equal(renderer.render(cams, seed=[7, 8, 9]), batch)
    assert not np.array_equal(renderer.render(cams[0], seed=8), batch[0])  # noise follows the seed
    quiet = renderer.render(cams[0], physics=drrfarm.Physics(), spectrum={"mono_kev": 60})
    assert abs(float(quiet.mean()) - float(batch[0].mean())) < 0.05
    torch = pytest.importorskip("torch")
    t = renderer.render_torch(cams, seed=7)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == (3, 24, 20)
    np.testing.assert_array_equal(t.numpy(), batch)
    assert tuple(renderer.render_torch(cams[1], seed=8).shape) == (24, 20)


def test_render_errors_name_the_argument(renderer: drrfarm.Renderer, carm: drrfarm.CArm, ct: drrfarm.Volume) -> None:
    cam = carm.camera()
    cases = [
        (lambda: renderer.render("ap"), GeometryError, "cameras"),
        (lambda: renderer.render([]), GeometryError, "cameras"),
        (lambda: renderer.render([cam, "x"]), GeometryError, r"cameras\[1\]"),
        (lambda: renderer.render([cam, carm.with_size(8, 8, 30.0).camera()]), GeometryError, "cameras"),
        (lambda: renderer.render(cam, seed=-1), PhysicsError, "seed"),
        (lambda: renderer.render([cam, cam], seed=[1]), PhysicsError, "seed"),
        (lambda: renderer.render(cam, physics="noisy"), PhysicsError, "physics"),
        (lambda: renderer.render(cam, physics={"photon": 10}), PhysicsError, "photon"),
        (lambda: renderer.render(cam, spectrum="200KV"), SpectrumError, "200KV"),
        (lambda: drrfarm.Renderer(ct, backend="gpu"), BackendError, "backend"),
        (lambda: drrfarm.Renderer(np.zeros((4, 4, 4))), VolumeError, "ct"),
        (lambda: drrfarm.Renderer(ct, backend="cpu", world_from_patient=np.eye(3)), VolumeError, "world_from_patient"),
        (lambda: renderer.save("x.png", np.zeros((3, 3)), cam), GeometryError, "image"),
        (lambda: renderer.to_world([1.0, 2.0]), GeometryError, "points_patient_mm"),
        (lambda: drrfarm.tool_mesh("drill"), MeshError, "kind"),
        (lambda: drrfarm.tool_mesh("kwire", radius_mm=1), MeshError, "radius_mm"),
    ]
    for call, error, needle in cases:
        with pytest.raises(error, match=needle):
            call()


def test_tools_render_in_the_same_pass_and_save_writes_the_cli_files(renderer: drrfarm.Renderer,
                                                                     carm: drrfarm.CArm, tmp_path: Path) -> None:
    cam = carm.camera()
    centre = renderer.materials.centre_patient_mm()
    np.testing.assert_allclose(renderer.to_world(centre), [0.0, 0.0, 0.0], atol=1e-9)
    wire = drrfarm.tool_mesh("kwire", diameter_mm=20.0, length_mm=200.0)
    tip, base = renderer.to_world([centre + [0, 0, 60], centre - [0, 0, 60]])
    posed = wire.aligned(tip, base)
    quiet = drrfarm.Physics()
    with_wire = renderer.render(cam, meshes=[posed], physics=quiet)
    without = renderer.render(cam, physics=quiet)
    column = int(round(cam.project(np.zeros(3))[0]))
    assert (with_wire[:, column] - without[:, column]).mean() > 1.0  # steel along the image's vertical axis
    assert np.allclose(with_wire[:, 0], without[:, 0])
    A = renderer.line_integrals(cam, meshes=[posed])
    assert A.shape == (4, 24, 20) and A[3].max() > 0  # the CT's three materials, then steel
    written = renderer.save(tmp_path / "wire.png", with_wire, cam, seed=3, meshes=[posed], physics=quiet, npy=True)
    assert [p.name for p in written] == ["wire.png", "wire.json", "wire.npy"]
    meta = json.loads((tmp_path / "wire.json").read_text())
    assert meta["tools"][0]["material"] == "steel" and meta["seed"] == 3 and meta["physics"]["photons"] is None
    assert drrfarm.Camera.from_dict(meta).P.shape == (3, 4) and meta["ct"] == "phantom"
    np.testing.assert_array_equal(np.load(tmp_path / "wire.npy"), with_wire)


@pytest.mark.gpu
def test_render_torch_stays_on_the_gpu(ct: drrfarm.Volume, carm: drrfarm.CArm) -> None:
    torch = pytest.importorskip("torch")
    gpu = drrfarm.Renderer(ct, backend="cuda", spectrum="mono:60", physics=drrfarm.Physics(photons=5000))
    cams = [carm.camera(alpha_deg=a) for a in (0, 30)]
    t = gpu.render_torch(cams, seed=7)
    assert t.is_cuda and t.dtype == torch.float32 and tuple(t.shape) == (2, 24, 20)
    np.testing.assert_allclose(t.cpu().numpy(), gpu.render(cams, seed=7), atol=1e-5)
    cpu = drrfarm.Renderer(ct, backend="cpu", spectrum="mono:60").render(cams)
    quiet = gpu.render(cams, physics=drrfarm.Physics())  # the texture unit's 8-bit weights at the phantom's steps
    np.testing.assert_allclose(quiet, cpu, atol=0.05)
    assert float(np.abs(quiet - cpu).mean()) < 5e-3
    assert gpu.render_torch(cams[0], device="cpu").device.type == "cpu"
