"""Sweep spec validation: every kind of bad spec gives a clear error naming file, key path and reason."""

from __future__ import annotations

import copy
import glob
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from drrfarm.errors import SpecError
from drrfarm.farm.spec import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]

BASE: dict = {
    "seed": 3,
    "volumes": [{"id": "ct", "path": "ct.nii.gz"}],
    "poses": {"carm": {"alpha_deg": {"range": [-30, 30], "num": 3}, "beta_deg": [0, 10]}},
    "spectra": {"presets": ["90KV_AL40"]},
    "image": {"size": 32, "pixel_mm": 8.0},
    "output": {"url": "out", "formats": ["parquet"], "shard_size": 4},
}


def spec_with(**changes: object) -> dict:
    d = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        keys = dotted.split("__")
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is _DELETE:
            node.pop(keys[-1])
        else:
            node[keys[-1]] = value
    return d


_DELETE = object()


def write(tmp_path: Path, data: object, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return p


def error_of(tmp_path: Path, data: object) -> str:
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert str(path) in msg, msg  # always names the file
    return msg


def test_valid_spec_loads_with_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE))
    assert spec.volumes[0].id == "ct"
    assert spec.volumes[0].resolved == str(tmp_path / "ct.nii.gz")  # relative to the spec file
    assert spec.poses.carm is not None
    assert spec.poses.carm.alpha_deg.values == (-30.0, 0.0, 30.0)
    assert spec.detector.photons == (None,)
    assert spec.output.url == os.path.abspath("out")
    assert spec.backend == "auto" and spec.tracking.enabled
    assert len(spec.sha256) == 64 and spec.sweep_id == spec.sha256[:12]


def test_content_hash_ignores_where_and_how(tmp_path: Path) -> None:
    a = load_spec(write(tmp_path, BASE, "a.yaml"))
    b = load_spec(write(tmp_path, spec_with(output__url="s3://bucket/x", backend="cpu", name="other",
                                            tracking={"enabled": False}, farm={"actors": 3}), "b.yaml"))
    assert a.sha256 == b.sha256
    assert a.with_output("/elsewhere").sha256 == a.sha256
    assert a.with_output("/elsewhere").output.url == "/elsewhere"
    # int vs float spelling of the same number hashes the same
    c = load_spec(write(tmp_path, spec_with(image={"size": 32, "pixel_mm": 8}), "c.yaml"))
    assert c.sha256 == a.sha256
    # content changes change it
    for change in ({"seed": 4}, {"image": {"size": 33, "pixel_mm": 8.0}}, {"output__shard_size": 5},
                   {"spectra": {"presets": ["60KV_AL35"]}}, {"output__formats": ["parquet", "png"]}):
        d = load_spec(write(tmp_path, spec_with(**change), "d.yaml"))
        assert d.sha256 != a.sha256, change


def test_hash_independent_of_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, BASE)
    h1 = load_spec(p).sha256
    monkeypatch.chdir(tmp_path)
    assert load_spec("spec.yaml").sha256 == h1


@pytest.mark.parametrize(
    "changes, path, reason",
    [
        # unknown keys
        ({"colour": "red"}, "colour", "unknown key"),
        ({"poses": {"carm": {"alpha": 3}}}, "poses.carm.alpha", "did you mean 'alpha_deg'"),
        ({"output__formt": ["png"]}, "output.formt", "did you mean 'format"),
        # wrong types
        ({"poses": {"carm": {"alpha_deg": {"range": [-30, "x"], "num": 3}}}}, "poses.carm.alpha_deg.range[1]",
         "must be a number, got string 'x'"),
        ({"image": {"size": "big", "pixel_mm": 1.0}}, "image.size", "must be an integer"),
        ({"volumes": {"path": "a"}}, "volumes", "must be a list"),
        ({"output__shard_size": 2.5}, "output.shard_size", "must be an integer"),
        ({"tracking": {"enabled": "yes"}}, "tracking.enabled", "must be true or false"),
        ({"seed": True}, "seed", "must be an integer"),
        ({"detector": {"photons": ["many"]}}, "detector.photons[0]", "must be an integer"),
        # missing keys
        ({"image": _DELETE}, "image", "required key is missing"),
        ({"image": {"size": 32}}, "image.pixel_mm", "required key is missing"),
        # impossible values
        ({"image": {"size": 32, "pixel_mm": -1}}, "image.pixel_mm", "must be > 0"),
        ({"image": {"size": 0, "pixel_mm": 1}}, "image.size", "must be >= 1"),
        ({"poses": {"carm": {"alpha_deg": {"range": [30, -30], "num": 3}}}}, "poses.carm.alpha_deg.range[1]",
         "below its start"),
        ({"poses": {"carm": {"alpha_deg": 200}}}, "poses.carm.alpha_deg", "outside the C-arm range"),
        ({"poses": {"carm": {"sid_mm": 1500}}}, "poses.carm.sid_mm", "must be below the source-detector"),
        ({"poses": {"carm": {"sdd_mm": -5}}}, "poses.carm.sdd_mm", "must be > 0"),
        ({"poses": {"carm": {"sdd_mm": {"normal": {"mean": 1000, "std": 10}}}}}, "poses.carm.sdd_mm.normal.clip",
         "required"),
        ({"poses": {"carm": {"samples": 3}}}, "poses.carm.samples", "needs a random axis"),
        ({"poses": {"carm": {"alpha_deg": {"uniform": [10, 10]}}}}, "poses.carm.alpha_deg.uniform[1]",
         "must exceed"),
        ({"poses": {"carm": {"alpha_deg": [0, 0]}}}, "poses.carm.alpha_deg", "distinct"),
        ({"poses": {"carm": {}, "explicit": []}}, "poses", "exactly one of 'carm'"),
        ({"poses": {"explicit": [[[1, 2, 3, 0], [2, 4, 6, 0], [0, 0, 1, 0]]]}}, "poses.explicit.matrices[0]",
         "singular"),
        ({"poses": {"explicit": [[[1, 0, 0, 0], [0, 1, 0, 0]]]}}, "poses.explicit.matrices[0]", "at least 3"),
        ({"spectra": {"tube": {"kvp": [200]}}}, "spectra.tube.kvp[0]", "must be <= 150"),
        ({"spectra": {"mono_kev": [0]}}, "spectra.mono_kev[0]", "must be >= 1"),
        ({"spectra": {}}, "spectra", "at least one spectrum"),
        ({"spectra": {"presets": ["90KV_AL40", "90KV_AL40"]}}, "spectra", "listed twice"),
        ({"detector": {"model": "film"}}, "detector.model", "must be one of ideal, photon_counting, csi"),
        ({"detector": {"photons": [0]}}, "detector.photons[0]", "must be >= 1"),
        ({"detector": {"electronic_noise": 2.0}}, "detector.electronic_noise", "needs a photon count"),
        ({"detector": {"csi_thickness_mm": 0.5}}, "detector.csi_thickness_mm", "only used with model: csi"),
        ({"volumes": [{"id": "a", "path": "x.nii"}, {"id": "a", "path": "y.nii"}]}, "volumes[1].id",
         "duplicate volume id"),
        ({"volumes": [{"id": "bad id!", "path": "x.nii"}]}, "volumes[0].id", "must be 1-64 characters"),
        ({"volumes": [{"path": "x.nii", "materials": {"thresholds_hu": [[300, "bone"], [100, "air"]]}}]},
         "volumes[0].materials.thresholds_hu[1][0]", "must increase"),
        ({"volumes": [{"path": "x.nii", "materials": {"label_map": "l.nii"}}]}, "volumes[0].materials.table",
         "required with 'label_map'"),
        ({"volumes": [{"path": "x.nii", "placement": {"orientation": "sideways"}}]},
         "volumes[0].placement.orientation", "must be one of HFS, FFS, HFP, FFP"),
        ({"volumes": [{"path": "sample:Chest CT"}]}, "volumes[0].path", "bad sample name"),
        ({"output__formats": ["jpeg"]}, "output.formats[0]", "must be one of parquet, png"),
        ({"output__image_dtype": "int8"}, "output.image_dtype", "must be one of uint16"),
        ({"backend": "tpu"}, "backend", "must be one of auto, cpu, cuda"),
        ({"version": 2}, "version", "unsupported spec version"),
        ({"farm": {"inflight_per_actor": 0}}, "farm.inflight_per_actor", "must be >= 1"),
        ({"farm": {"switch_interval_ms": 0}}, "farm.switch_interval_ms", "must be >= 0.01"),
    ],
)
def test_bad_specs(tmp_path: Path, changes: dict, path: str, reason: str) -> None:
    msg = error_of(tmp_path, spec_with(**changes))
    assert f": {path}: " in msg, msg
    assert reason in msg, msg


def test_farm_inflight_and_switch_interval_defaults() -> None:
    """GPU actors keep more small shards in flight (square root of the size ratio, at most 4x) and switch
    threads every 0.5 ms; a setting wins; CPU actors keep 2 and Python's interval."""
    from drrfarm.farm.spec import FarmSpec

    farm = FarmSpec()
    mpx = 1024 * 1024
    assert farm.inflight(True, 16, 64 * mpx) == 18
    assert farm.inflight(True, 16, 64 * mpx // 4) == 36  # 64 images of 512²
    assert farm.inflight(True, 16, 64 * mpx * 4) == 18  # larger shards: never fewer than threads + 2
    assert farm.inflight(True, 16, 1) == 64  # capped
    assert farm.inflight(True, 4, 64 * 256 * 256) == 24  # at most 4x
    assert farm.inflight(False, 16, 64 * 512 * 512) == 2
    assert FarmSpec(inflight_per_actor=5).inflight(True, 16, 64 * 512 * 512) == 5
    assert farm.switch_interval_s(True) == pytest.approx(0.0005) and farm.switch_interval_s(False) is None
    assert FarmSpec(switch_interval_ms=2.0).switch_interval_s(False) == pytest.approx(0.002)


def test_yaml_level_errors(tmp_path: Path) -> None:
    assert "invalid YAML (line 2" in error_of(tmp_path, "seed: 1\nvolumes: [a: b: c]\n")
    assert "duplicate key 'seed'" in error_of(tmp_path, "seed: 1\nseed: 2\n")
    assert "the spec is empty" in error_of(tmp_path, "")
    assert "must be a mapping" in error_of(tmp_path, "- a\n- b\n")
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    # safe loading: no Python objects
    assert "invalid YAML" in error_of(tmp_path, "seed: !!python/object/apply:os.system ['true']\n")


def test_exponent_hint(tmp_path: Path) -> None:
    msg = error_of(tmp_path, spec_with(poses={"carm": {"sdd_mm": "1e3"}}))
    assert "poses.carm.sdd_mm" in msg and "1.0e3" in msg


def test_axis_forms() -> None:
    spec = parse_spec(spec_with(poses={"carm": {
        "alpha_deg": {"range": [-20, 20], "step": 10}, "beta_deg": {"values": [1, 2]},
        "gamma_deg": {"normal": {"mean": 0, "std": 2, "clip": [-3, 3]}}, "sdd_mm": {"uniform": [900, 1100]},
        "iso_jitter_mm": 4, "samples": 2}}))
    c = spec.poses.carm
    assert c is not None
    assert c.alpha_deg.values == (-20.0, -10.0, 0.0, 10.0, 20.0)
    assert c.beta_deg.values == (1.0, 2.0)
    assert c.gamma_deg.kind == "normal" and c.gamma_deg.clip == (-3.0, 3.0)
    assert c.sdd_mm.kind == "uniform" and c.iso_jitter_mm == (4.0, 4.0, 4.0) and c.samples == 2


def test_spectra_expand_in_order() -> None:
    spec = parse_spec(spec_with(spectra={"presets": ["60KV_AL35"], "tube": {"kvp": [70, 90], "al_mm": [2, 3]},
                                         "mono_kev": 50, "n_bins": 16}))
    names = [s.name for s in spec.spectra.items]
    assert names == ["60KV_AL35", "70kV_Al2_Cu0", "70kV_Al3_Cu0", "90kV_Al2_Cu0", "90kV_Al3_Cu0", "mono:50"]
    assert spec.spectra.n_bins == 16
    assert spec.spectra.items[1].request() == {"kvp": 70.0, "al_mm": 2.0, "cu_mm": 0.0, "anode_angle_deg": 12.0}


def test_explicit_matrices_inline_and_file(tmp_path: Path) -> None:
    P = [[1962.0, 0.0, 15.5, 0.0], [0.0, 1962.0, 15.5, 0.0], [0.0, 0.0, 1.0, 530.0]]
    spec = parse_spec(spec_with(poses={"explicit": {"matrices": [P, sum(P, [])]}}))
    assert spec.poses.explicit is not None and len(spec.poses.explicit.matrices) == 2
    assert spec.poses.explicit.matrices[0] == spec.poses.explicit.matrices[1]
    np.save(tmp_path / "poses.npy", np.array([P, P, P]))
    spec2 = load_spec(write(tmp_path, spec_with(poses={"explicit": {"file": "poses.npy"}})))
    assert spec2.poses.explicit is not None and len(spec2.poses.explicit.matrices) == 3
    np.save(tmp_path / "bad.npy", np.zeros((2, 4, 4)))
    msg = error_of(tmp_path, spec_with(poses={"explicit": {"file": "bad.npy"}}))
    assert "poses.explicit.file" in msg and "(N, 3, 4)" in msg


def test_labels_materials_and_urls(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, spec_with(volumes=[
        {"path": "s3://bucket/cts/case 1.nii.gz",
         "materials": {"label_map": "labels.nii.gz", "table": {"0": "air", 1: "bone"}, "default": "water"}},
        {"path": "sample:chest_ct", "materials": {"label_map": "sample:chest_ct_labels", "table": "table.csv"}},
    ])))
    v0, v1 = spec.volumes
    assert v0.resolved == "s3://bucket/cts/case 1.nii.gz" and v0.id == "case_1"
    assert v0.materials.table == ((0, "air"), (1, "bone")) and v0.materials.default == "water"
    assert v0.materials.label_map_resolved == str(tmp_path / "labels.nii.gz")
    assert v1.id == "chest_ct" and v1.materials.table_path_resolved == str(tmp_path / "table.csv")
    assert v1.materials.label_map_resolved == "sample:chest_ct_labels"


def test_shipped_specs_are_valid() -> None:
    from drrfarm.farm.demo import DEMO_SPEC_YAML
    from drrfarm.farm.plan import make_plan

    paths = sorted(glob.glob(str(REPO / "jobs" / "specs" / "*.yaml")))
    assert any(p.endswith("demo.yaml") for p in paths)
    for p in paths:
        plan = make_plan(load_spec(p))
        assert plan.n_images > 0
    demo_file = load_spec(REPO / "jobs" / "specs" / "demo.yaml")
    demo_code = parse_spec(yaml.safe_load(DEMO_SPEC_YAML))
    assert demo_file.sha256 == demo_code.sha256  # the shipped file and `drrfarm demo` render the same dataset
    assert 24 <= make_plan(demo_code).n_images <= 60  # "a few dozen"
