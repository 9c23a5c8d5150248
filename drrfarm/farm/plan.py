"""Planner: deterministic expansion of a :class:`~drrfarm.farm.spec.SweepSpec` into shards.

Images are enumerated volume-major: ``for volume: for spectrum: for photons: for pose``; the
global image index is the position in that order. Each (volume, spectrum, photons) group's poses
are cut into chunks of ``output.shard_size``; each chunk is a shard, numbered in the same order.

* shard id: ``<sweep_id>-<shard index:06d>`` where ``sweep_id`` is the first 12 hex digits of the
  spec's content hash (so ids are stable across runs, machines and ``--output`` overrides);
* image seed: 63 bits of ``SeedSequence(seed, spawn_key=(0, image_index))`` — independent of the
  shard layout, the actor and the attempt, so a re-render reproduces the image bit for bit;
* random poses: drawn once from ``PCG64(SeedSequence(poses.seed))`` (or, without ``poses.seed``,
  ``SeedSequence(seed, spawn_key=(1,))``), axis by axis in the order alpha, beta, gamma, sdd,
  sid, then the isocentre jitter; the C-arm grid is the product of the fixed-value axes (alpha
  outermost) with ``samples`` random draws per grid point (innermost);
* tool poses (``tools:``): one generator per (volume, pose, tool),
  ``PCG64(SeedSequence(seed, spawn_key=(2, volume_index, pose_index, tool_index)))`` — so a tool sits
  in the same place in every spectrum and photon setting of one pose, independent of the shard layout.

Everything here is pure NumPy: no Ray, no I/O beyond what :mod:`spec` already read.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from drrfarm.errors import SpecError
from drrfarm.farm.spec import CARM_AXES, SweepSpec
from drrfarm.farm.validator import AxisSpec

_DTYPE_BYTES = {"uint16": 2, "float16": 2, "float32": 4}
WARM_POSES = 256  # poses (evenly spread over the sweep) whose volume layouts a GPU actor builds before its first shard
_ROW_METADATA_BYTES = 1024  # per image: camera, spectrum, ids (Parquet columns or PNG JSON sidecar)


def image_seed(global_seed: int, image_index: int) -> int:
    """Deterministic 63-bit noise seed of one image."""
    state = np.random.SeedSequence(int(global_seed), spawn_key=(0, int(image_index))).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


# NumPy's SeedSequence hash (numpy/random/bit_generator.pyx, the algorithm of M. E. O'Neill's seed_seq_fe),
# evaluated for many spawn keys at once: :func:`image_seeds` gives exactly :func:`image_seed`'s values.
_POOL_SIZE = 4
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _XSHIFT = 0xCA01F9DD, 0x4973F715, 16


def _uint32_words(value: int) -> list[int]:
    """A non-negative int as little-endian 32-bit words (at least one), as SeedSequence splits it."""
    words = []
    while True:
        words.append(value & 0xFFFFFFFF)
        value >>= 32
        if not value:
            return words


def image_seeds(global_seed: int, image_indices: Any) -> np.ndarray:
    """The noise seeds of many images: ``image_seed(global_seed, i)`` for each ``i``, (N,) int64, computed
    together (the planner makes 64 per shard; one at a time costs ~60 µs each)."""
    indices = np.asarray(image_indices, dtype=np.int64).reshape(-1)
    out = np.empty(indices.size, dtype=np.int64)
    if indices.size == 0:
        return out
    if indices.min() < 0:
        raise SpecError(f"image index {int(indices.min())}: must be >= 0")
    run = _uint32_words(int(global_seed))
    run += [0] * max(0, _POOL_SIZE - len(run))  # padded to the pool size when there is a spawn key
    big = indices >= (1 << 32)
    for sel in (~big, big):  # one or two words for the index
        if not sel.any():
            continue
        idx = indices[sel].astype(np.uint64)
        words = [np.uint64(0)] + ([idx & 0xFFFFFFFF, idx >> np.uint64(32)] if sel is big else [idx])
        entropy = [np.full(idx.size, w, np.uint64) for w in run] + [np.broadcast_to(np.uint64(w), idx.size)
                                                                     if np.ndim(w) == 0 else w for w in words]
        out[sel] = _seed_sequence_state(entropy)
    return out


def _seed_sequence_state(entropy: list[np.ndarray]) -> np.ndarray:
    """SeedSequence's pool mixed from ``entropy`` (words as (N,) uint64 < 2³²), then two state words as int63."""
    mask = np.uint64(0xFFFFFFFF)
    n = entropy[0].size
    hash_const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_const
        value = value ^ np.uint64(hash_const)
        hash_const = (hash_const * _MULT_A) & 0xFFFFFFFF
        value = (value * np.uint64(hash_const)) & mask
        return value ^ (value >> np.uint64(_XSHIFT))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = (np.uint64(_MIX_MULT_L) * x - np.uint64(_MIX_MULT_R) * y) & mask
        return result ^ (result >> np.uint64(_XSHIFT))

    zero = np.zeros(n, np.uint64)
    pool = [hashmix(entropy[i] if i < len(entropy) else zero) for i in range(_POOL_SIZE)]
    for i_src in range(_POOL_SIZE):
        for i_dst in range(_POOL_SIZE):
            if i_src != i_dst:
                pool[i_dst] = mix(pool[i_dst], hashmix(pool[i_src]))
    for i_src in range(_POOL_SIZE, len(entropy)):
        for i_dst in range(_POOL_SIZE):
            pool[i_dst] = mix(pool[i_dst], hashmix(entropy[i_src]))
    state, const = [], _INIT_B
    for i in range(2):
        value = pool[i] ^ np.uint64(const)
        const = (const * _MULT_B) & 0xFFFFFFFF
        value = (value * np.uint64(const)) & mask
        state.append(value ^ (value >> np.uint64(_XSHIFT)))
    return (((state[0] << np.uint64(32)) | state[1]) & np.uint64((1 << 63) - 1)).astype(np.int64)


def pose_seed_sequence(spec: SweepSpec) -> np.random.SeedSequence:
    """The seed sequence random poses are drawn from."""
    if spec.poses.seed is not None:
        return np.random.SeedSequence(int(spec.poses.seed))
    return np.random.SeedSequence(int(spec.seed), spawn_key=(1,))


def tool_pose_rng(global_seed: int, volume_index: int, pose_index: int, tool_index: int) -> np.random.Generator:
    """The generator one tool's pose is drawn from for one (volume, pose) (see the module doc)."""
    seq = np.random.SeedSequence(int(global_seed), spawn_key=(2, int(volume_index), int(pose_index), int(tool_index)))
    return np.random.Generator(np.random.PCG64(seq))


def shard_id(sweep_id: str, index: int) -> str:
    """Stable shard id: ``<sweep_id>-<index:06d>``."""
    return f"{sweep_id}-{index:06d}"


@dataclass(frozen=True)
class Pose:
    """One pose: C-arm parameters (``kind == "carm"``) or an explicit 3x4 ``P`` (row-major)."""

    index: int
    kind: str
    alpha_deg: float = 0.0
    beta_deg: float = 0.0
    gamma_deg: float = 0.0
    sdd_mm: float | None = None
    sid_mm: float | None = None
    isocentre_world_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    P: tuple[float, ...] | None = None  # noqa: N815 (contract name)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pose_index": self.index, "kind": self.kind}
        if self.kind == "carm":
            d.update(alpha_deg=self.alpha_deg, beta_deg=self.beta_deg, gamma_deg=self.gamma_deg,
                     sdd_mm=self.sdd_mm, sid_mm=self.sid_mm, isocentre_world_mm=list(self.isocentre_world_mm))
        else:
            d["P"] = list(self.P or ())
        return d


@dataclass(frozen=True)
class ShardPlan:
    """One shard: a volume, a spectrum, a photon setting and a contiguous chunk of poses."""

    index: int
    shard_id: str
    volume_index: int
    spectrum_index: int
    photons_index: int
    pose_start: int
    pose_stop: int
    first_image_index: int

    @property
    def n_images(self) -> int:
        return self.pose_stop - self.pose_start

    @property
    def image_indices(self) -> range:
        return range(self.first_image_index, self.first_image_index + self.n_images)


@dataclass(frozen=True)
class ShardTask:
    """A self-contained work order for a render actor (small: poses and seeds, no pixels)."""

    shard_id: str
    shard_index: int
    sweep_id: str
    volume_index: int
    spectrum_index: int
    photons_index: int
    poses: tuple[Pose, ...]
    image_indices: tuple[int, ...]
    seeds: tuple[int, ...]
    attempt: int = 0

    @property
    def n_images(self) -> int:
        return len(self.poses)


class PoseTable:
    """All poses of a sweep as arrays (N,) / (N, 3) / (N, 12); :meth:`pose` builds one :class:`Pose`."""

    def __init__(self, kind: str, n: int, arrays: dict[str, np.ndarray]) -> None:
        self.kind = kind
        self.n = n
        self.arrays = arrays

    def __len__(self) -> int:
        return self.n

    def pose(self, i: int) -> Pose:
        a = self.arrays
        if self.kind == "explicit":
            return Pose(index=i, kind="explicit", P=tuple(float(x) for x in a["P"][i]))
        return Pose(index=i, kind="carm", alpha_deg=float(a["alpha_deg"][i]), beta_deg=float(a["beta_deg"][i]),
                    gamma_deg=float(a["gamma_deg"][i]), sdd_mm=float(a["sdd_mm"][i]), sid_mm=float(a["sid_mm"][i]),
                    isocentre_world_mm=tuple(float(x) for x in a["isocentre_world_mm"][i]))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Pose]:
        return (self.pose(i) for i in range(self.n))


def _draw(axis: AxisSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    if axis.kind == "uniform":
        return rng.uniform(axis.low, axis.high, n)
    x = rng.normal(axis.mean, axis.std, n)
    if axis.clip is not None:
        x = np.clip(x, axis.clip[0], axis.clip[1])
    return x


def expand_poses(spec: SweepSpec) -> PoseTable:
    """All poses of ``spec`` (shared by every volume, spectrum and photon setting)."""
    src = spec.source
    if spec.poses.explicit is not None:
        mats = np.asarray(spec.poses.explicit.matrices, dtype=np.float64).reshape(-1, 12)
        return PoseTable("explicit", len(mats), {"P": mats})
    carm = spec.poses.carm
    assert carm is not None
    fixed = [(name, carm.axis(name)) for name in CARM_AXES if not carm.axis(name).is_random]
    grid = list(itertools.product(*[ax.values for _, ax in fixed]))
    n = len(grid) * carm.samples
    arrays: dict[str, np.ndarray] = {}
    grid_arr = np.asarray(grid, dtype=np.float64).reshape(len(grid), len(fixed))
    for col, (name, _) in enumerate(fixed):
        arrays[name] = np.repeat(grid_arr[:, col], carm.samples)
    rng = np.random.Generator(np.random.PCG64(pose_seed_sequence(spec)))
    for name in CARM_AXES:
        ax = carm.axis(name)
        if ax.is_random:
            arrays[name] = _draw(ax, rng, n)
    iso = np.broadcast_to(np.asarray(carm.isocentre_mm, dtype=np.float64), (n, 3)).copy()
    jit = np.asarray(carm.iso_jitter_mm, dtype=np.float64)
    if np.any(jit > 0):
        iso += rng.uniform(-jit, jit, (n, 3))
    arrays["isocentre_world_mm"] = iso
    bad = np.nonzero(arrays["sid_mm"] >= arrays["sdd_mm"])[0]
    if bad.size:
        i = int(bad[0])
        raise SpecError(f"{src}: poses.carm.sid_mm: pose {i} has sid_mm {arrays['sid_mm'][i]:g} >= sdd_mm "
                        f"{arrays['sdd_mm'][i]:g}; the isocentre must lie between source and detector")
    return PoseTable("carm", n, arrays)


class Plan:
    """The expanded sweep: poses, shards, counts. Build with :func:`make_plan`."""

    def __init__(self, spec: SweepSpec, poses: PoseTable, shards: list[ShardPlan]) -> None:
        self.spec = spec
        self.poses = poses
        self.shards = shards
        self.spec_sha256 = spec.sha256
        self.sweep_id = spec.sweep_id
        self._by_id = {s.shard_id: s for s in shards}

    # -- counts ----------------------------------------------------------------------------------
    @property
    def n_volumes(self) -> int:
        return len(self.spec.volumes)

    @property
    def n_poses(self) -> int:
        return len(self.poses)

    @property
    def n_spectra(self) -> int:
        return len(self.spec.spectra.items)

    @property
    def n_photons(self) -> int:
        return len(self.spec.detector.photons)

    @property
    def n_images(self) -> int:
        return self.n_volumes * self.n_spectra * self.n_photons * self.n_poses

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def estimated_bytes(self) -> int:
        """Upper estimate of the output size (uncompressed pixels plus per-image metadata)."""
        img = self.spec.image
        px = img.height * img.width
        per_image = 0
        for fmt in self.spec.output.formats:
            if fmt == "parquet":
                per_image += px * _DTYPE_BYTES[self.spec.output.image_dtype] + _ROW_METADATA_BYTES
            else:  # 16-bit PNG + JSON sidecar
                per_image += px * 2 + 2 * _ROW_METADATA_BYTES
        return per_image * self.n_images

    # -- shards ------------------------------------------------------------------------------------
    def shard(self, shard_id_or_index: str | int) -> ShardPlan:
        if isinstance(shard_id_or_index, int):
            return self.shards[shard_id_or_index]
        try:
            return self._by_id[shard_id_or_index]
        except KeyError:
            raise KeyError(f"no shard {shard_id_or_index!r} in sweep {self.sweep_id}") from None

    def sample_poses(self, n: int) -> list[Pose]:
        """Up to ``n`` of the sweep's poses, evenly spread over the pose table (first and last included)."""
        total = len(self.poses)
        if total == 0 or n <= 0:
            return []
        picks = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(np.int64))
        return [self.poses.pose(int(i)) for i in picks]

    def shard_ids(self) -> list[str]:
        return [s.shard_id for s in self.shards]

    def task(self, shard: ShardPlan | str | int, attempt: int = 0) -> ShardTask:
        """The work order of one shard (poses and seeds resolved)."""
        s = shard if isinstance(shard, ShardPlan) else self.shard(shard)
        idx = tuple(s.image_indices)
        return ShardTask(
            shard_id=s.shard_id, shard_index=s.index, sweep_id=self.sweep_id, volume_index=s.volume_index,
            spectrum_index=s.spectrum_index, photons_index=s.photons_index,
            poses=tuple(self.poses.pose(i) for i in range(s.pose_start, s.pose_stop)),
            image_indices=idx, seeds=tuple(image_seeds(self.spec.seed, idx).tolist()), attempt=attempt)

    def images_in(self, shard_ids: list[str] | set[str]) -> int:
        return sum(self._by_id[s].n_images for s in shard_ids if s in self._by_id)

    # -- reporting ---------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return {"volumes": self.n_volumes, "poses": self.n_poses, "spectra": self.n_spectra,
                "photon_settings": self.n_photons, "images": self.n_images, "shards": self.n_shards,
                "estimated_bytes": self.estimated_bytes()}

    def describe(self) -> str:
        """Human-readable plan (what ``drrfarm plan`` prints)."""
        spec = self.spec
        lines = [f"spec:      {spec.source}",
                 f"sha256:    {self.spec_sha256}",
                 f"sweep id:  {self.sweep_id}"]
        if spec.name:
            lines.append(f"name:      {spec.name}")
        lines.append(f"volumes:   {self.n_volumes}")
        for v in spec.volumes:
            mat = ("thresholds " + ", ".join(f"{m}<={t:g}" for t, m in v.materials.thresholds_hu)
                   + f", {v.materials.above} above") if v.materials.method == "thresholds" else \
                f"labels {v.materials.label_map}"
            lines.append(f"  - {v.id}: {v.path}  [{mat}; {v.placement.orientation}]")
        if spec.poses.carm is not None:
            c = spec.poses.carm
            axes = ", ".join(f"{a} {c.axis(a).describe()}" for a in CARM_AXES)
            extra = f"; {c.samples} samples per grid point" if c.samples > 1 else ""
            jit = f"; isocentre jitter ±{list(c.iso_jitter_mm)} mm" if any(c.iso_jitter_mm) else ""
            lines.append(f"poses:     {self.n_poses}  (C-arm: {axes}{extra}{jit})")
        else:
            lines.append(f"poses:     {self.n_poses}  (explicit projection matrices)")
        names = ", ".join(s.name for s in spec.spectra.items)
        rebin = f"; rebinned to {spec.spectra.n_bins} bins" if spec.spectra.n_bins else ""
        lines.append(f"spectra:   {self.n_spectra}  ({names}{rebin})")
        ph = ", ".join("noiseless" if p is None else f"{p:g}" for p in spec.detector.photons)
        lines.append(f"photons:   {self.n_photons}  ({ph}); detector {spec.detector.model}, "
                     f"output {spec.detector.output}")
        lines.append(f"image:     {spec.image.height} x {spec.image.width} px @ {spec.image.pixel_mm:g} mm")
        for t in spec.tools:
            how = "random trajectory" if t.pose.is_random else "fixed pose"
            lines.append(f"tool:      {t.name}: {t.mesh} [{t.material or 'default material'}, "
                         f"{t.mode or 'default mode'}; {how}]")
        if spec.labels is not None:
            lb = spec.labels
            what = f"{lb.label_map} ({len(lb.values) or 'all'} labels)" if lb.label_map else "no label map"
            lines.append(f"labels:    {what}; tool masks {'on' if lb.tools else 'off'}; "
                         f"thickness {'on' if lb.thickness else 'off'}")
        if spec.landmarks is not None:
            lm = spec.landmarks
            src = lm.file or (f"{len(lm.points)} inline points" if lm.points else "no points")
            lines.append(f"landmarks: {src}{'; tool tips' if lm.tool_tips else ''}")
        sc = self.spec.scatter
        if sc is not None and sc.mode != "none":
            lines.append(f"scatter:   {sc.mode}, {sc.photons or 'default'} histories per image (docs/scatter.md)")
        lines.append(f"images:    {self.n_images}  ({self.n_volumes} volumes x {self.n_spectra} spectra x "
                     f"{self.n_photons} photon settings x {self.n_poses} poses)")
        lines.append(f"shards:    {self.n_shards}  (up to {spec.output.shard_size} images each)")
        lines.append(f"output:    {spec.output.url}  [{', '.join(spec.output.formats)}; "
                     f"{spec.output.image_dtype}]")
        lines.append(f"bytes:     ~{format_bytes(self.estimated_bytes())} (upper estimate, uncompressed)")
        return "\n".join(lines)


def make_plan(spec: SweepSpec) -> Plan:
    """Expand ``spec`` into poses and shards (deterministic)."""
    poses = expand_poses(spec)
    size = spec.output.shard_size
    shards: list[ShardPlan] = []
    image = 0
    sweep = spec.sweep_id
    for v in range(len(spec.volumes)):
        for s in range(len(spec.spectra.items)):
            for p in range(len(spec.detector.photons)):
                for start in range(0, len(poses), size):
                    stop = min(start + size, len(poses))
                    index = len(shards)
                    shards.append(ShardPlan(index=index, shard_id=shard_id(sweep, index), volume_index=v,
                                            spectrum_index=s, photons_index=p, pose_start=start, pose_stop=stop,
                                            first_image_index=image))
                    image += stop - start
    return Plan(spec, poses, shards)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} PB"
