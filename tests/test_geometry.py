"""Tests for drrfarm.geometry: cameras, the C-arm convention, placement, samplers and the doc example."""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path

import numpy as np
import pytest

from drrfarm.errors import GeometryError
from drrfarm.geometry import (
    ORIENTATIONS,
    Camera,
    CArm,
    carm_grid,
    check_source_outside,
    rot_x,
    rot_z,
    sample_carm_poses,
    volume_box_corners_world,
    world_from_patient_default,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "geometry.md"


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _random_camera(rng: np.random.Generator) -> Camera:
    f = rng.uniform(300, 6000)
    K = np.array(
        [
            [f, rng.uniform(-2, 2), rng.uniform(0, 1000)],
            [0.0, f * rng.uniform(0.9, 1.1), rng.uniform(0, 1000)],
            [0.0, 0.0, 1.0],
        ]
    )
    return Camera(K, _random_rotation(rng), rng.uniform(-800, 800, 3), 512, 640, rng.uniform(0.1, 1.0))


def _same_up_to_scale(A: np.ndarray, B: np.ndarray, tol: float = 1e-9) -> bool:
    a = A / np.linalg.norm(A)
    b = B / np.linalg.norm(B)
    return min(np.max(np.abs(a - b)), np.max(np.abs(a + b))) < tol


# ---------------------------------------------------------------------------------------------
# Camera
# ---------------------------------------------------------------------------------------------


def test_projection_round_trip_random_cameras():
    rng = np.random.default_rng(1)
    for _ in range(50):
        cam = _random_camera(rng)
        scale = rng.choice([-1.0, 1.0]) * rng.uniform(1e-3, 1e3)
        back = Camera.from_projection(scale * cam.P, cam.height, cam.width, cam.pixel_mm)
        assert _same_up_to_scale(back.P, scale * cam.P)
        np.testing.assert_allclose(back.P, cam.P, rtol=1e-9, atol=1e-6 * np.abs(cam.P).max())
        np.testing.assert_allclose(back.K, cam.K, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(back.R, cam.R, atol=1e-10)
        np.testing.assert_allclose(back.t, cam.t, atol=1e-7)
        assert back.K[2, 2] == 1.0 and back.K[0, 0] > 0 and back.K[1, 1] > 0
        assert np.linalg.det(back.R) == pytest.approx(1.0)
        np.testing.assert_allclose(back.source_world_mm, cam.source_world_mm, atol=1e-6)


def test_from_projection_unknown_pitch_defaults_to_one():
    cam = CArm().camera(20, 10)
    back = Camera.from_projection(cam.P, cam.height, cam.width)
    assert back.pixel_mm == 1.0
    assert back.sdd_mm == pytest.approx(cam.K[0, 0])


def test_from_projection_pixel_center_half():
    cam = CArm().camera(10, -5, 7)
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    back = Camera.from_projection(3.0 * shift @ cam.P, 1536, 1536, 0.194, pixel_center=0.5)
    np.testing.assert_allclose(back.P, cam.P, atol=1e-8)
    back2 = Camera.from_krt(shift @ cam.K, cam.R, cam.t, 1536, 1536, 0.194, pixel_center=0.5)
    np.testing.assert_allclose(back2.K, cam.K, atol=1e-12)


def test_dict_round_trip_is_json_and_exact():
    cam = _random_camera(np.random.default_rng(2))
    d = json.loads(json.dumps(cam.to_dict()))
    assert d["pixel_center"] == 0.0
    assert set(d) >= {"K", "R", "t", "P", "pixel_center", "source_world_mm", "height", "width", "pixel_mm"}
    back = Camera.from_dict(d)
    np.testing.assert_allclose(back.P, cam.P, rtol=1e-12, atol=1e-9)
    assert (back.height, back.width, back.pixel_mm) == (cam.height, cam.width, cam.pixel_mm)
    only_p = {k: d[k] for k in ("P", "height", "width", "pixel_mm")}
    assert _same_up_to_scale(Camera.from_dict(only_p).P, cam.P)
    bad = dict(d, source_world_mm=[0.0, 0.0, 0.0])
    with pytest.raises(GeometryError, match="source_world_mm"):
        Camera.from_dict(bad)
    bad = dict(d, P=(np.array(d["P"]) + np.eye(3, 4)).tolist())
    with pytest.raises(GeometryError, match="P"):
        Camera.from_dict(bad)


def test_project_of_points_along_pixel_rays_returns_the_pixels():
    rng = np.random.default_rng(3)
    for cam in [_random_camera(rng), CArm().camera(33, -12, 71)]:
        us = rng.uniform(-10, cam.width + 10, 200)
        vs = rng.uniform(-10, cam.height + 10, 200)
        d = cam.pixel_rays_world(us, vs)
        np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-12)
        dist = rng.uniform(10, 2000, (200, 1))
        pts = cam.source_world_mm + dist * d
        np.testing.assert_allclose(cam.project(pts), np.stack([us, vs], -1), atol=1e-6)
        # depth of source + dist*d is dist * cos(angle to the principal ray)
        np.testing.assert_allclose(cam.depth(pts), dist[:, 0] * (d @ cam.principal_ray_world), rtol=1e-10)


def test_ray_directions_grid_layout_and_centre_pixel():
    cam = CArm().with_size(255, 257, 1.2).camera(15, 20, 40)
    rays = cam.ray_directions_world()
    assert rays.shape == (255, 257, 3) and rays.dtype == np.float64
    # odd detector: pixel (128, 127) is the principal point, its ray is the principal ray
    np.testing.assert_allclose(rays[127, 128], cam.principal_ray_world, atol=1e-12)
    # element [v, u]
    np.testing.assert_allclose(rays[3, 200], cam.pixel_rays_world(200, 3), atol=1e-15)
    np.testing.assert_allclose(cam.ray_directions_world([200], [3])[0], rays[3, 200], atol=1e-15)
    # even default detector: principal point at 767.5
    cam0 = CArm().camera()
    np.testing.assert_allclose(cam0.pixel_rays_world(767.5, 767.5), [0.0, 1.0, 0.0], atol=1e-15)


def test_detector_distance_along_ray():
    cam = CArm().camera(30, 10, 5)
    rays = cam.pixel_rays_world(np.array([0.0, 767.5, 1535.0]), np.array([0.0, 767.5, 1535.0]))
    dist = cam.detector_distance_along_ray(rays)
    assert dist[1] == pytest.approx(1020.0)
    # the points at that distance lie on the detector plane (depth == SDD)
    pts = cam.source_world_mm + dist[:, None] * rays
    np.testing.assert_allclose(cam.depth(pts), 1020.0, rtol=1e-12)
    assert dist[0] > 1020.0
    assert np.isinf(cam.detector_distance_along_ray(-cam.principal_ray_world))


def test_project_behind_source_is_nan():
    cam = CArm().camera()
    uv = cam.project([[0.0, -600.0, 0.0], [0.0, 0.0, 0.0]])
    assert np.all(np.isnan(uv[0])) and np.all(np.isfinite(uv[1]))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"K": np.diag([-100.0, 100.0, 1.0])}, "K"),
        ({"K": np.diag([100.0, 0.0, 1.0])}, "K"),
        ({"K": np.array([[100.0, 0, 0], [5.0, 100, 0], [0, 0, 1]])}, "K"),
        ({"K": np.diag([np.nan, 100.0, 1.0])}, "K"),
        ({"R": np.diag([1.0, 1.0, 1.1])}, "R"),
        ({"R": np.diag([1.0, 1.0, -1.0])}, "R"),
        ({"t": [0.0, np.inf, 0.0]}, "t"),
        ({"t": [0.0, 0.0]}, "t"),
        ({"height": 0}, "height"),
        ({"width": -5}, "width"),
        ({"width": 10.5}, "width"),
        ({"pixel_mm": 0.0}, "pixel_mm"),
        ({"pixel_mm": float("nan")}, "pixel_mm"),
    ],
)
def test_camera_validation_names_parameter(kwargs, name):
    args = {
        "K": np.diag([100.0, 100.0, 1.0]),
        "R": np.eye(3),
        "t": [0.0, 0.0, 500.0],
        "height": 10,
        "width": 10,
        "pixel_mm": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(GeometryError, match=rf"^{name}:"):
        Camera(**args)


def test_from_projection_rejects_singular_and_nan():
    with pytest.raises(GeometryError, match="^P:"):
        Camera.from_projection(np.zeros((3, 4)), 10, 10)
    P = np.array([[1.0, 2, 3, 0], [2, 4, 6, 0], [0, 0, 1, 1]])
    with pytest.raises(GeometryError, match="^P:"):
        Camera.from_projection(P, 10, 10)
    P = CArm().camera().P
    P[0, 0] = np.nan
    with pytest.raises(GeometryError, match="^P:"):
        Camera.from_projection(P, 10, 10)
    with pytest.raises(GeometryError, match="^P:"):
        Camera.from_projection(np.eye(3), 10, 10)


# ---------------------------------------------------------------------------------------------
# C-arm convention
# ---------------------------------------------------------------------------------------------


def test_carm_zero_pose():
    arm = CArm()
    cam = arm.camera()
    np.testing.assert_allclose(cam.source_world_mm, [0.0, -530.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(cam.principal_ray_world, [0.0, 1.0, 0.0], atol=1e-15)
    assert cam.sdd_mm == pytest.approx(1020.0)
    assert cam.K[0, 0] == pytest.approx(1020.0 / 0.194)
    np.testing.assert_allclose(cam.project([0.0, 0.0, 0.0]), [767.5, 767.5], atol=1e-9)
    # camera axes in world: u -> +x, v -> -z
    np.testing.assert_allclose(cam.R[0], [1, 0, 0], atol=1e-15)
    np.testing.assert_allclose(cam.R[1], [0, 0, -1], atol=1e-15)


@pytest.mark.parametrize("angles", [(0, 0, 0), (40, -20, 15), (-35, 100, -170), (110, 225, 90)])
def test_isocentre_projects_to_principal_point(angles):
    iso = np.array([12.0, -30.0, 55.0])
    cam = CArm().camera(*angles, isocentre_world_mm=iso)
    np.testing.assert_allclose(cam.project(iso), cam.principal_point, atol=1e-8)
    assert cam.depth(iso) == pytest.approx(530.0)
    assert np.linalg.norm(cam.source_world_mm - iso) == pytest.approx(530.0)


def test_plus_x_larger_u_plus_z_smaller_v():
    cam = CArm().camera()
    c = cam.project([0.0, 0.0, 0.0])
    px = cam.project([10.0, 0.0, 0.0])
    pz = cam.project([0.0, 0.0, 10.0])
    assert px[0] > c[0] and px[1] == pytest.approx(c[1])
    assert pz[1] < c[1] and pz[0] == pytest.approx(c[0])


def test_alpha_90_is_lateral_along_plus_x():
    cam = CArm().camera(alpha_deg=90)
    np.testing.assert_allclose(cam.principal_ray_world, [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(cam.source_world_mm, [-530.0, 0.0, 0.0], atol=1e-9)
    # anterior appears toward the image left, head still toward the top
    c = cam.project([0.0, 0.0, 0.0])
    assert cam.project([0.0, 10.0, 0.0])[0] < c[0]
    assert cam.project([0.0, 0.0, 10.0])[1] < c[1]
    # negative alpha (RAO-like) swings the detector toward -x
    assert CArm().camera(alpha_deg=-30).principal_ray_world[0] < 0


def test_beta_30_tilts_toward_plus_z():
    cam = CArm().camera(beta_deg=30)
    np.testing.assert_allclose(cam.principal_ray_world, [0.0, math.cos(math.radians(30)), 0.5], atol=1e-12)
    assert cam.source_world_mm[2] < 0  # the source goes toward the feet


def test_device_rotation_order():
    a, b = 25.0, 35.0
    cam = CArm().camera(a, b)
    ca, sa, cb, sb = (
        math.cos(math.radians(a)),
        math.sin(math.radians(a)),
        math.cos(math.radians(b)),
        math.sin(math.radians(b)),
    )
    # R_x(b) @ R_z(-a) @ (0,1,0) = R_x(b) @ (sin a, cos a, 0)
    np.testing.assert_allclose(cam.principal_ray_world, [sa, ca * cb, ca * sb], atol=1e-12)


def test_gamma_rotates_image_counter_clockwise_on_display():
    arm = CArm()
    p = np.array([[50.0, 0.0, 0.0], [0.0, 0.0, 50.0]])  # right of centre; above centre
    c = np.array([767.5, 767.5])
    d0 = arm.camera().project(p) - c
    for g in (30.0, 90.0, -45.0):
        cam = arm.camera(gamma_deg=g)
        # source and principal ray do not depend on gamma
        np.testing.assert_allclose(cam.source_world_mm, [0.0, -530.0, 0.0], atol=1e-9)
        np.testing.assert_allclose(cam.principal_ray_world, [0.0, 1.0, 0.0], atol=1e-12)
        d = cam.project(p) - c
        # on a display with v downward, screen coords are (du, -dv); CCW rotation by g
        gr = math.radians(g)
        rot = np.array([[math.cos(gr), -math.sin(gr)], [math.sin(gr), math.cos(gr)]])
        screen0 = d0 * [1, -1]
        np.testing.assert_allclose(d * [1, -1], screen0 @ rot.T, atol=1e-8)
    d90 = arm.camera(gamma_deg=90).project(p) - c
    np.testing.assert_allclose(d90[0], [0.0, -d0[0, 0]], atol=1e-8)  # patient left -> top


def test_with_size_and_dict():
    arm = CArm().with_size(256, 256, 1.164)
    cam = arm.camera()
    assert (cam.height, cam.width, cam.pixel_mm) == (256, 256, 1.164)
    assert cam.principal_point == (127.5, 127.5)
    assert cam.sdd_mm == pytest.approx(1020.0)
    d = json.loads(json.dumps(arm.to_dict()))
    assert CArm.from_dict(d) == arm
    with pytest.raises(GeometryError, match="^bogus"):
        CArm.from_dict({"bogus": 1})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sdd_mm": 500.0}, "sdd_mm"),
        ({"sdd_mm": 530.0}, "sdd_mm"),
        ({"sid_mm": -1.0}, "sid_mm"),
        ({"sdd_mm": 0.0}, "sdd_mm"),
        ({"pixel_mm": 0.0}, "pixel_mm"),
        ({"height": 0}, "height"),
        ({"width": -3}, "width"),
        ({"alpha_range_deg": (10.0, -10.0)}, "alpha_range_deg"),
        ({"isocentre_world_mm": (0.0, np.nan, 0.0)}, "isocentre_world_mm"),
    ],
)
def test_carm_validation_names_parameter(kwargs, name):
    with pytest.raises(GeometryError, match=rf"^{name}:"):
        CArm(**kwargs)


def test_carm_angle_limits():
    arm = CArm()
    with pytest.raises(GeometryError, match="^alpha_deg:"):
        arm.camera(alpha_deg=-41)
    with pytest.raises(GeometryError, match="^alpha_deg:"):
        arm.camera(alpha_deg=111)
    with pytest.raises(GeometryError, match="^beta_deg:"):
        arm.camera(beta_deg=226)
    with pytest.raises(GeometryError, match="^gamma_deg:"):
        arm.camera(gamma_deg=float("nan"))
    free = CArm(enforce_limits=False)
    np.testing.assert_allclose(free.camera(alpha_deg=-90).principal_ray_world, [-1, 0, 0], atol=1e-12)


def test_carm_cameras_batch_equals_one_by_one_and_the_formula():
    arm = CArm(height=64, width=48, pixel_mm=0.8, isocentre_world_mm=(5.0, -3.0, 2.0))
    rng = np.random.default_rng(3)
    a, b, g = rng.uniform(-40, 110, 25), rng.uniform(-225, 225, 25), rng.uniform(-90, 90, 25)
    iso = rng.uniform(-60, 60, (25, 3))
    batch = arm.cameras(a, b, g, iso)
    for i, cam in enumerate(batch):
        one = arm.camera(a[i], b[i], g[i], iso[i])
        for name in ("K", "R", "t"):
            np.testing.assert_array_equal(getattr(cam, name), getattr(one, name))
        # the convention written out: R_device = R_x(beta) R_z(-alpha), roll R_z(-gamma) after the device axes
        r_device = rot_x(b[i]) @ rot_z(-a[i])
        r0 = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
        R = rot_z(-g[i]) @ r0 @ r_device.T
        np.testing.assert_allclose(cam.R, R, atol=1e-12)
        np.testing.assert_allclose(cam.source_world_mm, iso[i] - arm.sid_mm * r_device[:, 1], atol=1e-9)
        checked = Camera(cam.K, cam.R, cam.t, cam.height, cam.width, cam.pixel_mm)  # passes validation
        np.testing.assert_allclose(checked.P, cam.P, atol=1e-9)
    default_iso = arm.cameras([0.0], [0.0], [0.0])[0]
    np.testing.assert_allclose(default_iso.project([5.0, -3.0, 2.0]), [23.5, 31.5], atol=1e-9)


def test_carm_cameras_validation_names_parameter():
    arm = CArm()
    with pytest.raises(GeometryError, match="^beta_deg: 300 outside"):
        arm.cameras([0.0, 10.0], [0.0, 300.0], [0.0, 0.0])
    with pytest.raises(GeometryError, match="^gamma_deg:"):
        arm.cameras([0.0], [0.0], [np.inf])
    with pytest.raises(GeometryError, match="one per pose"):
        arm.cameras([0.0, 1.0], [0.0], [0.0, 0.0])
    with pytest.raises(GeometryError, match="^isocentres_world_mm:"):
        arm.cameras([0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [[0.0, 0.0]])


def test_camera_for_pose_sdd_override():
    arm = CArm()
    cam = arm.camera_for_pose(
        {"alpha_deg": 10, "beta_deg": 5, "gamma_deg": 0, "isocentre_world_mm": [1, 2, 3], "sdd_mm": 1100.0}
    )
    assert cam.sdd_mm == pytest.approx(1100.0)
    np.testing.assert_allclose(cam.project([1, 2, 3]), [767.5, 767.5], atol=1e-8)
    with pytest.raises(GeometryError, match="^sdd_mm:"):
        arm.camera_for_pose({"sdd_mm": 400.0})


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------


def test_world_from_patient_orientations():
    centre = np.array([10.0, -20.0, 300.0])
    expect = {  # world direction of patient left, anterior, superior
        "HFS": ([1, 0, 0], [0, 1, 0], [0, 0, 1]),
        "FFS": ([-1, 0, 0], [0, 1, 0], [0, 0, -1]),
        "HFP": ([-1, 0, 0], [0, -1, 0], [0, 0, 1]),
        "FFP": ([1, 0, 0], [0, -1, 0], [0, 0, -1]),
    }
    assert set(expect) == set(ORIENTATIONS)
    for name, (left, ant, sup) in expect.items():
        W = world_from_patient_default(centre, name.lower() if name == "FFS" else name)
        np.testing.assert_allclose(W @ [*centre, 1.0], [0, 0, 0, 1], atol=1e-12)
        np.testing.assert_allclose(W[:3, :3] @ [1, 0, 0], left)
        np.testing.assert_allclose(W[:3, :3] @ [0, 1, 0], ant)
        np.testing.assert_allclose(W[:3, :3] @ [0, 0, 1], sup)
        assert np.linalg.det(W[:3, :3]) == pytest.approx(1.0)
        np.testing.assert_array_equal(W[3], [0, 0, 0, 1])
    W = world_from_patient_default(centre, isocentre_world_mm=[5, 6, 7])
    np.testing.assert_allclose(W @ [*centre, 1.0], [5, 6, 7, 1])
    with pytest.raises(GeometryError, match="^orientation:"):
        world_from_patient_default(centre, "LFS")


def test_world_from_patient_accepts_volume_like():
    class FakeVolume:
        def centre_patient_mm(self):
            return np.array([1.0, 2.0, 3.0])

    np.testing.assert_allclose(world_from_patient_default(FakeVolume())[:3, 3], [-1, -2, -3])


def test_check_source_outside():
    A = np.diag([0.8, 0.8, 1.5, 1.0])
    shape = (400, 400, 300)  # 320 x 320 x 450 mm box
    W = world_from_patient_default(np.zeros(3))
    corners = volume_box_corners_world(shape, A, W)
    assert corners.shape == (8, 3)
    np.testing.assert_allclose(corners.min(0), [-0.4, -0.4, -0.75])
    np.testing.assert_allclose(corners.max(0), [319.6, 319.6, 449.25])
    arm = CArm()
    check_source_outside(arm.camera(), corners)  # source at y=-530: outside
    inside = arm.camera(isocentre_world_mm=[100.0, 600.0, 100.0])  # source at (100, 70, 100)
    with pytest.raises(GeometryError, match="^source:"):
        check_source_outside(inside, corners)
    # rotated box and shuffled corner order
    Wr = np.eye(4)
    Wr[:3, :3] = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    corners_r = volume_box_corners_world(shape, A, Wr)[[3, 7, 0, 5, 1, 6, 2, 4]]
    check_source_outside(arm.camera(isocentre_world_mm=[-160.0, 160.0, 225.0]), corners_r)
    with pytest.raises(GeometryError, match="^source:"):
        check_source_outside(arm.camera(isocentre_world_mm=[-160.0, 600.0, 225.0]), corners_r)
    with pytest.raises(GeometryError, match="^box_corners_world:"):
        check_source_outside(arm.camera(), np.zeros((8, 3)))


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


def test_carm_grid():
    poses = carm_grid([0, 30], [-10, 0, 10], [5])
    assert len(poses) == 6
    assert [(p["alpha_deg"], p["beta_deg"]) for p in poses[:3]] == [(0, -10), (0, 0), (0, 10)]
    assert all(p["gamma_deg"] == 5 and p["sdd_mm"] is None for p in poses)
    assert poses[0]["isocentre_world_mm"] == [0.0, 0.0, 0.0]
    json.dumps(poses)
    with pytest.raises(GeometryError, match="^alphas:"):
        carm_grid([], [0])


def test_sampler_deterministic_and_in_range():
    kw = dict(
        alpha=(-40, 110),
        beta={"normal": (0, 10), "clip": (-20, 20)},
        gamma=(-5, 5),
        iso_jitter_mm=10.0,
        sdd_range_mm=(900, 1100),
        seed=42,
    )
    a = sample_carm_poses(50, **kw)
    b = sample_carm_poses(50, **kw)
    assert a == b
    assert sample_carm_poses(20, **kw) == a[:20]  # prefix-stable
    assert sample_carm_poses(50, **dict(kw, seed=43)) != a
    json.dumps(a)
    for p in a:
        assert set(p) == {"alpha_deg", "beta_deg", "gamma_deg", "isocentre_world_mm", "sdd_mm"}
        assert -40 <= p["alpha_deg"] <= 110 and -20 <= p["beta_deg"] <= 20 and -5 <= p["gamma_deg"] <= 5
        assert np.all(np.abs(p["isocentre_world_mm"]) <= 10) and 900 <= p["sdd_mm"] <= 1100
    alphas = np.array([p["alpha_deg"] for p in sample_carm_poses(2000, seed=1)])
    assert alphas.min() >= -40 and alphas.max() <= 110 and abs(alphas.mean() - 35) < 5
    betas = np.array([p["beta_deg"] for p in sample_carm_poses(2000, beta={"normal": (5, 2)}, seed=1)])
    assert abs(betas.mean() - 5) < 0.3 and abs(betas.std() - 2) < 0.3
    const = sample_carm_poses(3, alpha=12.0, beta=0.0, seed=0)
    assert [p["alpha_deg"] for p in const] == [12.0] * 3 and const[0]["sdd_mm"] is None
    arm = CArm()
    for p in a[:5]:
        arm.camera_for_pose(p)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": (10, 0)}, "alpha"),
        ({"beta": {"normal": (0, -1)}}, "beta.normal"),
        ({"gamma": {"cauchy": (0, 1)}}, "gamma"),
        ({"iso_jitter_mm": -1.0}, "iso_jitter_mm"),
        ({"sdd_range_mm": (1100, 900)}, "sdd_range_mm"),
        ({"seed": -1}, "seed"),
    ],
)
def test_sampler_validation(kwargs, name):
    with pytest.raises(GeometryError, match=rf"^{name}:"):
        sample_carm_poses(3, **kwargs)


# ---------------------------------------------------------------------------------------------
# The documentation's worked example
# ---------------------------------------------------------------------------------------------


def test_doc_examples_execute():
    result = doctest.testfile(str(DOC), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 15
    assert result.failed == 0


def test_worked_example_numbers_from_first_principles():
    f = 1020.0 / 0.194
    assert f"{f:.2f}" == "5257.73"
    cam = CArm().camera()
    for x_mm, expected_u in [(50.0, "1263.51"), (100.0, "1759.52")]:
        u_closed = 767.5 + f * x_mm / 530.0
        assert f"{u_closed:.2f}" == expected_u
        assert cam.project([x_mm, 0.0, 0.0])[0] == pytest.approx(u_closed, abs=1e-9)
    assert f"{767.5 - f * 50.0 / 530.0:.2f}" == "271.49"
    small_f = 1020.0 / 1.164
    assert f"{small_f:.2f} {127.5 + small_f * 50 / 530:.2f}" == "876.29 210.17"
    r = f * 50.0 / 530.0
    g = math.radians(30)
    assert f"{767.5 + r * math.cos(g):.2f} {767.5 - r * math.sin(g):.2f}" == "1197.06 519.49"
    text = DOC.read_text()
    for number in ("5257.73", "1263.51", "1759.52", "271.49", "876.29", "210.17", "1197.06", "519.49"):
        assert number in text
