"""Physics of the polyenergetic step: detector models, beam hardening, noise, outputs."""

from __future__ import annotations

import numpy as np
import pytest

from drrfarm import physics as phys
from drrfarm.errors import PhysicsError
from drrfarm.materials import mass_attenuation_cm2_g
from drrfarm.spectrum import monoenergetic, preset

WATER_G_CM3 = 1.0


def water_columns(thickness_cm: np.ndarray) -> np.ndarray:
    """Line integrals (M=1, N) of water slabs of the given thickness."""
    return (np.asarray(thickness_cm, dtype=np.float64) * WATER_G_CM3)[None, :]


def test_open_field_intensity_is_spectrum_mean_energy() -> None:
    spectrum = preset("90KV_AL40")
    p = phys.Physics(detector="ideal", output="intensity")
    tables = phys.detector_tables(spectrum, ["water"], p)
    tau, q = phys.transmissions(np.zeros((1, 4)), tables)
    intensity = phys.output_transform(tau, tables, p)
    assert np.allclose(intensity, spectrum.mean_energy_kev, rtol=1e-6)
    assert np.allclose(q, 1.0)


def test_monoenergetic_transmission_is_beer_lambert() -> None:
    p = phys.Physics(output="transmission")
    tables = phys.detector_tables(monoenergetic(60.0), ["water"], p)
    t_cm = np.array([0.0, 1.0, 5.0, 20.0])
    tau, _ = phys.transmissions(water_columns(t_cm), tables)
    mu = mass_attenuation_cm2_g("water", np.array([60.0]))[0]
    np.testing.assert_allclose(tau, np.exp(-mu * t_cm), rtol=1e-12)


@pytest.mark.parametrize("detector", phys.DETECTORS)
def test_transmission_decreases_with_thickness(detector: str) -> None:
    p = phys.Physics(detector=detector, output="transmission")
    tables = phys.detector_tables(preset("90KV_AL40"), ["water"], p)
    tau, q = phys.transmissions(water_columns(np.linspace(0, 40, 41)), tables)
    assert np.all(np.diff(tau) < 0) and np.all(np.diff(q) < 0)


def test_beam_hardening_effective_mu_falls_with_thickness() -> None:
    p = phys.Physics(output="line_integral")
    tables = phys.detector_tables(preset("90KV_AL40"), ["water"], p)
    t_cm = np.array([1.0, 5.0, 10.0, 20.0, 30.0])
    tau, _ = phys.transmissions(water_columns(t_cm), tables)
    mu_eff = -np.log(tau) / t_cm
    assert np.all(np.diff(mu_eff) < 0), mu_eff
    # and stays between the attenuation at the spectrum's extremes
    spectrum = preset("90KV_AL40")
    mu = mass_attenuation_cm2_g("water", spectrum.energies_kev)
    assert mu.min() < mu_eff.min() and mu_eff.max() < mu.max()


def test_photon_counting_open_field_is_one_and_weights_by_photons() -> None:
    spectrum = preset("120KV_AL43")
    ideal = phys.detector_tables(spectrum, ["water"], phys.Physics(detector="ideal"))
    counting = phys.detector_tables(spectrum, ["water"], phys.Physics(detector="photon_counting"))
    assert counting.open_field_signal == pytest.approx(1.0)
    # an energy-integrating detector weighs hard photons more: it sees more transmission
    tau_i, _ = phys.transmissions(water_columns([20.0]), ideal)
    tau_c, _ = phys.transmissions(water_columns([20.0]), counting)
    assert tau_i[0] > tau_c[0]


def test_csi_detector_absorbs_less_at_high_energy() -> None:
    energies = np.array([30.0, 60.0, 100.0])
    eta = phys.detector_efficiency(energies, phys.Physics(detector="csi", csi_thickness_mm=0.6))
    assert np.all((eta > 0) & (eta <= 1))
    # above the K-edges (33/36 keV) absorption falls with energy
    assert eta[2] < eta[1]
    thick = phys.detector_efficiency(energies, phys.Physics(detector="csi", csi_thickness_mm=2.0))
    assert np.all(thick > eta)


def test_noise_statistics_match_poisson() -> None:
    photons = 2000.0
    p = phys.Physics(detector="photon_counting", output="transmission", photons=photons)
    tau = np.full((256, 256), 0.3)
    noisy = phys.apply_noise(tau, tau.copy(), p, seed=7)
    counts = noisy * photons
    assert counts.mean() == pytest.approx(0.3 * photons, rel=0.02)
    assert counts.var() == pytest.approx(0.3 * photons, rel=0.02)
    np.testing.assert_allclose(counts, np.round(counts))  # whole photons for a counter


def test_noise_is_seeded() -> None:
    p = phys.Physics(output="transmission", photons=1000.0, electronic_noise=2.0)
    tau = np.full((64, 64), 0.5)
    a = phys.apply_noise(tau, tau, p, seed=1)
    b = phys.apply_noise(tau, tau, p, seed=1)
    c = phys.apply_noise(tau, tau, p, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_line_integral_output_is_log_i0_over_i_and_finite_with_noise() -> None:
    p = phys.Physics(output="line_integral", photons=100.0)
    tables = phys.detector_tables(monoenergetic(50.0), ["water"], p)
    tau = np.array([[1.0, 0.5, 0.0]])
    out = phys.output_transform(tau, tables, p)
    np.testing.assert_allclose(out[0, :2], [0.0, np.log(2.0)], rtol=1e-6)
    assert np.isfinite(out).all() and out[0, 2] == pytest.approx(np.log(200.0), rel=1e-6)


def test_deepdrr_neglog_is_min_max_normalised() -> None:
    intensity = np.array([[10.0, 20.0], [30.0, 40.0]])
    out = phys.deepdrr_neglog(intensity)
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0] == 1.0  # darkest pixel (most attenuation) is brightest in neglog
    assert np.all(phys.deepdrr_neglog(np.full((3, 3), 5.0)) == 0)


def test_solid_angle_falloff_is_one_at_principal_point_and_cos_cubed() -> None:
    class Cam:
        K = np.array([[100.0, 0, 2.0], [0, 100.0, 2.0], [0, 0, 1]])
        height = width = 5

    g = phys.solid_angle_falloff(Cam())
    assert g[2, 2] == pytest.approx(1.0)
    cos = 100.0 / np.hypot(100.0, 2.0)
    assert g[2, 4] == pytest.approx(cos**3)


def test_quantize_uint16_round_trips_within_half_a_step() -> None:
    x = np.linspace(0, 10, 1001, dtype=np.float32)
    q, scale = phys.quantize_uint16(x, "line_integral")
    assert q.dtype == np.uint16
    assert np.abs(q * scale - x).max() <= scale / 2 + 1e-7


@pytest.mark.parametrize(
    ("field", "value"),
    [("detector", "film"), ("output", "log"), ("photons", -5), ("step_voxels", 0.0), ("method", "cubic")],
)
def test_bad_physics_options_name_the_field(field: str, value: object) -> None:
    with pytest.raises(PhysicsError, match=field):
        phys.Physics(**{field: value})
