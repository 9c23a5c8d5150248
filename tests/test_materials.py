"""Tests for drrfarm.materials: values against NIST, mixture rule, names, errors, caching."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from drrfarm import materials as M
from drrfarm.errors import MaterialError

# NIST SRD 126 (Hubbell & Seltzer) Tables 3/4, mu/rho in cm2/g at 60 keV
NIST_MU_60KEV = {
    "water": 0.2059,
    "soft_tissue": 0.2048,  # "Tissue, Soft (ICRU-44)"
    "cortical_bone": 0.3148,  # "Bone, Cortical (ICRU-44)"
    "air": 0.1875,  # "Air, Dry (near sea level)"
}


@pytest.mark.parametrize(("name", "nist"), sorted(NIST_MU_60KEV.items()))
def test_mu_at_60kev_matches_nist(name: str, nist: float) -> None:
    value = float(M.mass_attenuation_cm2_g(name, np.array([60.0]))[0])
    assert value == pytest.approx(nist, rel=0.02)


def test_water_energy_dependence_matches_nist() -> None:
    # NIST XCOM water, total with coherent: 20, 30, 100 keV
    mu = M.mass_attenuation_cm2_g("water", [20.0, 30.0, 100.0])
    np.testing.assert_allclose(mu, [0.8096, 0.3756, 0.1707], rtol=0.02)


def test_lead_k_edge_jump_at_88kev() -> None:
    below, above = M.mass_attenuation_cm2_g("lead", [87.9, 88.1])
    assert above / below > 3.5  # NIST: 1.910 -> 7.683 cm2/g
    assert below == pytest.approx(1.910, rel=0.03)
    assert above == pytest.approx(7.683, rel=0.03)
    # no jump between 80 and 87.9 keV: attenuation falls with energy off the edge
    e = np.linspace(60.0, 87.9, 30)
    assert np.all(np.diff(M.mass_attenuation_cm2_g("Pb", e)) < 0)


def test_mixture_rule_water_from_elements() -> None:
    import xraydb

    e = np.array([15.0, 40.0, 60.0, 90.0, 140.0])
    water = M.mass_attenuation_cm2_g("water", e)
    h, o = M.mass_attenuation_cm2_g("H", e), M.mass_attenuation_cm2_g("O", e)
    m_h, m_o = 2 * xraydb.atomic_mass("H"), xraydb.atomic_mass("O")
    w_h = m_h / (m_h + m_o)
    np.testing.assert_allclose(water, w_h * h + (1 - w_h) * o, rtol=1e-10)
    np.testing.assert_allclose(M.mass_attenuation_cm2_g("H2O", e), water, rtol=1e-12)
    # and agrees with xraydb's own compound routine
    np.testing.assert_allclose(water, xraydb.material_mu("H2O", e * 1e3, density=1.0), rtol=1e-6)


def test_registered_material_follows_mixture_rule() -> None:
    name = "test_mix_ca_water"
    if name not in M.known_materials():
        M.register_material(name, {"H": 0.1, "O": 0.8, "Ca": 0.1}, 1.3, source="test")
    e = np.array([30.0, 60.0])
    expected = sum(w * M.mass_attenuation_cm2_g(el, e) for el, w in {"H": 0.1, "O": 0.8, "Ca": 0.1}.items())
    np.testing.assert_allclose(M.mass_attenuation_cm2_g(name, e), expected, rtol=1e-12)
    assert M.nominal_density_g_cm3(name) == 1.3
    with pytest.raises(MaterialError, match="already exists"):
        M.register_material("soft tissue", {"H": 1.0}, 1.0)
    with pytest.raises(MaterialError, match="not an element"):
        M.register_material("bad_mix", {"Xx": 1.0}, 1.0)


@pytest.mark.parametrize(
    ("name", "z_over_a"),
    [("blood", 0.54999), ("cortical_bone", 0.51478), ("adipose", 0.55579), ("air", 0.49919)],
)
def test_compositions_reproduce_nist_z_over_a(name: str, z_over_a: float) -> None:
    import xraydb

    info = M.material_info(name)
    assert sum(w for _, w in info.mass_fractions) == pytest.approx(1.0, abs=1e-12)
    value = sum(w * xraydb.atomic_number(el) / xraydb.atomic_mass(el) for el, w in info.mass_fractions)
    assert value == pytest.approx(z_over_a, rel=5e-4)


def test_unknown_material_names_it_and_lists_known() -> None:
    with pytest.raises(MaterialError) as err:
        M.mass_attenuation_cm2_g("unobtainium", [60.0])
    msg = str(err.value)
    assert "unobtainium" in msg
    assert "soft_tissue" in msg and "cortical_bone" in msg
    with pytest.raises(MaterialError):
        M.material_table(["water", "kryptonite"], [60.0])
    with pytest.raises(MaterialError):
        M.nominal_density_g_cm3("")


def test_aliases_and_names() -> None:
    assert M.canonical_material_name("soft tissue") == "soft_tissue"
    assert M.canonical_material_name("Soft Tissue") == "soft_tissue"
    assert M.canonical_material_name("bone") == "cortical_bone"
    assert M.canonical_material_name("Ti") == "titanium"
    assert M.canonical_material_name("aluminum") == "aluminium"
    assert M.canonical_material_name("cobalt-chrome") == "cobalt_chrome"
    # formulas are case-sensitive: Co is cobalt, CO carbon monoxide
    assert M.mass_attenuation_cm2_g("Co", 60.0) > 5 * M.mass_attenuation_cm2_g("CO", 60.0)
    names = M.known_materials()
    for required in [
        "air",
        "lung",
        "adipose",
        "soft_tissue",
        "muscle",
        "blood",
        "water",
        "cortical_bone",
        "titanium",
        "iron",
        "steel",
        "cobalt_chrome",
        "aluminium",
        "copper",
        "lead",
        "csi",
    ]:
        assert required in names
        assert M.nominal_density_g_cm3(required) > 0


def test_nominal_densities() -> None:
    assert M.nominal_density_g_cm3("water") == pytest.approx(1.0)
    assert M.nominal_density_g_cm3("bone") == pytest.approx(1.92)
    assert M.nominal_density_g_cm3("Ti") == pytest.approx(4.506, rel=1e-3)
    assert M.nominal_density_g_cm3("lead") == pytest.approx(11.34, rel=1e-3)
    assert M.nominal_density_g_cm3("Cr") == pytest.approx(7.15, rel=0.02)  # element: xraydb atomic density
    with pytest.raises(MaterialError, match="no nominal density"):
        M.nominal_density_g_cm3("Ca10(PO4)6(OH)2")


def test_material_table_shape_and_columns() -> None:
    e = np.array([20.0, 50.0, 80.0, 120.0])
    names = ["air", "soft tissue", "bone", "titanium"]
    table = M.material_table(names, e)
    assert table.shape == (4, 4) and table.dtype == np.float64
    for m, name in enumerate(names):
        np.testing.assert_array_equal(table[:, m], M.mass_attenuation_cm2_g(name, e))
    # denser/higher-Z materials attenuate more per gram at 50 keV
    assert table[1, 0] < table[1, 2] < table[1, 3]
    with pytest.raises(MaterialError):
        M.material_table("water", e)


def test_energy_range_checked() -> None:
    for bad in ([0.5], [900.0], [np.nan]):
        with pytest.raises(MaterialError, match="energies_kev"):
            M.mass_attenuation_cm2_g("water", bad)


def test_results_are_cached_copies() -> None:
    e = np.array([40.0, 60.0])
    first = M.mass_attenuation_cm2_g("muscle", e)
    first[:] = -1.0
    second = M.mass_attenuation_cm2_g("muscle", e)
    assert np.all(second > 0)
    assert M.mass_attenuation_cm2_g("muscle", 60.0).shape == ()


def test_mass_energy_absorption_air_and_water_vs_nist() -> None:
    e = np.array([20.0, 30.0, 60.0, 100.0])
    # NIST SRD 126 mu_en/rho, cm2/g
    np.testing.assert_allclose(M.mass_energy_absorption_cm2_g("air", e), [0.5389, 0.1537, 0.03041, 0.02325], rtol=0.02)
    np.testing.assert_allclose(
        M.mass_energy_absorption_cm2_g("water", e), [0.5503, 0.1557, 0.03190, 0.02546], rtol=0.02
    )
    assert np.all(M.mass_energy_absorption_cm2_g("csi", e) < M.mass_attenuation_cm2_g("csi", e))


def test_import_is_lazy() -> None:
    code = (
        "import sys, drrfarm.materials, drrfarm.spectrum; "
        "assert 'xraydb' not in sys.modules and 'spekpy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
