"""scatter/scatter.cu against the CPU reference Monte Carlo (the same photon histories from the same
seeds), the narrow-beam and slab checks at GPU photon counts, and the fast estimate on the chest CT.
GPU only. On a GPU host without xraydb/xraylib/SpekPy the tables come from ``$DRRFARM_SCATTER_TABLES_NPZ``."""

from __future__ import annotations

import numpy as np
import pytest
from scatter_cases import axis_camera, bone_in_water_volume, slab_volume, tables_for

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    pytest.importorskip("pycuda.driver")
    from drrfarm.scatter.cuda import CudaScatter

    return CudaScatter()


def test_gpu_replays_the_cpu_reference_histories(gpu) -> None:
    from drrfarm.scatter import simulate

    vol = bone_in_water_volume(centre_z_mm=700.0)
    tables = tables_for("90KV_AL40", vol.material_names)
    cams = [axis_camera(250.0, 48, sdd_mm=1000.0)]
    res = gpu.resident("bone", vol)
    for solid_angle in (False, True):
        ref = simulate(vol, tables, cams[0], 40_000, seed=123, tally_shape=(12, 12), solid_angle=solid_angle)
        out = gpu.simulate(res, tables, cams, 40_000, [123], tally_shape=(12, 12), solid_angle=solid_angle)[0]
        assert out.interactions == ref.interactions  # every history identical
        for k in ("emitted", "deposited", "escaped", "detected"):
            assert out.energy_kev[k] == pytest.approx(ref.energy_kev[k], rel=1e-9), k
        for name in ("scatter_signal", "scatter_counts", "primary_signal", "primary_counts"):
            a, b = getattr(out, name), getattr(ref, name)
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7 * b.max(), err_msg=name)  # float32 tallies


def test_gpu_forced_detection_replays_the_cpu_reference(gpu) -> None:
    """scatter_forced against drrfarm.scatter.forced: the same collisions from the same histories, the same
    expected scatter on every bin (float32 tally sums: within 1e-4), for a batch of two cameras."""
    from drrfarm.geometry import Camera
    from drrfarm.scatter.forced import simulate_forced

    vol = bone_in_water_volume(centre_z_mm=600.0)
    tables = tables_for("90KV_AL40", vol.material_names)
    base = axis_camera(240.0, 64)
    tilted = Camera(base.K, np.array([[1, 0, 0], [0, 0.98, -0.198997], [0, 0.198997, 0.98]]), base.t, 64, 64,
                    base.pixel_mm)
    res = gpu.resident("bone600", vol)
    out = gpu.simulate(res, tables, [base, tilted], 3_000, [7, 8], tally_shape=(8, 8), solid_angle=True,
                       forced_step_mm=5.0)
    for cam, seed, got in zip((base, tilted), (7, 8), out, strict=True):
        ref = simulate_forced(vol, tables, cam, 3_000, seed, step_mm=5.0, tally_shape=(8, 8), solid_angle=True)
        assert got.interactions == ref.interactions  # every history and every collision recorded
        for name in ("scatter_signal", "scatter_counts", "primary_signal", "primary_counts"):
            a, b = getattr(got, name), getattr(ref, name)
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7 * b.max(), err_msg=name)


def test_gpu_forced_detection_makes_room_for_every_collision(gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first guess of collisions per history that is too small: the histories run again with room for all,
    and the result is the one a large enough buffer gives."""
    import drrfarm.scatter.cuda as sc

    vol = bone_in_water_volume(centre_z_mm=600.0)
    tables = tables_for("90KV_AL40", vol.material_names)
    cam = axis_camera(240.0, 64)
    res = gpu.resident("bone600", vol)
    roomy = gpu.simulate(res, tables, [cam], 5_000, [3], tally_shape=(8, 8), solid_angle=True, forced_step_mm=5.0)[0]
    monkeypatch.setattr(sc, "EVENTS_PER_HISTORY", 0)  # room for 1,024 collisions only
    tight = gpu.simulate(res, tables, [cam], 5_000, [3], tally_shape=(8, 8), solid_angle=True, forced_step_mm=5.0)[0]
    assert tight.interactions == roomy.interactions and roomy.interactions["forced_events"] > 1_024
    np.testing.assert_allclose(tight.scatter_signal, roomy.scatter_signal, rtol=1e-5)
    assert tight.energy_kev == pytest.approx(roomy.energy_kev, rel=1e-12)


def test_gpu_batch_uses_each_images_seed_and_camera(gpu) -> None:
    from drrfarm.geometry import Camera

    vol = bone_in_water_volume(centre_z_mm=700.0)
    tables = tables_for("90KV_AL40", vol.material_names)
    base = axis_camera(250.0, 48, sdd_mm=1000.0)
    tilted = Camera(base.K, np.array([[1, 0, 0], [0, 0.98, -0.198997], [0, 0.198997, 0.98]]), base.t, 48, 48,
                    base.pixel_mm)
    res = gpu.resident("bone", vol)
    both = gpu.simulate(res, tables, [base, tilted], 30_000, [5, 6], tally_shape=(8, 8))
    alone = gpu.simulate(res, tables, [tilted], 30_000, [6], tally_shape=(8, 8))[0]
    assert both[1].interactions == alone.interactions
    np.testing.assert_allclose(both[1].scatter_signal, alone.scatter_signal, rtol=1e-5, atol=1e-9)
    assert both[0].interactions != both[1].interactions


def test_gpu_narrow_beam_attenuation_at_ten_million_photons(gpu) -> None:
    vol = slab_volume(100.0, 200.0, 1000.0, gap_mm=400.0)
    tables = tables_for("mono:60", ["water"])
    n = 10_000_000
    out = gpu.simulate(gpu.resident("slab10", vol), tables, [axis_camera(4.0, 4)], n, [9], tally_shape=(1, 1))[0]
    mu = float(np.interp(60.0, tables.energy_grid_kev, tables.mu_cm2_g[0].sum(axis=0)))
    expected = np.exp(-mu * 10.0)
    assert abs(out.primary_counts[0, 0] - expected) < 4.5 * np.sqrt(expected * (1 - expected) / n)
    e = out.energy_kev
    assert e["emitted"] == pytest.approx(e["deposited"] + e["escaped"], rel=1e-9)


def test_gpu_spr_of_the_20cm_water_slab(gpu) -> None:
    from test_scatter import MCGPU_SPR_20CM_WATER_30CM_FIELD

    vol = slab_volume(200.0, 500.0, 1000.0, gap_mm=0.0)
    tables = tables_for("tube:90:2.5", ["water"])
    out = gpu.simulate(gpu.resident("slab20", vol), tables, [axis_camera(300.0, 60)], 50_000_000, [4],
                       tally_shape=(5, 5), solid_angle=True)[0]
    assert out.primary_signal[2, 2] > 0
    spr = out.scatter_signal[2, 2] / out.primary_signal[2, 2]
    assert spr == pytest.approx(MCGPU_SPR_20CM_WATER_30CM_FIELD, rel=0.05)


def test_fast_estimate_on_the_chest_ct_is_within_10_percent_at_a_two_hundredth_of_the_cost() -> None:
    pytest.importorskip("pycuda.driver")
    from drrfarm.geometry import CArm, world_from_patient_default
    from drrfarm.physics import Physics
    from drrfarm.samples.downloads import chest_ct
    from drrfarm.scatter import ScatterEstimator, ScatterVolume
    from drrfarm.volume import load_volume, segment_by_thresholds

    vol = load_volume(str(chest_ct()))
    mv = segment_by_thresholds(vol)
    wfp = world_from_patient_default(vol.centre_patient_mm())

    def make() -> ScatterVolume:
        return ScatterVolume(mv.densities_g_cm3, wfp @ mv.patient_from_ijk, mv.material_names)

    tables = tables_for("90KV_AL40", mv.material_names)
    est = ScatterEstimator("cuda")
    for alpha in (0.0, 90.0):
        cam = CArm(height=512, width=512, pixel_mm=0.582).camera(alpha, 0.0)
        ref = est.estimate("chest", make, [cam], None,
                           Physics(scatter="monte_carlo", scatter_photons=200_000_000, scatter_bins=32), [1],
                           tables=tables)[0]
        fast = est.estimate("chest", make, [cam], None, Physics(scatter="fast"), [2], tables=tables)[0]  # defaults
        rel = np.abs(fast.signal - ref.signal) / ref.signal
        assert rel.mean() <= 0.10, (alpha, rel.mean())
        assert ref.tally.seconds >= 200 * fast.tally.seconds, (ref.tally.seconds, fast.tally.seconds)



def _offline_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU host without xraydb/xraylib: both backends' tables from the shipped npz files."""
    try:
        import xraydb  # noqa: F401
        import xraylib  # noqa: F401
        return
    except ImportError:
        pass
    import sys
    from pathlib import Path

    import drrfarm.physics
    import drrfarm.scatter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "device"))
    from tables import load_tables

    monkeypatch.setattr(drrfarm.physics, "detector_tables",
                        lambda spectrum, names, physics: load_tables(spectrum.name, list(names), physics.detector))
    monkeypatch.setattr(drrfarm.scatter, "transport_tables",
                        lambda spectrum, names, physics: tables_for("mono:60", list(names), physics.detector))


@pytest.mark.parametrize("mode", ["monte_carlo", "fast"])
def test_cuda_backend_with_scatter_matches_the_cpu_backend(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    pytest.importorskip("pycuda.driver")
    from drrfarm.geometry import CArm
    from drrfarm.physics import Physics
    from drrfarm.render import get_backend
    from drrfarm.samples.phantoms import sphere_phantom
    from drrfarm.spectrum import get_spectrum

    _offline_tables(monkeypatch)
    mv = sphere_phantom().material_volume()
    spec = get_spectrum("mono:60")
    cams = [CArm(height=64, width=64, pixel_mm=4.0).camera(a, 0.0) for a in (0.0, 35.0, 90.0)]
    photons = 200_000 if mode == "monte_carlo" else 5_000  # forced detection: far fewer histories
    physics = Physics(output="transmission", scatter=mode, scatter_photons=photons, scatter_bins=16)
    cpu, gpu = get_backend("cpu"), get_backend("cuda")
    ref = cpu.render(cpu.prepare(mv), cams, spec, physics, [1, 2, 3])
    out = gpu.render(gpu.prepare(mv), cams, spec, physics, [1, 2, 3])
    plain = cpu.render(cpu.prepare(mv), cams, spec, Physics(output="transmission"), [1, 2, 3])
    assert (ref - plain).mean() > 1e-3  # scatter is there
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-5)  # same histories, same interpolation
    assert gpu.scatter_seconds > 0
