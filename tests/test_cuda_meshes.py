"""The CUDA backend with meshes (``render`` / ``line_integrals`` with ``meshes=``) against the CPU backend:
additive and replacing tools in one pass, both march methods, per-image poses, scenes mixed in one call,
the overflow error. GPU only (``pytest -m gpu``).

On a GPU host without xraydb/SpekPy, detector tables come from ``$DRRFARM_TABLES_NPZ`` (the image tests
skip when neither gives tables for the mesh materials).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from drrfarm.errors import BackendError
from drrfarm.geometry import CArm
from drrfarm.physics import Physics, finish_image
from drrfarm.render import get_backend, output_material_names
from drrfarm.render.mesh_reference import trace_meshes
from drrfarm.samples.phantoms import Box, Cylinder, Phantom

pytestmark = pytest.mark.gpu
pytest.importorskip("trimesh")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "device"))
from tables import load_tables  # noqa: E402

CARM = CArm(height=96, width=112, pixel_mm=1.2)
CAMERAS = [CARM.camera(alpha_deg=a, beta_deg=b) for a, b in ((0.0, 0.0), (30.0, -15.0), (90.0, 10.0))]


def rel_max(x: np.ndarray, ref: np.ndarray, floor: float = 0.01) -> float:
    """Max relative error over the pixels whose reference exceeds ``floor`` of its maximum."""
    ref = np.asarray(ref, dtype=np.float64)
    mask = ref > floor * ref.max()
    return float(np.max(np.abs(np.asarray(x, dtype=np.float64)[mask] - ref[mask]) / ref[mask]))


def phantom_volume():
    return Phantom([Cylinder((0.0, 0.0, 0.0), 35.0, 70.0, "z", "water", 1.0),
                    Box((0.0, 0.0, 0.0), (40.0, 30.0, 50.0), "bone", 1.85)],
                   shape=(72, 72, 80), spacing_mm=1.0, name="bone-block").material_volume()


def tools(advance_mm: float = 0.0):
    from drrfarm.meshes import kwire_mesh, screw_mesh

    return [
        screw_mesh(sections=48).aligned((8.0, 2.0, 10.0), (-8.0, -3.0, -25.0), advance_mm=advance_mm),
        screw_mesh(sections=48).aligned((-6.0, 4.0, 12.0), (10.0, -2.0, -20.0)),  # crosses the first
        kwire_mesh(diameter_mm=2.0, length_mm=120.0, mode="add").aligned((0.0, 0.0, 30.0), (0.0, 40.0, -60.0)),
    ]


@pytest.fixture(scope="module")
def volume():
    return phantom_volume()


@pytest.fixture(scope="module")
def backends():
    from drrfarm.render import cuda_available

    if not cuda_available():
        pytest.skip("needs pycuda and an NVIDIA GPU")
    from drrfarm.render.cuda import CudaBackend

    return get_backend("cpu"), CudaBackend(device=0, exact_interpolation=True), CudaBackend(device=0)


@pytest.mark.parametrize("method", ["trilinear", "joseph"])
def test_mesh_line_integrals_match_the_cpu(backends, volume, method: str) -> None:
    cpu, exact, _ = backends
    physics = Physics(method=method)
    meshes = [tools(advance_mm=a) for a in (0.0, -4.0, 3.0)]  # each image its own poses
    ref = cpu.line_integrals(cpu.prepare(volume), CAMERAS, physics, meshes=meshes)
    got = exact.line_integrals(exact.prepare(volume), CAMERAS, physics, meshes=meshes)
    names = output_material_names(volume.material_names, meshes[0])
    assert got.shape == ref.shape == (3, len(names), 96, 112) and names[-2:] == ["titanium", "steel"]
    for b, cam in enumerate(CAMERAS):
        chord = trace_meshes(meshes[b], cam).chords_mm
        assert chord[:2].max() > 5.0  # the screws are seen
        for m in range(len(names)):
            if ref[b, m].max() > 0:
                assert rel_max(got[b, m], ref[b, m]) <= 1e-3, (b, names[m])
        assert rel_max(got[b].sum(0), ref[b].sum(0)) <= 1e-3
    # the replacing screws removed bone where they sit in it (their heads stick out into water)
    plain = exact.line_integrals(exact.prepare(volume), CAMERAS[:1], physics)[0]
    bone = names.index("bone")
    assert np.count_nonzero(got[0, bone] < plain[bone] - 0.1) > 50
    assert np.all(got[0, bone] <= plain[bone] + 1e-3)


def test_mesh_images_match_the_cpu(backends, volume) -> None:
    cpu, exact, fast = backends
    physics = Physics(output="line_integral")
    meshes = tools()
    names = output_material_names(volume.material_names, meshes)
    try:
        tables = load_tables("90KV_AL40", names, "ideal")
    except Exception as exc:  # noqa: BLE001 - no xraydb and no precomputed tables for these materials
        pytest.skip(f"no detector tables for {names}: {exc}")
    A = cpu.line_integrals(cpu.prepare(volume), CAMERAS, physics, meshes=meshes)
    ref = np.stack([finish_image(A[b], tables, physics, cam, 0) for b, cam in enumerate(CAMERAS)])
    img = exact.render(exact.prepare(volume), CAMERAS, tables, physics, [0, 0, 0], meshes=meshes)
    assert rel_max(img, ref) <= 1e-3
    img_hw = fast.render(fast.prepare(volume), CAMERAS, tables, physics, [0, 0, 0], meshes=meshes)
    assert rel_max(img_hw, ref) <= 1e-2  # the texture unit's 8-bit filter weights
    # fused=True is not used with meshes: same images
    from drrfarm.render.cuda import CudaBackend

    fused = CudaBackend(device=0, exact_interpolation=True, fused=True)
    np.testing.assert_allclose(fused.render(fused.prepare(volume), CAMERAS, tables, physics, [0, 0, 0],
                                            meshes=meshes), img, rtol=1e-6, atol=1e-6)


def test_mixed_scenes_and_images_without_meshes(backends, volume) -> None:
    """One call: images with the screws, with only the K-wire, and with nothing — grouped by scene."""
    cpu, exact, _ = backends
    physics = Physics()
    t = tools()
    per = [t, [t[2]], [], t]
    cams = CAMERAS + CAMERAS[:1]
    got = exact.line_integrals(exact.prepare(volume), cams, physics, meshes=per)
    ref = cpu.line_integrals(cpu.prepare(volume), cams, physics, meshes=per)
    assert got.shape == ref.shape
    for b in range(len(cams)):
        assert rel_max(got[b].sum(0), ref[b].sum(0)) <= 1e-3, b
    plain = exact.line_integrals(exact.prepare(volume), [cams[2]], physics)[0]
    np.testing.assert_array_equal(got[2][: plain.shape[0]], plain)  # no meshes: the unchanged fast path


def test_too_many_replacing_intervals_is_an_error(volume) -> None:
    from drrfarm.render import cuda_available

    if not cuda_available():
        pytest.skip("needs pycuda and an NVIDIA GPU")
    from drrfarm.meshes import cylinder_mesh
    from drrfarm.render.cuda import CudaBackend

    backend = CudaBackend(device=0, mesh_kmax=1)
    rods = [cylinder_mesh(2.0, 30.0, mode="replace", material="titanium").aligned((x, 0.0, 15.0), (x, 0.0, -15.0))
            for x in (-10.0, 10.0)]
    lateral = CARM.camera(alpha_deg=90.0)  # both rods on the central rays, two separate intervals
    with pytest.raises(BackendError, match="mesh_kmax"):
        backend.line_integrals(backend.prepare(volume), [lateral], Physics(), meshes=rods)


def test_render_worker_on_cuda_matches_the_cpu_worker(tmp_path) -> None:
    """The farm's worker with tools, labels and landmarks: CUDA images = CPU images (≤ 1e-3, exact
    interpolation), identical annotations (they are computed on the CPU either way)."""
    from drrfarm.render import cuda_available

    if not cuda_available():
        pytest.skip("needs pycuda and an NVIDIA GPU")
    pytest.importorskip("xraydb")
    pytest.importorskip("nibabel")
    import yaml
    from test_farm_tools import spec_dict, write_phantom

    from drrfarm.farm.plan import make_plan
    from drrfarm.farm.spec import load_spec
    from drrfarm.farm.worker import RenderWorker

    write_phantom(tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path, tmp_path / "out")), encoding="utf-8")
    spec = load_spec(path)
    task = make_plan(spec).task(0)
    results = {}
    for name, options in (("cpu", {}), ("cuda", {"exact_interpolation": True})):
        worker = RenderWorker(spec, backend=name, backend_options=options, warm_up=False)
        try:
            results[name] = worker.render_images(task)[:2]
        finally:
            worker.close()
    (cpu_images, cpu_rows), (gpu_images, gpu_rows) = results["cpu"], results["cuda"]
    assert rel_max(gpu_images, cpu_images) <= 1e-3
    for a, b in zip(cpu_rows, gpu_rows, strict=True):
        assert np.array_equal(a["masks"], b["masks"]) and a["tool_world_from_mesh"] == b["tool_world_from_mesh"]
        np.testing.assert_array_equal(a["landmarks_uv"], b["landmarks_uv"])
