"""kernels/mesh.cu against the CPU reference (mesh_reference): chords of a cylinder and of screws,
the replacing union, the line-integral add and the CT-march skip rule. GPU only."""

from __future__ import annotations

import numpy as np
import pytest

from drrfarm.geometry import CArm
from drrfarm.meshes import cylinder_mesh, kwire_mesh, screw_mesh
from drrfarm.render import reference
from drrfarm.render.mesh_reference import trace_meshes

pytestmark = pytest.mark.gpu
pytest.importorskip("trimesh")


@pytest.fixture(scope="module")
def tracer():
    pytest.importorskip("pycuda.driver")
    from drrfarm.render.mesh_cuda import MeshTracer

    return MeshTracer()


def cylinder_case():
    return [cylinder_mesh(10.0, 60.0, sections=256, material="steel").aligned(
        (6.0, 8.0, 25.0), (-4.0, 2.0, -30.0), advance_mm=2.0, twist_deg=17.0)]


def screw_case():
    return [
        screw_mesh(sections=48).aligned((8.0, 2.0, 10.0), (-8.0, -3.0, -25.0), advance_mm=-3.0),
        screw_mesh(sections=48).aligned((-6.0, 4.0, 12.0), (10.0, -2.0, -20.0)),  # crosses the first
        kwire_mesh(diameter_mm=2.0, length_mm=120.0, mode="add").aligned((0.0, 0.0, 30.0), (0.0, 40.0, -60.0)),
    ]


CAMERAS = [CArm(height=96, width=128, pixel_mm=1.0).camera(alpha_deg=a, beta_deg=b)
           for a, b in ((0.0, 0.0), (30.0, -15.0), (90.0, 10.0))]


@pytest.mark.parametrize("case", [cylinder_case, screw_case], ids=["cylinder", "screws"])
def test_cuda_chords_and_intervals_match_the_cpu(tracer, case) -> None:
    meshes = case()
    scene = tracer.upload(meshes, ["bone"])
    res = tracer.trace(scene, CAMERAS, [meshes] * len(CAMERAS), kmax=4)
    assert res.overflow == (0, 0)
    for b, cam in enumerate(CAMERAS):
        mp = trace_meshes(meshes, cam)
        assert mp.chords_mm.max() > 5.0
        np.testing.assert_allclose(res.chords[b], mp.chords_mm, rtol=1e-3, atol=1e-3)
        # replacing union: same number of intervals and the same ends (float64 on the GPU)
        rep = mp.replace
        counts = rep.per_ray_counts().reshape(cam.height, cam.width)
        np.testing.assert_array_equal(res.n_intervals[b], counts)
        k = np.concatenate([np.arange(c) for c in rep.per_ray_counts()]) if len(rep) else np.zeros(0, int)
        gpu = res.intervals[b].reshape(-1, 4, 2)[rep.ray, k]
        np.testing.assert_allclose(gpu[:, 0], rep.t_in, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(gpu[:, 1], rep.t_out, rtol=1e-6, atol=1e-4)


def test_cuda_lint_add_and_skip_rule(tracer) -> None:
    import pycuda.driver as drv

    from drrfarm.render.mesh_reference import pack_cameras, pack_poses

    meshes = screw_case()
    names = ["soft_tissue", "bone"]
    scene = tracer.upload(meshes, names)
    assert scene.material_names == ["soft_tissue", "bone", "titanium", "steel"]
    cam = CAMERAS[1]
    H, W, M = cam.height, cam.width, len(scene.material_names)
    base = np.full((1, M, H, W), 0.25, dtype=np.float32)
    with tracer.context():
        d_cams = drv.to_device(pack_cameras([cam]))
        d_poses = drv.to_device(np.ascontiguousarray(pack_poses([meshes])))
        d_lint = drv.to_device(base)
        p = tracer.params(scene, int(d_cams), int(d_poses), H, W, 1, lint=int(d_lint), M=M)
        tracer.trace_device(p)
        drv.Context.synchronize()
        lint = drv.from_device(d_lint, base.shape, np.float32)
    mp = trace_meshes(meshes, cam)
    _, expect = mp.mesh_line_integrals(names)
    np.testing.assert_allclose(lint[0], 0.25 + expect, rtol=1e-3, atol=1e-3)
    # the split-pipeline variant: chords first, then mesh_add_chords into a buffer a march wrote
    with tracer.context():
        d_chords = drv.mem_alloc(4 * len(meshes) * H * W)
        d_lint2 = drv.to_device(base)
        p = tracer.params(scene, int(d_cams), int(d_poses), H, W, 1, chords=int(d_chords), M=M)
        tracer.trace_device(p)
        p = tracer.params(scene, int(d_cams), int(d_poses), H, W, 1, chords=int(d_chords), lint=int(d_lint2), M=M)
        tracer.add_chords_device(p)
        drv.Context.synchronize()
        lint2 = drv.from_device(d_lint2, base.shape, np.float32)
    np.testing.assert_allclose(lint2, lint, rtol=1e-6, atol=1e-6)
    # skip rule: samples of a 60 mm box march at 0.25 mm steps inside the replacing intervals
    res = tracer.trace(scene, [cam], [meshes], kmax=4)
    spacing, shape = 0.5, (120, 120, 120)
    A = np.diag([spacing, spacing, spacing, 1.0])
    A[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2.0
    src, dirs, t_det = reference.camera_rays_ijk(cam, reference.ijk_from_world(A))
    t0, t1 = reference.clip_rays_to_box(src, dirs, shape, t_det)
    length = np.maximum(t1 - t0, 0.0)
    n = np.ceil(length / 0.25).astype(np.int32)
    h = np.where(n > 0, length / np.maximum(n, 1), 0.0)
    got = tracer.count_skipped(scene, res.intervals, res.n_intervals, t0.reshape(1, H, W), h.reshape(1, H, W),
                               n.reshape(1, H, W))[0].reshape(-1)
    rep = mp.replace
    want = np.zeros(H * W, dtype=np.int64)
    for r, a, b in zip(rep.ray, rep.t_in, rep.t_out, strict=True):
        tk = t0[r] + (np.arange(n[r]) + 0.5) * h[r]
        want[r] += np.sum((tk >= a) & (tk <= b))
    assert want.sum() > 1000
    # float32 interval ends on the GPU: a boundary sample may flip, rarely
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 1e-3
