"""Tools, label masks and landmarks in a sweep: spec validation, the backend's mesh pass (a replacing
screw removes bone along its chord), the render worker, the Parquet/PNG columns and the loaders.

Phantom: a 48³ water box (1.5 mm voxels) with a bone block, a label map on its grid holding a sphere
(label 5) at the isocentre, a replacing titanium screw in the bone and inline landmarks. Images are
48 px of 2 mm, so a CPU render of a shard takes a second or two.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

from drrfarm.errors import SpecError
from drrfarm.farm.plan import make_plan
from drrfarm.farm.spec import load_spec, parse_spec

pytest.importorskip("trimesh")

REPO = Path(__file__).resolve().parents[1]
N, SPACING = 48, 1.5
SPHERE_MM = 15.0
BONE_HALF_MM = (15.0, 12.0, 24.0)  # bone block half-sizes (x, y, z), centred on the origin
LANDMARKS = [{"name": "front", "position_mm": [10.0, 5.0, -8.0]}, {"name": "side", "position_mm": [-20.0, 0.0, 12.0]}]


def grid() -> tuple[np.ndarray, np.ndarray]:
    A = np.diag([SPACING, SPACING, SPACING, 1.0])
    A[:3, 3] = -SPACING * (N - 1) / 2.0
    ijk = np.stack(np.meshgrid(*[np.arange(N)] * 3, indexing="ij"), axis=-1).astype(np.float64)
    return A, ijk @ A[:3, :3].T + A[:3, 3]


def write_phantom(d: Path) -> Path:
    """``ct.nii.gz`` (water box, bone block) and ``labels.nii.gz`` (sphere = 5) in ``d``."""
    A, xyz = grid()
    hu = np.full((N, N, N), 40, np.int16)
    hu[np.all(np.abs(xyz) <= BONE_HALF_MM, axis=-1)] = 1200
    nib.save(nib.Nifti1Image(hu, A), str(d / "ct.nii.gz"))
    labels = np.zeros((N, N, N), np.uint8)
    labels[np.linalg.norm(xyz, axis=-1) <= SPHERE_MM] = 5
    nib.save(nib.Nifti1Image(labels, A), str(d / "labels.nii.gz"))
    return d


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("tools"))


def spec_dict(d: Path, out: Path, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "seed": 11,
        "volumes": [{"id": "ph", "path": str(d / "ct.nii.gz")}],
        "poses": {"carm": {"alpha_deg": [0, 30], "beta_deg": [0]}},
        "spectra": {"mono_kev": [60]},
        "image": {"size": 48, "pixel_mm": 2.0},
        "output": {"url": str(out), "formats": ["parquet", "png"], "shard_size": 2, "image_dtype": "float32"},
        "tracking": {"enabled": False},
        "tools": [{"name": "screw", "mesh": "screw",
                   "size": {"diameter_mm": 4.0, "length_mm": 20.0, "head_diameter_mm": 6.0, "head_length_mm": 2.0,
                            "tip_length_mm": 2.0},
                   "pose": {"tip_mm": [9.0, 0.0, 0.0], "base_mm": [-9.0, 0.0, 0.0],
                            "advance_mm": {"uniform": [-2.0, 0.0]}, "twist_deg": {"uniform": [0, 360]}}}],
        "labels": {"label_map": str(d / "labels.nii.gz"), "values": {5: "sphere"}, "thickness": True},
        "landmarks": {"points": LANDMARKS, "tool_tips": True},
    }
    spec.update(copy.deepcopy(changes))
    return spec


def sphere_outline_px(camera: Any) -> tuple[np.ndarray, float]:
    """Signed distance (px) of each pixel centre from the analytic circle of the sphere (a sphere on the
    principal ray projects to a circle of radius f tan θ, sin θ = r / d), and that radius."""
    d = float(np.linalg.norm(camera.source_world_mm))  # the sphere's centre is the isocentre (origin)
    theta = np.arcsin(SPHERE_MM / d)
    radius_px = camera.sdd_mm * np.tan(theta) / camera.pixel_mm
    cu, cv = camera.project(np.zeros((1, 3)))[0]
    v, u = np.mgrid[0 : camera.height, 0 : camera.width].astype(np.float64)
    return np.hypot(u - cu, v - cv) - radius_px, radius_px


# ------------------------------------------------------------------------------------------------ spec


def test_spec_sections_parse_hash_and_plan(phantom: Path, tmp_path: Path) -> None:
    spec = parse_spec(spec_dict(phantom, tmp_path / "o"), source="s.yaml")
    (tool,) = spec.tools
    assert tool.name == "screw" and tool.is_builtin and tool.pose.is_random
    assert spec.labels.values == ((5, "sphere"),) and spec.labels.thickness
    assert [n for n, _ in spec.landmarks.points] == ["front", "side"]
    content = spec.content_dict()
    assert {"tools", "labels", "landmarks"} <= set(content)
    plain = parse_spec({k: v for k, v in spec_dict(phantom, tmp_path / "o").items()
                        if k not in ("tools", "labels", "landmarks")})
    assert not {"tools", "labels", "landmarks"} & set(plain.content_dict())  # old specs keep their hash
    moved = copy.deepcopy(spec_dict(phantom, tmp_path / "o"))
    moved["tools"][0]["pose"]["advance_mm"] = {"uniform": [-3.0, 0.0]}
    assert parse_spec(moved).sha256 != spec.sha256
    text = make_plan(spec).describe()
    assert "tool:      screw" in text and "labels:" in text and "landmarks:" in text
    for path in ("jobs/specs/example.yaml", "jobs/specs/tools_labels.yaml"):
        r = subprocess.run([sys.executable, "-m", "drrfarm.cli", "plan", str(REPO / path)], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "tool:      kwire" in r.stdout


@pytest.mark.parametrize("change, where", [
    ({"tools": [{"mesh": "kwire", "pose": {"tip_mm": [0, 0, 0], "base_mm": [0, 0, 9]}, "colour": 1}]},
     "tools[0].colour: unknown key"),
    ({"tools": [{"mesh": "kwire", "pose": {"tip_mm": [0, 0, 0], "base_mm": [0, 0, 0]}}]},
     "tools[0].pose.base_mm: the trajectory's tip and base coincide"),
    ({"tools": [{"mesh": "kwire", "size": {"diameter_mm": -1}, "pose": {"tip_mm": [0, 0, 0], "base_mm": [1, 0, 0]}}]},
     "tools[0].size.diameter_mm: must be > 0"),
    ({"tools": [{"mesh": "part.stl", "pose": {"world_from_mesh": np.eye(4).tolist()}}]},
     "tools[0].material: required for a mesh file"),
    ({"tools": [{"mesh": "kwire", "mode": "subtract", "pose": {"tip_mm": [0, 0, 0], "base_mm": [1, 0, 0]}}]},
     "tools[0].mode: must be one of add, replace"),
    ({"tools": [{"mesh": "kwire", "pose": {"tip_mm": [0, 0, 0], "base_mm": [1, 0, 0], "advance_mm": [1, 2]}}]},
     "tools[0].pose.advance_mm: a list of values is not supported"),
    ({"tools": [{"mesh": "kwire", "pose": {"tip_mm": [0, 0, 0], "base_mm": [1, 0, 0],
                                           "advance_mm": {"range": [0, 4], "num": 3}}}]},
     "tools[0].pose.advance_mm: a grid of values"),
    ({"tools": [{"mesh": "kwire", "pose": {"tip_mm": [0, 0, 0], "base_mm": [1, 0, 0],
                                           "twist_deg": {"values": [0, 90]}}}]},
     "tools[0].pose.twist_deg: a grid of values"),
    ({"tools": [{"mesh": "screw", "pose": {"world_from_mesh": [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                                               [0, 0, 0, 1]]}}]},
     "tools[0].pose.world_from_mesh: the upper-left 3x3 block must be a rotation"),
    ({"labels": {"thickness": "yes"}}, "labels.thickness: must be true or false"),
    ({"labels": {"values": [5]}, "tools": []}, "tools: must have at least 1 item"),
    ({"landmarks": {"file": "points.txt"}}, "landmarks.file: must be a Slicer markups"),
    ({"landmarks": {"points": [{"name": "a", "position_mm": [1, 2]}]}},
     "landmarks.points[0].position_mm: must have at least 3 items"),
])
def test_spec_sections_reject_bad_input(phantom: Path, tmp_path: Path, change: dict[str, Any], where: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec_dict(phantom, tmp_path / "o", **change), source="bad.yaml")
    assert str(err.value).startswith("bad.yaml: ") and where in str(err.value), str(err.value)


# --------------------------------------------------------------------------------------- backend pass


def test_replacing_screw_removes_bone_along_its_chord(phantom: Path) -> None:
    """Through the Backend API: bone line integral drops by ρ_bone × chord, titanium gains ρ_Ti × chord."""
    from drrfarm.geometry import CArm
    from drrfarm.meshes import screw_mesh
    from drrfarm.physics import Physics
    from drrfarm.render import get_backend, output_material_names
    from drrfarm.render.mesh_reference import trace_meshes
    from drrfarm.volume import load_volume, segment_by_thresholds

    vol = load_volume(str(phantom / "ct.nii.gz"))
    mv = segment_by_thresholds(vol)
    backend = get_backend("cpu")
    handle = backend.prepare(mv, np.eye(4))
    cam = CArm(height=40, width=40, pixel_mm=1.0).camera(alpha_deg=0.0, beta_deg=0.0)
    screw = screw_mesh(diameter_mm=6.0, length_mm=20.0, head_diameter_mm=8.0, head_length_mm=2.0,
                       tip_length_mm=2.0).aligned((10.0, 0.0, 0.0), (-10.0, 0.0, 0.0))
    physics = Physics(step_voxels=0.25)
    plain = backend.line_integrals(handle, [cam], physics)[0]
    with_screw = backend.line_integrals(handle, [cam], physics, meshes=[screw])[0]
    names = output_material_names(mv.material_names, [screw])
    assert names[-1] == "titanium" and with_screw.shape[0] == len(names) == plain.shape[0] + 1
    bone, ti = names.index("bone"), len(names) - 1
    chord = trace_meshes([screw], cam).chords_mm[0]
    rho_bone = float(mv.densities_g_cm3[bone][N // 2, N // 2, N // 2])
    deep = chord > 3.0  # rays well inside the screw (its surface is within bone everywhere)
    assert deep.sum() > 20
    removed = plain[bone] - with_screw[bone]
    # the skipped march samples cover the chord to within one step h (0.375 mm) of uniform bone
    one_sample = rho_bone * physics.step_voxels * SPACING / 10.0
    assert np.all(np.abs(removed[deep] - rho_bone * chord[deep] / 10.0) <= one_sample * 1.01)
    assert abs(removed[deep].sum() / (rho_bone * chord[deep].sum() / 10.0) - 1.0) < 0.02
    np.testing.assert_allclose(with_screw[ti], screw.density_g_cm3 * chord / 10.0, rtol=1e-6, atol=1e-7)
    assert np.array_equal(with_screw[bone][chord == 0], plain[bone][chord == 0])  # elsewhere untouched
    # the image sees it: titanium attenuates more than the bone it replaces
    spectrum_kev = 60.0
    from drrfarm.spectrum import get_spectrum

    s = get_spectrum(f"mono:{spectrum_kev:g}")
    img0 = backend.render(handle, [cam], s, Physics(), [1])[0]
    img1 = backend.render(handle, [cam], s, Physics(), [1], meshes=[[screw]])[0]
    assert np.all(img1[deep] > img0[deep])
    np.testing.assert_allclose(img1[chord == 0], img0[chord == 0], rtol=1e-6, atol=1e-7)


def test_backend_line_integral_channels_cover_every_mesh_of_the_call(phantom: Path) -> None:
    """Images of one call may carry different meshes: channels are the CT's plus every mesh material."""
    from drrfarm.geometry import CArm
    from drrfarm.meshes import kwire_mesh, screw_mesh
    from drrfarm.physics import Physics
    from drrfarm.render import get_backend
    from drrfarm.volume import load_volume, segment_by_thresholds

    mv = segment_by_thresholds(load_volume(str(phantom / "ct.nii.gz")))
    backend = get_backend("cpu")
    handle = backend.prepare(mv, np.eye(4))
    cam = CArm(height=24, width=24, pixel_mm=3.0).camera()
    screw = screw_mesh().aligned((10.0, 0.0, 0.0), (-10.0, 0.0, 0.0))
    wire = kwire_mesh(mode="add").aligned((0.0, 0.0, 20.0), (0.0, 0.0, -20.0))
    out = backend.line_integrals(handle, [cam, cam, cam], Physics(), meshes=[[screw], [], [wire]])
    assert out.shape == (3, len(mv.material_names) + 2, 24, 24)  # + titanium, steel
    plain = backend.line_integrals(handle, [cam], Physics())[0]
    np.testing.assert_array_equal(out[1, : plain.shape[0]], plain)
    assert not out[1, -2:].any() and out[0, -2].any() and not out[0, -1].any() and out[2, -1].any()


# ---------------------------------------------------------------------------------------------- worker


def render_all(spec_path: Path) -> Any:
    from drrfarm.farm.worker import RenderWorker

    spec = load_spec(spec_path)
    plan = make_plan(spec)
    worker = RenderWorker(spec, backend="cpu")
    try:
        stats = [worker.render_shard(plan.task(s)) for s in plan.shards]
    finally:
        worker.close()
    return spec, plan, worker, stats


@pytest.fixture(scope="module")
def rendered(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    tmp = tmp_path_factory.mktemp("tools-out")
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(phantom, tmp / "out")), encoding="utf-8")
    spec, plan, worker, _ = render_all(path)
    return spec, tmp / "out"


def test_worker_writes_annotation_columns(rendered: tuple[Any, Path]) -> None:
    from drrfarm.sinks import read_manifest, read_shard
    from drrfarm.sinks.annotations import decode_pixel_column

    spec, out = rendered
    m = read_manifest(str(out))
    assert len(m) == 1
    (entry,) = m.values()
    images, rows, meta = read_shard((out / entry.keys_of("parquet")[0]).read_bytes())
    assert json.loads(meta["drrfarm.mask_names"]) == ["sphere", "screw"]
    assert json.loads(meta["drrfarm.landmark_names"]) == ["front", "side", "screw_tip", "screw_base"]
    assert json.loads(meta["drrfarm.tool_names"]) == ["screw"]
    for r in rows:
        assert r["mask_count"] == 2 and isinstance(r["masks"], bytes) and isinstance(r["thickness_mm"], bytes)
        assert len(r["landmarks_uv"]) == 8 and len(r["landmarks_visible"]) == 4 and len(r["tool_world_from_mesh"]) == 16
    masks = decode_pixel_column("masks", [r["masks"] for r in rows], [2, 2], [48, 48], [48, 48])
    assert masks.shape == (2, 2, 48, 48) and masks[:, 1].any(axis=(1, 2)).all()  # the screw is seen
    # PNG: mask and thickness PNGs next to each image, landmarks in the sidecar
    sidecars = sorted((out / "png").rglob("*.json"))
    assert len(sidecars) == 2
    side = json.loads(sidecars[0].read_text())
    assert side["mask_pngs"] and len(side["thickness_pngs"]) == 2 and side["mask_count"] == 2
    assert len(side["landmarks_uv"]) == 8
    from drrfarm.sinks import decode_png16
    from drrfarm.sinks.annotations import unpack_mask_bits

    plane = decode_png16((out / side["mask_pngs"][0]).read_bytes())
    first = 0 if rows[0]["image_index"] == side["image_index"] else 1
    assert np.array_equal(unpack_mask_bits(plane[None], 2), masks[first])


def test_loader_masks_landmarks_and_poses_are_right(rendered: tuple[Any, Path]) -> None:
    """Through the torch dataset: the sphere's mask is the analytic circle within 1 px; landmark pixels
    are P·X; the tool tip landmark is the stored tool pose applied to the screw's model tip."""
    from drrfarm.data import DrrTorchDataset
    from drrfarm.farm.compile import camera_for
    from drrfarm.meshes import screw_mesh

    spec, out = rendered
    ds = DrrTorchDataset(str(out), columns="all", float_line_integral=True)
    assert len(ds) == 2
    by_alpha = {float(ds[i]["alpha_deg"]): ds[i] for i in range(2)}
    row = by_alpha[0.0]
    assert row["masks"].shape == (2, 48, 48) and row["masks"].dtype == bool
    assert row["thickness_mm"].shape == (2, 48, 48)
    assert row["landmarks_uv"].shape == (4, 2) and row["landmarks_visible"].dtype == bool
    assert row["tool_world_from_mesh"].shape == (1, 4, 4)
    pose = next(p for p in make_plan(spec).poses if p.alpha_deg == 0.0)
    cam = camera_for(spec, pose)
    dist, radius = sphere_outline_px(cam)
    assert radius > 8
    mask = row["masks"][0]
    assert mask[dist < -1.0].all() and not mask[dist > 1.0].any()
    # the sphere's projected thickness at its centre is its diameter (within the voxelisation)
    cu, cv = np.rint(cam.project(np.zeros((1, 3)))[0]).astype(int)
    assert abs(row["thickness_mm"][0][cv, cu] - 2 * SPHERE_MM) < 1.5
    P = np.asarray(row["P"])
    X = np.array([p["position_mm"] for p in LANDMARKS])  # world = patient here (centred phantom, HFS)
    h = np.c_[X, np.ones(len(X))] @ P.T
    np.testing.assert_allclose(row["landmarks_uv"][:2], h[:, :2] / h[:, 2:], atol=1e-9)
    assert row["landmarks_visible"][:2].all()
    T = row["tool_world_from_mesh"][0]
    tip_model = screw_mesh(diameter_mm=4.0, length_mm=20.0, head_diameter_mm=6.0, head_length_mm=2.0,
                           tip_length_mm=2.0).tip_mm
    tip = T[:3, :3] @ tip_model + T[:3, 3]
    ht = P @ np.r_[tip, 1.0]
    np.testing.assert_allclose(row["landmarks_uv"][2], ht[:2] / ht[2], atol=1e-6)
    # the tool mask covers the tip landmark's pixel
    u, v = np.rint(row["landmarks_uv"][2]).astype(int)
    assert row["masks"][1][max(v - 1, 0):v + 2, max(u - 1, 0):u + 2].any()


def test_tool_poses_are_deterministic_per_volume_and_pose(rendered: tuple[Any, Path]) -> None:
    from drrfarm.farm.scene import VolumeScene
    from drrfarm.inputs import resolve_input

    spec, _ = rendered
    scene = VolumeScene(spec, 0, np.eye(4), resolve_input)
    a = scene.tools_for(0)[0].world_from_mesh
    assert np.array_equal(a, VolumeScene(spec, 0, np.eye(4), resolve_input).tools_for(0)[0].world_from_mesh)
    assert not np.array_equal(a, scene.tools_for(1)[0].world_from_mesh)


def test_sweep_through_local_ray_and_read_drrs(phantom: Path, tmp_path: Path) -> None:
    """`drrfarm sweep` on its own local Ray, then read_drrs (Ray Data) decodes the new columns."""
    import ray

    out = tmp_path / "out"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(phantom, out, output={"url": str(out), "shard_size": 2})))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "drrfarm.cli", "sweep", str(path), "--no-tracking", "--actors", "1",
                        "--backend", "cpu"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    from drrfarm.data import read_drrs

    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        (batch,) = list(read_drrs(str(out)).iter_batches(batch_size=8, batch_format="numpy"))
    finally:
        ray.shutdown()
    assert batch["image"].shape == (2, 48, 48)
    assert batch["masks"].shape == (2, 2, 48, 48) and batch["masks"].dtype == bool
    assert batch["thickness_mm"].shape == (2, 2, 48, 48)
    assert batch["landmarks_uv"].shape == (2, 4, 2) and batch["landmarks_visible"].dtype == bool
    assert batch["tool_world_from_mesh"].shape == (2, 1, 4, 4)
    assert batch["masks"][:, 0].any(axis=(1, 2)).all()
