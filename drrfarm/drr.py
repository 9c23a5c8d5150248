"""One DRR from one CT: the path behind ``drrfarm render`` (load → materials → place → render).

The farm does the same per shard with cached volumes; this is the single-image convenience path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drrfarm.api import Renderer, load_ct
from drrfarm.errors import DrrfarmError, GeometryError
from drrfarm.farm.plan import tool_pose_rng
from drrfarm.farm.scene import base_tool_mesh, pose_tool
from drrfarm.geometry import CArm, world_from_patient_default
from drrfarm.physics import Physics
from drrfarm.spectrum import get_spectrum
from drrfarm.volume import segment_by_labels, segment_by_thresholds

#: Default detector: DeepDRR's C-arm panel (1536 px × 0.194 mm ≈ 298 mm) sampled at 512 px.
DEFAULT_SIZE_PX = 512
DEFAULT_PIXEL_MM = 1536 * 0.194 / DEFAULT_SIZE_PX


@dataclass
class DrrRequest:
    """Everything ``drrfarm render`` needs (CLI flags map one to one)."""

    ct: str
    alpha_deg: float = 0.0
    beta_deg: float = 0.0
    gamma_deg: float = 0.0
    spectrum: str | dict[str, Any] = "90KV_AL40"
    labels: str | None = None
    label_table: str | None = None
    size_px: int = DEFAULT_SIZE_PX
    pixel_mm: float = DEFAULT_PIXEL_MM
    sdd_mm: float = 1020.0
    sid_mm: float = 530.0
    orientation: str = "HFS"
    backend: str = "auto"
    seed: int = 0
    physics: Physics = field(default_factory=Physics)
    #: tools in the CT: validated ``tools:`` items of the sweep spec (:func:`drrfarm.farm.spec_scene.parse_tools`)
    tools: tuple[Any, ...] = ()


def render_drr(req: DrrRequest) -> tuple[np.ndarray, dict[str, Any]]:
    """Render one DRR: returns ``(image (H, W) float32, sidecar metadata dict)``.

    The render goes through :class:`drrfarm.api.Renderer`; tools are posed as a sweep poses them
    (:func:`drrfarm.farm.scene.pose_tool`, random draws from ``req.seed``).
    """
    if req.size_px <= 0:
        raise GeometryError(f"size: must be a positive number of pixels, got {req.size_px}")
    spectrum = get_spectrum(req.spectrum)
    tool_meshes = []
    if req.tools:  # the tools' meshes first: a bad mesh file fails before the CT is read
        tool_meshes = [base_tool_mesh(tool, str) for tool in req.tools]
    volume = load_ct(req.ct)
    if req.labels:
        if not req.label_table:
            raise DrrfarmError("label-table: --labels needs --label-table (CSV with columns label,material)")
        materials = segment_by_labels(volume, req.labels, req.label_table)
    else:
        materials = segment_by_thresholds(volume)
    world_from_patient = world_from_patient_default(volume.centre_patient_mm(), orientation=req.orientation)
    carm = CArm(sdd_mm=req.sdd_mm, sid_mm=req.sid_mm, height=req.size_px, width=req.size_px,
                pixel_mm=req.pixel_mm)
    camera = carm.camera(alpha_deg=req.alpha_deg, beta_deg=req.beta_deg, gamma_deg=req.gamma_deg)
    meshes = [pose_tool(tool, mesh, world_from_patient, lambda k=k: tool_pose_rng(req.seed, 0, 0, k))
              for k, (tool, mesh) in enumerate(zip(req.tools, tool_meshes, strict=True))] or None
    renderer = Renderer(volume, materials=materials, backend=req.backend, spectrum=spectrum, physics=req.physics,
                        world_from_patient=world_from_patient)
    image = renderer.render(camera, seed=req.seed, meshes=meshes)
    sidecar = renderer.sidecar(camera, seed=req.seed, meshes=meshes)
    sidecar["carm"] = {"alpha_deg": req.alpha_deg, "beta_deg": req.beta_deg, "gamma_deg": req.gamma_deg,
                       "sdd_mm": req.sdd_mm, "sid_mm": req.sid_mm, "orientation": req.orientation}
    return image, sidecar
