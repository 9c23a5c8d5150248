"""Planner: counts match the spec, shard ids and seeds are stable, random poses are reproducible."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from drrfarm.errors import SpecError
from drrfarm.farm.plan import image_seed, image_seeds, make_plan, shard_id
from drrfarm.farm.spec import parse_spec

BASE: dict = {
    "seed": 11,
    "volumes": [{"id": "a", "path": "a.nii.gz"}, {"id": "b", "path": "b.nii.gz"}],
    "poses": {"carm": {"alpha_deg": {"range": [-30, 30], "num": 5}, "beta_deg": [-10, 0, 10]}},
    "spectra": {"presets": ["90KV_AL40", "60KV_AL35"], "mono_kev": [60]},
    "detector": {"model": "csi", "photons": [None, 1000]},
    "image": {"size": [24, 32], "pixel_mm": 8.0},
    "output": {"url": "/tmp/unused", "formats": ["parquet", "png"], "shard_size": 4},
}


def spec_of(**top: object) -> object:
    d = copy.deepcopy(BASE)
    d.update(top)
    return parse_spec(d, source="test.yaml")


def test_counts_match_the_spec() -> None:
    plan = make_plan(spec_of())
    assert (plan.n_volumes, plan.n_poses, plan.n_spectra, plan.n_photons) == (2, 15, 3, 2)
    assert plan.n_images == 2 * 15 * 3 * 2 == 180
    groups = 2 * 3 * 2
    assert plan.n_shards == groups * math.ceil(15 / 4) == 48
    sizes = [s.n_images for s in plan.shards]
    assert sum(sizes) == plan.n_images and max(sizes) == 4 and sizes[:4] == [4, 4, 4, 3]
    c = plan.counts()
    assert c["images"] == 180 and c["shards"] == 48 and c["spectra"] == 3
    per_image = 24 * 32 * 2 + 1024 + 24 * 32 * 2 + 2048
    assert plan.estimated_bytes() == 180 * per_image


def test_shards_cover_every_image_once_in_order() -> None:
    plan = make_plan(spec_of())
    indices = [i for s in plan.shards for i in s.image_indices]
    assert indices == list(range(plan.n_images))
    ids = plan.shard_ids()
    assert len(set(ids)) == len(ids) and ids[0] == f"{plan.sweep_id}-000000" and ids[7] == shard_id(plan.sweep_id, 7)
    # volume-major order; each shard has one volume, one spectrum, one photon setting
    assert [s.volume_index for s in plan.shards] == sorted(s.volume_index for s in plan.shards)
    combos = {(s.volume_index, s.spectrum_index, s.photons_index) for s in plan.shards}
    assert len(combos) == 12
    task = plan.task(plan.shards[5])
    assert task.shard_id == plan.shards[5].shard_id and len(task.poses) == len(task.seeds) == task.n_images
    assert task.image_indices == tuple(plan.shards[5].image_indices)
    assert plan.task(plan.shards[5].shard_id) == task


def test_stable_ids_and_seeds_across_runs() -> None:
    a, b = make_plan(spec_of()), make_plan(spec_of())
    assert a.shard_ids() == b.shard_ids()
    assert [a.task(i).seeds for i in range(a.n_shards)] == [b.task(i).seeds for i in range(b.n_shards)]
    seeds = [s for i in range(a.n_shards) for s in a.task(i).seeds]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    # an image's seed depends on the global seed and its index only (not the shard layout)
    c = make_plan(spec_of(output={"url": "/tmp/x", "shard_size": 7}))
    assert c.sweep_id != a.sweep_id
    assert [s for i in range(c.n_shards) for s in c.task(i).seeds] == seeds
    other = make_plan(spec_of(seed=12))
    assert other.task(0).seeds != a.task(0).seeds
    assert image_seed(11, 0) == a.task(0).seeds[0]


def test_output_override_keeps_ids() -> None:
    spec = spec_of()
    assert make_plan(spec.with_output("s3://bucket/elsewhere")).shard_ids() == make_plan(spec).shard_ids()


def test_random_poses_are_reproducible_and_bounded() -> None:
    poses = {"carm": {"alpha_deg": {"uniform": [-20, 20]}, "beta_deg": [0, 15],
                      "gamma_deg": {"normal": {"mean": 0, "std": 50, "clip": [-5, 5]}},
                      "sdd_mm": {"uniform": [950, 1050]}, "iso_jitter_mm": [2, 3, 4], "samples": 6}}
    p1 = make_plan(spec_of(poses=poses))
    p2 = make_plan(spec_of(poses=poses))
    assert p1.n_poses == 2 * 6
    a1 = p1.poses.arrays
    for key in ("alpha_deg", "gamma_deg", "sdd_mm", "isocentre_world_mm"):
        np.testing.assert_array_equal(a1[key], p2.poses.arrays[key])
    assert np.all((a1["alpha_deg"] >= -20) & (a1["alpha_deg"] <= 20))
    assert np.all(np.abs(a1["gamma_deg"]) <= 5) and np.any(np.abs(a1["gamma_deg"]) == 5)  # clipped
    assert np.all(np.abs(a1["isocentre_world_mm"]) <= [2, 3, 4])
    assert list(a1["beta_deg"]) == [0.0] * 6 + [15.0] * 6  # grid outer, samples inner
    assert len(set(a1["alpha_deg"].tolist())) == 12
    # the global seed drives the draws unless poses.seed is given
    p3 = make_plan(spec_of(poses=poses, seed=99))
    assert not np.array_equal(p3.poses.arrays["alpha_deg"], a1["alpha_deg"])
    pinned = {**poses, "seed": 5}
    p4, p5 = make_plan(spec_of(poses=pinned, seed=1)), make_plan(spec_of(poses=pinned, seed=2))
    np.testing.assert_array_equal(p4.poses.arrays["alpha_deg"], p5.poses.arrays["alpha_deg"])


def test_pose_objects() -> None:
    plan = make_plan(spec_of())
    p = plan.poses.pose(5)
    assert p.kind == "carm" and p.alpha_deg == -15.0 and p.beta_deg == 10.0 and p.sdd_mm == 1020.0
    assert p.to_dict()["pose_index"] == 5
    P = [[1962.0, 0.0, 15.5, 0.0], [0.0, 1962.0, 11.5, 0.0], [0.0, 0.0, 1.0, 530.0]]
    explicit = make_plan(spec_of(poses={"explicit": [P, P, P]}))
    assert explicit.n_poses == 3 and tuple(sum(P, [])) == explicit.poses.pose(2).P


def test_random_sid_sdd_violation_is_a_spec_error() -> None:
    poses = {"carm": {"sdd_mm": {"uniform": [500, 1000]}, "sid_mm": {"uniform": [100, 450]}, "samples": 3}}
    make_plan(spec_of(poses=poses))  # bounds already guarantee sid < sdd
    with pytest.raises(SpecError, match="sid_mm"):
        spec_of(poses={"carm": {"sdd_mm": {"uniform": [500, 1000]}, "sid_mm": {"uniform": [400, 600]}}})


def test_describe_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from drrfarm.cli import main

    plan = make_plan(spec_of())
    text = plan.describe()
    for needle in ("images:    180", "shards:    48", "volumes:   2", "poses:     15", "spectra:   3", "bytes:"):
        assert needle in text, text
    d = copy.deepcopy(BASE)
    d["volumes"] = [{"id": "a", "path": "a.nii.gz"}]
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    assert main(["plan", str(p)]) == 0
    out = capsys.readouterr().out
    assert "images:    90" in out and "shards:    24" in out
    assert main(["plan", str(p), "--json"]) == 0
    import json

    counts = json.loads(capsys.readouterr().out)
    assert counts["images"] == 90 and counts["shards"] == 24 and counts["volumes"] == 1
    d["volumes"] = []
    p.write_text(yaml.safe_dump(d))
    assert main(["plan", str(p)]) == 2
    assert "volumes: must have at least 1 item" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 5, 2**32 - 1, 2**32, 2**64 + 5, 123456789012345678901234567890])
def test_image_seeds_together_equal_numpys_seed_sequence_one_by_one(seed: int) -> None:
    """The planner's batched seeds are NumPy's SeedSequence(seed, spawn_key=(0, index)) of each image, also
    for seeds and indices of several 32-bit words."""
    rng = np.random.default_rng(seed % 1000)
    idx = np.concatenate([np.arange(70), rng.integers(0, 2**31, 40), [2**32 - 1, 2**32, 2**33 + 7, 2**62]])
    got = image_seeds(seed, idx)
    assert got.dtype == np.int64 and np.all(got >= 0)
    assert got.tolist() == [image_seed(seed, int(i)) for i in idx]
    assert image_seeds(seed, []).size == 0
