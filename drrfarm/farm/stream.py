"""Render into training without storage: a sweep spec as a Ray Data source.

:func:`stream_drrs` turns a sweep spec into a ``ray.data.Dataset`` whose rows are rendered on the fly by the
farm's own render code -- the planner (:func:`~drrfarm.farm.plan.make_plan`: the same shards, poses and
seeds) and :class:`~drrfarm.farm.worker.RenderWorker` (the same cameras, physics and backends, the CUDA
image ring on a GPU) -- and decoded by :mod:`drrfarm.data`'s own decoder. An epoch of the stream is the
stored sweep of that spec, image for image: same ``image_index``, same stored-dtype pixels (uint16 =
``quantize(render, image_scale)``, bit for bit on the GPU too), same metadata columns, same decoding
conventions as :func:`drrfarm.data.read_drrs` (``columns``, ``float_line_integral``)::

    from drrfarm.data import stream_drrs, to_float_line_integrals

    ds = stream_drrs("jobs/specs/example.yaml")          # nothing rendered yet (Ray Data is lazy)
    for batch in ds.iter_torch_batches(batch_size=64, device="cuda"):
        x = to_float_line_integrals(batch)               # (B, H, W) float32 line integrals on the GPU

How: :func:`stream_drrs` starts the render actors -- ``gpus_per_actor`` GPU each (one actor per GPU by
default) when the spec renders on CUDA, else CPU actors (``farm.cpus_per_actor`` CPUs each, one per that many
CPUs of the cluster) -- each a :class:`StreamRenderer` holding one :class:`~drrfarm.farm.worker.RenderWorker`
with ``inflight`` shards at once on its threads and its volumes resident. The actors live as long as the
dataset, so every epoch reuses them (no restart, no reload of the CT). The dataset itself is one input row per
shard of the plan (``ray.data.from_items``: the shards volume by volume, cut into one contiguous run per actor
and interleaved, :func:`assign_shards`) and ``map_batches(ShardRows)`` on 0-CPU Ray tasks: each task asks its
shard's actor for the render and turns it into rows (:func:`shard_rows`) in its own process, so the actors'
interpreters only feed the GPU. A shard becomes one block, its rows in image order; the order of the shards is
Ray Data's (join on ``image_index``). Every pass over the dataset renders again (the same images);
``Dataset.materialize()`` keeps one epoch in Ray's object store instead.

A shard's rows are built by the sinks' own encoder -- :meth:`drrfarm.sinks.ShardSink.prepare` into an
in-memory, uncompressed Parquet file, read back with pyarrow and decoded by
:func:`drrfarm.data.decode_table` -- so masks, thickness, landmarks and every extra column come out as a
stored sweep's do. The only column whose value is not what the bytes say is ``image_codec`` (shown with
``columns="all"``): it names the codec a stored shard of the spec uses, as the rest of the row does.

Nothing is written: the workers' sink is an in-memory store, never the spec's ``output.url``.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

import drrfarm
from drrfarm.data.columns import IMAGE, decode_table, select_columns
from drrfarm.data.splits import volume_split
from drrfarm.errors import BackendError, SpecError, StorageError
from drrfarm.farm.compile import camera_for, image_rows
from drrfarm.farm.driver import connect_ray, preflight
from drrfarm.farm.plan import WARM_POSES, Plan, image_seeds, make_plan
from drrfarm.farm.spec import SweepSpec, load_spec
from drrfarm.farm.worker import RenderWorker, remote_class
from drrfarm.render import BACKENDS
from drrfarm.sinks import ShardSink, open_store
from drrfarm.sinks.parquet import IMAGE_CODEC_COLUMN, KNOWN_COLUMNS, DeltaPlanes

if TYPE_CHECKING:  # pragma: no cover
    import os

    import pyarrow as pa
    import ray.data

#: where a streaming worker's sink points (an in-process fsspec memory store: nothing leaves the actor)
STREAM_URL = "memory://drrfarm-stream"
#: shards in flight per actor by default (the spec's ``farm.inflight_per_actor`` overrides)
GPU_INFLIGHT = 8  # e2e-512 on an H200: 927 images/s to the training loop with 4, 1,157 with 8 (RESULTS.md)
CPU_INFLIGHT = 2


# ---------------------------------------------------------------------------------------------------------
# The spec, its plan and the shards to stream


def resolve_spec(spec: str | os.PathLike[str] | SweepSpec, backend: str | None = None) -> SweepSpec:
    """The :class:`SweepSpec` of ``spec`` (a YAML path: :func:`~drrfarm.farm.spec.load_spec` and its errors,
    naming the file and key), with ``backend`` ("auto" | "cpu" | "cuda") overriding the spec's."""
    s = spec if isinstance(spec, SweepSpec) else load_spec(spec)
    if backend is not None:
        if backend not in BACKENDS:
            raise SpecError(f"backend {backend!r}: choose from {list(BACKENDS)}")
        s = dataclasses.replace(s, backend=backend)
    return s


def shard_indices(plan: Plan, volume_ids: Iterable[str] | None = None) -> list[int]:
    """Indices of the plan's shards to stream: all, or those of the volumes ``volume_ids`` (ids of the spec's
    ``volumes``; a shard holds one volume, so this is the patient-level filter of a stored sweep)."""
    if volume_ids is None:
        return [s.index for s in plan.shards]
    if isinstance(volume_ids, str):
        volume_ids = [volume_ids]
    wanted = list(dict.fromkeys(str(v) for v in volume_ids))
    known = [v.id for v in plan.spec.volumes]
    bad = [v for v in wanted if v not in known]
    if bad:
        raise SpecError(f"{plan.spec.source}: volume_ids: unknown {bad}; the spec's volumes are {known}")
    keep = {known.index(v) for v in wanted}
    return [s.index for s in plan.shards if s.volume_index in keep]


def stored_codec(spec: SweepSpec | str) -> str:
    """The ``image_codec`` of the stored Parquet shards of a spec (or of its ``output.image_dtype``): the sinks'
    default, ``zstd-delta`` for uint16, else ``raw``."""
    dtype = spec if isinstance(spec, str) else spec.output.image_dtype
    return "zstd-delta" if dtype == "uint16" else "raw"


def stream_info(spec: str | os.PathLike[str] | SweepSpec, *, volume_ids: Iterable[str] | None = None
                ) -> dict[str, Any]:
    """What :func:`stream_drrs` of ``spec`` yields, from the plan (nothing rendered): the counterpart of
    :func:`drrfarm.data.dataset_info` -- ``url`` (the spec file), ``rows``, ``shards``, ``volume_ids``,
    ``image_dtype``, ``height``, ``width`` (lists, as there), ``spec_sha256``, ``sweep_id`` and
    ``mlflow_run_id`` ("": a stream has no provenance run)."""
    s = resolve_spec(spec)
    plan = make_plan(s)
    idx = shard_indices(plan, volume_ids)
    vols = sorted({s.volumes[plan.shards[i].volume_index].id for i in idx})
    return {"url": s.source, "shards": len(idx), "rows": sum(plan.shards[i].n_images for i in idx),
            "volume_ids": vols, "image_dtype": [s.output.image_dtype], "height": [s.image.height],
            "width": [s.image.width], "finalized": False, "mlflow_run_id": "", "spec_sha256": plan.spec_sha256,
            "sweep_id": plan.sweep_id, "drrfarm_version": _version(), "file_metadata": {}}


def stream_metadata(spec: str | os.PathLike[str] | SweepSpec, *, volume_ids: Iterable[str] | None = None
                    ) -> dict[str, np.ndarray]:
    """The plan's per-image columns of the streamed rows, in ``image_index`` order, without rendering (e.g. the
    angle range a training job normalises with): ``image_index``, ``seed``, ``pose_index`` (int64),
    ``alpha_deg``, ``beta_deg``, ``gamma_deg``, ``sid_mm`` (float64, NaN for explicit poses), ``photons``
    (float64, NaN = noiseless), ``volume_id`` and ``shard_id`` (str objects) -- equal to what
    :func:`drrfarm.data.read_metadata` reads from the stored sweep."""
    s = resolve_spec(spec)
    plan = make_plan(s)
    arrays = plan.poses.arrays
    carm = plan.poses.kind == "carm"
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("image_index", "seed", "pose_index", "alpha_deg", "beta_deg",
                                                          "gamma_deg", "sid_mm", "photons", "volume_id", "shard_id")}
    for i in shard_indices(plan, volume_ids):
        sh = plan.shards[i]
        n = sh.n_images
        poses = np.arange(sh.pose_start, sh.pose_stop)
        photons = s.detector.photons[sh.photons_index]
        parts["image_index"].append(np.asarray(sh.image_indices, np.int64))
        parts["seed"].append(image_seeds(s.seed, np.asarray(sh.image_indices)))
        parts["pose_index"].append(poses.astype(np.int64))
        for name in ("alpha_deg", "beta_deg", "gamma_deg", "sid_mm"):
            parts[name].append(np.asarray(arrays[name][poses], np.float64) if carm else np.full(n, np.nan))
        parts["photons"].append(np.full(n, np.nan if photons is None else float(int(photons))))
        parts["volume_id"].append(np.full(n, s.volumes[sh.volume_index].id, dtype=object))
        parts["shard_id"].append(np.full(n, sh.shard_id, dtype=object))
    return {k: np.concatenate(v) if v else np.zeros(0, object if k in ("volume_id", "shard_id") else np.float64)
            for k, v in parts.items()}


def _version() -> str:
    return drrfarm.__version__


def _known_columns(spec: SweepSpec, plan: Plan) -> set[str] | None:
    """Every column a streamed row can have (None: the spec has annotations, whose columns only a render knows)."""
    if spec.tools or spec.has_annotations:
        return None
    class _Spectrum:  # image_rows only reads these
        kvp, al_mm, cu_mm, name, mean_energy_kev = 1.0, 0.0, 0.0, "", 1.0

    task = plan.task(plan.shards[0])
    one = dataclasses.replace(task, poses=task.poses[:1], image_indices=task.image_indices[:1], seeds=task.seeds[:1])
    rows = image_rows(spec, one, [camera_for(spec, one.poses[0])], _Spectrum(), None, "", "")
    return set(KNOWN_COLUMNS) | set(rows[0])


def _check_columns(columns: Sequence[str] | str | None, known: set[str] | None) -> None:
    if columns is None or known is None or columns == "all":
        return
    names = [columns] if isinstance(columns, str) else list(columns)
    bad = [c for c in names if c not in known and c != IMAGE]
    if bad:
        raise StorageError(f"columns: unknown {bad}; available: {sorted(known)}")


# ---------------------------------------------------------------------------------------------------------
# Rendering (the actors) and rows (the Ray Data tasks)


@dataclasses.dataclass
class RenderedRows:
    """One shard rendered, before it becomes rows: ``images`` (B, H, W) in the stored dtype (uint16 with
    ``image_scale``) or float32 (the CPU backend: quantised by the sinks' quantiser in :func:`shard_rows`), the
    worker's row dicts and the shard's file metadata."""

    shard_id: str
    images: np.ndarray
    rows: list[dict[str, Any]]
    file_metadata: dict[str, Any]
    image_scale: float | None


class StreamRenderer:
    """Renders shards of a spec with the farm's :class:`~drrfarm.farm.worker.RenderWorker` (a plain class: the
    render actor of :func:`stream_drrs`, usable without Ray; thread-safe, as the farm's threaded actors).

    ``spec``: the sweep; ``backend``: the worker's ("cpu" | "cuda" | "auto"); ``inflight``: shards rendered at
    once (threads calling :meth:`render`; on CUDA the worker's ring buffers); ``backend_options``: for
    :func:`drrfarm.render.get_backend` (e.g. CPU ``threads``); ``max_volumes``: volumes kept resident.
    """

    def __init__(self, spec: SweepSpec, backend: str = "cpu", inflight: int = 2,
                 backend_options: Mapping[str, Any] | None = None, max_volumes: int = 2) -> None:
        self.spec = spec
        self.plan = make_plan(spec)
        self.worker = RenderWorker(spec.with_output(STREAM_URL), backend=backend, concurrency=max(1, int(inflight)),
                                   max_volumes=max_volumes, backend_options=dict(backend_options or {}),
                                   warm_up=True, encode_threads=1)
        # not the stored sweep's zstd uint16 sink: the GPU then hands over plain uint16 images (no delta planes)
        self.worker.sink = _rows_sink(spec.output.image_dtype)

    def start(self, volume_indices: Sequence[int] = ()) -> dict[str, Any]:
        """Make volumes resident before the first shard (:meth:`RenderWorker.start`); returns the worker's info."""
        return self.worker.start(list(volume_indices), self.plan.sample_poses(WARM_POSES))

    def render(self, index: int) -> RenderedRows:
        """Shard ``index`` of the plan, rendered by the farm's worker (the GPU ring's uint16 where it applies)."""
        task = self.plan.task(int(index))
        shard = self.worker._render(task)
        try:
            images = shard.images.images() if isinstance(shard.images, DeltaPlanes) else \
                np.array(shard.images, copy=shard.release is not None)  # off the ring buffer before it goes back
        finally:
            shard.done()
        meta = {**self.worker.file_metadata, **(shard.info.get("file_metadata") or {})}
        return RenderedRows(task.shard_id, images, shard.rows, meta, shard.image_scale)

    def rows(self, index: int, columns: Sequence[str] | str | None = None, float_line_integral: bool = False
             ) -> dict[str, Any]:
        """Shard ``index`` as a batch of rows (:func:`shard_rows` of :meth:`render`)."""
        return shard_rows(self.render(index), self.spec.output.image_dtype, columns, float_line_integral)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        self.worker.close()


def _rows_sink(image_dtype: str) -> Any:
    """The rows' encoder: the stored sweep's Parquet layout with the image column uncompressed, in memory."""
    return ShardSink(open_store(STREAM_URL, probe=False), formats=("parquet",), image_dtype=image_dtype,
                     parquet_compression="none")


def shard_table(shard: RenderedRows, image_dtype: str) -> pa.Table:
    """A rendered shard encoded as its stored Parquet file would be (:meth:`drrfarm.sinks.ShardSink.prepare`:
    quantisation, row normalisation, annotation cells; the image column uncompressed), read back by pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files, _ = _rows_sink(image_dtype).prepare(shard.shard_id, shard.images, shard.rows, shard.file_metadata,
                                               image_scale=shard.image_scale)
    (data,) = files.values()
    return pq.read_table(pa.BufferReader(pa.py_buffer(data)))


def shard_rows(shard: RenderedRows, image_dtype: str, columns: Sequence[str] | str | None = None,
               float_line_integral: bool = False) -> dict[str, Any]:
    """A rendered shard as the batch of rows :func:`drrfarm.data.read_drrs` reads from the stored shard:
    ``image`` (B, H, W) plus the metadata ``columns`` (numpy; :func:`drrfarm.data.decode_table`), rows in image
    order."""
    tab = shard_table(shard, image_dtype)
    out = decode_table(tab, select_columns(tab.schema, columns), float_line_integral=float_line_integral)
    if IMAGE_CODEC_COLUMN in out:  # what the stored shard holds (the stream's own bytes were raw)
        out[IMAGE_CODEC_COLUMN] = np.full(tab.num_rows, stored_codec(image_dtype), dtype=object)
    return out


class ShardRows:
    """The ``map_batches`` function of :func:`stream_drrs` (run as Ray tasks): each input row names a shard and
    its render actor; the actor renders it, the task turns it into rows (:func:`shard_rows`) -- off the actor,
    so the actor's interpreter only feeds its GPU."""

    def __init__(self, actors: Sequence[Any], image_dtype: str, columns: Sequence[str] | str | None,
                 float_line_integral: bool) -> None:
        self.actors = list(actors)
        self.image_dtype = image_dtype
        self.columns = columns
        self.float_line_integral = float_line_integral

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        import ray

        for index, actor in zip(np.asarray(batch["shard_index"]).reshape(-1), np.asarray(batch["actor"]).reshape(-1),
                                strict=True):
            shard = ray.get(self.actors[int(actor)].render.remote(int(index)))
            yield shard_rows(shard, self.image_dtype, self.columns, self.float_line_integral)


def assign_shards(plan: Plan, indices: Sequence[int], n_actors: int) -> list[tuple[int, int]]:
    """``(shard index, actor)`` in the order to stream them: the shards, volume by volume, cut into ``n_actors``
    contiguous runs of about equal size (an actor loads each of its volumes once and keeps it resident), then
    interleaved (the first shard of every actor, the second of every actor...) so all actors work at once."""
    ordered = sorted(indices, key=lambda i: (plan.shards[i].volume_index, i))
    n = max(1, min(int(n_actors), len(ordered)))
    bounds = [len(ordered) * a // n for a in range(n + 1)]
    runs = [ordered[bounds[a] : bounds[a + 1]] for a in range(n)]
    out = []
    for k in range(max(len(r) for r in runs)):
        out += [(r[k], a) for a, r in enumerate(runs) if k < len(r)]
    return out


# ---------------------------------------------------------------------------------------------------------
# Ray Data


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        connect_ray(None)  # a local Ray on 127.0.0.1 (or RAY_ADDRESS), as `drrfarm sweep` starts


@dataclasses.dataclass
class _Actors:
    """The render actors of a stream and how they were sized."""

    handles: list[Any]
    inflight: int


def _start_actors(s: SweepSpec, n_shards: int, actors: int | None, gpus_per_actor: float,
                  cpus_per_actor: float | None, inflight_per_actor: int | None, max_volumes: int) -> _Actors:
    """Start the render actors (see :func:`stream_drrs` for the defaults; never more than ``n_shards``)."""
    import ray

    if s.farm.actors is not None and actors is None:
        actors = s.farm.actors
    if gpus_per_actor <= 0:
        raise BackendError(f"gpus_per_actor must be > 0, got {gpus_per_actor}")
    # the actors of a dropped stream die with its dataset, which Ray Data's objects keep in reference cycles:
    # collect them now, so that their GPUs / CPUs are free for these actors
    gc.collect()
    _ensure_ray()
    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0.0))
    use_gpu = s.backend == "cuda" or (s.backend == "auto" and gpus > 0)
    if use_gpu and gpus <= 0:
        raise BackendError(f"{s.source}: backend cuda but the Ray cluster has no GPU; stream with backend='cpu'")
    actor_backend = s.backend if s.backend != "auto" else ("auto" if use_gpu else "cpu")
    cpus = float(cpus_per_actor) if cpus_per_actor is not None else (1.0 if use_gpu else float(s.farm.cpus_per_actor))
    n = actors
    if n is None:
        n = int(gpus / gpus_per_actor) if use_gpu else int(float(res.get("CPU", 1.0)) // max(cpus, 1e-9))
    n = max(1, min(int(n), n_shards))
    inflight = int(inflight_per_actor or s.farm.inflight_per_actor or (GPU_INFLIGHT if use_gpu else CPU_INFLIGHT))
    backend_options = {"threads": max(1, int(cpus))} if actor_backend == "cpu" else {}
    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": float(gpus_per_actor) if use_gpu else 0,
                               "max_concurrency": inflight, "max_restarts": s.farm.max_actor_restarts,
                               "max_task_retries": 2}
    actor = remote_class(StreamRenderer).options(**options)
    handles = [actor.remote(s, actor_backend, inflight, backend_options, max_volumes) for _ in range(n)]
    return _Actors(handles, inflight)


def _preload(plan: Plan, order: Sequence[tuple[int, int]], pool: _Actors) -> None:
    """Each actor loads the volume of its first shard now, while the caller sets up."""
    for a, h in enumerate(pool.handles):
        first = next((i for i, b in order if b == a), None)
        if first is not None:
            h.start.remote([plan.shards[first].volume_index])


def _dataset(s: SweepSpec, order: Sequence[tuple[int, int]], pool: _Actors, columns: Sequence[str] | str | None,
             float_line_integral: bool) -> ray.data.Dataset:
    import ray.data
    from ray.data import TaskPoolStrategy

    items = ray.data.from_items([{"shard_index": i, "actor": a} for i, a in order], override_num_blocks=len(order))
    # 0-CPU tasks: they wait on the actors, then build rows; the actors hold the CPUs (and GPUs) they render with
    return items.map_batches(ShardRows(pool.handles, s.output.image_dtype, columns, float_line_integral),
                             batch_size=1, batch_format="numpy", num_cpus=0,
                             compute=TaskPoolStrategy(size=min(len(order), len(pool.handles) * (pool.inflight + 1))))


def _prepare(spec: str | os.PathLike[str] | SweepSpec, backend: str | None, columns: Sequence[str] | str | None
             ) -> tuple[SweepSpec, Plan]:
    s = resolve_spec(spec, backend)
    plan = make_plan(s)
    preflight(plan, check_local_files=not _ray_client())  # a Ray Client's cluster sees other files
    _check_columns(columns, _known_columns(s, plan))
    return s, plan


def _ray_client() -> bool:
    """Whether this process talks to its cluster through Ray Client (``ray://``)."""
    import os
    import sys

    if os.environ.get("RAY_ADDRESS", "").startswith("ray://"):
        return True
    ray = sys.modules.get("ray")
    try:
        return bool(ray is not None and ray.util.client.ray.is_connected())
    except Exception:  # noqa: BLE001 - no client module: not a client
        return False


def stream_drrs(
    spec: str | os.PathLike[str] | SweepSpec,
    columns: Sequence[str] | str | None = None,
    *,
    float_line_integral: bool = False,
    actors: int | None = None,
    backend: str | None = None,
    volume_ids: Iterable[str] | None = None,
    gpus_per_actor: float = 1.0,
    cpus_per_actor: float | None = None,
    inflight_per_actor: int | None = None,
    max_volumes: int = 4,
) -> ray.data.Dataset:
    """A sweep spec as a ``ray.data.Dataset`` rendered on the fly: the rows :func:`drrfarm.data.read_drrs` reads
    from the stored sweep of ``spec``, image for image, without storing anything (see the module doc).

    Args:
        spec: the sweep spec (YAML path or :class:`~drrfarm.farm.spec.SweepSpec`); a missing file or a bad
            key raises :class:`~drrfarm.errors.SpecError` naming the file and key (:func:`load_spec`), a
            missing volume file or bad spectrum/physics/geometry too (the farm's preflight), before any render.
        columns: metadata columns besides ``image``, as :func:`~drrfarm.data.read_drrs` (None: every numeric
            column; ``"all"``: strings too).
        float_line_integral: float32 ``stored * image_scale`` images instead of the stored dtype, as
            :func:`~drrfarm.data.read_drrs` (to train on a GPU rather keep uint16 and call
            :func:`~drrfarm.data.to_float_line_integrals` there).
        actors: render actors (default: the spec's ``farm.actors``, else one per ``gpus_per_actor`` GPUs of the
            cluster when rendering on CUDA, else one per ``cpus_per_actor`` CPUs), never more than the shards.
        backend: "auto" | "cpu" | "cuda", overriding the spec's (``auto``: CUDA actors when the Ray cluster has
            GPUs, else the CPU backend).
        volume_ids: stream only the shards of these volumes (ids of the spec's ``volumes``; patient-level split,
            see also :func:`stream_split_by_volume`).
        gpus_per_actor: GPU share of a CUDA actor (e.g. 0.5 to share each GPU with a Ray Train worker).
        cpus_per_actor: CPUs an actor reserves (default: 1 for CUDA actors, ``farm.cpus_per_actor`` for CPU
            actors, whose renderer uses that many threads).
        inflight_per_actor: shards an actor works on at once (default: ``farm.inflight_per_actor``, else 8 on
            CUDA and 2 on the CPU).
        max_volumes: volumes an actor keeps resident (least recently used beyond).

    The render actors start here (and begin loading their first volume) and live as long as the dataset: every
    epoch reuses them and their resident volumes, and they hold their GPUs / CPUs meanwhile (so train and
    validation streams of one spec should share them: :func:`stream_split_by_volume`). Starts a local Ray on
    127.0.0.1 if this process is not connected to one (as ``drrfarm sweep`` does).
    """
    s, plan = _prepare(spec, backend, columns)
    indices = shard_indices(plan, volume_ids)
    if not indices:
        raise SpecError(f"{s.source}: volume_ids: no volume given")
    pool = _start_actors(s, len(indices), actors, gpus_per_actor, cpus_per_actor, inflight_per_actor, max_volumes)
    order = assign_shards(plan, indices, len(pool.handles))
    _preload(plan, order, pool)
    return _dataset(s, order, pool, columns, float_line_integral)


def stream_split_by_volume(
    spec: str | os.PathLike[str] | SweepSpec,
    val_fraction: float = 0.2,
    seed: int = 0,
    columns: Sequence[str] | str | None = None,
    **stream_kwargs: Any,
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(train, val) streams of ``spec`` split by patient (``volume_id``) as :func:`drrfarm.data.split_by_volume`
    splits the stored sweep (:func:`drrfarm.data.volume_split`: the same volumes on each side), both rendered by
    one set of actors (``stream_kwargs``: those of :func:`stream_drrs` but ``volume_ids``). The val dataset is
    empty when the spec has a single volume."""
    if "volume_ids" in stream_kwargs:
        raise TypeError("stream_split_by_volume: volume_ids is the split's to choose")
    unknown = set(stream_kwargs) - {"float_line_integral", "actors", "backend", "gpus_per_actor", "cpus_per_actor",
                                    "inflight_per_actor", "max_volumes"}
    if unknown:
        raise TypeError(f"stream_split_by_volume: unexpected stream_drrs arguments {sorted(unknown)}")
    s, plan = _prepare(spec, stream_kwargs.get("backend"), columns)
    train_ids, val_ids = volume_split([v.id for v in s.volumes], val_fraction, seed)
    train_idx = shard_indices(plan, train_ids)
    val_idx = shard_indices(plan, val_ids) if val_ids else []
    pool = _start_actors(s, len(train_idx) + len(val_idx), stream_kwargs.get("actors"),
                         float(stream_kwargs.get("gpus_per_actor", 1.0)), stream_kwargs.get("cpus_per_actor"),
                         stream_kwargs.get("inflight_per_actor"), int(stream_kwargs.get("max_volumes", 4)))
    order = assign_shards(plan, train_idx, len(pool.handles))
    _preload(plan, order, pool)
    fl = bool(stream_kwargs.get("float_line_integral", False))
    train = _dataset(s, order, pool, columns, fl)
    if not val_idx:
        return train, train.limit(0)
    return train, _dataset(s, assign_shards(plan, val_idx, len(pool.handles)), pool, columns, fl)


__all__ = ["STREAM_URL", "RenderedRows", "ShardRows", "StreamRenderer", "assign_shards", "resolve_spec",
           "shard_indices", "shard_rows", "shard_table", "stored_codec", "stream_drrs", "stream_info",
           "stream_metadata", "stream_split_by_volume"]
