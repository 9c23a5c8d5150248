"""The CUDA backend (issue 13): CPU-side planning everywhere, and on a GPU (``pytest -m gpu``) the
renderer against the CPU reference, closed forms, a converged march, noise statistics, seeds and
PyTorch interop. GPU tests skip without pycuda and an NVIDIA GPU.

On a GPU host without xraydb/SpekPy, detector tables come from ``$DRRFARM_TABLES_NPZ``
(``benchmarks/device/prepare_data.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from drrfarm.geometry import CArm, world_from_patient_default
from drrfarm.gpu.resident_cache import ResidentCache
from drrfarm.physics import Physics, finish_image, quantize_uint16
from drrfarm.render import cuda_available, reference
from drrfarm.render.cuda_plan import (
    bytes_per_voxel,
    camera_block,
    dominant_axes,
    layout_dims,
    plan_batch,
    rays_from_block,
    tables_block,
)
from drrfarm.samples.phantoms import Box, Cylinder, Phantom, Sphere, inserts_phantom, sphere_phantom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "device"))
from tables import load_tables  # noqa: E402

needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs pycuda and an NVIDIA GPU")

# Geometry of the benchmark: source 510 mm from the volume centre, SDD 1020 mm; 200 mm at the
# isocentre, sampled more coarsely here to keep the CPU reference quick.
CARM = CArm(sdd_mm=1020.0, sid_mm=510.0, height=128, width=128, pixel_mm=400.0 / 128)
POSES = {"ap": {}, "lateral": {"alpha_deg": 90.0}, "oblique30": {"alpha_deg": 30.0}}
SPECTRA = ("90KV_AL40", "60KV_AL35")


def rel_max(x: np.ndarray, ref: np.ndarray, floor: float = 0.01) -> float:
    """Max relative error over the pixels whose reference exceeds ``floor`` of its maximum."""
    ref = np.asarray(ref, dtype=np.float64)
    mask = ref > floor * ref.max()
    return float(np.max(np.abs(np.asarray(x, dtype=np.float64)[mask] - ref[mask]) / ref[mask]))


def philox_np(ctr: list[int], key: list[int]) -> list[int]:
    """Philox4x32-10 in plain Python (the kernel's twin)."""
    m0, m1, w0, w1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    c, k = list(ctr), list(key)
    for _ in range(10):
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
        k = [(k[0] + w0) & 0xFFFFFFFF, (k[1] + w1) & 0xFFFFFFFF]
    return c


# Random123's known-answer vectors for Philox4x32-10.
PHILOX_KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


# ============================================================================ CPU-side (no GPU needed)

def test_philox_twin_matches_known_answers() -> None:
    for ctr, key, expected in PHILOX_KAT:
        assert philox_np(ctr, key) == expected


def _placement(shape=(60, 50, 40), spacing=(0.8, 1.1, 2.5)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    return a


@pytest.mark.parametrize("pose", [{}, {"alpha_deg": 90.0}, {"alpha_deg": 30.0, "beta_deg": 20.0},
                                  {"alpha_deg": 45.0}, {"beta_deg": 90.0}, {"alpha_deg": 70.0, "gamma_deg": 30.0}])
def test_camera_block_reproduces_reference_rays_and_axes(pose: dict) -> None:
    carm = CArm(sdd_mm=1020.0, sid_mm=510.0, height=37, width=53, pixel_mm=6.0)
    cam = carm.camera(**pose)
    world_from_ijk = _placement()
    M = reference.ijk_from_world(world_from_ijk)
    src, dirs, t_det = reference.camera_rays_ijk(cam, M)
    block = camera_block(cam, M, 0.4, 1)
    s2, d2, t2 = rays_from_block(block, cam.height, cam.width)
    np.testing.assert_allclose(s2, src, rtol=0, atol=1e-9)
    np.testing.assert_allclose(d2, dirs, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(t2, t_det, rtol=1e-12)
    brute = set(np.unique(np.argmax(np.abs(dirs), axis=1)).tolist())
    planned = dominant_axes(cam, M)
    assert brute <= planned  # every axis a ray uses has its layout
    assert len(planned) <= len(brute) + 1  # and ties aside, no extra layout


def test_plan_batch_matches_camera_block() -> None:
    carm = CArm(sdd_mm=1020.0, sid_mm=510.0, height=37, width=53, pixel_mm=6.0)
    cams = [carm.camera(alpha_deg=a, beta_deg=b) for a, b in ((0, 0), (90, 0), (30, 15), (-40, 100))]
    M = reference.ijk_from_world(_placement())
    records, principal, corners = plan_batch(cams, M, 0.4, (60, 50, 40))
    for cam, rec, pa in zip(cams, records, principal, strict=True):
        np.testing.assert_allclose(rec, camera_block(cam, M, 0.4, int(pa)), rtol=1e-13, atol=1e-12)
    assert corners <= {0, 1, 2} and set(principal.tolist()) <= {0, 1, 2}
    inside = CArm(sdd_mm=100.0, sid_mm=5.0, height=8, width=8).camera()
    from drrfarm.errors import GeometryError

    with pytest.raises(GeometryError):
        plan_batch([inside], M, 0.4, (60, 50, 40))


def test_tables_block_layout() -> None:
    from drrfarm.physics import DetectorTables

    t1 = DetectorTables(np.arange(6.0).reshape(3, 2), np.array([0.2, 0.3, 0.5]), np.array([0.5, 0.25, 0.25]), 40.0)
    t2 = DetectorTables(np.ones((1, 2)), np.array([1.0]), np.array([1.0]), 60.0)
    block, nbmax, stride = tables_block([t1, t2], 2)
    assert nbmax == 3 and stride % 4 == 0 and stride >= 2 + 3 * 4
    assert block[0, 0] == 3 and block[0, 1] == 40.0 and block[1, 0] == 1
    np.testing.assert_allclose(block[0, 2:5], [0.2, 0.3, 0.5], rtol=1e-7)
    np.testing.assert_array_equal(block[0, 2 + 3 : 2 + 6], [0.5, 0.25, 0.25])
    np.testing.assert_array_equal(block[0, 2 + 6 : 2 + 12], np.arange(6.0))


def test_memory_per_voxel_fits_the_budget() -> None:
    voxels = 512 * 512 * 600
    assert bytes_per_voxel(3) == 8 and bytes_per_voxel(1) == 2 and bytes_per_voxel(5) == 16
    assert voxels * bytes_per_voxel(3, layouts=3) <= 4e9  # all three layouts of a 3-material CT
    assert layout_dims((512, 512, 600), 2) == (512, 512, 600)
    assert layout_dims((10, 20, 30), 0) == (30, 20, 10)
    assert layout_dims((10, 20, 30), 1) == (30, 10, 20)


class _Entry:
    def __init__(self, n: int) -> None:
        self.n = n
        self.released = False

    @property
    def nbytes(self) -> int:
        return 0 if self.released else self.n

    def release(self) -> None:
        self.released = True


def test_resident_cache_lru_budget_and_stats() -> None:
    cache = ResidentCache(100)
    a, b, c = _Entry(40), _Entry(40), _Entry(40)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now most recent
    assert cache.get("x") is None
    assert cache.make_room(40, keep={"c"}) == 0  # evicts b (least recent), not a
    cache.put("c", c)
    assert b.released and not a.released
    st = cache.stats()
    assert st == {"hits": 1, "misses": 1, "volumes": 2, "bytes_resident": 80, "evictions": 1, "budget_bytes": 100}
    assert cache.make_room(500, keep={"a", "c"}) > 0  # nothing evictable left: reports the overshoot


# ============================================================================ GPU

@pytest.fixture(scope="module")
def backend():
    if not cuda_available():
        pytest.skip("needs pycuda and an NVIDIA GPU")
    from drrfarm.render.cuda import CudaBackend

    return CudaBackend(device=0)


@pytest.fixture(scope="module")
def exact_backend():
    if not cuda_available():
        pytest.skip("needs pycuda and an NVIDIA GPU")
    from drrfarm.render.cuda import CudaBackend

    return CudaBackend(device=0, exact_interpolation=True)


@pytest.fixture(scope="module")
def chest():
    from drrfarm.samples.downloads import chest_ct
    from drrfarm.volume import load_volume, segment_by_thresholds

    volume = load_volume(chest_ct())
    mv = segment_by_thresholds(volume)
    wfp = world_from_patient_default(volume.centre_patient_mm())
    dens = reference.pack_volume(mv.densities_g_cm3)
    world_from_ijk = wfp @ mv.patient_from_ijk
    return mv, wfp, dens, world_from_ijk


def _cpu_line_integrals(dens, world_from_ijk, spacing, cam, physics) -> np.ndarray:
    return reference.line_integrals(dens, world_from_ijk, spacing, cam, method=physics.method,
                                    step_voxels=physics.step_voxels)


@pytest.mark.gpu
@needs_gpu
def test_philox_on_gpu_matches_known_answers(backend) -> None:
    import pycuda.driver as drv

    inp = np.array([c + k for c, k, _ in PHILOX_KAT], dtype=np.uint32)
    out = np.zeros((len(PHILOX_KAT), 4), dtype=np.uint32)
    with backend._gpu.context():
        backend._fn("philox_kat")(drv.In(inp), drv.Out(out), np.int32(len(PHILOX_KAT)), block=(32, 1, 1),
                                  grid=(1, 1))
    assert out.tolist() == [e for _, _, e in PHILOX_KAT]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("lam", [0.3, 4.0, 9.9, 10.0, 37.5, 1000.0, 2.5e5])
def test_poisson_sampler_mean_and_variance(backend, lam: float) -> None:
    import pycuda.driver as drv

    n = 400_000
    out = np.zeros(n, dtype=np.float64)
    with backend._gpu.context():
        backend._fn("poisson_draws")(drv.In(np.array([lam])), drv.Out(out), np.int32(n), np.int32(n),
                                     np.uint32(1234), block=(256, 1, 1), grid=((n + 255) // 256, 1))
    assert np.all(out == np.floor(out)) and out.min() >= 0
    assert abs(out.mean() / lam - 1) < 0.01 + 3 / np.sqrt(n * lam)
    assert abs(out.var() / lam - 1) < 0.02


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method", ["joseph", "trilinear"])
@pytest.mark.parametrize("pose", list(POSES))
def test_chest_ct_matches_cpu_reference(backend, exact_backend, chest, method: str, pose: str, record) -> None:
    """CUDA vs CPU reference ≤ 1e-3 relative (pixels above 1% of the maximum), two spectra."""
    mv, wfp, dens, world_from_ijk = chest
    cam = CARM.camera(**POSES[pose])
    physics = Physics(method=method, output="line_integral")
    spacing = mv.spacing_mm
    A_ref = _cpu_line_integrals(dens, world_from_ijk, spacing, cam, physics)
    handle = backend.prepare(mv, wfp)
    A_gpu = backend.line_integrals(handle, [cam], physics)[0]
    A_exact = exact_backend.line_integrals(exact_backend.prepare(mv, wfp), [cam], physics)[0]
    err_total = rel_max(A_gpu.sum(0), A_ref.sum(0))
    per_mat = [rel_max(A_gpu[m], A_ref[m]) for m in range(A_ref.shape[0])]
    per_mat_exact = [rel_max(A_exact[m], A_ref[m]) for m in range(A_ref.shape[0])]
    hw = ", ".join(f"{e:.2e}" for e in per_mat)
    ex = ", ".join(f"{e:.2e}" for e in per_mat_exact)
    record(f"chest {pose} {method}: line integral (total) {err_total:.2e}; per material hw [{hw}], exact [{ex}]")
    assert err_total <= 1e-3
    assert max(per_mat_exact) <= 1e-3
    for spec in SPECTRA:
        tables = load_tables(spec, mv.material_names, "ideal")
        ref_img = finish_image(A_ref, tables, physics, cam, 0)
        img = backend.render(handle, [cam], tables, physics, [0])[0]
        err = rel_max(img, ref_img)
        record(f"chest {pose} {method} {spec}: image (line_integral output) {err:.2e}")
        assert err <= 1e-3


def _two_material_phantom() -> Phantom:
    return Phantom([Cylinder((0.0, 0.0, 0.0), 30.0, 50.0, "z", "water", 1.0),
                    Sphere((8.0, 5.0, 0.0), 10.0, "bone", 1.92)], shape=(80, 72, 64), spacing_mm=1.0, name="two")


PHANTOMS = {
    "sphere": lambda: sphere_phantom(radius_mm=30.0, shape=(72, 72, 72), spacing_mm=1.0),
    "two_materials": _two_material_phantom,
    "inserts": lambda: inserts_phantom(shape=(112, 112, 88), spacing_mm=1.0),
}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", list(PHANTOMS))
@pytest.mark.parametrize("method", ["joseph", "trilinear"])
def test_phantoms_match_reference_and_closed_form(backend, exact_backend, name: str, method: str, record) -> None:
    phantom = PHANTOMS[name]()
    mv = phantom.material_volume()
    packed = reference.pack_volume(mv.densities_g_cm3)
    carm = CArm(height=48, width=48, pixel_mm=4.0)
    physics = Physics(method=method)
    handle = backend.prepare(mv, np.eye(4))
    for pose in ({}, {"alpha_deg": 90.0}, {"alpha_deg": 30.0, "beta_deg": 15.0}):
        cam = carm.camera(**pose)
        A_gpu = backend.line_integrals(handle, [cam], physics)[0]
        A_ref = reference.line_integrals(packed, np.asarray(mv.patient_from_ijk), mv.spacing_mm, cam, method=method)
        dirs = cam.ray_directions_world().reshape(-1, 3)
        analytic = phantom.line_integrals_g_cm2(np.broadcast_to(cam.source_world_mm, dirs.shape), dirs)
        analytic = analytic.reshape(A_ref.shape).sum(0)
        A_exact = exact_backend.line_integrals(exact_backend.prepare(mv, np.eye(4)), [cam], physics)[0]
        err_ref = rel_max(A_gpu.sum(0), A_ref.sum(0))
        err_exact = rel_max(A_exact.sum(0), A_ref.sum(0))
        mask = analytic > 0.8 * analytic.max()
        err_closed = float(np.max(np.abs(A_gpu.sum(0)[mask] - analytic[mask]) / analytic[mask]))
        record(f"phantom {name} {method} {pose}: vs reference {err_ref:.2e} (exact interpolation {err_exact:.2e}), "
               f"vs closed form {err_closed:.2e}")
        # fp32 interpolation weights: the reference to fp16 storage precision
        assert err_exact <= 1e-3
        # the texture unit's 8-bit weights: below 1e-3 with 97% of the rays; sharp-edged rim rays reach 7e-3
        errs = np.abs(A_gpu.sum(0) - A_ref.sum(0))[A_ref.sum(0) > 0.01 * A_ref.sum(0).max()]
        errs = errs / A_ref.sum(0)[A_ref.sum(0) > 0.01 * A_ref.sum(0).max()]
        assert np.quantile(errs, 0.97) <= 1e-3 and err_ref <= 1e-2
        if name == "sphere":
            assert err_closed < 0.005  # the reference's own bound (test_reference.py)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("pose", list(POSES))
def test_every_method_within_1e3_of_converged_march(backend, chest, pose: str, record) -> None:
    """Line integrals vs a march at 1/16 voxel (positions from t, float64 sum): ≤ 1e-3 max."""
    mv, wfp, dens, world_from_ijk = chest
    carm = CArm(sdd_mm=1020.0, sid_mm=510.0, height=48, width=48, pixel_mm=400.0 / 48)
    cam = carm.camera(**POSES[pose])
    converged = _cpu_line_integrals(dens, world_from_ijk, mv.spacing_mm, cam,
                                    Physics(method="trilinear", step_voxels=1 / 16)).sum(0)
    handle = backend.prepare(mv, wfp)
    for physics in (Physics(method="joseph"), Physics(method="trilinear", step_voxels=0.5),
                    Physics(method="trilinear", step_voxels=1.0)):
        got = backend.line_integrals(handle, [cam], physics)[0].sum(0)
        err = rel_max(got, converged)
        own = rel_max(_cpu_line_integrals(dens, world_from_ijk, mv.spacing_mm, cam, physics).sum(0), converged)
        record(f"converged {pose} {physics.method} step {physics.step_voxels}: {err:.2e} (CPU reference: {own:.2e})")
        if physics.step_voxels <= 0.5 or physics.method == "joseph":
            # Joseph's own discretisation reaches 1.03e-3 at 30° oblique in the CPU reference (the spec):
            # there the GPU must not add more than 1e-4 to it.
            assert err <= max(1e-3, own + 1e-4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("photons", [4.0, 1000.0, 1e5])
def test_noise_mean_and_variance_match_poisson(backend, photons: float, record) -> None:
    phantom = sphere_phantom(radius_mm=30.0, shape=(72, 72, 72), spacing_mm=1.0)
    mv = phantom.material_volume()
    handle = backend.prepare(mv, np.eye(4))
    cam = CArm(height=128, width=128, pixel_mm=1.5).camera()
    tables = load_tables("90KV_AL40", mv.material_names, "photon_counting")
    clean = Physics(detector="photon_counting", output="transmission")
    q = backend.render(handle, [cam], tables, clean, [0])[0].astype(np.float64)
    noisy = Physics(detector="photon_counting", output="transmission", photons=photons)
    n_img = 16
    imgs = backend.render(handle, [cam] * n_img, tables, noisy, list(range(100, 100 + n_img)))
    counts = np.rint(imgs.astype(np.float64) * photons)
    lam = photons * q[None]
    mean_ratio = counts.mean() / lam.mean()
    var_ratio = ((counts - lam) ** 2).mean() / lam.mean()
    record(f"noise N={photons:g}: mean ratio {mean_ratio:.4f}, variance ratio {var_ratio:.4f}")
    assert abs(mean_ratio - 1) < 0.02
    assert abs(var_ratio - 1) < 0.02


@pytest.mark.gpu
@needs_gpu
def test_energy_integrating_noise_and_electronic_noise(backend) -> None:
    phantom = sphere_phantom(radius_mm=30.0, shape=(72, 72, 72), spacing_mm=1.0)
    mv = phantom.material_volume()
    handle = backend.prepare(mv, np.eye(4))
    cam = CArm(height=96, width=96, pixel_mm=2.0).camera()
    tables = load_tables("90KV_AL40", mv.material_names, "ideal")
    clean = backend.render(handle, [cam], tables, Physics(output="transmission"), [0])[0]
    imgs = backend.render(handle, [cam] * 16, tables, Physics(output="transmission", photons=2000.0),
                          list(range(16)))
    assert abs(imgs.mean() / clean.mean() - 1) < 0.01
    sigma_e = 20.0
    with_e = backend.render(handle, [cam] * 16, tables,
                            Physics(output="transmission", photons=2000.0, electronic_noise=sigma_e),
                            list(range(16)))
    extra = ((with_e - imgs) * 2000.0).std()  # same seeds: the Poisson part is identical
    assert abs(extra / sigma_e - 1) < 0.02


@pytest.mark.gpu
@needs_gpu
def test_joseph_without_the_rays_own_layout_is_the_same(chest, record) -> None:
    """One layout per volume: rays dominant along another axis are sampled from it at the same points."""
    from drrfarm.render.cuda import CudaBackend

    mv, wfp, dens, world_from_ijk = chest
    single = CudaBackend(device=0, joseph_layouts=False, exact_interpolation=True)
    handle = single.prepare(mv, wfp)
    carm = CArm(sdd_mm=1020.0, sid_mm=510.0, height=96, width=96, pixel_mm=6.0)
    cam = carm.camera(alpha_deg=44.0)  # rays on both sides of the i/j diagonal
    M = reference.ijk_from_world(world_from_ijk)
    _, dirs, _ = reference.camera_rays_ijk(cam, M)
    assert len(np.unique(np.argmax(np.abs(dirs), axis=1))) == 2
    got = single.line_integrals(handle, [cam], Physics(method="joseph"))[0]
    assert len(handle.layouts) == 1
    ref = _cpu_line_integrals(dens, world_from_ijk, mv.spacing_mm, cam, Physics(method="joseph"))
    err = rel_max(got.sum(0), ref.sum(0))
    record(f"joseph fallback (one layout), 44 deg: {err:.2e}")
    assert err <= 1e-3


@pytest.mark.gpu
@needs_gpu
def test_seeds_reproduce_and_batches_do_not_matter(backend) -> None:
    phantom = sphere_phantom(radius_mm=20.0, shape=(48, 48, 48))
    mv = phantom.material_volume()
    handle = backend.prepare(mv, np.eye(4))
    carm = CArm(height=64, width=64, pixel_mm=2.0)
    cam, cam2 = carm.camera(), carm.camera(alpha_deg=40.0)
    tables = load_tables("90KV_AL40", mv.material_names, "ideal")
    physics = Physics(output="transmission", photons=500.0, electronic_noise=2.0)
    a = backend.render(handle, [cam], tables, physics, [7])[0]
    b = backend.render(handle, [cam2, cam, cam], tables, physics, [3, 7, 8])
    assert np.array_equal(a, b[1])
    assert not np.array_equal(b[1], b[2])
    big = backend.render(handle, [cam], tables, physics, [2**63 + 5])[0]
    assert not np.array_equal(big, a)


@pytest.mark.gpu
@needs_gpu
def test_outputs_dtypes_and_solid_angle_match_reference(exact_backend, chest, record) -> None:
    """Every detector and output transform; fp32 interpolation weights so that exp/log's magnification
    of line-integral errors (transmission error = μA × relative error of A) stays out of the check."""
    backend = exact_backend
    mv, wfp, dens, world_from_ijk = chest
    cam = CARM.camera(alpha_deg=30.0)
    handle = backend.prepare(mv, wfp)
    A_ref = _cpu_line_integrals(dens, world_from_ijk, mv.spacing_mm, cam, Physics(method="joseph"))
    for detector in ("ideal", "photon_counting", "csi"):
        tables = load_tables("90KV_AL40", mv.material_names, detector)
        for output in ("line_integral", "transmission", "intensity", "neglog"):
            physics = Physics(method="joseph", detector=detector, output=output, solid_angle=True)
            ref_img = finish_image(A_ref, tables, physics, cam, 0)
            f32 = backend.render_async(handle, [cam], tables, physics, [0], dtype="float32").wait()[0]
            err = float(np.max(np.abs(f32 - ref_img))) if output == "neglog" else rel_max(f32, ref_img)
            record(f"output {detector}/{output}: {err:.2e}")
            assert err <= 1e-3
            f16 = backend.render_async(handle, [cam], tables, physics, [0], dtype="float16").wait()[0]
            np.testing.assert_allclose(f16.astype(np.float32), f32, rtol=2**-10, atol=1e-7)
            job = backend.render_async(handle, [cam], tables, physics, [0], dtype="uint16")
            u16 = job.wait()[0]
            q, scale = quantize_uint16(f32[None], output)
            assert job.scale == scale
            np.testing.assert_array_equal(u16, q[0])  # the GPU quantiser is the CPU's, bit for bit


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("output", ["line_integral", "transmission", "intensity", "neglog"])
def test_split_pipeline_equals_fused_kernel(backend, output: str) -> None:
    from drrfarm.render.cuda import CudaBackend

    assert not backend.fused  # the default is the split pipeline
    two = CudaBackend(device=0, fused=True)
    for name in ("sphere", "inserts"):
        mv = PHANTOMS[name]().material_volume()
        cams = [CArm(height=40, width=56, pixel_mm=4.0).camera(alpha_deg=a) for a in (0.0, 35.0)]
        tables = load_tables("90KV_AL40", mv.material_names, "ideal")
        physics = Physics(output=output, photons=3000.0, electronic_noise=1.5, solid_angle=True, method="joseph")
        a = backend.render(backend.prepare(mv, np.eye(4)), cams, tables, physics, [5, 6])
        b = two.render(two.prepare(mv, np.eye(4)), cams, tables, physics, [5, 6])
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
        li_a = backend.line_integrals(backend.prepare(mv, np.eye(4)), cams, physics)
        li_b = two.line_integrals(two.prepare(mv, np.eye(4)), cams, physics)
        np.testing.assert_array_equal(li_a, li_b)


@pytest.mark.gpu
@needs_gpu
def test_one_launch_mixes_spectra(backend) -> None:
    phantom = inserts_phantom(shape=(112, 112, 88))
    mv = phantom.material_volume()
    handle = backend.prepare(mv, np.eye(4))
    carm = CArm(height=64, width=64, pixel_mm=3.0)
    cams = [carm.camera(alpha_deg=a) for a in (0.0, 30.0, 60.0)]
    t90 = load_tables("90KV_AL40", mv.material_names, "ideal")
    t60 = load_tables("60KV_AL35", mv.material_names, "ideal")
    physics = Physics(output="transmission")
    mixed = backend.render(handle, cams, [t90, t60, t90], physics, [0, 0, 0])
    assert np.array_equal(mixed[0], backend.render(handle, cams[:1], t90, physics, [0])[0])
    assert np.array_equal(mixed[1], backend.render(handle, cams[1:2], t60, physics, [0])[0])
    assert not np.allclose(mixed[1], backend.render(handle, cams[1:2], t90, physics, [0])[0])


@pytest.mark.gpu
@needs_gpu
def test_volume_cache_hits_budget_and_layout_memory(backend) -> None:
    from drrfarm.render.cuda import CudaBackend

    small = CudaBackend(device=0, memory_budget_bytes=int(2.5 * 72**3 * 2))
    a = sphere_phantom(radius_mm=30.0, shape=(72, 72, 72)).material_volume()
    b = sphere_phantom(radius_mm=25.0, shape=(72, 72, 72)).material_volume()
    cam = CArm(height=32, width=32, pixel_mm=4.0).camera()
    ha = small.prepare(a, np.eye(4), layouts=(0, 1))
    assert small.prepare(a, np.eye(4)) is ha
    st = small.cache_stats()
    assert st["hits"] == 1 and st["misses"] == 1 and st["bytes_resident"] == 2 * 72**3 * 2
    hb = small.prepare(b, np.eye(4))
    small.line_integrals(hb, [cam], Physics(method="joseph"))  # needs 1 more layout: a is evicted
    st = small.cache_stats()
    assert st["evictions"] >= 1 and st["bytes_resident"] <= small.memory_budget_bytes
    assert not ha.layouts


@pytest.mark.gpu
@needs_gpu
def test_gpu_index_is_checked() -> None:
    from drrfarm.errors import BackendError
    from drrfarm.render.cuda import CudaBackend

    with pytest.raises(BackendError, match="GPU index"):
        CudaBackend(device=99)


_INTEROP = textwrap.dedent("""
    import sys, numpy as np
    order = sys.argv[1]
    def use_torch():
        import torch
        x = torch.arange(10, device="cuda", dtype=torch.float32)
        return float((x * 2).sum())
    def use_drrfarm():
        from drrfarm.geometry import CArm
        from drrfarm.physics import DetectorTables, Physics
        from drrfarm.render.cuda import CudaBackend
        from drrfarm.samples.phantoms import sphere_phantom
        be = CudaBackend(device=0)
        h = be.prepare(sphere_phantom(radius_mm=20.0, shape=(48, 48, 48)).material_volume(), np.eye(4))
        tab = DetectorTables(np.array([[0.2]]), np.array([1.0]), np.array([1.0]), 60.0)
        cam = CArm(height=32, width=32, pixel_mm=3.0).camera()
        job = be.render_async(h, [cam], tab, Physics(), [0], dtype="float16", to_host=False)
        t = job.torch()
        assert t.data_ptr() == job.images.ptr, "not zero-copy"
        import torch
        out = torch.empty((1, 32, 32), device="cuda", dtype=torch.float32)
        be.render_async(h, [cam], tab, Physics(), [0], out=out, to_host=False).wait()
        assert torch.allclose(out, t.float(), rtol=1e-3, atol=1e-3)
        return float(t.float().max())
    if order == "torch-first":
        a = use_torch(); b = use_drrfarm(); c = use_torch()
    else:
        b = use_drrfarm(); a = use_torch(); c = use_drrfarm()
    assert a == 90.0 and b > 0
    print("OK", order)
""")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("order", ["torch-first", "drrfarm-first"])
def test_torch_interop_in_either_import_order(order: str) -> None:
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _INTEROP, order], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"OK {order}" in proc.stdout


@pytest.mark.gpu
@needs_gpu
def test_nvrtc_builds_a_loadable_module(backend) -> None:
    import pycuda.driver as drv

    from drrfarm.gpu.build import find_nvrtc, kernel_source, nvrtc_compile

    lib = find_nvrtc()
    if lib is None:
        pytest.skip("no libnvrtc on this machine")
    image = nvrtc_compile(kernel_source(), backend._gpu.arch, {}, lib)
    with backend._gpu.context():
        mod = drv.module_from_buffer(image)
        assert mod.get_function("drr_joseph_c4_t1_hw") is not None


@pytest.fixture
def record(request):
    """Append a measured number to $DRRFARM_GPU_REPORT (a text file) and print it."""
    path = os.environ.get("DRRFARM_GPU_REPORT")

    def _rec(line: str) -> None:
        print(line)
        if path:
            with open(path, "a") as f:
                f.write(f"{request.node.name}: {line}\n")

    return _rec


def test_box_phantom_chords_are_available() -> None:
    # the closed forms the GPU tests rely on exist on every machine
    ph = Phantom([Box((0.0, 0.0, 0.0), (20.0, 20.0, 20.0), "water", 1.0)], shape=(32, 32, 32))
    li = ph.line_integrals_g_cm2(np.array([[0.0, -100.0, 0.0]]), np.array([[0.0, 1.0, 0.0]]))
    assert abs(li.sum() - 2.0) < 1e-12
