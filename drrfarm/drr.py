"""One DRR from one CT: the path behind ``drrfarm render`` (load → materials → place → render).

The farm does the same per shard with cached volumes; this is the single-image convenience path.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drrfarm.errors import DrrfarmError, GeometryError, StorageError
from drrfarm.physics import Physics, quantize_uint16

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
    from drrfarm.api import Renderer
    from drrfarm.geometry import CArm, world_from_patient_default
    from drrfarm.spectrum import get_spectrum
    from drrfarm.volume import load_volume, segment_by_labels, segment_by_thresholds

    if req.size_px <= 0:
        raise GeometryError(f"size: must be a positive number of pixels, got {req.size_px}")
    spectrum = get_spectrum(req.spectrum)
    tool_meshes = []
    if req.tools:  # the tools' meshes first: a bad mesh file fails before the CT is read
        from drrfarm.farm.plan import tool_pose_rng
        from drrfarm.farm.scene import base_tool_mesh, pose_tool

        tool_meshes = [base_tool_mesh(tool, str) for tool in req.tools]
    volume = load_volume(req.ct)
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


def output_paths(out_png: str | Path, npy: bool = False) -> list[Path]:
    """The files :func:`write_drr` writes for ``out_png`` (PNG, JSON sidecar, optional NPY), checked before
    any work is done: none may be a folder, and their folder must exist or be creatable, and be writable.

    Raises :class:`~drrfarm.errors.StorageError` naming the path.
    """
    out_png = Path(out_png)
    if out_png.name in ("", ".", ".."):
        raise StorageError(f"output file {str(out_png)!r} is not a file name; give a .png path")
    paths = [out_png, out_png.with_suffix(".json")] + ([out_png.with_suffix(".npy")] if npy else [])
    if len(set(paths)) != len(paths):
        raise StorageError(f"output file {out_png}: the image and its sidecar would share this name; give a .png path")
    try:
        if out_png.is_dir():
            raise StorageError(f"output file {out_png} is a folder; give a file path such as {out_png / 'drr.png'}")
        for path in paths[1:]:
            if path.is_dir():
                raise StorageError(f"output file {out_png}: {path} is a folder, so it cannot be written")
        existing = out_png.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StorageError(f"output file {out_png}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"output file {out_png}: folder {existing} is not writable")
    except OSError as exc:
        raise StorageError(f"output file {out_png}: {exc.strerror or exc}") from None
    return paths


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise StorageError(f"output file {path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StorageError(f"output file {path}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_drr(image: np.ndarray, sidecar: dict[str, Any], out_png: str | Path, npy: bool = False) -> list[Path]:
    """Write ``out.png`` (16-bit, ``value × image_scale`` = output), ``out.json`` and optionally ``out.npy``."""
    from drrfarm.sinks.png import encode_png16

    written = output_paths(out_png, npy=npy)
    out_png = written[0]
    quantised, scale = quantize_uint16(image, sidecar["physics"]["output"])
    sidecar = {**sidecar, "image_scale": scale, "image_dtype": "uint16"}
    _atomic_write(out_png, encode_png16(quantised))
    _atomic_write(written[1], json.dumps(sidecar, indent=2).encode())
    if npy:
        import io

        buf = io.BytesIO()
        np.save(buf, image.astype(np.float32))
        _atomic_write(written[2], buf.getvalue())
    return written
