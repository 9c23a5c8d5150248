"""Meshes: loading and watertightness, tool posing, BVH/ray intervals against exact chords,
additive and replacing meshes in a render (CPU reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drrfarm.geometry import CArm
from drrfarm.materials import mass_attenuation_cm2_g
from drrfarm.meshes import (
    MeshError,
    align_linear_tool,
    cylinder_mesh,
    kwire_mesh,
    load_mesh,
    mesh_from_arrays,
    sample_tool_pose,
    screw_mesh,
)
from drrfarm.physics import Physics
from drrfarm.render import get_backend, reference
from drrfarm.render.mesh_reference import (
    Intervals,
    build_bvh,
    camera_rays_world,
    cpu_line_integrals,
    cpu_render,
    line_integrals_with_meshes,
    pack_poses,
    pack_scene,
    pixel_window,
    trace_mesh,
    trace_meshes,
)
from drrfarm.samples.phantoms import box_chord_mm, cylinder_chord_mm
from drrfarm.spectrum import monoenergetic
from drrfarm.volume import MaterialVolume

trimesh = pytest.importorskip("trimesh")

SMALL = CArm(height=48, width=48, pixel_mm=1.0)


# --------------------------------------------------------------------------------- exact references

def prism_planes(radius_mm: float, length_mm: float, sections: int) -> tuple[np.ndarray, np.ndarray]:
    """Half-spaces n.x <= c of the inscribed regular N-gon prism that cylinder_mesh builds (model frame)."""
    k = np.arange(sections)
    phi = 2.0 * np.pi * k / sections + np.pi / sections  # face normals between vertices at 2*pi*k/N
    n = np.stack([np.cos(phi), np.sin(phi), np.zeros(sections)], axis=1)
    c = np.full(sections, radius_mm * math.cos(math.pi / sections))
    n = np.vstack([n, [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]])
    c = np.r_[c, 0.0, length_mm]
    return n, c


def convex_interval(o: np.ndarray, d: np.ndarray, n: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cyrus-Beck: [t_in, t_out] of rays o + t d (R,3) inside the polyhedron {x: n.x <= c}."""
    nd = d @ n.T
    num = c[None, :] - o @ n.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t = num / nd
    t_in = np.where(nd < 0, t, -np.inf).max(axis=1)
    t_out = np.where(nd > 0, t, np.inf).min(axis=1)
    outside_parallel = ((nd == 0) & (num < 0)).any(axis=1)
    t_in = np.where(outside_parallel, np.inf, t_in)
    return t_in, t_out


def exact_prism_intervals(mesh, radius_mm, length_mm, sections, camera):
    src, dirs, t_det = camera_rays_world(camera)
    T = np.linalg.inv(mesh.world_from_mesh)
    o = np.broadcast_to(T[:3, :3] @ src + T[:3, 3], dirs.shape)
    d = dirs @ T[:3, :3].T
    t_in, t_out = convex_interval(o, d, *prism_planes(radius_mm, length_mm, sections))
    t_in = np.maximum(t_in, 0.0)
    t_out = np.minimum(t_out, t_det)
    return t_in, t_out, np.maximum(t_out - t_in, 0.0)


# ------------------------------------------------------------------------------------------ loading

@pytest.mark.parametrize("suffix", [".stl", ".obj", ".ply"])
def test_load_formats_keep_volume_and_pose(tmp_path, suffix: str) -> None:
    tm = trimesh.creation.cylinder(radius=4.0, height=20.0, sections=32)
    path = tmp_path / f"tool{suffix}"
    tm.export(str(path))
    pose = align_linear_tool((0, 0, 10), (0, 0, -10), (5.0, 1.0, 2.0), (5.0, -9.0, 2.0))
    m = load_mesh(path, "titanium", mode="replace", world_from_mesh=pose)
    assert m.volume_mm3 == pytest.approx(tm.volume, rel=1e-6)  # STL stores float32
    assert m.density_g_cm3 == pytest.approx(4.506, rel=1e-3)  # nominal density
    assert m.mode == "replace" and m.name == "tool" and m.source == str(path)
    lo, hi = m.bounds_world_mm()
    # tip (model z = 10) at the world tip, the 20 mm tool back along the trajectory (-y)
    np.testing.assert_allclose(lo, [1.0, -19.0, -2.0], atol=1e-5)
    np.testing.assert_allclose(hi, [9.0, 1.0, 6.0], atol=1e-5)


def test_scale_to_mm(tmp_path) -> None:
    tm = trimesh.creation.box((0.01, 0.02, 0.03))  # metres
    path = tmp_path / "plate.stl"
    tm.export(str(path))
    m = load_mesh(path, "steel", scale_to_mm=1000.0)
    assert m.volume_mm3 == pytest.approx(10 * 20 * 30, rel=1e-6)  # float32 STL


def test_non_watertight_mesh_is_rejected_naming_the_file(tmp_path) -> None:
    tm = trimesh.creation.cylinder(radius=3.0, height=10.0, sections=16)
    holey = trimesh.Trimesh(tm.vertices, tm.faces[:-1], process=False)
    path = tmp_path / "broken_screw.stl"
    holey.export(str(path))
    with pytest.raises(MeshError, match="not watertight") as info:
        load_mesh(path, "titanium")
    assert str(path) in str(info.value)
    assert "open edge" in str(info.value)


def test_inconsistent_winding_and_bad_inputs(tmp_path) -> None:
    tm = trimesh.creation.box((2.0, 2.0, 2.0))
    faces = np.array(tm.faces)
    faces[0] = faces[0][::-1]
    with pytest.raises(MeshError, match="wound"):
        mesh_from_arrays(tm.vertices, faces, "steel", name="flipped")
    with pytest.raises(MeshError, match="material"):
        mesh_from_arrays(tm.vertices, tm.faces, "unobtainium")
    with pytest.raises(MeshError, match="density"):
        mesh_from_arrays(tm.vertices, tm.faces, "steel", density_g_cm3=-1.0)
    with pytest.raises(MeshError, match="mode"):
        mesh_from_arrays(tm.vertices, tm.faces, "steel", mode="paint")
    with pytest.raises(MeshError, match="not found"):
        load_mesh(tmp_path / "missing.stl", "steel")
    with pytest.raises(MeshError, match="rotation"):
        mesh_from_arrays(tm.vertices, tm.faces, "steel", world_from_mesh=np.diag([2.0, 2.0, 2.0, 1.0]))


def test_inside_out_mesh_is_flipped() -> None:
    tm = trimesh.creation.box((2.0, 4.0, 6.0))
    m = mesh_from_arrays(tm.vertices, np.asarray(tm.faces)[:, ::-1], "steel")
    assert m.volume_mm3 == pytest.approx(48.0)


# ------------------------------------------------------------------------------------------- posing

def test_align_linear_tool_tip_axis_advance_twist() -> None:
    tip_w, base_w = np.array([10.0, -5.0, 30.0]), np.array([-20.0, 15.0, -10.0])
    w = (tip_w - base_w) / np.linalg.norm(tip_w - base_w)
    wire = kwire_mesh(diameter_mm=2.0, length_mm=100.0)
    for advance in (0.0, 7.5, -12.0):
        m = wire.aligned(tip_w, base_w, advance_mm=advance, twist_deg=33.0)
        np.testing.assert_allclose(m.tip_world_mm(), tip_w + advance * w, atol=1e-9)
        axis = m.tip_world_mm() - m.base_world_mm()
        assert np.linalg.norm(axis) == pytest.approx(100.0)  # the tool keeps its length
        np.testing.assert_allclose(axis / 100.0, w, atol=1e-12)
    # twist turns a model point off the axis about w, by the angle asked
    T0 = align_linear_tool((0, 0, 1), (0, 0, 0), tip_w, base_w, 0.0, 0.0)
    T1 = align_linear_tool((0, 0, 1), (0, 0, 0), tip_w, base_w, 0.0, 90.0)
    p0 = T0[:3, :3] @ [1.0, 0.0, 0.0]
    p1 = T1[:3, :3] @ [1.0, 0.0, 0.0]
    assert p0 @ p1 == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(np.cross(p0, p1), w, atol=1e-12)  # right-handed about w
    # antiparallel trajectory (model +z onto world -z) is handled
    T = align_linear_tool((0, 0, 1), (0, 0, 0), (0, 0, -5), (0, 0, 5))
    np.testing.assert_allclose(T[:3, :3] @ [0, 0, 1], [0, 0, -1], atol=1e-12)
    assert np.linalg.det(T[:3, :3]) == pytest.approx(1.0)


def test_sample_tool_pose_is_seeded_and_stays_on_the_distribution() -> None:
    wire = kwire_mesh(length_mm=100.0)
    tip, base = np.array([10.0, 0.0, 20.0]), np.array([10.0, -60.0, 20.0])
    W = np.eye(4)
    W[:3, 3] = [1.0, 2.0, 3.0]  # trajectory planned in patient RAS
    draws = [sample_tool_pose(wire, tip, base, np.random.default_rng(7), advance_mm=(-30.0, 0.0),
                              twist_deg={"normal": (0.0, 10.0), "clip": (-5.0, 5.0)}, world_from_patient=W)
             for _ in range(2)]
    np.testing.assert_array_equal(draws[0].world_from_mesh, draws[1].world_from_mesh)  # same seed, same pose
    rng = np.random.default_rng(1)
    tips = []
    for _ in range(50):
        m = sample_tool_pose(wire, tip, base, rng, advance_mm=(-30.0, 0.0), tip_jitter_mm=0.0, world_from_patient=W)
        t = m.tip_world_mm() - W[:3, 3]
        tips.append(t)
        np.testing.assert_allclose(t[[0, 2]], tip[[0, 2]], atol=1e-9)  # on the planned line
        assert -30.0 - 1e-9 <= t[1] - tip[1] <= 1e-9  # advance in [-30, 0] along +y
    assert np.ptp(np.array(tips)[:, 1]) > 20.0
    tilted = sample_tool_pose(wire, tip, base, rng, angle_jitter_deg=5.0)
    axis = tilted.tip_world_mm() - tilted.base_world_mm()
    angle = np.degrees(np.arccos(axis[1] / np.linalg.norm(axis)))
    assert 0.0 <= angle <= 5.0 + 1e-9
    with pytest.raises(MeshError, match="advance_mm"):
        sample_tool_pose(wire, tip, base, rng, advance_mm={"gamma": 1})


# ------------------------------------------------------------------------------- chords and intervals

@pytest.mark.parametrize("sections", [12, 256])
def test_mesh_cylinder_renders_analytic_chords(sections: int) -> None:
    r, L = 10.0, 60.0
    mesh = cylinder_mesh(r, L, sections=sections, material="steel").aligned(
        (6.0, 8.0, 25.0), (-4.0, 2.0, -30.0), advance_mm=2.0, twist_deg=17.0)
    camera = SMALL.camera(alpha_deg=20.0, beta_deg=-10.0)
    chord = trace_meshes([mesh], camera).chords_mm[0].reshape(-1)
    _, _, exact = exact_prism_intervals(mesh, r, L, sections, camera)
    assert (exact > 0).sum() > 300
    np.testing.assert_allclose(chord, exact, rtol=0, atol=1e-9 * 1000)
    # against the circle: the N-gon prism lies between its inscribed (apothem) and circumscribed cylinders
    src, dirs, _ = camera_rays_world(camera)
    T = np.linalg.inv(mesh.world_from_mesh)
    o = np.broadcast_to(T[:3, :3] @ src + T[:3, 3], dirs.shape)
    d = dirs @ T[:3, :3].T
    outer = cylinder_chord_mm(o, d, (0, 0, L / 2), r, L, "z")
    inner = cylinder_chord_mm(o, d, (0, 0, L / 2), r * math.cos(math.pi / sections), L, "z")
    assert np.all(chord <= outer + 1e-9) and np.all(chord >= inner - 1e-9)
    if sections == 256:  # sagitta r (1 - cos(pi/N)) = 0.75 um: deep chords within 10 um of the circle
        assert np.max(np.abs(chord - outer)[inner > 10.0]) < 0.01


def test_bvh_matches_brute_force_on_a_screw_and_edge_rays() -> None:
    screw = screw_mesh(sections=24).aligned((3.0, 4.0, 20.0), (-2.0, -1.0, -25.0))
    bvh = build_bvh(screw.triangles_model_mm(), leaf_size=2)
    flat = build_bvh(screw.triangles_model_mm(), leaf_size=10**6)  # one leaf: brute force
    camera = SMALL.camera(alpha_deg=75.0, beta_deg=30.0)
    src, dirs, t_det = camera_rays_world(camera)
    a = trace_mesh(screw, src, dirs, t_det, bvh=bvh, rays=pixel_window(screw, camera))
    b = trace_mesh(screw, src, dirs, t_det, bvh=flat)  # every ray, brute force
    assert len(a) > 100
    np.testing.assert_array_equal(a.ray, b.ray)
    np.testing.assert_allclose(a.t_in, b.t_in, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.t_out, b.t_out, rtol=0, atol=1e-12)
    # rays through vertices and along shared edges of a box (each face is two triangles) are not lost
    box = mesh_from_arrays(*_box(), "steel")
    origin = np.array([0.0, -500.0, 0.0])
    targets = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, -1.0], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0],
                        [2.0, 0.0, 3.0], [1.0, 0.0, -1.0]])
    d = targets - origin
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    iv = trace_mesh(box, origin, d, np.full(len(d), 1e4))
    np.testing.assert_allclose(iv.chord_mm(), box_chord_mm(np.broadcast_to(origin, d.shape), d, (0, 0, 0),
                                                           (4.0, 4.0, 6.0)), atol=1e-9)


def _box() -> tuple[np.ndarray, np.ndarray]:
    tm = trimesh.creation.box((4.0, 4.0, 6.0))
    return np.asarray(tm.vertices), np.asarray(tm.faces)


def test_nested_shells_and_source_inside() -> None:
    outer = trimesh.creation.box((10.0, 10.0, 10.0))
    inner = trimesh.creation.box((4.0, 4.0, 4.0))
    # a hollow box: outer shell outward, inner shell inward (a cavity)
    v = np.vstack([outer.vertices, inner.vertices])
    f = np.vstack([outer.faces, np.asarray(inner.faces)[:, ::-1] + len(outer.vertices)])
    hollow = mesh_from_arrays(v, f, "steel", check=False)
    origin = np.array([0.0, -100.0, 0.0])
    iv = trace_mesh(hollow, origin, np.array([[0.0, 1.0, 0.0]]), np.array([1000.0]))
    np.testing.assert_allclose(np.c_[iv.t_in, iv.t_out], [[95.0, 98.0], [102.0, 105.0]], atol=1e-9)
    # source inside the mesh: the interval starts at t = 0
    iv = trace_mesh(hollow, np.array([0.0, -4.0, 0.0]), np.array([[0.0, 1.0, 0.0]]), np.array([1000.0]))
    np.testing.assert_allclose(np.c_[iv.t_in, iv.t_out], [[0.0, 2.0], [6.0, 9.0]], atol=1e-9)
    # a mesh behind the detector plane is clipped at t_max
    iv = trace_mesh(hollow, origin, np.array([[0.0, 1.0, 0.0]]), np.array([96.5]))
    np.testing.assert_allclose(iv.chord_mm(), [1.5])


# ------------------------------------------------------------------------------------- in a render

def uniform_volume(material: str, density: float, shape=(80, 80, 80), spacing=0.5) -> MaterialVolume:
    A = np.diag([spacing, spacing, spacing, 1.0])
    A[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2.0
    dens = np.full((1, *shape), density, dtype=np.float32)
    return MaterialVolume([material], dens, A, f"uniform-{material}-{density}")


def test_additive_mesh_adds_density_times_chord_in_a_new_channel() -> None:
    mv = uniform_volume("water", 1.0, shape=(60, 60, 60), spacing=1.0)
    handle = get_backend("cpu").prepare(mv, np.eye(4))
    r, L, N = 5.0, 40.0, 64
    wire = cylinder_mesh(r, L, sections=N, material="steel", density_g_cm3=7.9).aligned(
        (15.0, -10.0, 18.0), (-12.0, 14.0, -16.0))
    camera = SMALL.camera(alpha_deg=10.0)
    names, A = cpu_line_integrals(handle, [camera], Physics(), [wire])
    assert names == ["water", "steel"]
    _, _, exact = exact_prism_intervals(wire, r, L, N, camera)
    np.testing.assert_allclose(A[0, 1].reshape(-1), 7.9 * exact / 10.0, rtol=1e-6, atol=1e-6)
    # additive: the water is untouched
    plain = get_backend("cpu").line_integrals(handle, [camera], Physics())[0, 0]
    np.testing.assert_array_equal(A[0, 0], plain)


def sample_count_inside(camera, shape, spacing, t_in, t_out, step_voxels=0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per ray: number of trilinear midpoints t_k of the reference march inside [t_in, t_out], and h."""
    A = np.diag([spacing, spacing, spacing, 1.0])
    A[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2.0
    M_inv = reference.ijk_from_world(A)
    src, dirs, t_det = reference.camera_rays_ijk(camera, M_inv)
    t0, t1 = reference.clip_rays_to_box(src, dirs, shape, t_det)
    length = np.maximum(t1 - t0, 0)
    n = np.ceil(length / (step_voxels * spacing))
    h = np.where(n > 0, length / np.maximum(n, 1), 0)
    counts = np.zeros(len(n))
    for i in np.flatnonzero((t_out > t_in) & (n > 0)):
        tk = t0[i] + (np.arange(n[i]) + 0.5) * h[i]
        counts[i] = np.sum((tk >= t_in[i]) & (tk <= t_out[i]))
    return counts, h


@pytest.mark.parametrize("method", ["trilinear", "joseph"])
def test_replacing_titanium_screw_removes_the_bone_along_its_chord(method: str) -> None:
    rho_bone = 1.92
    shape, spacing = (80, 80, 80), 0.5
    mv = uniform_volume("bone", rho_bone, shape, spacing)
    handle = get_backend("cpu").prepare(mv, np.eye(4))
    r, L, N = 3.0, 24.0, 128
    screw = cylinder_mesh(r, L, sections=N, material="titanium", mode="replace").aligned(
        (8.0, 2.0, 10.0), (-8.0, -3.0, -8.0))
    camera = SMALL.camera(alpha_deg=25.0, beta_deg=12.0)
    physics = Physics(method=method)
    names, A = cpu_line_integrals(handle, [camera], physics, [screw])
    full = get_backend("cpu").line_integrals(handle, [camera], physics)[0, 0].reshape(-1).astype(np.float64)
    bone = A[0, 0].reshape(-1).astype(np.float64)
    ti = A[0, 1].reshape(-1).astype(np.float64)
    assert names == ["bone", "titanium"]
    t_in, t_out, exact = exact_prism_intervals(screw, r, L, N, camera)
    hit = exact > 0
    assert hit.sum() > 200
    np.testing.assert_allclose(ti, screw.density_g_cm3 * exact / 10.0, atol=2e-6)
    removed = full - bone
    if method == "trilinear":
        # exactly the march samples inside the screw are skipped
        counts, h = sample_count_inside(camera, shape, spacing, t_in, t_out)
        np.testing.assert_allclose(removed, np.float32(rho_bone) * counts * h / 10.0, rtol=1e-5, atol=1e-6)
        h_max = float(h.max())
    else:
        h_max = spacing * math.sqrt(3.0)
    # ... which is the bone along the chord, to one sample at each end
    np.testing.assert_allclose(removed, rho_bone * exact / 10.0, atol=2 * rho_bone * h_max / 10.0 + 1e-5)
    assert np.all(removed[~hit] == 0.0)
    # the same as a CT with the screw region set to zero (voxels whose centres are inside the screw)
    I, J, K = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([I, J, K], axis=-1).reshape(-1, 3).astype(np.float64)
    world = ijk @ mv.patient_from_ijk[:3, :3].T + mv.patient_from_ijk[:3, 3]
    T = np.linalg.inv(screw.world_from_mesh)
    model = world @ T[:3, :3].T + T[:3, 3]
    n_pl, c_pl = prism_planes(r, L, N)
    inside = np.all(model @ n_pl.T <= c_pl, axis=1).reshape(shape)
    zeroed = mv.densities_g_cm3.copy()
    zeroed[0][inside] = 0.0
    hz = get_backend("cpu").prepare(MaterialVolume(["bone"], zeroed, mv.patient_from_ijk, "zeroed"), np.eye(4))
    removed_zero = full - get_backend("cpu").line_integrals(hz, [camera], physics)[0, 0].reshape(-1)
    assert removed.sum() == pytest.approx(removed_zero.sum(), rel=0.02)
    deep = exact > 3.0
    assert np.max(np.abs(removed - removed_zero)[deep]) < 2 * rho_bone * (h_max + spacing) / 10.0


def test_cpu_render_with_meshes_is_beer_lambert_over_all_channels() -> None:
    mv = uniform_volume("water", 1.0, shape=(40, 40, 40), spacing=1.0)
    handle = get_backend("cpu").prepare(mv, np.eye(4))
    wire = kwire_mesh(diameter_mm=2.0, length_mm=60.0).aligned((0.0, 0.0, 25.0), (0.0, 5.0, -25.0))
    camera = SMALL.camera()
    physics = Physics(output="transmission")
    names, A = cpu_line_integrals(handle, [camera], physics, [[wire]])
    img = cpu_render(handle, [camera], monoenergetic(60.0), physics, [0], [[wire]])[0]
    mu = np.array([mass_attenuation_cm2_g(n, np.array([60.0]))[0] for n in names])
    np.testing.assert_allclose(img, np.exp(-np.tensordot(mu, A[0].astype(np.float64), axes=1)), rtol=2e-6)
    assert img.min() < 0.6 * np.median(img)  # the wire shows


def test_union_of_overlapping_replacing_meshes_removes_once() -> None:
    mv = uniform_volume("bone", 1.5, shape=(60, 60, 60), spacing=0.5)
    handle = get_backend("cpu").prepare(mv, np.eye(4))
    a = cylinder_mesh(2.0, 20.0, sections=48, material="titanium", mode="replace").aligned((0, 0, 10), (0, 0, -10))
    b = a.posed(a.world_from_mesh)  # the same screw twice
    camera = SMALL.camera()
    _, one, _ = line_integrals_with_meshes(handle.densities, handle.world_from_ijk, handle.spacing_mm, ["bone"],
                                           camera, [a])
    _, two, _ = line_integrals_with_meshes(handle.densities, handle.world_from_ijk, handle.spacing_mm, ["bone"],
                                           camera, [a, b])
    np.testing.assert_allclose(two[0], one[0], atol=1e-9)  # bone removed once
    np.testing.assert_allclose(two[1], 2 * one[1], rtol=1e-12)  # titanium counted twice (additive part)


def test_pack_scene_layout() -> None:
    a = screw_mesh(sections=16)
    b = kwire_mesh(sections=8)
    scene = pack_scene([a, b], ["air", "soft_tissue", "bone"])
    assert list(scene["names"]) == ["air", "soft_tissue", "bone", "titanium", "steel"]
    assert scene["nodes"].shape[1] == 8 and scene["tris"].shape[1] == 9
    np.testing.assert_array_equal(scene["meshes"][:, 2:], [[1, 3], [1, 4]])
    n0 = int(scene["meshes"][1, 0])
    assert scene["nodes"][:n0, 7].view(np.int32).sum() == a.n_triangles  # leaf counts cover every slot
    assert pack_poses([[a, b]]).shape == (1, 2, 12)
    empty = Intervals.empty(5)
    assert empty.chord_mm().shape == (5,)
