"""Label masks (CT label maps and meshes) against the analytic cone outline of a sphere, and landmarks
against P·X and the rendered image of beads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drrfarm.geometry import CArm, world_from_patient_default
from drrfarm.labels import LabelImages, LabelProjector, mesh_label_images, unpack_bits
from drrfarm.landmarks import LandmarkError, landmarks_from_points, load_landmarks, project_landmarks
from drrfarm.meshes import cylinder_mesh
from drrfarm.physics import Physics
from drrfarm.render import get_backend
from drrfarm.render.mesh_reference import camera_rays_world
from drrfarm.samples.phantoms import bead_phantom, sphere_chord_mm

pytest.importorskip("trimesh")


# ------------------------------------------------------------------------------------------- labels

def sphere_label_map(centre, radius, shape=(100, 100, 100), spacing=0.5, value=7):
    A = np.diag([spacing, spacing, spacing, 1.0])
    A[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2.0
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    xyz = ijk @ A[:3, :3].T + A[:3, 3]
    labels = np.zeros(shape, dtype=np.uint8)
    labels[np.linalg.norm(xyz - np.asarray(centre), axis=-1) <= radius] = value
    return labels, A


def cone_conic(camera, centre_world, radius):
    """3x3 conic C of the sphere's outline: pixel x~ = (u, v, 1) is inside the cone tangent to the sphere
    from the source iff x~^T C x~ >= 0 (exact under perspective; an ellipse on the detector)."""
    s = camera.source_world_mm
    c = np.asarray(centre_world, dtype=np.float64) - s
    dist = np.linalg.norm(c)
    chat = c / dist
    cos2 = 1.0 - (radius / dist) ** 2
    Q = np.outer(chat, chat) - cos2 * np.eye(3)
    M = camera.R.T @ np.linalg.inv(camera.K)  # pixel -> world direction
    return M.T @ Q @ M


def test_sphere_label_mask_is_the_analytic_ellipse_within_one_pixel() -> None:
    centre, radius = np.array([6.0, -4.0, 5.0]), 12.0
    labels, A = sphere_label_map(centre, radius)
    labels[5:15, 60:90, 40:50] = 3  # a second label (a box) away from the sphere
    world_from_patient = world_from_patient_default(np.zeros(3), isocentre_world_mm=(20.0, 0.0, -15.0))
    proj = LabelProjector(labels, world_from_patient, {7: "sphere", 3: "box"}, patient_from_ijk=A)
    camera = CArm(height=160, width=160, pixel_mm=0.8).camera(alpha_deg=30.0, beta_deg=15.0)
    out = proj.project(camera, thickness=True)
    assert out.names == ["sphere", "box"]
    mask = out["sphere"]
    centre_w = world_from_patient[:3, :3] @ centre + world_from_patient[:3, 3]
    C = cone_conic(camera, centre_w, radius)
    v, u = np.mgrid[0 : camera.height, 0 : camera.width].astype(np.float64)
    x = np.stack([u, v, np.ones_like(u)], axis=-1)
    f = np.einsum("...i,ij,...j->...", x, C, x)
    grad = 2.0 * np.einsum("ij,...j->...i", C, x)[..., :2]
    dist_px = np.abs(f) / np.linalg.norm(grad, axis=-1)  # distance to the outline, first order
    analytic = f >= 0
    assert analytic.sum() > 2000 and not analytic[0].any() and not analytic[:, 0].any()  # well inside
    wrong = mask != analytic
    assert wrong.sum() < 0.02 * analytic.sum()
    assert np.all(dist_px[wrong] <= 1.0), float(dist_px[wrong].max())
    # under this obliquity the outline is an ellipse, not a circle: its axes differ measurably
    evals = np.linalg.eigvalsh(C[:2, :2])
    assert abs(evals[0] / evals[1] - 1.0) > 1e-4
    # projected thickness = the chord through the sphere (interpolated indicator integrates to it)
    src, dirs, _ = camera_rays_world(camera)
    chord = sphere_chord_mm(np.broadcast_to(src, dirs.shape), dirs, centre_w, radius).reshape(mask.shape)
    # the voxelised surface is off the sphere by up to half a voxel (0.25 mm); a chord c through a sphere
    # of radius R moves by dc/dR = 4R/c per mm of radius
    deep = chord > 6.0
    tol = 4 * radius / chord[deep] * 0.25
    assert np.all(np.abs(out.thickness_mm[0][deep] - chord[deep]) <= tol)
    assert out.thickness_mm[0].max() == pytest.approx(2 * radius, abs=0.35)
    assert out.thickness_mm[0].sum() == pytest.approx(chord.sum(), rel=0.01)
    assert out["box"].sum() > 0 and not (out["box"] & analytic).all()


def test_labels_from_volume_missing_and_bit_packing() -> None:
    labels, A = sphere_label_map((0.0, 0.0, 0.0), 6.0, shape=(40, 40, 40), spacing=1.0, value=5)
    camera = CArm(height=32, width=32, pixel_mm=2.0).camera()
    proj = LabelProjector(labels, np.eye(4), [5, 9], patient_from_ijk=A)
    out = proj.project(camera)
    assert out.names == ["label_5", "label_9"] and proj.missing == ["label_9"]
    assert out.masks[0].any() and not out.masks[1].any() and out.thickness_mm is None
    masks = np.random.default_rng(0).random((20, 8, 9)) > 0.5
    li = LabelImages([f"m{i}" for i in range(20)], masks)
    planes = li.pack_bits()
    assert planes.shape == (2, 8, 9) and planes.dtype == np.uint16
    np.testing.assert_array_equal(unpack_bits(planes, 20), masks)


def test_mesh_masks_are_the_exact_footprint() -> None:
    mesh = cylinder_mesh(4.0, 30.0, sections=64, material="titanium", name="screw").aligned((0, 5, 15), (0, -5, -15))
    camera = CArm(height=40, width=40, pixel_mm=1.5).camera(alpha_deg=40.0)
    out = mesh_label_images([mesh], camera)
    assert out.names == ["screw"]
    th = out.thickness_mm[0]
    assert th.max() > 7.0
    np.testing.assert_array_equal(out.masks[0], th > 0)
    # the projected footprint of every vertex lies inside the mask's (1 px dilated) support
    uv = camera.project(mesh.vertices_world_mm())
    iu = np.clip(np.rint(uv[:, 0]).astype(int), 0, 39)
    iv = np.clip(np.rint(uv[:, 1]).astype(int), 0, 39)
    m = np.pad(out.masks[0], 1)
    dilated = np.zeros_like(out.masks[0])
    for dv in (-1, 0, 1):
        for du in (-1, 0, 1):
            dilated |= m[1 + dv : 41 + dv, 1 + du : 41 + du]
    assert dilated[iv, iu].all()


# ---------------------------------------------------------------------------------------- landmarks

def test_landmarks_project_to_p_x_and_onto_rendered_beads(tmp_path) -> None:
    phantom = bead_phantom(bead_radius_mm=2.0, shape=(112, 112, 112), spacing_mm=1.0)
    mv = phantom.material_volume()
    W = world_from_patient_default(mv, orientation="HFP", isocentre_world_mm=(2.0, -3.0, 1.0))
    ras = phantom.centres_mm()
    # write them as Slicer markups in LPS and read them back
    doc = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
           "Schema/markups-schema-v1.0.3.json",
           "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                        "controlPoints": [{"id": str(i + 1), "label": f"bead-{i}", "position": list(p * [-1, -1, 1]),
                                           "positionStatus": "defined"} for i, p in enumerate(ras)]}]}
    path = tmp_path / "beads.mrk.json"
    path.write_text(json.dumps(doc))
    marks = load_landmarks(path)
    np.testing.assert_allclose(marks.points_ras_mm, ras, atol=1e-12)
    assert marks.names[0] == "bead-0"
    backend = get_backend("cpu")
    handle = backend.prepare(mv, W)
    camera = CArm(height=200, width=200, pixel_mm=0.8).camera(alpha_deg=35.0, beta_deg=-20.0)
    pl = project_landmarks(marks, camera, W)
    world = ras @ W[:3, :3].T + W[:3, 3]
    h = np.c_[world, np.ones(len(world))] @ camera.P.T
    np.testing.assert_allclose(pl.uv, h[:, :2] / h[:, 2:], atol=1e-9)  # P X
    assert pl.visible.sum() >= 8
    image = backend.line_integrals(handle, [camera], Physics())[0].sum(axis=0).astype(np.float64)
    checked = 0
    for (u, v), vis in zip(pl.uv, pl.visible, strict=True):
        others = np.hypot(*(pl.uv - [u, v]).T)
        if not vis or not (8 <= u < camera.width - 8 and 8 <= v < camera.height - 8) or np.sort(others)[1] < 14:
            continue
        r = 6
        iu, iv = int(round(u)), int(round(v))
        patch = np.clip(image[iv - r : iv + r + 1, iu - r : iu + r + 1] - np.median(image), 0, None)
        vv, uu = np.mgrid[iv - r : iv + r + 1, iu - r : iu + r + 1]
        cu, cv = (patch * uu).sum() / patch.sum(), (patch * vv).sum() / patch.sum()
        assert np.hypot(cu - u, cv - v) < 0.25, (u, v, cu, cv)
        checked += 1
    assert checked >= 6


def test_visibility_flags() -> None:
    camera = CArm(height=100, width=80, pixel_mm=1.0).camera()  # source at y = -530, detector at y = +490
    pts = np.array([
        [0.0, 0.0, 0.0],        # isocentre: visible
        [0.0, -600.0, 0.0],     # behind the source
        [500.0, 0.0, 0.0],      # off the detector
        [0.0, 600.0, 0.0],      # beyond the detector plane
    ])
    pl = project_landmarks(landmarks_from_points(pts), camera, np.eye(4))
    np.testing.assert_array_equal(pl.in_front, [True, False, True, False])
    np.testing.assert_array_equal(pl.in_image, [True, False, False, True])
    np.testing.assert_array_equal(pl.visible, [True, False, False, False])
    assert np.isnan(pl.uv[1]).all() and np.allclose(pl.uv[0], [39.5, 49.5])
    row = pl.to_row()
    assert len(row["landmarks_uv"]) == 8 and row["landmarks_visible"] == [True, False, False, False]
    # world points directly
    direct = project_landmarks(pts, camera)
    np.testing.assert_allclose(direct.uv[0], pl.uv[0])


def test_fcsv_frames_and_errors(tmp_path) -> None:
    lps = tmp_path / "a.fcsv"
    lps.write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                   "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                   "vtkMRMLMarkupsFiducialNode_0,10,20,30,0,0,0,1,1,1,0,T1,,\n"
                   "vtkMRMLMarkupsFiducialNode_1,-1.5,2.5,-3,0,0,0,1,1,1,0,T2,,\n")
    m = load_landmarks(lps)
    assert m.names == ("T1", "T2")
    np.testing.assert_allclose(m.points_ras_mm, [[-10, -20, 30], [1.5, -2.5, -3]])
    old = tmp_path / "b.fcsv"
    old.write_text("# Markups fiducial file version = 4.4\n# CoordinateSystem = 0\n"
                   "vtkMRMLMarkupsFiducialNode_0,10,20,30,0,0,0,1,1,1,0,F-1,,\n")
    np.testing.assert_allclose(load_landmarks(old).points_ras_mm, [[10, 20, 30]])
    ras_json = tmp_path / "c.mrk.json"
    points = [{"label": "x", "position": [1, 2, 3]},
              {"label": "skip", "position": [0, 0, 0], "positionStatus": "undefined"}]
    ras_json.write_text(json.dumps({"markups": [{"coordinateSystem": "RAS", "controlPoints": points}]}))
    r = load_landmarks(ras_json)
    assert r.names == ("x",) and np.allclose(r.points_ras_mm, [[1, 2, 3]])
    bad = tmp_path / "d.fcsv"
    bad.write_text("vtkMRMLMarkupsFiducialNode_0,ten,20,30\n")
    with pytest.raises(LandmarkError, match="d.fcsv"):
        load_landmarks(bad)
    with pytest.raises(LandmarkError, match="not found"):
        load_landmarks(tmp_path / "nope.mrk.json")
    with pytest.raises(LandmarkError, match="RAS or LPS"):
        landmarks_from_points([[0, 0, 0]], frame="XYZ")
    d = landmarks_from_points({"tip": (1, 2, 3)}, frame="LPS")
    assert d.names == ("tip",) and np.allclose(d.points_ras_mm, [[-1, -2, 3]])
