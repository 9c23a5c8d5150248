"""The CPU reference renderer against closed forms: phantoms, beads, Beer-Lambert, real CT."""

from __future__ import annotations

import numpy as np
import pytest

from drrfarm.errors import GeometryError
from drrfarm.geometry import Camera, CArm, world_from_patient_default
from drrfarm.materials import mass_attenuation_cm2_g
from drrfarm.physics import Physics
from drrfarm.render import get_backend
from drrfarm.render.reference import ray_lengths_in_box
from drrfarm.samples.phantoms import Ellipsoid, Phantom, bead_phantom, sphere_phantom
from drrfarm.spectrum import monoenergetic, preset

SMALL_CARM = CArm(height=48, width=48, pixel_mm=2.0)


def analytic_and_rendered(phantom: Phantom, camera: Camera, physics: Physics) -> tuple[np.ndarray, np.ndarray]:
    """(M, H, W) analytic and rendered line integrals of a phantom centred at the isocentre."""
    mv = phantom.material_volume()
    backend = get_backend("cpu")
    handle = backend.prepare(mv, np.eye(4))
    rendered = backend.line_integrals(handle, [camera], physics)[0]
    dirs = camera.ray_directions_world().reshape(-1, 3)
    origins = np.broadcast_to(camera.source_world_mm, dirs.shape)
    analytic = phantom.line_integrals_g_cm2(origins, dirs).reshape(rendered.shape)
    return analytic, rendered


def relative_errors(analytic: np.ndarray, rendered: np.ndarray, floor: float) -> np.ndarray:
    """Relative errors of the pixels whose analytic line integral is at least ``floor`` of the maximum.

    The rim of a voxelised sphere is blurred by partial volume and trilinear interpolation (a
    resolution effect, not a renderer error), so checks use the mean near the rim and the max inside.
    """
    mask = analytic > floor * analytic.max()
    return np.abs(rendered[mask] - analytic[mask]) / analytic[mask]


@pytest.mark.parametrize("method", ["trilinear", "joseph"])
def test_sphere_line_integrals_match_chord_length(method: str) -> None:
    phantom = sphere_phantom(radius_mm=30.0, shape=(72, 72, 72), spacing_mm=1.0)
    analytic, rendered = analytic_and_rendered(phantom, SMALL_CARM.camera(), Physics(method=method))
    assert relative_errors(analytic, rendered, floor=0.2).mean() < 0.005
    assert relative_errors(analytic, rendered, floor=0.8).max() < 0.005


def test_ellipsoid_oblique_view_within_half_percent_and_converges() -> None:
    phantom = Phantom(
        [Ellipsoid((0.0, 0.0, 0.0), (28.0, 18.0, 22.0), "water", 1.0)], shape=(72, 56, 64), spacing_mm=(1.0, 1.0, 1.0)
    )
    camera = SMALL_CARM.camera(alpha_deg=30.0, beta_deg=15.0)
    errors = []
    for step in (1.0, 0.5, 0.25):
        analytic, rendered = analytic_and_rendered(phantom, camera, Physics(step_voxels=step))
        errors.append(relative_errors(analytic, rendered, floor=0.5).mean())
        if step == 0.5:  # the default step
            assert relative_errors(analytic, rendered, floor=0.8).max() < 0.005
    assert errors[2] <= errors[0]  # refining the step does not make it worse


def test_monoenergetic_render_is_exactly_beer_lambert() -> None:
    phantom = sphere_phantom(radius_mm=25.0, shape=(60, 60, 60))
    backend = get_backend("cpu")
    handle = backend.prepare(phantom.material_volume(), np.eye(4))
    camera = SMALL_CARM.camera()
    physics = Physics(output="transmission")
    A = backend.line_integrals(handle, [camera], physics)[0, 0].astype(np.float64)
    image = backend.render(handle, [camera], monoenergetic(60.0), physics, [0])[0]
    mu = mass_attenuation_cm2_g("water", np.array([60.0]))[0]
    np.testing.assert_allclose(image, np.exp(-mu * A), rtol=2e-6)
    analytic, _ = analytic_and_rendered(phantom, camera, physics)
    centre = np.unravel_index(np.argmax(analytic[0]), analytic[0].shape)
    assert image[centre] == pytest.approx(np.exp(-mu * analytic[0][centre]), rel=5e-3)


def test_beads_project_where_p_predicts() -> None:
    phantom = bead_phantom(bead_radius_mm=2.0, shape=(112, 112, 112), spacing_mm=1.0)
    carm = CArm(height=160, width=160, pixel_mm=0.6)
    backend = get_backend("cpu")
    handle = backend.prepare(phantom.material_volume(), np.eye(4))
    for alpha, beta in [(0.0, 0.0), (35.0, -20.0)]:
        camera = carm.camera(alpha_deg=alpha, beta_deg=beta)
        image = backend.line_integrals(handle, [camera], Physics(method="trilinear"))[0].sum(axis=0)
        predicted = camera.project(phantom.centres_mm())
        for u, v in predicted:
            if not (8 <= u < camera.width - 8 and 8 <= v < camera.height - 8):
                continue
            r = 6
            iu, iv = int(round(u)), int(round(v))
            patch = image[iv - r : iv + r + 1, iu - r : iu + r + 1].astype(np.float64)
            patch = np.clip(patch - np.median(image), 0, None)
            vv, uu = np.mgrid[iv - r : iv + r + 1, iu - r : iu + r + 1]
            cu = (patch * uu).sum() / patch.sum()
            cv = (patch * vv).sum() / patch.sum()
            assert np.hypot(cu - u, cv - v) < 0.25, (alpha, beta, u, v, cu, cv)


def test_ray_lengths_match_box_chords() -> None:
    shape = (40, 30, 20)
    world_from_ijk = np.eye(4)
    world_from_ijk[:3, 3] = -(np.asarray(shape) - 1) / 2.0
    camera = SMALL_CARM.camera()
    lengths = ray_lengths_in_box(camera, world_from_ijk, shape)
    # the central ray crosses the box along y: 30 mm
    c = (camera.height - 1) // 2
    assert lengths[c, c] == pytest.approx(30.0, rel=1e-3)


def test_source_inside_volume_is_rejected() -> None:
    phantom = sphere_phantom(radius_mm=10.0, shape=(40, 40, 40))
    backend = get_backend("cpu")
    handle = backend.prepare(phantom.material_volume(), np.eye(4))
    camera = CArm(sdd_mm=100.0, sid_mm=10.0, height=8, width=8, pixel_mm=1.0).camera()
    with pytest.raises(GeometryError, match="source"):
        backend.render(handle, [camera], monoenergetic(60.0), Physics(), [0])


def test_same_seed_same_image_other_seed_differs() -> None:
    phantom = sphere_phantom(radius_mm=20.0, shape=(48, 48, 48))
    backend = get_backend("cpu")
    handle = backend.prepare(phantom.material_volume(), np.eye(4))
    cams = [SMALL_CARM.camera()] * 3
    physics = Physics(photons=500.0)
    a, b, c = backend.render(handle, cams, preset("90KV_AL40"), physics, [1, 1, 2])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert backend.cache_stats()["hits"] == 0 and backend.cache_stats()["volumes"] == 1
    backend.prepare(phantom.material_volume(), np.eye(4))
    assert backend.cache_stats()["hits"] == 1


@pytest.fixture(scope="module")
def chest() -> tuple[object, object, np.ndarray]:
    from drrfarm.samples.downloads import chest_ct
    from drrfarm.volume import load_volume, segment_by_thresholds

    volume = load_volume(chest_ct())
    backend = get_backend("cpu")
    handle = backend.prepare(segment_by_thresholds(volume), world_from_patient_default(volume.centre_patient_mm()))
    return backend, handle, volume


def _body_columns(line_integral_profile: np.ndarray) -> tuple[int, int]:
    cols = np.nonzero(line_integral_profile > 2.0)[0]  # the body, not the table
    return int(cols[0]), int(cols[-1])


def test_real_ct_ap_and_lateral_show_lungs_brighter_than_spine(chest) -> None:
    backend, handle, _ = chest
    carm = CArm(height=96, width=96, pixel_mm=7.5)  # a panel large enough for the whole chest
    physics = Physics(output="transmission", method="joseph")
    ap, lateral = backend.render(
        handle, [carm.camera(), carm.camera(alpha_deg=90.0)], preset("90KV_AL40"), physics, [0, 0]
    )
    rows = slice(30, 55)  # a mid-chest band (rows run head → feet)

    # AP: the spine is in the middle, a lung on each side
    profile = ap[rows].mean(axis=0)
    b0, b1 = _body_columns(-np.log(profile))
    w = b1 - b0
    mid = (b0 + b1) // 2
    spine = profile[mid - w // 20 : mid + w // 20 + 1].mean()
    right_lung = profile[b0 + w // 5 : b0 + 7 * w // 20].mean()
    left_lung = profile[b1 - 7 * w // 20 : b1 - w // 5].mean()
    assert right_lung > 1.5 * spine and left_lung > 1.5 * spine

    # lateral (α = 90°): anterior on the image's left, the spine in the posterior quarter
    profile = lateral[rows].mean(axis=0)
    b0, b1 = _body_columns(-np.log(profile))
    w = b1 - b0
    spine = profile[b1 - w // 4 : b1 - w // 10].mean()
    lungs = profile[b0 + 2 * w // 5 : b0 + 7 * w // 10].max()
    assert lungs > 1.5 * spine
