"""What a render actor adds to each image of a volume: tools posed per image, label masks, landmarks.

:class:`VolumeScene` is built once per resident volume from the spec's ``tools`` / ``labels`` /
``landmarks`` sections (:mod:`drrfarm.farm.spec_scene`); per image it gives the posed tool meshes
(:meth:`VolumeScene.tools_for`, deterministic from :func:`drrfarm.farm.plan.tool_pose_rng`) and, after
the render, the annotation fields of the image's row (:meth:`VolumeScene.annotate`):

* ``masks`` (L, H, W) bool and, with ``labels.thickness``, ``thickness_mm`` (L, H, W) float32: the label
  map's labels first, then the tools' (:func:`drrfarm.labels.mesh_label_images`), in
  :attr:`VolumeScene.mask_names` order (encoded by the sinks, :mod:`drrfarm.sinks.annotations`);
* ``landmarks_uv`` / ``landmarks_visible`` / ``landmarks_depth_mm``
  (:meth:`drrfarm.landmarks.ProjectedLandmarks.to_row`), in :attr:`VolumeScene.landmark_names` order;
* ``tool_world_from_mesh``: each tool's 4x4 pose (16 floats, row-major), :attr:`VolumeScene.tool_names` order.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from drrfarm.farm.plan import tool_pose_rng
from drrfarm.farm.spec import SweepSpec
from drrfarm.farm.spec_scene import ToolSpec, for_volume
from drrfarm.labels import LabelImages, LabelProjector, mesh_label_images
from drrfarm.landmarks import landmarks_from_points, load_landmarks, project_landmarks
from drrfarm.meshes import BUILTIN_TOOLS, load_mesh, sample_tool_pose


def base_tool_mesh(tool: ToolSpec, resolve: Any) -> Any:
    """The tool's :class:`drrfarm.meshes.Mesh` in its model frame (not yet posed)."""
    overrides: dict[str, Any] = {"name": tool.name}
    if tool.material is not None:
        overrides["material"] = tool.material
    if tool.density_g_cm3 is not None:
        overrides["density_g_cm3"] = tool.density_g_cm3
    if tool.mode is not None:
        overrides["mode"] = tool.mode
    if tool.is_builtin:
        shape = {k: (int(v) if k == "sections" else v) for k, v in tool.shape}
        return BUILTIN_TOOLS[tool.mesh](**shape, **overrides)
    return load_mesh(resolve(tool.resolved), scale_to_mm=tool.scale_to_mm, tip_mm=tool.model_tip_mm,
                     base_mm=tool.model_base_mm, **{"mode": "add", **overrides})


def pose_tool(tool: ToolSpec, mesh: Any, world_from_patient: np.ndarray, rng: Any) -> Any:
    """``mesh`` (the tool's model-frame mesh, :func:`base_tool_mesh`) posed as ``tool.pose`` says.

    A fixed ``world_from_mesh`` (in the patient frame: composed with ``world_from_patient``, (4, 4)), or
    one draw on the planned trajectory (:func:`drrfarm.meshes.sample_tool_pose`) from ``rng()``: a
    callable returning the :class:`numpy.random.Generator` (called only for a trajectory).
    """
    pose = tool.pose
    wfp = np.asarray(world_from_patient, dtype=np.float64) if pose.frame == "patient" else None
    if pose.world_from_mesh is not None:
        T = np.asarray(pose.world_from_mesh, dtype=np.float64).reshape(4, 4)
        return mesh.posed(wfp @ T if wfp is not None else T)
    return sample_tool_pose(mesh, pose.tip_mm, pose.base_mm, rng(), pose.advance_mm.for_sampler(),
                            pose.twist_deg.for_sampler(), pose.tip_jitter_mm, pose.angle_jitter_deg,
                            world_from_patient=wfp)


class VolumeScene:
    """Tools, label projector and landmarks of one volume of a sweep.

    ``world_from_patient``: (4, 4) placement of the volume (the backend's ``prepare`` argument);
    ``resolve``: maps a spec path/URL to something openable (:func:`drrfarm.farm.compile.resolve_input`).
    """

    def __init__(self, spec: SweepSpec, volume_index: int, world_from_patient: np.ndarray, resolve: Any) -> None:
        self.spec = spec
        self.volume_index = int(volume_index)
        self.world_from_patient = np.asarray(world_from_patient, dtype=np.float64)
        volume_id = spec.volumes[volume_index].id
        self.tools = [base_tool_mesh(t, resolve) for t in spec.tools]
        self.tool_names = [t.name for t in spec.tools]
        self.projector = None
        self.label_thickness = False
        self.tool_masks = False
        if spec.labels is not None:
            lb = spec.labels
            self.label_thickness = lb.thickness
            self.tool_masks = lb.tools and bool(self.tools)
            if lb.label_map_resolved:
                self.projector = LabelProjector(resolve(for_volume(lb.label_map_resolved, volume_id)),
                                                self.world_from_patient, dict(lb.values) or None)
        self.landmarks = None
        self.tool_tips = False
        if spec.landmarks is not None:
            lm = spec.landmarks
            self.tool_tips = lm.tool_tips
            if lm.file_resolved:
                self.landmarks = load_landmarks(resolve(for_volume(lm.file_resolved, volume_id)))
            elif lm.points:
                self.landmarks = landmarks_from_points([p for _, p in lm.points], [n for n, _ in lm.points],
                                                       frame=lm.frame, source="landmarks.points")

    # -- names (constant for the volume; the sinks write them into the shard's metadata) ---------------
    @property
    def mask_names(self) -> list[str]:
        names = list(self.projector.names) if self.projector is not None else []
        return names + (self.tool_names if self.tool_masks else [])

    @property
    def landmark_names(self) -> list[str]:
        names = list(self.landmarks.names) if self.landmarks is not None else []
        if self.tool_tips:
            names += [f"{n}_{end}" for n in self.tool_names for end in ("tip", "base")]
        return names

    def file_metadata(self) -> dict[str, str]:
        """Names of the annotation channels, for the shard's file metadata (JSON lists)."""
        meta: dict[str, str] = {}
        if self.tools:
            meta["drrfarm.tool_names"] = json.dumps(self.tool_names)
        if self.spec.labels is not None:
            meta["drrfarm.mask_names"] = json.dumps(self.mask_names)
        if self.spec.landmarks is not None:
            meta["drrfarm.landmark_names"] = json.dumps(self.landmark_names)
        return meta

    # -- per image -----------------------------------------------------------------------------------
    def tools_for(self, pose_index: int) -> list[Any]:
        """The tools posed for one pose of this volume (the same in every spectrum / photon setting)."""
        return [pose_tool(tool, mesh, self.world_from_patient,
                          lambda k=k: tool_pose_rng(self.spec.seed, self.volume_index, pose_index, k))
                for k, (tool, mesh) in enumerate(zip(self.spec.tools, self.tools, strict=True))]

    def annotate(self, camera: Any, tools: list[Any]) -> dict[str, Any]:
        """The annotation fields of one image's row (see the module doc)."""
        row: dict[str, Any] = {}
        if tools:
            row["tool_world_from_mesh"] = [float(x) for m in tools for x in m.world_from_mesh.reshape(-1)]
        if self.spec.labels is not None:
            H, W = int(camera.height), int(camera.width)
            th = self.label_thickness
            parts = [self.projector.project(camera, thickness=th, step_voxels=self.spec.physics.step_voxels)] \
                if self.projector is not None else []
            if self.tool_masks:
                parts.append(mesh_label_images(tools, camera, thickness=th))
            images = parts[0] if parts else LabelImages([], np.zeros((0, H, W), bool),
                                                        np.zeros((0, H, W), np.float32) if th else None)
            for more in parts[1:]:
                images = images.concat(more)
            row["masks"] = images.masks
            if th:
                row["thickness_mm"] = images.thickness_mm
        if self.spec.landmarks is not None:
            points = [self.landmarks.world_mm(self.world_from_patient)] if self.landmarks is not None else []
            if self.tool_tips:
                points += [np.array([p for m in tools for p in (m.tip_world_mm(), m.base_world_mm())]).reshape(-1, 3)]
            X = np.concatenate(points) if points else np.zeros((0, 3))
            row.update(project_landmarks(X, camera).to_row())
        return row
