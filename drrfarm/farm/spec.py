"""Sweep spec: a YAML file describing a DRR dataset, validated into frozen dataclasses.

A spec names the CT volumes, the pose distribution, the spectra and detector settings to sweep,
the image geometry, the output location and a global seed (see ``jobs/specs/example.yaml`` for
every key). :func:`load_spec` reads it with a safe YAML loader (duplicate keys, anchors and aliases
rejected; size, nesting depth and number of values capped before anything is built) and validates
every key; any problem raises :class:`~drrfarm.errors.SpecError` with one line naming the file, the
key path (``poses.carm.alpha_deg.range[1]``) and the reason, showing user values only in short.

Content hash
------------
:attr:`SweepSpec.sha256` is the sha256 of a canonical JSON (sorted keys, no whitespace, numbers
already normalised to float/int by validation) of :meth:`SweepSpec.content_dict`: everything that
determines *which images exist and what their pixels are* — volumes (paths as written, materials,
placement), poses, spectra, detector/noise, image, physics, output layout (formats, shard size,
image dtype) and the seed. It deliberately excludes *where and how* a sweep runs: ``output.url``
(so ``--output`` moves a dataset without changing its identity), ``tracking``, ``backend``,
``farm`` and ``name``. Shard ids and the sweep id are derived from this hash, so resume works
across output overrides and execution settings, and any change to the content starts a new sweep.
Volume paths are hashed as written (not resolved), so the same spec file gives the same hash from
any working directory (``ray job submit --working-dir`` included).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drrfarm.errors import SpecError
from drrfarm.farm import spec_scene
from drrfarm.farm.spec_scene import LabelsSpec, LandmarksSpec, ToolSpec
from drrfarm.farm.spec_yaml import parse_yaml, read_limited, yaml_problem
from drrfarm.farm.validator import SAMPLE_RE, URL_RE, AxisSpec, Validator, brief, join, key_text, one_line
from drrfarm.geometry import (
    CARM_ALPHA_RANGE_DEG,
    CARM_BETA_RANGE_DEG,
    CARM_SDD_MM,
    CARM_SID_MM,
    ORIENTATIONS,
)
from drrfarm.physics import (
    DETECTORS,
    MAX_SCATTER_BINS,
    MAX_SCATTER_PHOTONS,
    MAX_STEP_VOXELS,
    METHODS,
    OUTPUTS,
    SCATTER_MODES,
    Physics,
)
from drrfarm.render import BACKENDS
from drrfarm.sinks.parquet import IMAGE_DTYPES
from drrfarm.sinks.writer import FORMATS
from drrfarm.spectrum import ANODE_ANGLE_RANGE_DEG, KVP_RANGE, MONO_RANGE_KEV

SPEC_VERSION = 1

MAX_INFLIGHT = 64  # shards in flight per actor
INFLIGHT_REFERENCE_PIXELS = 64 * 1024 * 1024  # a shard of 64 images of 1024²: encoder threads + 2 in flight
GPU_SWITCH_INTERVAL_MS = 0.5  # GIL switch interval of GPU actors (Python's default: 5 ms)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# ----------------------------------------------------------------------------------------------
# dataclasses


@dataclass(frozen=True)
class MaterialsSpec:
    """How a volume is split into materials: HU thresholds, or a label map plus a label table.

    ``thresholds_hu``: increasing ``(upper_hu, material)`` pairs; voxels above the last one get
    ``above``. ``label_map``: path/URL of a label volume on the CT grid; ``table``: inline
    ``((label, material), ...)`` or the path of a ``label,material`` CSV.
    """

    method: str = "thresholds"  # "thresholds" | "labels"
    thresholds_hu: tuple[tuple[float, str], ...] = ((-800.0, "air"), (350.0, "soft_tissue"))
    above: str = "bone"
    label_map: str | None = None
    label_map_resolved: str | None = None
    table: tuple[tuple[int, str], ...] | None = None
    table_path: str | None = None
    table_path_resolved: str | None = None
    default: str | None = None  # material for labels missing from the table (None: error)

    def material_names(self) -> list[str]:
        """Every material name the spec mentions (for preflight checks)."""
        if self.method == "thresholds":
            return [m for _, m in self.thresholds_hu] + [self.above]
        return [m for _, m in (self.table or ())] + ([self.default] if self.default else [])

    def content(self) -> dict[str, Any]:
        if self.method == "thresholds":
            return {"method": "thresholds", "thresholds_hu": [list(t) for t in self.thresholds_hu],
                    "above": self.above}
        return {"method": "labels", "label_map": self.label_map,
                "table": [list(t) for t in self.table] if self.table is not None else None,
                "table_path": self.table_path, "default": self.default}


@dataclass(frozen=True)
class PlacementSpec:
    """Patient placement: orientation on the table (HFS, FFS, HFP, FFP) and the offset (world mm)
    of the CT's centre from the isocentre (``world_from_patient_default(..., isocentre_world_mm=offset)``)."""

    orientation: str = "HFS"
    offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class VolumeSpec:
    """One CT volume of the sweep.

    ``path`` is as written in the spec (hashed); ``resolved`` is what to open: an absolute local
    path, an fsspec URL (``s3://...``) or ``sample:<name>`` (a :mod:`drrfarm.samples` dataset).
    ``relpath`` is ``resolved`` relative to the driver's working directory (or None), which a
    worker tries when ``resolved`` does not exist on its node (Ray job ``working_dir`` uploads).
    """

    id: str
    path: str
    resolved: str
    relpath: str | None = None
    materials: MaterialsSpec = field(default_factory=MaterialsSpec)
    placement: PlacementSpec = field(default_factory=PlacementSpec)

    def content(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "materials": self.materials.content(),
                "placement": {"orientation": self.placement.orientation,
                              "offset_mm": list(self.placement.offset_mm)}}


CARM_AXES = ("alpha_deg", "beta_deg", "gamma_deg", "sdd_mm", "sid_mm")


@dataclass(frozen=True)
class CArmPoses:
    """C-arm pose distribution: the grid is the product of all fixed-value axes; at each grid
    point ``samples`` poses are drawn from the random axes and the isocentre jitter."""

    alpha_deg: AxisSpec = AxisSpec("values", (0.0,))
    beta_deg: AxisSpec = AxisSpec("values", (0.0,))
    gamma_deg: AxisSpec = AxisSpec("values", (0.0,))
    sdd_mm: AxisSpec = AxisSpec("values", (CARM_SDD_MM,))
    sid_mm: AxisSpec = AxisSpec("values", (CARM_SID_MM,))
    isocentre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    iso_jitter_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # half-width of a uniform offset per axis
    samples: int = 1
    enforce_limits: bool = True  # alpha within [-40, 110], beta within [-225, 225] (the C-arm's ranges)

    def axis(self, name: str) -> AxisSpec:
        return getattr(self, name)

    @property
    def is_random(self) -> bool:
        return any(self.axis(a).is_random for a in CARM_AXES) or any(s > 0 for s in self.iso_jitter_mm)

    def content(self) -> dict[str, Any]:
        d: dict[str, Any] = {a: self.axis(a).content() for a in CARM_AXES}
        d.update(isocentre_mm=list(self.isocentre_mm), iso_jitter_mm=list(self.iso_jitter_mm),
                 samples=self.samples, enforce_limits=self.enforce_limits)
        return d


@dataclass(frozen=True)
class ExplicitPoses:
    """An explicit list of 3x4 projection matrices (world mm -> pixel, pixel centres at integer
    coordinates) for detectors of ``image.size`` and ``image.pixel_mm``; each flattened row-major."""

    matrices: tuple[tuple[float, ...], ...]
    source: str | None = None  # file the matrices came from, if any (informational)

    def content(self) -> dict[str, Any]:
        return {"matrices": [list(m) for m in self.matrices]}


@dataclass(frozen=True)
class PosesSpec:
    """Exactly one of ``carm`` / ``explicit``; ``seed`` seeds random pose draws (None: derived
    from the global seed)."""

    carm: CArmPoses | None = None
    explicit: ExplicitPoses | None = None
    seed: int | None = None

    def content(self) -> dict[str, Any]:
        return {"carm": self.carm.content() if self.carm else None,
                "explicit": self.explicit.content() if self.explicit else None,
                "seed": self.seed}


@dataclass(frozen=True)
class SpectrumItem:
    """One spectrum setting. ``kind``: "preset" (``name``), "tube" (``kvp``/``al_mm``/``cu_mm``/
    ``anode_angle_deg``) or "mono" (``energy_kev``). ``key_path`` locates it in the spec."""

    kind: str
    name: str
    kvp: float | None = None
    al_mm: float = 0.0
    cu_mm: float = 0.0
    anode_angle_deg: float = 12.0
    energy_kev: float | None = None
    key_path: str = "spectra"

    def request(self) -> str | dict[str, float]:
        """The argument for :func:`drrfarm.spectrum.get_spectrum`."""
        if self.kind == "preset":
            return self.name
        if self.kind == "mono":
            return f"mono:{self.energy_kev:g}"
        return {"kvp": float(self.kvp or 0.0), "al_mm": self.al_mm, "cu_mm": self.cu_mm,
                "anode_angle_deg": self.anode_angle_deg}

    def content(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("key_path")
        return d


@dataclass(frozen=True)
class SpectraSpec:
    """Spectra to sweep, in order: presets, then the tube product (kVp x Al x Cu), then mono
    energies. ``n_bins`` (optional) rebins each spectrum to that many energy bins (speed)."""

    items: tuple[SpectrumItem, ...]
    n_bins: int | None = None

    def content(self) -> dict[str, Any]:
        return {"items": [s.content() for s in self.items], "n_bins": self.n_bins}


@dataclass(frozen=True)
class DetectorSpec:
    """Detector and noise: ``photons`` is the list of photon counts per pixel (unattenuated) to
    sweep; ``None`` in it means noiseless. Defaults: those of :class:`~drrfarm.physics.Physics`."""

    model: str = Physics.detector
    output: str = Physics.output
    photons: tuple[int | None, ...] = (None,)
    electronic_noise: float = Physics.electronic_noise
    solid_angle: bool = Physics.solid_angle
    csi_thickness_mm: float = Physics.csi_thickness_mm


@dataclass(frozen=True)
class ImageSpec:
    """Detector size in pixels and pixel pitch in mm."""

    height: int
    width: int
    pixel_mm: float


@dataclass(frozen=True)
class PhysicsSpec:
    """Ray-marching options (defaults: those of :class:`~drrfarm.physics.Physics`)."""

    step_voxels: float = Physics.step_voxels
    method: str = Physics.method


@dataclass(frozen=True)
class ScatterSpec:
    """X-ray scatter added to every image (:mod:`drrfarm.scatter`)."""

    mode: str = Physics.scatter  # one of drrfarm.physics.SCATTER_MODES
    photons: int | None = None  # Monte Carlo histories per image; None: the mode's default for the backend
    bins: int = Physics.scatter_bins  # longest side of the Monte Carlo's tally grid


@dataclass(frozen=True)
class OutputSpec:
    """Where and how shards are written. ``url``: local path (resolved against the current
    directory) or fsspec URL."""

    url: str
    formats: tuple[str, ...] = ("parquet",)
    shard_size: int = 64
    image_dtype: str = "uint16"


@dataclass(frozen=True)
class TrackingSpec:
    """MLflow provenance. ``tracking_uri`` None: ``MLFLOW_TRACKING_URI`` or a local store under
    the output folder (decided by :mod:`drrfarm.tracking`)."""

    enabled: bool = True
    experiment: str = "drrfarm"
    tracking_uri: str | None = None


@dataclass(frozen=True)
class FarmSpec:
    """Execution settings (not part of the content hash). ``actors`` None: one per GPU, or one per
    ``cpus_per_actor`` CPUs without GPUs. ``cpus_per_gpu``: CPUs a GPU actor reserves and encodes with
    (None: its node's CPUs divided by its GPUs). ``inflight_per_actor``: shards an actor works on at once
    (None: 2 on CPU actors -- one rendering, one being written; on GPU actors its encoder threads + 2, so
    the GPU always has a shard queued while the others are encoded and written, times up to 4 for shards
    smaller than 64 images of 1024² -- see :meth:`inflight`). ``switch_interval_ms``: how often the actor's
    Python interpreter hands the GIL between threads (None: 0.5 ms on GPU actors, whose dozens of threads
    each hold it briefly between GIL-free zstd, hashing and writes; Python's 5 ms on CPU actors)."""

    actors: int | None = None
    cpus_per_actor: float = 1.0
    max_shard_retries: int = 3
    inflight_per_actor: int | None = None
    max_actor_restarts: int = 3
    cpus_per_gpu: float | None = None
    shard_timeout_s: float | None = None  # None: derived from the shards measured (drrfarm.farm.driver)
    shard_timeout_floor_s: float = 300.0  # the derived deadline never goes below this
    max_actors: int | None = None  # GPU farms without ``actors``: at most this many (None: the shards left)
    switch_interval_ms: float | None = None

    def inflight(self, use_gpu: bool, encode_threads: int, shard_pixels: int | None = None) -> int:
        """Shards in flight per actor: the setting, or its default (see the class docstring).

        ``shard_pixels``: pixels of a full shard. A GPU actor keeps ``encode_threads + 2`` shards of 64
        images of 1024² in flight; smaller shards cost as much Python per shard for less work, so it keeps
        more of them, by the square root of the size ratio, at most 4 times as many (e.g. 36 of 64 images
        of 512² with 16 encoder threads: measured on an H200, RESULTS.md)."""
        if self.inflight_per_actor is not None:
            return self.inflight_per_actor
        if not use_gpu:
            return 2
        scale = 1.0 if not shard_pixels else min(4.0, max(1.0, math.sqrt(INFLIGHT_REFERENCE_PIXELS / shard_pixels)))
        return min(MAX_INFLIGHT, max(2, round((int(encode_threads) + 2) * scale)))

    def switch_interval_s(self, use_gpu: bool) -> float | None:
        """The actor's GIL switch interval in seconds (None: leave Python's)."""
        if self.switch_interval_ms is not None:
            return self.switch_interval_ms / 1000.0
        return GPU_SWITCH_INTERVAL_MS / 1000.0 if use_gpu else None


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep spec. Build with :func:`load_spec` / :func:`parse_spec`."""

    volumes: tuple[VolumeSpec, ...]
    poses: PosesSpec
    spectra: SpectraSpec
    detector: DetectorSpec
    image: ImageSpec
    physics: PhysicsSpec
    output: OutputSpec
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    farm: FarmSpec = field(default_factory=FarmSpec)
    backend: str = "auto"
    seed: int = 0
    name: str | None = None
    tools: tuple[ToolSpec, ...] = ()  # drrfarm.farm.spec_scene
    labels: LabelsSpec | None = None
    landmarks: LandmarksSpec | None = None
    scatter: ScatterSpec | None = None
    source: str = "<dict>"  # the file it was read from
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    # -- identity ------------------------------------------------------------------------------
    def content_dict(self) -> dict[str, Any]:
        """The content that determines the images (what :attr:`sha256` hashes)."""
        return {
            "version": SPEC_VERSION,
            "volumes": [v.content() for v in self.volumes],
            "poses": self.poses.content(),
            "spectra": self.spectra.content(),
            "detector": dataclasses.asdict(self.detector),
            "image": dataclasses.asdict(self.image),
            "physics": dataclasses.asdict(self.physics),
            "output": {"formats": list(self.output.formats), "shard_size": self.output.shard_size,
                       "image_dtype": self.output.image_dtype},
            "seed": self.seed,
            # sections added later enter the hash only when present (older specs keep their hash)
            **({"tools": [t.content() for t in self.tools]} if self.tools else {}),
            **({"labels": self.labels.content()} if self.labels is not None else {}),
            **({"landmarks": self.landmarks.content()} if self.landmarks is not None else {}),
            **({"scatter": dataclasses.asdict(self.scatter)} if self.scatter is not None else {}),
        }

    @property
    def has_annotations(self) -> bool:
        """True when images carry masks or landmarks (``labels`` / ``landmarks`` sections)."""
        return self.labels is not None or self.landmarks is not None

    @property
    def sha256(self) -> str:
        """sha256 (hex) of the canonical JSON of :meth:`content_dict`."""
        return hashlib.sha256(canonical_json(self.content_dict()).encode("utf-8")).hexdigest()

    @property
    def sweep_id(self) -> str:
        """Short stable id of the sweep: the first 12 hex digits of :attr:`sha256`."""
        return self.sha256[:12]

    def to_dict(self) -> dict[str, Any]:
        """Everything (content plus output URL, tracking, backend, farm, name), JSON-able."""
        d = self.content_dict()
        d["output"]["url"] = self.output.url
        d["tracking"] = dataclasses.asdict(self.tracking)
        d["farm"] = dataclasses.asdict(self.farm)
        d["backend"] = self.backend
        d["name"] = self.name
        d["source"] = self.source
        return d

    def with_output(self, url: str | None) -> SweepSpec:
        """A copy writing to ``url`` instead (same content hash). None: unchanged."""
        if url is None:
            return self
        return dataclasses.replace(self, output=dataclasses.replace(self.output, url=_resolve_output(url)))

    def with_farm(self, **changes: Any) -> SweepSpec:
        """A copy with execution settings changed (same content hash)."""
        return dataclasses.replace(self, farm=dataclasses.replace(self.farm, **changes))


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, compact separators, NaN/inf refused."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


# ----------------------------------------------------------------------------------------------
# reading


def load_spec(path: str | os.PathLike[str], output: str | None = None) -> SweepSpec:
    """Read and validate a sweep spec YAML file; ``output`` overrides ``output.url``."""
    import yaml

    p = Path(path)
    try:
        text = read_limited(p)
    except FileNotFoundError:
        raise SpecError(f"{p}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{p}: cannot read spec file: {one_line(str(exc))}") from None
    except ValueError as exc:
        raise SpecError(f"{p}: spec {exc}; give long lists (such as pose matrices) as a file") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{p}: invalid YAML{yaml_problem(exc)}") from None
    return parse_spec(data, source=str(p), base_dir=p.resolve().parent, output=output)


def parse_spec(data: Any, source: str = "<dict>", base_dir: str | os.PathLike[str] | None = None,
               output: str | None = None) -> SweepSpec:
    """Validate an already-parsed mapping. Relative volume paths resolve against ``base_dir``
    (default: the current directory); the output URL against the current directory."""
    v = SpecValidator(source, Path(base_dir) if base_dir is not None else Path.cwd())
    spec = v.spec(data)
    return spec.with_output(output)


# ----------------------------------------------------------------------------------------------
# validation


def _resolve_output(url: str) -> str:
    if URL_RE.match(url):
        if url.startswith("file://"):
            return "file://" + os.path.abspath(url[len("file://"):])
        return url
    return os.path.abspath(os.path.expanduser(url))


class SpecValidator(Validator):
    """The sweep spec's sections on top of the :class:`~drrfarm.farm.validator.Validator` primitives."""

    # -- sections ------------------------------------------------------------------------------
    def spec(self, data: Any) -> SweepSpec:
        if data is None:
            self.fail("", "the spec is empty")
        top = self.mapping(
            data, "",
            ["version", "name", "seed", "volumes", "poses", "spectra", "detector", "image", "physics",
             "backend", "output", "tracking", "farm", "tools", "labels", "landmarks", "scatter"],
            required=["volumes", "poses", "spectra", "image", "output"])
        if "version" in top:
            version = self.integer(top["version"], "version")
            if version != SPEC_VERSION:
                self.fail("version", f"unsupported spec version {version} (this drrfarm reads {SPEC_VERSION})")
        name = self.string(top["name"], "name") if top.get("name") is not None else None
        seed = self.integer(top.get("seed", 0), "seed", lo=0, hi=2**63 - 1)
        volumes = self.volumes(top["volumes"], "volumes")
        image = self.image(top["image"], "image")
        poses = self.poses(top["poses"], "poses")
        spectra = self.spectra(top["spectra"], "spectra")
        detector = self.detector(top.get("detector", {}), "detector")
        physics = self.physics(top.get("physics", {}), "physics")
        backend = self.choice(top.get("backend", "auto"), "backend", BACKENDS)
        output = self.output(top["output"], "output")
        tracking = self.tracking(top.get("tracking", {}), "tracking")
        farm = self.farm(top.get("farm", {}), "farm")
        tools = spec_scene.tools(self, top["tools"], "tools") if "tools" in top else ()
        labels = spec_scene.labels(self, top["labels"], "labels", len(tools)) if "labels" in top else None
        landmarks = spec_scene.landmarks(self, top["landmarks"], "landmarks", len(tools)) \
            if "landmarks" in top else None
        if labels is not None and labels.label_map and spec_scene.VOLUME_ID_FIELD not in labels.label_map \
                and len({v.path for v in volumes}) > 1:
            self.fail("labels.label_map", f"one label map cannot describe {len(volumes)} CTs; write "
                                          "{volume_id} in the path to name one per volume")
        scatter = self.scatter(top["scatter"], "scatter") if "scatter" in top else None
        return SweepSpec(volumes=volumes, poses=poses, spectra=spectra, detector=detector, image=image,
                         physics=physics, output=output, tracking=tracking, farm=farm, backend=backend,
                         seed=seed, name=name, tools=tools, labels=labels, landmarks=landmarks,
                         scatter=scatter, source=self.source, raw=data)

    def volumes(self, value: Any, path: str) -> tuple[VolumeSpec, ...]:
        items = self.seq(value, path)
        out: list[VolumeSpec] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            p = join(path, i)
            if isinstance(item, str):
                item = {"path": item}
            m = self.mapping(item, p, ["id", "path", "materials", "placement"], required=["path"])
            raw_path = self.string(m["path"], join(p, "path"))
            if raw_path.startswith("sample:") and not SAMPLE_RE.match(raw_path):
                self.fail(join(p, "path"), f"bad sample name {brief(raw_path)} (expected e.g. sample:chest_ct)")
            resolved, rel = self.resolve_path(raw_path)
            vid = self.string(m["id"], join(p, "id")) if "id" in m else _default_volume_id(raw_path)
            if not _ID_RE.match(vid):
                self.fail(join(p, "id"), f"volume id {brief(vid)} must be 1-64 characters of letters, digits, "
                                          "'_', '.', '-' (starting with a letter or digit)")
            if vid in seen:
                self.fail(join(p, "id"), f"duplicate volume id {brief(vid)} (also volumes[{seen[vid]}]); "
                                          "give each volume a unique id")
            seen[vid] = i
            materials = self.materials(m.get("materials", {}), join(p, "materials"))
            placement = self.placement(m.get("placement", {}), join(p, "placement"))
            out.append(VolumeSpec(id=vid, path=raw_path, resolved=resolved, relpath=rel,
                                  materials=materials, placement=placement))
        return tuple(out)

    def materials(self, value: Any, path: str) -> MaterialsSpec:
        m = self.mapping(value, path, ["thresholds_hu", "above", "label_map", "table", "default"])
        has_thr = "thresholds_hu" in m or "above" in m
        has_lab = "label_map" in m or "table" in m or "default" in m
        if has_thr and has_lab:
            self.fail(path, "use either thresholds_hu/above or label_map/table, not both")
        if has_lab:
            if "label_map" not in m:
                self.fail(join(path, "label_map"), "required with 'table'")
            if "table" not in m:
                self.fail(join(path, "table"), "required with 'label_map'")
            label_map_raw = self.string(m["label_map"], join(path, "label_map"))
            label_resolved, _ = self.resolve_path(label_map_raw)
            default = self.string(m["default"], join(path, "default")) if m.get("default") is not None else None
            tpath = join(path, "table")
            table_val = m["table"]
            if isinstance(table_val, str):
                resolved, _ = self.resolve_path(table_val)
                return MaterialsSpec(method="labels", label_map=label_map_raw,
                                     label_map_resolved=label_resolved, table=None,
                                     table_path=table_val, table_path_resolved=resolved, default=default)
            t = self.mapping(table_val, tpath, []) if not isinstance(table_val, dict) else table_val
            if not t:
                self.fail(tpath, "must map at least one label to a material")
            rows: list[tuple[int, str]] = []
            for key, mat in t.items():
                kp = join(tpath, key_text(key))
                if isinstance(key, str) and re.fullmatch(r"-?\d+", key.strip()):
                    key = int(key)
                label = self.integer(key, kp, lo=0)
                rows.append((label, self.string(mat, kp)))
            rows.sort()
            return MaterialsSpec(method="labels", label_map=label_map_raw, label_map_resolved=label_resolved,
                                 table=tuple(rows), default=default)
        thresholds = MaterialsSpec().thresholds_hu
        if "thresholds_hu" in m:
            tp = join(path, "thresholds_hu")
            items = self.seq(m["thresholds_hu"], tp)
            parsed: list[tuple[float, str]] = []
            for i, item in enumerate(items):
                ip = join(tp, i)
                pair = self.seq(item, ip, min_len=2, max_len=2)
                hu = self.number(pair[0], join(ip, 0), lo=-2000.0, hi=40000.0)
                name = self.string(pair[1], join(ip, 1))
                if parsed and hu <= parsed[-1][0]:
                    self.fail(join(ip, 0), f"thresholds must increase: {hu:g} <= previous {parsed[-1][0]:g}")
                parsed.append((hu, name))
            thresholds = tuple(parsed)
        above = self.string(m["above"], join(path, "above")) if "above" in m else MaterialsSpec().above
        return MaterialsSpec(method="thresholds", thresholds_hu=thresholds, above=above)

    def placement(self, value: Any, path: str) -> PlacementSpec:
        m = self.mapping(value, path, ["orientation", "offset_mm"])
        orientation = self.choice(m.get("orientation", "HFS"), join(path, "orientation"), ORIENTATIONS)
        offset = self.vec3(m.get("offset_mm", [0.0, 0.0, 0.0]), join(path, "offset_mm"))
        return PlacementSpec(orientation=orientation, offset_mm=offset)


    def poses(self, value: Any, path: str) -> PosesSpec:
        m = self.mapping(value, path, ["carm", "explicit", "seed"])
        if ("carm" in m) == ("explicit" in m):
            self.fail(path, "give exactly one of 'carm' (C-arm pose distribution) or 'explicit' (3x4 matrices)")
        seed = self.integer(m["seed"], join(path, "seed"), lo=0, hi=2**63 - 1) if "seed" in m else None
        if "carm" in m:
            return PosesSpec(carm=self.carm(m["carm"], join(path, "carm")), seed=seed)
        return PosesSpec(explicit=self.explicit(m["explicit"], join(path, "explicit")), seed=seed)

    def carm(self, value: Any, path: str) -> CArmPoses:
        m = self.mapping(value, path, [*CARM_AXES, "isocentre_mm", "iso_jitter_mm", "samples", "enforce_limits"])
        d = CArmPoses()
        axes: dict[str, AxisSpec] = {}
        for name in CARM_AXES:
            if name in m:
                positive = name in ("sdd_mm", "sid_mm")
                axes[name] = self.axis(m[name], join(path, name), lo=0.0 if positive else None,
                                       lo_open=positive)
            else:
                axes[name] = d.axis(name)
        iso = self.vec3(m.get("isocentre_mm", [0.0, 0.0, 0.0]), join(path, "isocentre_mm"))
        jitter = self.vec3(m.get("iso_jitter_mm", 0.0), join(path, "iso_jitter_mm"), lo=0.0)
        samples = self.integer(m.get("samples", 1), join(path, "samples"), lo=1, hi=10_000_000)
        limits = self.boolean(m.get("enforce_limits", True), join(path, "enforce_limits"))
        carm = CArmPoses(**axes, isocentre_mm=iso, iso_jitter_mm=jitter, samples=samples, enforce_limits=limits)
        if limits:
            for name, (lo, hi) in (("alpha_deg", CARM_ALPHA_RANGE_DEG), ("beta_deg", CARM_BETA_RANGE_DEG)):
                a = axes[name]
                amin, amax = _axis_min(a), _axis_max(a)
                if a.kind == "normal" and a.clip is None:
                    self.fail(join(join(path, name), "normal"),
                              f"add clip: [lo, hi] within the C-arm range [{lo:g}, {hi:g}] "
                              "(or set enforce_limits: false)")
                if amin is not None and amin < lo:
                    self.fail(join(path, name), f"{amin:g} is outside the C-arm range [{lo:g}, {hi:g}] "
                                                "(set enforce_limits: false to allow it)")
                if amax is not None and amax > hi:
                    self.fail(join(path, name), f"{amax:g} is outside the C-arm range [{lo:g}, {hi:g}] "
                                                "(set enforce_limits: false to allow it)")
        if samples > 1 and not carm.is_random:
            self.fail(join(path, "samples"), "samples > 1 needs a random axis (uniform/normal) or "
                                             "iso_jitter_mm; otherwise every sample is the same pose")
        # sid < sdd must hold for every pose; check bounds where they are known up front
        sdd_lo = _axis_min(axes["sdd_mm"])
        sid_hi = _axis_max(axes["sid_mm"])
        if sdd_lo is not None and sid_hi is not None and sid_hi >= sdd_lo:
            self.fail(join(path, "sid_mm"), f"source-isocentre distance (up to {sid_hi:g} mm) must be below the "
                                            f"source-detector distance (from {sdd_lo:g} mm)")
        return carm

    def explicit(self, value: Any, path: str) -> ExplicitPoses:
        if isinstance(value, list):
            value = {"matrices": value}
        m = self.mapping(value, path, ["matrices", "file"])
        if ("matrices" in m) == ("file" in m):
            self.fail(path, "give exactly one of 'matrices' (inline list) or 'file' (.npy/.json/.yaml)")
        source = None
        if "file" in m:
            fp = join(path, "file")
            fname = self.string(m["file"], fp)
            resolved, _ = self.resolve_path(fname)
            raw = _load_matrix_file(resolved, lambda reason: self.fail(fp, reason))
            mp, source = fp, fname
        else:
            raw, mp = m["matrices"], join(path, "matrices")
        items = self.seq(raw, mp)
        mats: list[tuple[float, ...]] = []
        for i, item in enumerate(items):
            ip = join(mp, i)
            flat = self.matrix(item, ip, 3, 4)
            # M = P[:, :3] must be invertible for a pinhole camera (determinant of M scaled to entries <= 1,
            # so that huge entries cannot overflow)
            scale = max(abs(x) for x in (flat[0], flat[1], flat[2], flat[4], flat[5], flat[6], flat[8], flat[9],
                                         flat[10])) or 1.0
            a = [x / scale for x in flat]
            det = (a[0] * (a[5] * a[10] - a[6] * a[9]) - a[1] * (a[4] * a[10] - a[6] * a[8])
                   + a[2] * (a[4] * a[9] - a[5] * a[8]))
            if abs(det) <= 1e-12:
                self.fail(ip, "the left 3x3 block of P is singular; not a pinhole projection")
            mats.append(tuple(flat))
        return ExplicitPoses(matrices=tuple(mats), source=source)

    def spectra(self, value: Any, path: str) -> SpectraSpec:
        if isinstance(value, list):
            value = {"presets": value}
        m = self.mapping(value, path, ["presets", "tube", "mono_kev", "n_bins"])
        items: list[SpectrumItem] = []
        if "presets" in m:
            pp = join(path, "presets")
            for i, name in enumerate(self.seq(self.as_list(m["presets"]), pp)):
                s = self.string(name, join(pp, i))
                items.append(SpectrumItem("preset", s, key_path=join(pp, i)))
        if "tube" in m:
            tp = join(path, "tube")
            t = self.mapping(m["tube"], tp, ["kvp", "al_mm", "cu_mm", "anode_angle_deg"], required=["kvp"])
            kvps = [self.number(x, join(join(tp, "kvp"), i), lo=KVP_RANGE[0], hi=KVP_RANGE[1])
                    for i, x in enumerate(self.seq(self.as_list(t["kvp"]), join(tp, "kvp")))]
            als = [self.number(x, join(join(tp, "al_mm"), i), lo=0.0, hi=100.0)
                   for i, x in enumerate(self.seq(self.as_list(t.get("al_mm", 2.5)), join(tp, "al_mm")))]
            cus = [self.number(x, join(join(tp, "cu_mm"), i), lo=0.0, hi=20.0)
                   for i, x in enumerate(self.seq(self.as_list(t.get("cu_mm", 0.0)), join(tp, "cu_mm")))]
            anode = self.number(t.get("anode_angle_deg", 12.0), join(tp, "anode_angle_deg"),
                                lo=ANODE_ANGLE_RANGE_DEG[0], hi=ANODE_ANGLE_RANGE_DEG[1],
                                lo_open=True, hi_open=True)
            for field_name, vals in (("kvp", kvps), ("al_mm", als), ("cu_mm", cus)):
                if len(set(vals)) != len(vals):
                    self.fail(join(tp, field_name), "values must be distinct")
            for kvp in kvps:
                for al in als:
                    for cu in cus:
                        nm = f"{kvp:g}kV_Al{al:g}_Cu{cu:g}"
                        items.append(SpectrumItem("tube", nm, kvp=kvp, al_mm=al, cu_mm=cu, anode_angle_deg=anode,
                                                  key_path=tp))
        if "mono_kev" in m:
            mp = join(path, "mono_kev")
            for i, e in enumerate(self.seq(self.as_list(m["mono_kev"]), mp)):
                ev = self.number(e, join(mp, i), lo=MONO_RANGE_KEV[0], hi=MONO_RANGE_KEV[1])
                items.append(SpectrumItem("mono", f"mono:{ev:g}", energy_kev=ev, key_path=join(mp, i)))
        if not items:
            self.fail(path, "name at least one spectrum (presets, tube or mono_kev)")
        names = [s.name for s in items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            self.fail(path, f"spectrum listed twice: {', '.join(dup)}")
        n_bins = self.integer(m["n_bins"], join(path, "n_bins"), lo=1, hi=10_000) if "n_bins" in m else None
        return SpectraSpec(items=tuple(items), n_bins=n_bins)

    def detector(self, value: Any, path: str) -> DetectorSpec:
        m = self.mapping(value, path, ["model", "output", "photons", "electronic_noise", "solid_angle",
                                       "csi_thickness_mm"])
        d = DetectorSpec()
        model = self.choice(m.get("model", d.model), join(path, "model"), DETECTORS)
        output = self.choice(m.get("output", d.output), join(path, "output"), OUTPUTS)
        pp = join(path, "photons")
        photons: list[int | None] = []
        for i, x in enumerate(self.seq(self.as_list(m.get("photons", None)), pp)):
            ip = join(pp, i)
            photons.append(None if x is None else self.integer(x, ip, lo=1, hi=10**15))
        if len(set(photons)) != len(photons):
            self.fail(pp, "values must be distinct")
        noise = self.number(m.get("electronic_noise", 0.0), join(path, "electronic_noise"), lo=0.0)
        solid = self.boolean(m.get("solid_angle", d.solid_angle), join(path, "solid_angle"))
        csi = self.number(m.get("csi_thickness_mm", d.csi_thickness_mm), join(path, "csi_thickness_mm"),
                          lo=0.0, lo_open=True, hi=100.0)
        if "csi_thickness_mm" in m and model != "csi":
            self.fail(join(path, "csi_thickness_mm"), f"only used with model: csi (model is {brief(model)})")
        if noise > 0 and all(p is None for p in photons):
            self.fail(join(path, "electronic_noise"), "electronic noise needs a photon count (photons)")
        return DetectorSpec(model=model, output=output, photons=tuple(photons), electronic_noise=noise,
                            solid_angle=solid, csi_thickness_mm=csi)

    def image(self, value: Any, path: str) -> ImageSpec:
        m = self.mapping(value, path, ["size", "pixel_mm"], required=["size", "pixel_mm"])
        sp = join(path, "size")
        if isinstance(m["size"], list):
            pair = self.seq(m["size"], sp, min_len=2, max_len=2)
            h = self.integer(pair[0], join(sp, 0), lo=1, hi=16384)
            w = self.integer(pair[1], join(sp, 1), lo=1, hi=16384)
        else:
            h = w = self.integer(m["size"], sp, lo=1, hi=16384)
        px = self.number(m["pixel_mm"], join(path, "pixel_mm"), lo=0.0, hi=100.0, lo_open=True)
        return ImageSpec(height=h, width=w, pixel_mm=px)

    def physics(self, value: Any, path: str) -> PhysicsSpec:
        m = self.mapping(value, path, ["step_voxels", "method"])
        d = PhysicsSpec()
        step = self.number(m.get("step_voxels", d.step_voxels), join(path, "step_voxels"), lo=0.0, lo_open=True,
                           hi=MAX_STEP_VOXELS)
        method = self.choice(m.get("method", d.method), join(path, "method"), METHODS)
        return PhysicsSpec(step_voxels=step, method=method)

    def scatter(self, value: Any, path: str) -> ScatterSpec:
        if isinstance(value, str):
            value = {"mode": value}
        m = self.mapping(value, path, ["mode", "photons", "bins"])
        d = ScatterSpec()
        mode = self.choice(m.get("mode", d.mode), join(path, "mode"), SCATTER_MODES)
        photons = m.get("photons")
        if photons is not None:
            photons = self.integer(photons, join(path, "photons"), lo=1, hi=MAX_SCATTER_PHOTONS)
        bins = self.integer(m.get("bins", d.bins), join(path, "bins"), lo=1, hi=MAX_SCATTER_BINS)
        return ScatterSpec(mode=mode, photons=photons, bins=bins)

    def output(self, value: Any, path: str) -> OutputSpec:
        if isinstance(value, str):
            value = {"url": value}
        m = self.mapping(value, path, ["url", "formats", "shard_size", "image_dtype"], required=["url"])
        url = _resolve_output(self.string(m["url"], join(path, "url")))
        fp = join(path, "formats")
        formats = [self.choice(f, join(fp, i), FORMATS)
                   for i, f in enumerate(self.seq(self.as_list(m.get("formats", ["parquet"])), fp))]
        if len(set(formats)) != len(formats):
            self.fail(fp, "formats listed twice")
        shard = self.integer(m.get("shard_size", 64), join(path, "shard_size"), lo=1, hi=100_000)
        dtype = self.choice(m.get("image_dtype", "uint16"), join(path, "image_dtype"), tuple(IMAGE_DTYPES))
        return OutputSpec(url=url, formats=tuple(formats), shard_size=shard, image_dtype=dtype)

    def tracking(self, value: Any, path: str) -> TrackingSpec:
        if isinstance(value, bool):
            value = {"enabled": value}
        m = self.mapping(value, path, ["enabled", "experiment", "tracking_uri"])
        enabled = self.boolean(m.get("enabled", True), join(path, "enabled"))
        experiment = self.string(m.get("experiment", "drrfarm"), join(path, "experiment"))
        uri = m.get("tracking_uri")
        uri = self.string(uri, join(path, "tracking_uri")) if uri is not None else None
        return TrackingSpec(enabled=enabled, experiment=experiment, tracking_uri=uri)

    def farm(self, value: Any, path: str) -> FarmSpec:
        m = self.mapping(value, path, ["actors", "cpus_per_actor", "max_shard_retries", "inflight_per_actor",
                                       "max_actor_restarts", "cpus_per_gpu", "shard_timeout_s",
                                       "shard_timeout_floor_s", "max_actors", "switch_interval_ms"])
        d = FarmSpec()
        actors = self._optional_count(m.get("actors"), join(path, "actors"))
        cpus = self.number(m.get("cpus_per_actor", d.cpus_per_actor), join(path, "cpus_per_actor"), lo=0.0,
                           lo_open=True, hi=1024)
        retries = self.integer(m.get("max_shard_retries", d.max_shard_retries), join(path, "max_shard_retries"),
                               lo=0, hi=100)
        inflight = m.get("inflight_per_actor")
        if inflight is not None:
            inflight = self.integer(inflight, join(path, "inflight_per_actor"), lo=1, hi=MAX_INFLIGHT)
        restarts = self.integer(m.get("max_actor_restarts", d.max_actor_restarts),
                                join(path, "max_actor_restarts"), lo=-1, hi=1000)
        per_gpu = m.get("cpus_per_gpu")
        if per_gpu is not None:
            per_gpu = self.number(per_gpu, join(path, "cpus_per_gpu"), lo=0.0, lo_open=True, hi=1024)
        timeout = m.get("shard_timeout_s")
        if timeout is not None:
            timeout = self.number(timeout, join(path, "shard_timeout_s"), lo=0.0, lo_open=True, hi=7 * 86400.0)
        floor = self.number(m.get("shard_timeout_floor_s", d.shard_timeout_floor_s),
                            join(path, "shard_timeout_floor_s"), lo=0.0, lo_open=True, hi=7 * 86400.0)
        switch = m.get("switch_interval_ms")
        if switch is not None:
            switch = self.number(switch, join(path, "switch_interval_ms"), lo=0.01, hi=100.0)
        return FarmSpec(actors=actors, cpus_per_actor=cpus, max_shard_retries=retries,
                        inflight_per_actor=inflight, max_actor_restarts=restarts, cpus_per_gpu=per_gpu,
                        shard_timeout_s=timeout, shard_timeout_floor_s=floor,
                        max_actors=self._optional_count(m.get("max_actors"), join(path, "max_actors")),
                        switch_interval_ms=switch)

    def _optional_count(self, value: Any, path: str) -> int | None:
        return None if value is None else self.integer(value, path, lo=1, hi=100_000)


def _axis_min(a: AxisSpec) -> float | None:
    if a.kind == "values":
        return min(a.values)
    if a.kind == "uniform":
        return a.low
    return a.clip[0] if a.clip else None


def _axis_max(a: AxisSpec) -> float | None:
    if a.kind == "values":
        return max(a.values)
    if a.kind == "uniform":
        return a.high
    return a.clip[1] if a.clip else None


def _default_volume_id(path: str) -> str:
    m = SAMPLE_RE.match(path)
    if m:
        return m.group(1)
    name = path.rstrip("/").split("/")[-1] or "volume"
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".gz"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("_.-") or "volume"
    return name[:64]


def _load_matrix_file(path: str, fail: Any) -> Any:
    """Matrices from .npy ((N,3,4)), .json or .yaml (a list of 3x4 nested lists)."""
    if URL_RE.match(path):
        fail("matrix files must be local paths")
    p = Path(path)
    if not p.is_file():
        fail(f"file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            import numpy as np

            arr = np.load(p, allow_pickle=False)
            if arr.ndim != 3 or arr.shape[1:] != (3, 4):
                fail(f"{p.name}: expected an array of shape (N, 3, 4), got {arr.shape}")
            return arr.astype(float).tolist()
        if suffix == ".json":
            return json.loads(p.read_text(encoding="utf-8"))
        if suffix in (".yaml", ".yml"):
            return parse_yaml(read_limited(p))
    except SpecError:
        raise
    except (OSError, ValueError) as exc:
        fail(f"cannot read {p.name}: {exc}")
    except Exception as exc:  # yaml errors
        import yaml

        if isinstance(exc, yaml.YAMLError):
            fail(f"cannot read {p.name}: invalid YAML{yaml_problem(exc)}")
        fail(f"cannot read {p.name}: {exc}")
    fail(f"unsupported matrix file type {brief(suffix)} (use .npy, .json or .yaml)")
