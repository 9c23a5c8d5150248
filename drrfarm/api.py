"""The Python API: load a CT, make materials, aim a C-arm, render — with the objects the farm uses.

Everything here is glue around the modules that own the work (:mod:`drrfarm.volume`,
:mod:`drrfarm.geometry`, :mod:`drrfarm.spectrum`, :mod:`drrfarm.physics`, :mod:`drrfarm.render`,
:mod:`drrfarm.meshes`); ``drrfarm render`` and the render actors go through the same objects, so a
DRR rendered here is the DRR the CLI or a sweep writes for the same camera, spectrum, physics and seed.

Units throughout: millimetres (patient RAS frame and C-arm world frame), degrees, keV (photon
energies), kV (tube voltage), g/cm³ (densities), g/cm² (line integrals). Images are float32 numpy
arrays of shape (H, W) for one camera and (B, H, W) for a list of B cameras.

    import drrfarm

    ct = drrfarm.load_ct("sample:chest_ct")
    drr = drrfarm.Renderer(ct, spectrum="90KV_AL40", physics=drrfarm.Physics(photons=10_000))
    image = drr.render(drrfarm.CArm(height=256, width=256, pixel_mm=1.164).camera(alpha_deg=30), seed=1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from drrfarm.errors import GeometryError, MeshError, PhysicsError, VolumeError
from drrfarm.geometry import Camera
from drrfarm.meshes import BUILTIN_TOOLS, Mesh
from drrfarm.physics import Physics
from drrfarm.volume import MaterialVolume, Volume

__all__ = ["Renderer", "load_ct", "tool_mesh"]

#: Built-in tools of :func:`tool_mesh` (the sweep spec's ``tools[].mesh`` names).
TOOLS = ("kwire", "screw", "cylinder")


# ------------------------------------------------------------------------------------------------ CT

def load_ct(source: Any, affine: Any = None, *, series_uid: str | None = None, name: str | None = None) -> Volume:
    """Load a CT in Hounsfield units as a :class:`~drrfarm.volume.Volume`.

    ``source``: a NIfTI (``.nii``/``.nii.gz``) or NRRD file, a folder holding one DICOM series, an
    fsspec URL (``s3://…``, ``file://…``), ``"sample:chest_ct"`` (downloaded once and checksummed), a
    nibabel image, an existing :class:`~drrfarm.volume.Volume` (returned as is), or an (I, J, K) array
    of HU (numpy, or anything with ``__array__``; a torch tensor is copied to the CPU).
    ``affine``: with an array only, the (4, 4) voxel index -> RAS mm matrix (voxel centres at integer
    indices; nibabel's convention). ``series_uid``: which series of a DICOM folder holding several.
    ``name``: the source name recorded for an array (default ``"<array>"``).

    Returns a Volume: ``hu`` (I, J, K) float32 HU (values below -1024 become -1024, air) and
    ``patient_from_ijk`` (4, 4) float64 RAS mm. DICOM and LPS NRRD are converted to RAS on load.
    Raises :class:`~drrfarm.errors.VolumeError` naming the file or argument.
    """
    from drrfarm.volume import load_volume, volume_from_array

    if isinstance(source, Volume):
        if affine is not None:
            raise VolumeError("affine: a Volume carries its own affine; pass affine only with an array")
        return source
    if isinstance(source, (str, Path)):
        if affine is not None:
            raise VolumeError(f"affine: only with an array source; {str(source)!r} carries its own orientation")
        return load_volume(source, series_uid=series_uid)
    if series_uid is not None:
        raise VolumeError("series_uid: only with a DICOM folder")
    if affine is None and hasattr(source, "affine") and callable(getattr(source, "get_fdata", None)):
        return volume_from_array(np.asarray(source.get_fdata(dtype=np.float32)), source.affine,
                                 name or str(getattr(source, "get_filename", lambda: None)() or "<nibabel image>"))
    if hasattr(source, "detach") and hasattr(source, "cpu"):  # a torch tensor
        source = source.detach().cpu().numpy()
    if not (isinstance(source, np.ndarray) or hasattr(source, "__array__")):
        raise VolumeError(f"source: expected a path, URL, 'sample:<name>', Volume or (I, J, K) HU array, "
                          f"got {type(source).__name__}")
    if affine is None:
        raise VolumeError("affine: an array CT needs its (4, 4) voxel index -> RAS mm affine")
    return volume_from_array(np.asarray(source), affine, name or "<array>")


# --------------------------------------------------------------------------------------------- tools

def tool_mesh(kind: str, **options: Any) -> Mesh:
    """A built-in tool as a closed :class:`~drrfarm.meshes.Mesh` in its model frame (mm).

    ``kind``: ``"kwire"`` (steel, 1.6 mm × 150 mm, trocar tip), ``"screw"`` (titanium, 6.5 mm × 45 mm,
    11 mm head) or ``"cylinder"`` (steel; needs ``radius_mm`` and ``length_mm``). ``options``: the
    generator's keyword arguments (sizes in mm, ``sections``, ``material``, ``density_g_cm3`` in g/cm³,
    ``mode`` ``"add"`` / ``"replace"``, ``name``), as the sweep spec's ``tools[].size`` keys.

    The model axis is +z from the base (z = 0) to the tip (z = length_mm); place the tool with
    ``mesh.posed(world_from_mesh)`` ((4, 4) rigid, world mm) or ``mesh.aligned(tip_world_mm,
    base_world_mm, advance_mm, twist_deg)``; :meth:`Renderer.to_world` maps CT (RAS) points to world.
    """
    makers = BUILTIN_TOOLS
    if kind not in makers:
        raise MeshError(f"kind: unknown tool {kind!r}; choose one of {', '.join(TOOLS)} (or load_mesh(path, material))")
    try:
        return makers[kind](**options)
    except TypeError as exc:  # an unknown or missing keyword argument
        raise MeshError(f"{kind}: {exc}") from None


# ------------------------------------------------------------------------------------------ renderer

def _physics(value: Any, name: str = "physics") -> Physics:
    if value is None:
        return Physics()
    if isinstance(value, Physics):
        return value
    if isinstance(value, Mapping):
        return Physics.from_dict(dict(value))
    raise PhysicsError(f"{name}: expected a drrfarm Physics, a dict of its options or None, got {type(value).__name__}")


def _cameras(cameras: Any) -> tuple[list[Camera], bool]:
    """(list of cameras, single) with the checks every backend relies on."""
    if isinstance(cameras, Camera):
        return [cameras], True
    if isinstance(cameras, (str, bytes, Mapping)) or not isinstance(cameras, (Sequence, np.ndarray)):
        raise GeometryError(f"cameras: expected a drrfarm Camera or a list of them (e.g. CArm().camera(...)), "
                            f"got {type(cameras).__name__}")
    cams = list(cameras)
    if not cams:
        raise GeometryError("cameras: the list is empty; give at least one Camera")
    for i, cam in enumerate(cams):
        if not isinstance(cam, Camera):
            raise GeometryError(f"cameras[{i}]: expected a drrfarm Camera, got {type(cam).__name__}")
    sizes = sorted({(c.height, c.width) for c in cams})
    if len(sizes) > 1:
        raise GeometryError(f"cameras: all cameras of one call must share (height, width) in pixels, got {sizes}")
    return cams, False


def _seeds(seed: Any, n: int) -> list[int]:
    def check(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < 2**63:
            raise PhysicsError(f"{name}: expected an integer in [0, 2**63), got {value!r}")
        return int(value)

    if isinstance(seed, (Sequence, np.ndarray)) and not isinstance(seed, (str, bytes)):
        seeds = [check(s, f"seed[{i}]") for i, s in enumerate(seed)]
        if len(seeds) != n:
            raise PhysicsError(f"seed: give one integer, or one per camera ({n}), got {len(seeds)}")
        return seeds
    first = check(seed, "seed")
    if first + n > 2**63:
        raise PhysicsError(f"seed: {first} + {n} images runs past 2**63")
    return [first + i for i in range(n)]


class Renderer:
    """Renders DRRs of one CT on one backend; the volume is made resident once, at construction.

    ``ct``: a :class:`~drrfarm.volume.Volume` (HU; split into air ≤ -800 < soft tissue ≤ 350 < bone
    with DeepDRR's HU -> density fit), a :class:`~drrfarm.volume.MaterialVolume` (used as is: from
    :func:`~drrfarm.volume.segment_by_thresholds` or :func:`~drrfarm.volume.segment_by_labels`), or
    anything :func:`load_ct` reads from a path or URL (``"sample:chest_ct"``). ``materials``: with a
    Volume, its :class:`~drrfarm.volume.MaterialVolume` to render instead of the default thresholds
    (e.g. ``segment_by_labels(ct, label_map, table)``; the Volume is then kept for provenance only).
    ``backend``: ``"auto"`` (CUDA when pycuda sees a GPU, else CPU), ``"cpu"``, ``"cuda"``, or a backend
    object (:func:`drrfarm.render.get_backend`; share one between renderers to share its volume cache).
    ``spectrum``: a preset (``"60KV_AL35"``, ``"90KV_AL40"``, ``"120KV_AL43"``; ``"deepdrr:90KV_AL40"`` etc. for
    DeepDRR 1.2.2's own tables), ``"mono:<keV>"``, a dict (``{"kvp": 90, "al_mm": 4}``: kV and mm of Al/Cu
    filtration) or a :class:`~drrfarm.spectrum.Spectrum`.
    ``physics``: a :class:`~drrfarm.physics.Physics`, a dict of its options, or None (noiseless
    ``line_integral`` = log(I0/I), ideal energy-integrating detector).
    ``orientation``: the patient on the table, ``"HFS"``, ``"FFS"``, ``"HFP"`` or ``"FFP"``; the CT's centre
    is put at the world origin, the C-arm's default isocentre. ``world_from_patient``: a (4, 4) RAS mm
    -> world mm placement instead. ``backend_options``: passed to the backend (``device=1`` for CUDA,
    ``threads=4`` for the CPU).

    Call :meth:`render` (or the renderer itself) with cameras (:class:`~drrfarm.geometry.Camera`,
    e.g. ``CArm(...).camera(alpha_deg=30)``): (H, W) float32 for one camera, (B, H, W) for a list.
    """

    def __init__(self, ct: Any, *, materials: MaterialVolume | None = None, backend: Any = "auto",
                 spectrum: Any = "90KV_AL40", physics: Any = None, orientation: str = "HFS",
                 world_from_patient: Any = None, **backend_options: Any) -> None:
        from drrfarm.geometry import world_from_patient_default
        from drrfarm.render import get_backend
        from drrfarm.spectrum import get_spectrum
        from drrfarm.volume import _check_affine, segment_by_thresholds

        self.spectrum = get_spectrum(spectrum)
        self.physics = _physics(physics)
        if isinstance(ct, MaterialVolume):
            if materials is not None:
                raise VolumeError("materials: ct is already a MaterialVolume; give one or the other")
            self.volume: Volume | None = None
            self.materials = ct
        else:
            if not isinstance(ct, (Volume, str, Path)):
                raise VolumeError(f"ct: expected a Volume, a MaterialVolume, or a path/URL, got {type(ct).__name__}"
                                  " (load an array with drrfarm.load_ct(array, affine))")
            self.volume = load_ct(ct)
            if materials is None:
                self.materials = segment_by_thresholds(self.volume)
            elif not isinstance(materials, MaterialVolume):
                raise VolumeError(f"materials: expected a MaterialVolume (segment_by_thresholds / segment_by_labels), "
                                  f"got {type(materials).__name__}")
            elif materials.volume_sha256 != self.volume.sha256:
                raise VolumeError("materials: made from another CT (its volume_sha256 differs from ct's sha256)")
            else:
                self.materials = materials
        if world_from_patient is None:
            self.world_from_patient = world_from_patient_default(self.materials.centre_patient_mm(),
                                                                 orientation=orientation)
        else:
            self.world_from_patient = _check_affine(world_from_patient, "world_from_patient")
        if isinstance(backend, str):
            self.backend = get_backend(backend, **backend_options)
        else:
            if backend_options:
                raise PhysicsError(f"backend_options: {sorted(backend_options)} only with a backend name")
            if not all(callable(getattr(backend, m, None)) for m in ("prepare", "render")):
                raise PhysicsError(f"backend: expected 'auto', 'cpu', 'cuda' or a backend object, got {backend!r}")
            self.backend = backend
        self._handle = self.backend.prepare(self.materials, self.world_from_patient)

    def __repr__(self) -> str:
        return (f"Renderer(backend={self.backend.name!r}, materials={self.material_names}, "
                f"shape={self.materials.shape}, spectrum={self.spectrum.name!r}, output={self.physics.output!r})")

    # -- properties -------------------------------------------------------------------------------

    @property
    def backend_name(self) -> str:
        """``"cpu"`` or ``"cuda"``: the backend that renders (``"auto"`` resolved)."""
        return str(self.backend.name)

    @property
    def material_names(self) -> list[str]:
        """The CT's material channels (M names), in :meth:`line_integrals` order."""
        return list(self.materials.material_names)

    def to_world(self, points_patient_mm: Any) -> np.ndarray:
        """CT (patient RAS) mm points, (3,) or (N, 3), to world (C-arm) mm of the same shape."""
        p = np.asarray(points_patient_mm, dtype=np.float64)
        if p.shape[-1:] != (3,) or p.ndim > 2 or not np.all(np.isfinite(p)):
            raise GeometryError(f"points_patient_mm: expected finite (3,) or (N, 3) mm, got shape {p.shape}")
        T = self.world_from_patient
        return p @ T[:3, :3].T + T[:3, 3]

    # -- rendering --------------------------------------------------------------------------------

    def _setup(self, cameras: Any, seed: Any, spectrum: Any, physics: Any) -> tuple[list[Camera], bool, list[int],
                                                                                       Any, Physics]:
        from drrfarm.spectrum import get_spectrum

        cams, single = _cameras(cameras)
        seeds = _seeds(seed, len(cams))
        spec = self.spectrum if spectrum is None else get_spectrum(spectrum)
        phys = self.physics if physics is None else _physics(physics)
        return cams, single, seeds, spec, phys

    def render(self, cameras: Camera | Sequence[Camera], *, seed: int | Sequence[int] = 0, meshes: Any = None,
               spectrum: Any = None, physics: Any = None) -> np.ndarray:
        """Render DRRs: (H, W) float32 for one camera, (B, H, W) float32 for a list of B cameras.

        Pixel values are ``physics.output``: ``line_integral`` = log(I0/I) (dimensionless),
        ``transmission`` = I/I0, ``intensity`` (keV per emitted photon) or ``neglog`` (DeepDRR's, in
        [0, 1]). ``seed``: the noise seed of the first image; image i gets ``seed + i`` (so one image of
        a batch equals its single render), or give one seed per camera. Noiseless physics ignores it.
        ``meshes``: tools in the same pass — a list of posed :class:`~drrfarm.meshes.Mesh` (world mm)
        for every image, or one list per camera. ``spectrum``/``physics``: this call only.
        """
        cams, single, seeds, spec, phys = self._setup(cameras, seed, spectrum, physics)
        images = self.backend.render(self._handle, cams, spec, phys, seeds, meshes=meshes) if meshes else \
            self.backend.render(self._handle, cams, spec, phys, seeds)
        images = np.asarray(images, dtype=np.float32)
        return images[0] if single else images

    __call__ = render

    def render_torch(self, cameras: Camera | Sequence[Camera], *, seed: int | Sequence[int] = 0, meshes: Any = None,
                     spectrum: Any = None, physics: Any = None, device: Any = None) -> Any:
        """As :meth:`render`, as a torch float32 tensor: (H, W) or (B, H, W).

        CUDA backend: the tensor is on the renderer's GPU and *is* the render's output buffer (no
        copy, no trip through host memory; the backend shares the device's primary context with
        torch). CPU backend: a CPU tensor sharing the numpy image's memory. ``device``: move it there
        (a copy) when it is elsewhere.
        """
        import torch

        cams, single, seeds, spec, phys = self._setup(cameras, seed, spectrum, physics)
        out = None
        if self.backend_name == "cuda" and callable(getattr(self.backend, "render_async", None)):
            from drrfarm.render import meshes_per_image
            from drrfarm.render.cuda import scene_key

            per = meshes_per_image(meshes, len(cams))
            if per is None or (all(per) and len({scene_key(m) for m in per}) == 1):
                # the scatter tallies first, as CudaBackend.render does, then one launch kept on the GPU
                tallies = self.backend.scatter_tallies(self._handle, cams, [spec] * len(cams), phys, seeds)
                job = self.backend.render_async(self._handle, cams, spec, phys, seeds, to_host=False, meshes=per,
                                                scatter=tallies)
                out = job.torch()
        if out is None:
            images = self.backend.render(self._handle, cams, spec, phys, seeds, meshes=meshes) if meshes else \
                self.backend.render(self._handle, cams, spec, phys, seeds)
            out = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if device is not None and out.device != torch.device(device):
            out = out.to(device)
        return out[0] if single else out

    def line_integrals(self, cameras: Camera | Sequence[Camera], *, meshes: Any = None,
                       physics: Any = None) -> np.ndarray:
        """Per-material line integrals in g/cm²: (M, H, W) float32 for one camera, (B, M, H, W) for B.

        Channels: :attr:`material_names`, then the materials of ``meshes`` the CT lacks
        (:func:`drrfarm.render.output_material_names`). No spectrum, detector or noise is applied;
        ``physics`` sets the sampling (``method``, ``step_voxels``).
        """
        cams, single = _cameras(cameras)
        phys = self.physics if physics is None else _physics(physics)
        out = self.backend.line_integrals(self._handle, cams, phys, meshes=meshes) if meshes else \
            self.backend.line_integrals(self._handle, cams, phys)
        out = np.asarray(out, dtype=np.float32)
        return out[0] if single else out

    # -- provenance and files ---------------------------------------------------------------------

    def sidecar(self, camera: Camera, *, seed: int = 0, meshes: Any = None, spectrum: Any = None,
                physics: Any = None) -> dict[str, Any]:
        """JSON-friendly description of one image (what ``drrfarm render`` writes next to its PNG).

        The camera (K, R, t, P mapping world mm to pixels, ``pixel_center`` 0.0, source in world mm),
        ``world_from_patient`` (4, 4), the CT's source and sha256, materials, spectrum (kV, mm Al/Cu,
        mean energy in keV), physics options, backend, seed and the tools (``meshes`` of one image).
        """
        import drrfarm

        cams, _ = _cameras(camera)
        if len(cams) != 1:
            raise GeometryError("camera: the sidecar describes one image; give one Camera")
        _, _, seeds, spec, phys = self._setup(cams, seed, spectrum, physics)
        out: dict[str, Any] = {
            "drrfarm_version": drrfarm.__version__,
            "ct": self.volume.source if self.volume is not None else None,
            "ct_sha256": self.materials.volume_sha256,
            **cams[0].to_dict(),
            "patient_frame": "RAS",
            "world_from_patient": np.asarray(self.world_from_patient).tolist(),
            "materials": self.material_names,
            "spectrum": {"name": spec.name, "kvp": spec.kvp, "al_mm": spec.al_mm, "cu_mm": spec.cu_mm,
                         "mean_energy_kev": float(spec.mean_energy_kev)},
            "physics": phys.to_dict(),
            "backend": self.backend_name,
            "seed": seeds[0],
        }
        if meshes:
            if any(isinstance(m, (list, tuple)) for m in meshes):
                raise MeshError("meshes: the sidecar describes one image; give that image's list of meshes")
            out["tools"] = [m.describe() for m in meshes]
        return out

    def save(self, path: str | Path, image: np.ndarray, camera: Camera, *, seed: int = 0, meshes: Any = None,
             spectrum: Any = None, physics: Any = None, npy: bool = False) -> list[Path]:
        """Write one image as ``drrfarm render`` does: a 16-bit PNG (``value × image_scale`` = the float
        output), a JSON sidecar (:meth:`sidecar`, plus ``image_scale``) and with ``npy`` the float32 array.

        ``image``: (H, W), as :meth:`render` returned it for ``camera``; give the same ``seed``,
        ``meshes``, ``spectrum`` and ``physics`` as to that call (they are recorded, and the output
        transform sets the PNG's scale). Returns the paths written.
        """
        from drrfarm.drr import write_drr

        img = np.asarray(image, dtype=np.float32)
        cams, _ = _cameras(camera)
        if img.shape != (cams[0].height, cams[0].width):
            raise GeometryError(f"image: expected one ({cams[0].height}, {cams[0].width}) image for this camera, "
                                f"got shape {img.shape}")
        if not np.all(np.isfinite(img)):
            raise PhysicsError("image: contains NaN or infinite values")
        return write_drr(img, self.sidecar(camera, seed=seed, meshes=meshes, spectrum=spectrum, physics=physics),
                         path, npy=npy)
