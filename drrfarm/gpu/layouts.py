"""The kernels' parameter layouts: NumPy mirrors of the C structs in ``drrfarm/gpu/kernels/params.cuh``.

A launch fills one zeroed record of a dtype below (``np.zeros((), dtype)``) and passes it by value
(``record[()]``). The per-image record strides the host packers follow sit here too. Each dtype is
checked field by field against its C struct by ``tests/test_gpu_layouts.py`` (a parse of the header,
and nvcc's ``offsetof`` when nvcc is there).
"""

from __future__ import annotations

import numpy as np

#: ``struct DrrParams`` (``drr.cu``: every render kernel).
DRR_PARAMS_DTYPE = np.dtype([
    ("cams", "<u8"), ("info", "<u8"), ("tables", "<u8"), ("out", "<u8"), ("scratch", "<u8"), ("minmax", "<u8"),
    ("lint", "<u8"), ("rays", "<u8"), ("tex", "<u8", (6,)), ("texp", "<u8", (6,)),
    ("nI", "<i4"), ("nJ", "<i4"), ("nK", "<i4"), ("M", "<i4"),
    ("H", "<i4"), ("W", "<i4"), ("B", "<i4"), ("tstride", "<i4"),
    ("nbmax", "<i4"), ("mode", "<i4"), ("output", "<i4"), ("out_dtype", "<i4"),
    ("scale", "<f4"), ("photons", "<f4"), ("sigma_e", "<f4"), ("tau_min", "<f4"),
    ("solid_angle", "<i4"), ("pad0", "<i4"), ("scale64", "<f8"),
    ("scatter", "<u8"), ("scatter_h", "<i4"), ("scatter_w", "<i4"), ("pad3", "<i4"), ("pad4", "<i4"),
])

#: ``struct MeshParams`` (``mesh.cu``).
MESH_PARAMS_DTYPE = np.dtype([
    ("cams", "<u8"), ("poses", "<u8"), ("nodes", "<u8"), ("tris", "<u8"), ("meshes", "<u8"), ("density", "<u8"),
    ("chords", "<u8"), ("lint", "<u8"), ("intervals", "<u8"), ("n_intervals", "<u8"), ("overflow", "<u8"),
    ("H", "<i4"), ("W", "<i4"), ("B", "<i4"), ("NM", "<i4"),
    ("M", "<i4"), ("kmax", "<i4"), ("pad0", "<i4"), ("pad1", "<i4"),
])

#: ``struct ScatterParams`` (``scatter.cu``).
SCATTER_PARAMS_DTYPE = np.dtype([
    ("dens", "<u8"), ("mu", "<u8"), ("majorant", "<u8"), ("compton_s", "<u8"), ("rayleigh_cdf", "<u8"),
    ("eta", "<u8"), ("spec_kev", "<u8"), ("spec_cdf", "<u8"), ("cams", "<u8"), ("keys", "<u8"), ("tally", "<u8"),
    ("energy", "<u8"), ("interactions", "<u8"), ("events", "<u8"),
    ("ijk_from_world", "<f8", (12,)),
    ("e0", "<f8"), ("de", "<f8"), ("x_step", "<f8"), ("signal_norm", "<f8"), ("count_norm", "<f8"),
    ("forced_step_mm", "<f8"),
    ("photons", "<i8"),
    ("I", "<i4"), ("J", "<i4"), ("K", "<i4"), ("M", "<i4"), ("NE", "<i4"), ("NX", "<i4"), ("NB", "<i4"), ("H", "<i4"),
    ("W", "<i4"), ("Ht", "<i4"), ("Wt", "<i4"), ("solid_angle", "<i4"), ("signal_per_photon", "<i4"),
    ("n_img", "<i4"), ("forced", "<i4"), ("event_capacity", "<i4"), ("event_counts", "<u8"), ("forced_norms", "<u8"),
    ("cutoff_kev", "<f8"),
])

#: C struct name -> its NumPy mirror.
PARAMS_DTYPES = {
    "DrrParams": DRR_PARAMS_DTYPE,
    "MeshParams": MESH_PARAMS_DTYPE,
    "ScatterParams": SCATTER_PARAMS_DTYPE,
}

DRR_CAM_STRIDE = 24  # float64 per image camera record (drrfarm.render.cuda_plan.camera_block)
DRR_INFO_STRIDE = 4  # uint32 per image: spectrum index, seed lo, seed hi, trilinear layout axis
MESH_CAM_STRIDE = 16  # float64 per image (drrfarm.render.mesh_reference.pack_cameras)
MESH_POSE_STRIDE = 12  # float64 per (image, mesh): mesh_from_world, 3x4 row-major (pack_poses)
MESH_MAX_HITS = 64  # hits a ray keeps per mesh
MESH_KMAX_LOCAL = 16  # the most replacing intervals a ray keeps (the largest kmax)
SCATTER_CAM_STRIDE = 32  # float64 per image (drrfarm.scatter.cuda.pack_cameras)

#: The ``#define`` of ``params.cuh`` each constant above mirrors.
PARAMS_DEFINES = {
    "DRR_CAM_STRIDE": DRR_CAM_STRIDE,
    "DRR_INFO_STRIDE": DRR_INFO_STRIDE,
    "MESH_CAM_STRIDE": MESH_CAM_STRIDE,
    "MESH_POSE_STRIDE": MESH_POSE_STRIDE,
    "MESH_MAX_HITS": MESH_MAX_HITS,
    "MESH_KMAX_LOCAL": MESH_KMAX_LOCAL,
    "SCATTER_CAM_STRIDE": SCATTER_CAM_STRIDE,
}
