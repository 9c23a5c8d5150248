"""Host side of ``kernels/mesh.cu`` (pycuda): upload a mesh scene, trace it for a batch of cameras.

Standalone so the mesh kernel can be tested and benchmarked on its own; :mod:`drrfarm.render.cuda`
calls :meth:`MeshTracer.trace_device` on its own stream, with ``lint`` pointing at its line-integral
buffer and ``intervals`` read by the CT march. Uses the device's primary context
(:class:`drrfarm.gpu.device.GpuDevice`), pushed around every call, as the CUDA backend does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pycuda.driver as drv

from drrfarm.errors import BackendError
from drrfarm.gpu.device import GpuDevice
from drrfarm.gpu.layouts import MESH_KMAX_LOCAL, MESH_PARAMS_DTYPE
from drrfarm.render.mesh_reference import pack_cameras, pack_poses, pack_scene

KMAX_LIMIT = MESH_KMAX_LOCAL
BLOCK = (16, 8, 1)


@dataclass
class GpuScene:
    """A scene resident on the GPU (BVH nodes, triangles, per-mesh records)."""

    n_meshes: int
    material_names: list[str]
    buffers: dict[str, Any]
    nbytes: int


@dataclass
class MeshResult:
    """Host copies: chords (B, NM, H, W) float32, intervals (B, H, W, kmax, 2) float64,
    n_intervals (B, H, W) int32, overflow (hit lists, unions) counts."""

    chords: np.ndarray | None
    intervals: np.ndarray | None
    n_intervals: np.ndarray | None
    overflow: tuple[int, int]


class MeshTracer:
    """Loads ``mesh.cu`` on one GPU and traces scenes."""

    def __init__(self, device: int = 0) -> None:
        self.gpu = GpuDevice.get(device)  # the same primary context as the render backend
        self.context = self.gpu.context
        self.module, self.build = self.gpu.module("mesh.cu")
        with self.context():
            self._trace = self.module.get_function("mesh_trace")
            self._count = self.module.get_function("mesh_count_skipped")
            self._add = self.module.get_function("mesh_add_chords")

    def upload(self, meshes: Sequence[Any], material_names: Sequence[str]) -> GpuScene:
        """Pack (:func:`~drrfarm.render.mesh_reference.pack_scene`) and upload a scene."""
        packed = pack_scene(meshes, material_names)
        bufs: dict[str, Any] = {}
        nbytes = 0
        with self.context():
            for key in ("nodes", "tris", "meshes", "density"):
                arr = np.ascontiguousarray(packed[key])
                bufs[key] = drv.mem_alloc(max(arr.nbytes, 16))
                drv.memcpy_htod(bufs[key], arr)
                nbytes += arr.nbytes
        return GpuScene(len(meshes), [str(n) for n in packed["names"]], bufs, nbytes)

    def params(self, scene: GpuScene, cams_ptr: int, poses_ptr: int, H: int, W: int, B: int, *,
               chords: int = 0, lint: int = 0, M: int = 0, intervals: int = 0, n_intervals: int = 0,
               overflow: int = 0, kmax: int = 4) -> np.ndarray:
        if not 1 <= kmax <= KMAX_LIMIT:
            raise BackendError(f"kmax: must be in [1, {KMAX_LIMIT}], got {kmax}")
        p = np.zeros((), dtype=MESH_PARAMS_DTYPE)
        p["cams"], p["poses"] = cams_ptr, poses_ptr
        for key in ("nodes", "tris", "meshes", "density"):
            p[key] = int(scene.buffers[key])
        p["chords"], p["lint"], p["intervals"], p["n_intervals"], p["overflow"] = (
            chords, lint, intervals, n_intervals, overflow)
        p["H"], p["W"], p["B"], p["NM"], p["M"], p["kmax"] = H, W, B, scene.n_meshes, M, kmax
        return p

    def trace_device(self, params: np.ndarray, stream: Any = None) -> None:
        """Launch ``mesh_trace`` with ready parameters (device pointers) on ``stream``; context pushed by caller."""
        H, W, B = int(params["H"]), int(params["W"]), int(params["B"])
        grid = ((W + BLOCK[0] - 1) // BLOCK[0], (H + BLOCK[1] - 1) // BLOCK[1], B)
        self._trace(params[()], block=BLOCK, grid=grid, stream=stream)

    def add_chords_device(self, params: np.ndarray, stream: Any = None) -> None:
        """Launch ``mesh_add_chords`` (lint += density * chords / 10); context pushed by the caller."""
        H, W, B = int(params["H"]), int(params["W"]), int(params["B"])
        grid = ((W + BLOCK[0] - 1) // BLOCK[0], (H + BLOCK[1] - 1) // BLOCK[1], B)
        self._add(params[()], block=BLOCK, grid=grid, stream=stream)

    def trace(self, scene: GpuScene, cameras: Sequence[Any], meshes_per_image: Sequence[Sequence[Any]],
              kmax: int = 4, want_chords: bool = True, want_intervals: bool = True) -> MeshResult:
        """Trace a batch (cameras of one size; ``meshes_per_image[b]`` = the scene's meshes posed for image b)."""
        B = len(cameras)
        H, W = int(cameras[0].height), int(cameras[0].width)
        if any(int(c.height) != H or int(c.width) != W for c in cameras):
            raise BackendError("cameras: one launch traces images of one size")
        if len(meshes_per_image) != B or any(len(ms) != scene.n_meshes for ms in meshes_per_image):
            raise BackendError(f"meshes_per_image: need {B} lists of {scene.n_meshes} meshes")
        cams = pack_cameras(cameras)
        poses = pack_poses(meshes_per_image)
        with self.context():
            d_cams = drv.to_device(cams)
            d_poses = drv.to_device(np.ascontiguousarray(poses))
            d_of = drv.to_device(np.zeros(2, dtype=np.uint32))
            chords = drv.mem_alloc(4 * B * scene.n_meshes * H * W) if want_chords else None
            ivs = drv.mem_alloc(16 * B * H * W * kmax) if want_intervals else None
            niv = drv.mem_alloc(4 * B * H * W) if want_intervals else None
            p = self.params(scene, int(d_cams), int(d_poses), H, W, B, chords=int(chords or 0),
                            intervals=int(ivs or 0), n_intervals=int(niv or 0), overflow=int(d_of), kmax=kmax)
            self.trace_device(p)
            drv.Context.synchronize()
            out_c = drv.from_device(chords, (B, scene.n_meshes, H, W), np.float32) if chords else None
            out_i = drv.from_device(ivs, (B, H, W, kmax, 2), np.float64) if ivs else None
            out_n = drv.from_device(niv, (B, H, W), np.int32) if niv else None
            of = drv.from_device(d_of, (2,), np.uint32)
        return MeshResult(out_c, out_i, out_n, (int(of[0]), int(of[1])))

    def count_skipped(self, scene: GpuScene, result_intervals: np.ndarray, n_intervals: np.ndarray,
                      t0: np.ndarray, h: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Run ``mesh_count_skipped`` (the CT-march skip rule) on host arrays; returns (B, H, W) int32."""
        B, H, W, kmax, _ = result_intervals.shape
        with self.context():
            d_iv = drv.to_device(np.ascontiguousarray(result_intervals, dtype=np.float64))
            d_n = drv.to_device(np.ascontiguousarray(n_intervals, dtype=np.int32))
            p = self.params(scene, 0, 0, H, W, B, intervals=int(d_iv), n_intervals=int(d_n), kmax=kmax)
            out = drv.mem_alloc(4 * B * H * W)
            grid = ((W + BLOCK[0] - 1) // BLOCK[0], (H + BLOCK[1] - 1) // BLOCK[1], B)
            t0_h = np.ascontiguousarray(t0, np.float64)
            h_h = np.ascontiguousarray(h, np.float64)
            n_h = np.ascontiguousarray(n, np.int32)
            self._count(p[()], drv.In(t0_h), drv.In(h_h), drv.In(n_h), out, block=BLOCK, grid=grid)
            drv.Context.synchronize()
            return drv.from_device(out, (B, H, W), np.int32)
