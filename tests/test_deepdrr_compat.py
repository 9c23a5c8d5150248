"""DeepDRR 1.2.2 compatibility: its tabulated spectra as ``deepdrr:`` presets, its μ/ρ tables, and defaults kept."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from drrfarm import deepdrr_compat as dc
from drrfarm.errors import MaterialError, SpectrumError
from drrfarm.geometry import CArm, world_from_patient_default
from drrfarm.materials import mass_attenuation_cm2_g
from drrfarm.physics import Physics
from drrfarm.render import reference
from drrfarm.render.cpu import CpuBackend
from drrfarm.spectrum import DEEPDRR_MEAN_ENERGY_KEV, DEEPDRR_PRESETS, PRESETS, get_spectrum, preset
from drrfarm.volume import MaterialVolume

KVP = {"60KV_AL35": 60.0, "90KV_AL40": 90.0, "120KV_AL43": 120.0}


# ------------------------------------------------------------------------------------------ the stored tables


def test_stored_90kv_table_has_deepdrrs_mean_energy() -> None:
    # DeepDRR's open-field intensity is the table's mean energy, pdf = counts / sum(counts) with the negative
    # kVp bin kept; 49.24 keV is the value the issue quotes for DeepDRR 1.2.2's 90KV_AL40.
    energies, counts = dc.spectrum_table("90KV_AL40")
    mean = float((energies * counts).sum() / counts.sum())
    assert mean == pytest.approx(49.24, abs=0.005)


@pytest.mark.parametrize("name", dc.SPECTRUM_NAMES)
def test_stored_tables_match_deepdrrs_documented_binning_and_means(name: str) -> None:
    # DeepDRR inventory §2.4 (../shared/reference/deepdrr-inventory.md): 0.5 keV bins from 15 keV to the kVp
    # (91 / 151 / 211 bins) and mean energies 37.5 / 49.2 / 58.2 keV
    energies, counts = dc.spectrum_table(name)
    assert energies[0] == 15.0 and energies[-1] == KVP[name]
    np.testing.assert_array_equal(np.diff(energies), 0.5)
    assert len(energies) == {"60KV_AL35": 91, "90KV_AL40": 151, "120KV_AL43": 211}[name]
    assert counts[-1] < 0 and np.all(counts[:-1] > 0)  # the kVp bin's small negative count, as in DeepDRR
    mean = float((energies * counts).sum() / counts.sum())
    assert round(mean, 1) == DEEPDRR_MEAN_ENERGY_KEV[name]


def test_data_file_names_its_source() -> None:
    source = json.loads(Path(dc.TABLES_PATH).read_text(encoding="utf-8"))["source"]
    assert source["repository"] == "https://github.com/arcadelab/deepdrr" and source["version"] == "1.2.2"
    assert source["spectra_file"] == "deepdrr/projector/spectral_data.py"


# ------------------------------------------------------------------------------------------ the presets


@pytest.mark.parametrize("name", dc.SPECTRUM_NAMES)
def test_deepdrr_preset_is_the_table_without_the_negative_bin(name: str) -> None:
    energies, counts = dc.spectrum_table(name)
    s = get_spectrum(f"deepdrr:{name}")
    assert s.name == f"deepdrr:{name}" and s.kvp == KVP[name] and s.anode_angle_deg is None
    np.testing.assert_array_equal(s.energies_kev, energies[:-1])
    np.testing.assert_allclose(s.weights, counts[:-1] / counts[:-1].sum(), rtol=1e-12)
    assert abs(s.mean_energy_kev - float((energies * counts).sum() / counts.sum())) < 1e-3


def test_deepdrr_names_are_accepted_wherever_presets_are() -> None:
    expected = get_spectrum("deepdrr:90KV_AL40")
    assert DEEPDRR_PRESETS == ("deepdrr:60KV_AL35", "deepdrr:90KV_AL40", "deepdrr:120KV_AL43")
    assert get_spectrum(" DeepDRR:90kv_al40 ") == expected
    assert preset("deepdrr:90KV_AL40") == expected
    binned = get_spectrum({"preset": "deepdrr:90KV_AL40", "bins": 16})
    assert binned.n_bins == 16 and binned.mean_energy_kev == pytest.approx(expected.mean_energy_kev, rel=1e-12)
    with pytest.raises(SpectrumError, match="deepdrr:90KV_AL40"):
        get_spectrum("deepdrr:80KV_AL40")
    with pytest.raises(SpectrumError, match="deepdrr:120KV_AL43"):
        get_spectrum("80KV")


def test_sweep_spec_renders_a_deepdrr_preset(tmp_path: Path) -> None:
    from drrfarm.farm.compile import spectrum_request
    from drrfarm.farm.spec import parse_spec

    data = {
        "seed": 1,
        "volumes": [{"id": "ct", "path": "ct.nii.gz"}],
        "poses": {"carm": {"alpha_deg": [0]}},
        "spectra": {"presets": ["deepdrr:90KV_AL40", "90KV_AL40"]},
        "image": {"size": 8, "pixel_mm": 8.0},
        "output": {"url": str(tmp_path / "out")},
    }
    spec = parse_spec(data, base_dir=tmp_path)
    spectra = [get_spectrum(spectrum_request(item, None)) for item in spec.spectra.items]
    assert [s.name for s in spectra] == ["deepdrr:90KV_AL40", "90KV_AL40"]
    assert spectra[0] == get_spectrum("deepdrr:90KV_AL40")
    assert get_spectrum(spectrum_request(spec.spectra.items[0], 16)).n_bins == 16


def test_cli_accepts_deepdrr_presets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import nibabel as nib

    from drrfarm.cli import main

    assert main(["spectrum", "--preset", "deepdrr:90KV_AL40"]) == 0
    text = capsys.readouterr().out
    assert "spectrum: deepdrr:90KV_AL40" in text and "mean energy: 49.25 keV" in text
    affine = np.diag([10.0, 10.0, 10.0, 1.0])
    affine[:3, 3] = -35.0
    ct = tmp_path / "water.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), dtype=np.float32), affine), str(ct))
    out = tmp_path / "ap.png"
    assert main(["render", str(ct), "-o", str(out), "--spectrum", "deepdrr:90KV_AL40", "--size", "8",
                 "--pixel-mm", "4", "--backend", "cpu"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["spectrum"]["name"] == "deepdrr:90KV_AL40"


# ------------------------------------------------------------------------------------------ closed-form slab


def _slab_line_integrals(spectra: list[str]) -> tuple[list[float], list[float], float]:
    """Rendered and closed-form log(I0/I) of the central ray through 20 cm of soft tissue (1 g/cm³).

    Returns (rendered per spectrum, expected per spectrum, areal density in g/cm²)."""
    shape = (6, 20, 6)  # 10 mm voxels: 20 cm along j (the AP ray) and 6 cm across
    mv = MaterialVolume(["soft_tissue"], np.ones((1, *shape), dtype=np.float32),
                        np.diag([10.0, 10.0, 10.0, 1.0]), volume_sha256="slab")
    world_from_patient = world_from_patient_default(mv)
    camera = CArm(height=4, width=4, pixel_mm=1.0).camera()
    chord_mm = reference.ray_lengths_in_box(camera, world_from_patient @ mv.patient_from_ijk, shape)[1:3, 1:3]
    areal = float(chord_mm.mean()) / 10.0
    backend = CpuBackend()
    handle = backend.prepare(mv, world_from_patient)
    rendered, expected = [], []
    for name in spectra:
        s = get_spectrum(name)
        image = backend.render(handle, [camera], s, Physics(), seeds=[0])[0]
        rendered.append(float(image[1:3, 1:3].mean()))
        w = s.energies_kev * s.weights
        transmitted = (w * np.exp(-mass_attenuation_cm2_g("soft_tissue", s.energies_kev) * areal)).sum() / w.sum()
        expected.append(float(-np.log(transmitted)))
    return rendered, expected, areal


def test_deepdrr_spectrum_changes_a_water_slab_as_documented() -> None:
    (default, compat), (expect_default, expect_compat), areal = _slab_line_integrals(
        ["90KV_AL40", "deepdrr:90KV_AL40"])
    assert areal == pytest.approx(20.0, rel=1e-3)
    assert default == pytest.approx(expect_default, rel=2e-5)
    assert compat == pytest.approx(expect_compat, rel=2e-5)
    # docs/deepdrr.md: DeepDRR's harder spectrum lowers 20 cm of soft tissue's line integral by 0.29 %
    assert (compat - default) / default == pytest.approx(-0.0029, abs=0.0003)


# ------------------------------------------------------------------------------------------ μ/ρ (not offered)


@pytest.mark.parametrize(("deepdrr_name", "ours"), [("air", "air"), ("soft tissue", "soft_tissue"),
                                                     ("bone", "cortical_bone")])
def test_deepdrr_mu_matches_its_nist_rows_and_xraydb_at_them(deepdrr_name: str, ours: str) -> None:
    table = dc._tables()["mass_attenuation"][dc._MATERIAL_TABLES[deepdrr_name]]
    e_kev = np.asarray(table["energy_mev"]) * 1e3
    rows = (e_kev >= 15) & (e_kev <= 150)
    got = dc.mass_attenuation_cm2_g(deepdrr_name, e_kev[rows])
    np.testing.assert_allclose(got, np.asarray(table["mu_over_rho_cm2_g"])[rows], rtol=1e-9)
    # the same NIST material as drrfarm's: xraydb agrees within 0.2 % on NIST's own energies
    np.testing.assert_allclose(got, mass_attenuation_cm2_g(ours, e_kev[rows]), rtol=2e-3)


def test_deepdrr_mu_interpolates_log_log_and_respects_edges() -> None:
    e0, e1 = 60.0, 80.0
    mu0, mu1 = dc.mass_attenuation_cm2_g("bone", [e0, e1])
    mid = float(np.sqrt(e0 * e1))  # halfway in log E: the geometric mean of the two μ/ρ
    assert dc.mass_attenuation_cm2_g("bone", mid) == pytest.approx(np.sqrt(mu0 * mu1), rel=1e-12)
    below, above = dc.mass_attenuation_cm2_g("bone", [4.0381 * (1 - 1e-6), 4.0381])  # Ca K edge, 133 -> 333
    assert below == pytest.approx(129.6, rel=1e-3) and above == pytest.approx(333.2, rel=1e-3)
    with pytest.raises(MaterialError, match="soft tissue"):
        dc.mass_attenuation_cm2_g("water", 60.0)


def test_deepdrr_mu_differs_from_xraydb_by_less_than_one_percent_of_a_line_integral() -> None:
    # why rendering keeps xraydb (docs/deepdrr.md): on 20 cm of soft tissue, +0.31 % with DeepDRR's spectrum
    s = get_spectrum("deepdrr:90KV_AL40")
    w = s.energies_kev * s.weights

    def line_integral(mu: np.ndarray) -> float:
        return float(-np.log((w * np.exp(-mu * 20.0)).sum() / w.sum()))

    ours = line_integral(mass_attenuation_cm2_g("soft_tissue", s.energies_kev))
    theirs = line_integral(dc.mass_attenuation_cm2_g("soft tissue", s.energies_kev))
    assert (theirs - ours) / ours == pytest.approx(0.0031, abs=0.0003)


# ------------------------------------------------------------------------------------------ defaults unchanged


def test_drrfarm_defaults_stay_spekpy_and_xraydb() -> None:
    s = get_spectrum("90KV_AL40")
    assert set(PRESETS) == set(dc.SPECTRUM_NAMES)
    assert s.name == "90KV_AL40" and s.anode_angle_deg == 12.0 and s.energies_kev[1] - s.energies_kev[0] == 1.0
    assert s.mean_energy_kev == pytest.approx(48.74, abs=0.01)
    from drrfarm.api import Renderer

    assert inspect.signature(Renderer).parameters["spectrum"].default == "90KV_AL40"
    assert Physics() == Physics(detector="ideal", output="line_integral", photons=None)
