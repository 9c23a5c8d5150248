"""Loading a drrfarm dataset for training: Ray Data, plain PyTorch, patient-level splits.

Everything here reads through the dataset's manifest (:func:`drrfarm.sinks.read_manifest`): only
committed shards are read, a shard still being written or left half-written by a killed worker is
invisible. Parquet decoding is the sinks' own (:func:`drrfarm.sinks.decode_images`,
:func:`drrfarm.sinks.dequantize`); this module only turns metadata columns into arrays.

Ray Data::

    from drrfarm.data import read_drrs, split_by_volume, to_float_line_integrals

    ds = read_drrs("./drrfarm-demo", filter={"kvp": [120.0]})      # ray.data.Dataset
    for batch in ds.iter_torch_batches(batch_size=32, device="cuda", prefetch_batches=4):
        batch["image"]        # (B, H, W) torch.uint16 (stored dtype), or float32 with float_line_integral=True
        batch["alpha_deg"]    # (B,) float64;  batch["P"]: (B, 3, 4) float64 ...
        x = to_float_line_integrals(batch)    # (B, H, W) float32 = uint16 x image_scale, made on the GPU
    train, val = split_by_volume("s3://bucket/run1", val_fraction=0.2, seed=0)   # by patient

Without storage: :func:`stream_drrs` (:mod:`drrfarm.farm.stream`) renders a sweep spec on the fly into the
same rows, image for image, as ``read_drrs`` reads from its stored sweep (``stream_split_by_volume``: by
patient, as :func:`split_by_volume`).

Plain PyTorch (no Ray; pyarrow only): :class:`DrrTorchDataset` (map-style, random access with a
small row-group cache; use :meth:`DrrTorchDataset.sampler` to shuffle cheaply) and
:class:`DrrIterableDataset` (streams row groups; splits them across DataLoader workers and
distributed ranks; with ``batch_size`` it yields ready batches: ``DrrIterableDataset(url, batch_size=64,
shuffle=True).loader()``).

Speed: images are decoded where the data is read -- in Ray Data's read tasks (one per file, or per row group
when files are fewer than twice the cluster's CPUs: :func:`plan_read_tasks`), in the DataLoader workers --
straight from the Parquet cells into the output arrays (zstd and the delta transform without the GIL,
:mod:`drrfarm.sinks.parquet`), so decoding uses every core and the training process only slices ready
(B, H, W) arrays. Keep the stored uint16 up to the GPU and make floats there with
:func:`to_float_line_integrals`: half the bytes of float32 through Ray's object store, the loader and PCIe.
Measurements: ``benchmarks/bench_loader.py`` and ``benchmarks/RESULTS.md``.

Row layout produced by every reader (one row = one image):

* ``image``: ``(H, W)`` in the stored dtype (``uint16`` quantised, ``float16`` or ``float32``), or
  ``float32`` values ``stored * image_scale`` with ``float_line_integral=True`` (line integrals
  ``log(I0/I)`` for the default ``output: line_integral``; the stored quantity otherwise);
* camera: ``K`` (3, 3), ``R`` (3, 3), ``t`` (3,), ``P`` (3, 4), ``source_world_mm`` (3,),
  ``isocentre_world_mm`` (3,) -- float64, NaN where the shard stored null (no C-arm);
* numbers: ``alpha_deg``, ``beta_deg``, ``gamma_deg``, ``sdd_mm``, ``pixel_mm``, ``kvp``, ``al_mm``,
  ``cu_mm``, ``mean_energy_kev``, ``image_scale`` (float64, NaN = null), ``photons`` (float64, NaN
  = noiseless render), ``image_index``, ``seed``, ``height``, ``width`` (int64, -1 = null);
* strings (``volume_id``, ``shard_id``, ``sweep_id``, ``spectrum_name``, ``detector``, ``output``,
  ``volume_sha256``, ``image_dtype``; ``""`` = null) only when named in ``columns`` (or ``columns="all"``): Ray's
  ``iter_torch_batches`` cannot turn strings into tensors, so the default is the image plus every
  numeric column. Extra columns written by the farm (landmarks, ...) follow the same rule;
* annotations of sweeps with ``tools`` / ``labels`` / ``landmarks`` (absent from older datasets):
  ``masks`` (L, H, W) bool and ``thickness_mm`` (L, H, W) float32 (decoded from the packed bytes,
  :mod:`drrfarm.sinks.annotations`; names in the file metadata ``drrfarm.mask_names``), ``mask_count``
  (int64), ``landmarks_uv`` (N, 2) float64 pixels (NaN behind the source), ``landmarks_visible`` (N,)
  bool, ``landmarks_depth_mm`` (N,) float64 (names: ``drrfarm.landmark_names``) and
  ``tool_world_from_mesh`` (T, 4, 4) float64 (names: ``drrfarm.tool_names``). The torch datasets read
  ``masks`` / ``thickness_mm`` with the image, one row group at a time.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from drrfarm.errors import StorageError
from drrfarm.farm.stream import stream_drrs, stream_info, stream_metadata, stream_split_by_volume
from drrfarm.sinks.parquet import IMAGE_CODEC_COLUMN

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import ray.data

    from drrfarm.sinks import Manifest, Store

log = logging.getLogger("drrfarm.data")

IMAGE = "image"
#: columns the image decoder needs (read even when not asked for)
DECODE_COLUMNS = ("height", "width", "image_dtype", "image_scale")
#: vector columns and the shape each row gets
VECTOR_SHAPES: dict[str, tuple[int, ...]] = {
    "K": (3, 3),
    "R": (3, 3),
    "t": (3,),
    "P": (3, 4),
    "source_world_mm": (3,),
    "isocentre_world_mm": (3,),
}
#: list columns reshaped per row: name -> trailing shape (the leading axis is the list's length)
LIST_ROW_SHAPES: dict[str, tuple[int, ...]] = {"landmarks_uv": (2,), "tool_world_from_mesh": (4, 4)}
#: list columns of flags
BOOL_LISTS = frozenset({"landmarks_visible"})
#: pixel annotations decoded with the image (binary cells; sinks.annotations) and the columns they need
PIXEL_COLUMNS = ("masks", "thickness_mm")
PIXEL_DEPENDS = ("mask_count",)
#: integer columns that may legitimately be null: read as float64, NaN = null
NULLABLE_INT_AS_FLOAT = frozenset({"photons"})
INT_NULL = -1

FilterSpec = Any  # Mapping[str, value | list of values] | ray.data.expressions.Expr | str | pyarrow.compute.Expression


# ---------------------------------------------------------------------------------------------------------
# Opening a dataset


def open_dataset_store(url: str | Store, storage_options: Mapping[str, Any] | None = None) -> Store:
    """The sinks :class:`~drrfarm.sinks.Store` of a dataset root, read-only (no probe write).

    ``storage_options`` (fsspec keyword arguments, e.g. ``{"anon": True}`` or
    ``{"client_kwargs": {"endpoint_url": ...}}``) replace the store's default filesystem, which
    otherwise comes from the standard AWS environment/config chain for ``s3://``.
    """
    from drrfarm.sinks import Store, open_store

    store = url if isinstance(url, Store) else open_store(str(url), probe=False)
    if storage_options:
        import fsspec

        # same root/URL normalisation as the sinks, another filesystem instance
        store = Store(store.url, store.protocol, fsspec.filesystem(store.protocol, **dict(storage_options)),
                      store.root, store.retry)
    return store


def _committed(store: Store) -> Manifest:
    from drrfarm.sinks import read_manifest

    manifest = read_manifest(store)
    if not manifest:
        raise StorageError(f"{store.url}: no committed shards (no manifest entries) -- is this a drrfarm dataset?")
    if not manifest.keys_of("parquet"):
        raise StorageError(f"{store.url}: the dataset has no Parquet shards (PNG only); read_drrs needs Parquet")
    return manifest


def _arrow_fs(store: Store) -> Any:
    from drrfarm.sinks.dataset import arrow_filesystem

    return arrow_filesystem(store)


def _file_metadata(store: Store, manifest: Manifest) -> dict[str, str]:
    """File-level metadata of the dataset: manifest extra > shard entries > first Parquet footer."""
    import pyarrow.parquet as pq

    meta: dict[str, str] = {}
    for entry in manifest.values():
        for k, v in entry.file_metadata.items():
            if v and not meta.get(k):
                meta[k] = v
    for k in ("spec_sha256", "drrfarm_version", "mlflow_run_id", "sweep_id"):
        v = manifest.extra.get(k)
        if v:
            meta[k] = str(v)
    if not meta.get("mlflow_run_id"):
        key = manifest.keys_of("parquet")[0]
        with store.open_read(key) as fh:
            raw = pq.read_schema(fh).metadata or {}
        for k, v in raw.items():
            ks, vs = k.decode(), v.decode()
            if vs and not meta.get(ks):
                meta[ks] = vs
    return meta


def dataset_info(url: str | Store, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A summary of a dataset from its manifest (no pixel is read).

    Returns ``{"url", "shards", "rows", "volume_ids", "image_dtype", "height", "width", "finalized",
    "mlflow_run_id", "spec_sha256", "sweep_id", "drrfarm_version", "file_metadata"}``; the run id is the
    provenance (MLflow) run of the sweep that wrote the dataset ("" when it was not tracked).
    """
    store = open_dataset_store(url, storage_options)
    manifest = _committed(store)
    meta = _file_metadata(store, manifest)
    entries = list(manifest.values())
    return {
        "url": store.url,
        "shards": len(entries),
        "rows": manifest.total_rows,
        "volume_ids": sorted({v for e in entries for v in e.volume_ids}),
        "image_dtype": sorted({e.image_dtype for e in entries}),
        "height": sorted({e.height for e in entries}),
        "width": sorted({e.width for e in entries}),
        "finalized": bool(manifest.finalized_at),
        "mlflow_run_id": meta.get("mlflow_run_id", ""),
        "spec_sha256": meta.get("spec_sha256", ""),
        "sweep_id": meta.get("sweep_id", ""),
        "drrfarm_version": meta.get("drrfarm_version", ""),
        "file_metadata": meta,
    }


# ---------------------------------------------------------------------------------------------------------
# Filters and column selection


def _as_list(v: Any) -> list[Any]:
    if isinstance(v, str | bytes) or not isinstance(v, Iterable):
        return [v]
    return list(v)


def _check_filter_dict(flt: Mapping[str, Any], schema: pa.Schema) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, values in flt.items():
        if name not in schema.names or name == IMAGE:
            known = sorted(n for n in schema.names if n != IMAGE)
            raise StorageError(f"filter: unknown column {name!r}; columns: {known}")
        vals = _as_list(values)
        if not vals:
            raise StorageError(f"filter: empty list of values for {name!r}")
        out[str(name)] = vals
    return out


def _arrow_expression(flt: Mapping[str, list[Any]]) -> Any:
    """pyarrow.compute.Expression for a dict filter: AND over columns of ``column in values``."""
    import pyarrow.compute as pc

    expr = None
    for name, vals in flt.items():
        term = pc.field(name).isin(vals)
        expr = term if expr is None else expr & term
    return expr


def _ray_expression(flt: Mapping[str, list[Any]]) -> Any:
    from ray.data.expressions import col

    expr = None
    for name, vals in flt.items():
        term = col(name).is_in(vals)
        expr = term if expr is None else expr & term
    return expr


def _is_arrow_expression(obj: Any) -> bool:
    try:
        import pyarrow.compute as pc
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, pc.Expression)


def _prune_entries(manifest: Manifest, flts: Sequence[Mapping[str, list[Any]]]) -> list[Any]:
    """Manifest entries that can hold rows passing every dict filter on ``volume_id`` / ``shard_id`` (others
    skipped: their files are never opened)."""
    entries = list(manifest.values())
    for flt in flts:
        if "volume_id" in flt:
            want = {str(v) for v in flt["volume_id"]}
            entries = [e for e in entries if not e.volume_ids or want.intersection(e.volume_ids)]
        if "shard_id" in flt:
            shards = {str(v) for v in flt["shard_id"]}
            entries = [e for e in entries if e.shard_id in shards]
    return entries


def _is_numeric(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _is_numeric(t.value_type)
    return False


def _select_columns(schema: pa.Schema, columns: Sequence[str] | str | None) -> list[str]:
    """Metadata columns to return (without the image)."""
    names = [n for n in schema.names if n != IMAGE]
    if columns is None:
        return [n for n in names if _is_numeric(schema.field(n).type) or n in PIXEL_COLUMNS]
    if isinstance(columns, str):
        if columns == "all":
            return names
        columns = [columns]
    bad = [c for c in columns if c not in names and c != IMAGE]
    if bad:
        raise StorageError(f"columns: unknown {bad}; available: {sorted(names)}")
    return [c for c in dict.fromkeys(columns) if c != IMAGE]


# ---------------------------------------------------------------------------------------------------------
# Decoding (shared by Ray Data and the torch datasets)


def _combine(col: Any) -> Any:
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def column_to_numpy(name: str, col: Any) -> np.ndarray:
    """One metadata column (pyarrow Array/ChunkedArray of B rows) as a numpy array (see module doc)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = _combine(col)
    t = col.type
    n = len(col)
    if name in VECTOR_SHAPES or pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        if not _is_numeric(t):
            return np.asarray(col.to_pylist(), dtype=object)
        shape = VECTOR_SHAPES.get(name)
        valid = np.ones(n, bool) if col.null_count == 0 else ~np.asarray(col.is_null().to_numpy(zero_copy_only=False))
        present = col if col.null_count == 0 else col.filter(pa.array(valid))
        lengths = np.asarray(pc.list_value_length(present).to_numpy(zero_copy_only=False)) if len(present) else []
        if len(present) and np.any(lengths != lengths[0]):
            raise StorageError(f"column {name!r}: lists of different lengths in one batch; select other columns")
        per = int(np.prod(shape)) if shape else (int(lengths[0]) if len(present) else 0)
        if shape is None:
            shape = (per,)
        values = np.asarray(present.flatten().to_numpy(zero_copy_only=False), dtype=np.float64)
        if values.size != len(present) * per:
            raise StorageError(f"column {name!r}: expected {per} values per row")
        out = np.full((n, *shape), np.nan)
        out[valid] = values.reshape(len(present), *shape)
        if name in LIST_ROW_SHAPES:
            tail = LIST_ROW_SHAPES[name]
            out = out.reshape(n, shape[0] // int(np.prod(tail)), *tail)
        elif name in BOOL_LISTS:
            out = np.nan_to_num(out) != 0
        return out
    if pa.types.is_integer(t):
        if name in NULLABLE_INT_AS_FLOAT:
            return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        return np.asarray(col.fill_null(INT_NULL).to_numpy(zero_copy_only=False), dtype=np.int64)
    if pa.types.is_floating(t):
        return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    if pa.types.is_boolean(t):
        return np.asarray(col.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.asarray(col.fill_null("").to_pylist(), dtype=object)  # null -> ""
    return np.asarray(col.to_pylist(), dtype=object)


def decode_images_any_shape(table: Any, *, float_line_integral: bool = False) -> np.ndarray | list[np.ndarray]:
    """Images of a shard table: (B, H, W) array (stored dtype, or float32 values), or a list of (H, W)
    arrays when rows differ in shape/dtype (datasets mixing sweeps)."""
    from drrfarm.sinks import decode_images, dequantize

    def one(t: Any) -> np.ndarray:
        imgs = decode_images(t)
        if float_line_integral:
            scale = np.asarray(t.column("image_scale").to_numpy(zero_copy_only=False), np.float64)
            scale = np.where(np.isfinite(scale), scale, 1.0)
            imgs = dequantize(imgs, scale)
        return imgs

    try:
        return one(table)
    except StorageError:
        if table.num_rows <= 1:
            raise
    return [one(table.slice(i, 1))[0] for i in range(table.num_rows)]


def decode_table(table: Any, columns: Sequence[str], *, float_line_integral: bool = False) -> dict[str, Any]:
    """A shard table (pyarrow Table/RecordBatch with the image and decode columns) as a dict of numpy
    arrays: ``image`` (B, H, W) plus ``columns`` (see the module doc for dtypes and shapes)."""
    out: dict[str, Any] = {IMAGE: decode_images_any_shape(table, float_line_integral=float_line_integral)}
    for name in columns:
        out[name] = decode_pixel_column(table, name) if name in PIXEL_COLUMNS else \
            column_to_numpy(name, table.column(name))
    return out


def to_float_line_integrals(batch: Mapping[str, Any], device: Any = None, *, non_blocking: bool = True) -> Any:
    """float32 values ``stored * image_scale`` (line integrals for the default ``output: line_integral``) of a
    batch's images, computed on ``device`` (default: where the image already is).

    ``batch``: a batch of :func:`read_drrs` (``iter_torch_batches``, images in the stored dtype) or of the torch
    datasets, with ``image`` (B, H, W) and ``image_scale`` (B,) -- tensors or numpy arrays; a list of images
    (datasets mixing shapes) gives a list. Only the stored uint16 and the scales cross to the device and the
    multiply happens there: half the bytes of float32 through Ray's object store, the driver and PCIe, and no
    float pass on the CPU. Bit for bit the CPU's ``float_line_integral=True`` values (one float32 multiply);
    a null (NaN) scale counts as 1, float-stored images are only cast.
    """
    import torch

    if "image_scale" not in batch:
        raise StorageError("to_float_line_integrals: the batch has no 'image_scale' column; read it with the "
                           "default columns or name 'image_scale' in columns")
    img, scale = batch[IMAGE], batch["image_scale"]
    scale = torch.as_tensor(np.asarray(scale, np.float64)) if not isinstance(scale, torch.Tensor) else scale
    if isinstance(img, list | tuple) or (isinstance(img, np.ndarray) and img.dtype == object):
        return [to_float_line_integrals({IMAGE: im[None], "image_scale": scale[i : i + 1]}, device,
                                        non_blocking=non_blocking)[0] for i, im in enumerate(img)]
    img = torch.from_numpy(np.ascontiguousarray(img)) if isinstance(img, np.ndarray) else img
    if device is not None:
        img = img.to(device, non_blocking=non_blocking)
    scale = scale.to(img.device, non_blocking=non_blocking).to(torch.float32)
    scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))
    if img.dtype == torch.uint16:  # through int16/int32: kernels for uint16 are few on some torch builds
        x = img.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF).to(torch.float32)
    else:
        x = img.to(torch.float32)
    return x.mul_(scale.reshape(-1, *([1] * (x.ndim - 1))))


def decode_pixel_column(table: Any, name: str) -> np.ndarray:
    """``masks`` (B, L, H, W) bool or ``thickness_mm`` (B, L, H, W) float32 of a shard table."""
    from drrfarm.sinks.annotations import decode_pixel_column as decode

    def values(col: str) -> list[Any]:
        return _combine(table.column(col)).to_pylist()

    return decode(name, values(name), values("mask_count"), values("height"), values("width"))


def read_columns(columns: Sequence[str], schema_names: Sequence[str] = ()) -> list[str]:
    """The Parquet columns to read for ``columns`` (the image, its decode columns, pixel dependencies);
    ``schema_names``: the file's columns, to add ``image_codec`` where the shards have it."""
    deps = PIXEL_DEPENDS if any(c in PIXEL_COLUMNS for c in columns) else ()
    codec = [IMAGE_CODEC_COLUMN] if IMAGE_CODEC_COLUMN in schema_names else []
    return list(dict.fromkeys([IMAGE, *DECODE_COLUMNS, *codec, *deps, *columns]))


class _ShardReader:
    """The read function of one :func:`read_drrs` read task (a plain picklable object; no torch import).

    Reads its files' row groups one at a time (only the columns needed), keeps the rows passing
    ``arrow_filter``, decodes them (:func:`decode_table`: the images straight from their cells, no per-row
    Python objects) and yields one Ray block per row group. ``empty_image``: (dtype, H, W) of the dataset's
    images when all shards agree, for the empty block of a task whose rows were all filtered out (its
    columns must still have the dataset's types).
    """

    def __init__(self, units: Sequence[_ReadUnit], filesystem: Any, columns: Sequence[str], float_line_integral: bool,
                 arrow_filter: Any = None, empty_image: tuple[str, int, int] | None = None) -> None:
        self.units = tuple(units)
        self.filesystem = filesystem
        self.columns = list(columns)
        self.float_line_integral = float_line_integral
        self.arrow_filter = arrow_filter
        self.empty_image = empty_image

    def _file_columns(self, names: Sequence[str]) -> list[str]:
        cols = read_columns(self.columns, names)
        if self.arrow_filter is not None:  # a filter may name any column: read them all (pixels aside)
            cols += [n for n in names if n not in cols and n not in PIXEL_COLUMNS]
        return cols

    def tables(self) -> Iterator[Any]:
        """The filtered pyarrow table of every row group of the task (empty ones skipped)."""
        import pyarrow.parquet as pq

        for unit in self.units:
            with self.filesystem.open_input_file(unit.path) as fh:
                pf = pq.ParquetFile(fh, pre_buffer=True)
                cols = self._file_columns(pf.schema_arrow.names)
                groups = range(pf.num_row_groups) if unit.row_groups is None else unit.row_groups
                for g in groups:
                    tab = pf.read_row_group(g, columns=cols)
                    if self.arrow_filter is not None:
                        tab = tab.filter(self.arrow_filter)
                    if tab.num_rows:
                        yield tab

    def batch(self, table: Any) -> dict[str, Any]:
        """A table of rows as the dict of numpy arrays of a block (see the module doc)."""
        if table.num_rows == 0 and self.empty_image is not None:
            dtype, h, w = self.empty_image
            out = {IMAGE: np.zeros((0, h, w), np.float32 if self.float_line_integral else dtype)}
            out.update({c: decode_pixel_column(table, c) if c in PIXEL_COLUMNS else column_to_numpy(c, table.column(c))
                        for c in self.columns})
            return out
        out = decode_table(table, self.columns, float_line_integral=self.float_line_integral)
        if isinstance(out[IMAGE], list):
            arr = np.empty(len(out[IMAGE]), dtype=object)
            arr[:] = out[IMAGE]
            out[IMAGE] = arr  # Ray stores it as a variable-shaped tensor column
        return out

    def __call__(self) -> Iterator[Any]:
        from ray.data.block import BlockAccessor

        produced = False
        for tab in self.tables():
            produced = True
            yield BlockAccessor.batch_to_block(self.batch(tab))
        if not produced and self.empty_image is not None:
            import pyarrow.parquet as pq

            with self.filesystem.open_input_file(self.units[0].path) as fh:
                pf = pq.ParquetFile(fh)
                empty = pf.schema_arrow.empty_table().select(read_columns(self.columns, pf.schema_arrow.names))
            yield BlockAccessor.batch_to_block(self.batch(empty))


@dataclass(frozen=True)
class _ReadUnit:
    """A part of a read task: a Parquet file, all its row groups (None) or some."""

    path: str  # in the dataset's pyarrow filesystem
    row_groups: tuple[int, ...] | None
    rows: int  # before filters
    nbytes: int  # its images, decoded to the stored dtype


def _available_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to (else of this machine)."""
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001 - a cluster without resources information: the machine's count
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _row_group_units(store: Store, units: Sequence[_ReadUnit]) -> list[_ReadUnit]:
    """Every file's row groups as units of their own (the Parquet footers read in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    fs = _arrow_fs(store)

    def split(u: _ReadUnit) -> list[_ReadUnit]:
        with fs.open_input_file(u.path) as fh:
            meta = pq.ParquetFile(fh).metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        total = max(1, sum(sizes))
        return [_ReadUnit(u.path, (g,), n, u.nbytes * n // total) for g, n in enumerate(sizes) if n]

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(units)))) as pool:
        return [p for parts in pool.map(split, units) for p in parts]


def plan_read_tasks(store: Store, entries: Sequence[Any], tasks: int | None = None,
                    cpus: int | None = None) -> list[tuple[_ReadUnit, ...]]:
    """The read tasks of :func:`read_drrs`: which files / row groups each one reads.

    Parallelism follows the data and the cores: one task per Parquet file (its row groups streamed as
    blocks) when there are at least twice as many files as ``cpus`` (default: the Ray cluster's CPUs);
    otherwise one per row group (the footers are read to find them), so that a few large shards still keep
    every core busy. ``tasks`` (``override_num_blocks``) asks for that many instead: row groups are split
    off or consecutive units merged to come close.
    """
    from drrfarm.sinks.parquet import IMAGE_DTYPES

    files: list[_ReadUnit] = []
    for e in entries:
        keys = e.keys_of("parquet")
        per_pixel = np.dtype(IMAGE_DTYPES.get(e.image_dtype, "<u2")).itemsize
        for k in keys:
            rows = e.rows // max(1, len(keys))
            files.append(_ReadUnit(store.path(k), None, rows, rows * e.height * e.width * per_pixel))
    want = int(tasks) if tasks else 2 * (cpus or _available_cpus())
    units = files if len(files) >= want else _row_group_units(store, files)
    if not units:
        units = files
    if tasks is None or len(units) <= want:
        return [(u,) for u in units]
    per = -(-len(units) // want)  # merge consecutive units into `tasks` tasks
    return [tuple(units[i : i + per]) for i in range(0, len(units), per)]


def _datasource_class() -> type:
    """The Ray Datasource class of :func:`read_drrs` (defined on first use: this module imports without Ray)."""
    cls = globals().get("_DrrShardDatasource")
    if cls is not None:
        return cls
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class DrrShardDatasource(Datasource):
        """Committed drrfarm shards as Ray Data blocks, decoded in the read tasks (see :func:`plan_read_tasks`).
        Ray pushes ``Dataset.filter(expr=...)`` predicates down into it: rows are dropped before decoding."""

        def __init__(self, tasks: Sequence[tuple[_ReadUnit, ...]], filesystem: Any, columns: Sequence[str],
                     float_line_integral: bool, arrow_filter: Any, empty_image: tuple[str, int, int] | None,
                     decoded_bytes_per_stored: float) -> None:
            super().__init__()
            self.tasks = list(tasks)
            self.filesystem = filesystem
            self.columns = list(columns)
            self.float_line_integral = float_line_integral
            self.arrow_filter = arrow_filter
            self.empty_image = empty_image
            self.scale = decoded_bytes_per_stored

        def get_name(self) -> str:
            return "DrrShards"

        def estimate_inmemory_data_size(self) -> int | None:
            return int(sum(u.nbytes for t in self.tasks for u in t) * self.scale)

        def supports_predicate_pushdown(self) -> bool:
            return True

        def _filter(self) -> Any:
            pushed = self.get_current_predicate()
            if pushed is None:
                return self.arrow_filter
            pushed = pushed.to_pyarrow()
            return pushed if self.arrow_filter is None else self.arrow_filter & pushed

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            flt = self._filter()
            out = []
            for units in self.tasks:
                reader = _ShardReader(units, self.filesystem, self.columns, self.float_line_integral, flt,
                                      self.empty_image)
                meta = BlockMetadata(num_rows=None if flt is not None else sum(u.rows for u in units),
                                     size_bytes=int(sum(u.nbytes for u in units) * self.scale),
                                     input_files=[u.path for u in units], exec_stats=None)
                out.append(ReadTask(reader, meta, per_task_row_limit=per_task_row_limit))
            return out

    DrrShardDatasource.__module__ = __name__
    DrrShardDatasource.__qualname__ = "_DrrShardDatasource"
    globals()["_DrrShardDatasource"] = DrrShardDatasource
    return DrrShardDatasource


def _to_arrow_filter(flt: Any) -> Any:
    """A Ray Data expression (or expression string) as a pyarrow expression; None if it has no such form."""
    try:
        if isinstance(flt, str):
            from ray.data._internal.planner.plan_expression.expression_evaluator import ExpressionEvaluator

            flt = ExpressionEvaluator.parse_native_expression(flt)
        return flt.to_pyarrow()
    except Exception:  # noqa: BLE001 - left to Dataset.filter (Ray's own evaluation, after decoding)
        return None


# ---------------------------------------------------------------------------------------------------------
# Ray Data


def read_drrs(
    url: str | Store,
    columns: Sequence[str] | str | None = None,
    *,
    filter: FilterSpec | None = None,  # noqa: A002 - the issue's name
    float_line_integral: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    override_num_blocks: int | None = None,
    concurrency: int | None = None,
) -> ray.data.Dataset:
    """A drrfarm dataset (local path, ``file://``, ``s3://``, any fsspec URL) as a ``ray.data.Dataset``.

    Only the committed Parquet shards of the manifest are read. One row per image; see the module
    docstring for the columns, dtypes and shapes.

    Args:
        url: the dataset root (the sweep's output URL).
        columns: metadata columns to return besides ``image``; None: every numeric column (what
            ``iter_torch_batches`` can convert); ``"all"``: every column including strings.
        filter: rows to keep -- a dict ``{"volume_id": [...], "kvp": [...], ...}`` (AND over columns of
            ``value in list``; shards whose manifest entry names none of the wanted volumes / shard ids are
            not even opened), a Ray Data expression (``ray.data.expressions.col("kvp") > 80``) or a
            ``pyarrow.compute.Expression``. All are applied in the read tasks before any image is decoded,
            as are ``Dataset.filter(expr=...)`` calls on the result (Ray pushes them down).
        float_line_integral: decode to float32 values ``stored * image_scale`` (line integrals for the
            default ``output: line_integral``) in the read tasks instead of the stored dtype. To train on a
            GPU, rather keep uint16 and call :func:`to_float_line_integrals` on the device: half the bytes
            through the object store, the driver and PCIe.
        storage_options: fsspec options for the dataset's filesystem (default: the AWS env chain).
        override_num_blocks: the number of read tasks (default: one per file, or per row group when there are
            fewer files than twice the cluster's CPUs; see :func:`plan_read_tasks`).
        concurrency: at most this many read tasks at once (default: as many as the cluster's CPUs allow).

    Each read task reads and decodes its row groups (zstd and the delta transform without the GIL held,
    no per-row Python objects) and hands Ray one block per row group, so decoding runs on every core of
    the cluster and ``iter_torch_batches`` only slices ready (B, H, W) arrays. Works with
    ``iter_torch_batches`` (``image`` as a (B, H, W) tensor of the stored dtype -- torch.uint16 for uint16
    shards; :func:`to_float_line_integrals` makes float32 line integrals on the GPU) and with Ray Train's
    ``datasets=`` / ``ray.train.get_dataset_shard``.
    """
    return _read_drrs(url, columns, filters=[filter] if filter is not None else [],
                      float_line_integral=float_line_integral, storage_options=storage_options,
                      override_num_blocks=override_num_blocks, concurrency=concurrency)


def _read_drrs(
    url: str | Store,
    columns: Sequence[str] | str | None,
    *,
    filters: Sequence[FilterSpec],
    float_line_integral: bool,
    storage_options: Mapping[str, Any] | None,
    override_num_blocks: int | None,
    concurrency: int | None = None,
) -> ray.data.Dataset:
    import pyarrow.parquet as pq
    import ray.data

    from drrfarm.sinks.parquet import IMAGE_DTYPES

    store = open_dataset_store(url, storage_options)
    manifest = _committed(store)
    with store.open_read(manifest.keys_of("parquet")[0]) as fh:
        schema = pq.read_schema(fh)
    missing = [c for c in (IMAGE, *DECODE_COLUMNS) if c not in schema.names]
    if missing:
        raise StorageError(f"{store.url}: shards lack columns {missing}; not a drrfarm Parquet dataset")
    out_columns = _select_columns(schema, columns)

    dict_filters: list[dict[str, list[Any]]] = []
    arrow_exprs: list[Any] = []
    ray_exprs: list[Any] = []  # not expressible in pyarrow: Dataset.filter after decoding
    for flt in filters:
        if isinstance(flt, Mapping):
            d = _check_filter_dict(flt, schema)
            dict_filters.append(d)
            arrow_exprs.append(_arrow_expression(d))
        elif _is_arrow_expression(flt):
            arrow_exprs.append(flt)
        else:  # ray.data.expressions.Expr or an expression string
            converted = _to_arrow_filter(flt)
            (ray_exprs if converted is None else arrow_exprs).append(flt if converted is None else converted)
    entries = _prune_entries(manifest, dict_filters)
    if not entries:
        raise StorageError(f"{store.url}: no committed shard holds the requested volumes {dict_filters}")
    arrow_filter = None
    for e in arrow_exprs:
        arrow_filter = e if arrow_filter is None else arrow_filter & e

    tasks = plan_read_tasks(store, entries, override_num_blocks)
    shapes = {(e.image_dtype, e.height, e.width) for e in entries}
    stored = max(np.dtype(IMAGE_DTYPES.get(d, "<u2")).itemsize for d, _, _ in shapes)
    source = _datasource_class()(tasks, _arrow_fs(store), out_columns, float_line_integral, arrow_filter,
                                 shapes.pop() if len(shapes) == 1 else None,
                                 4 / stored if float_line_integral else 1.0)
    ds = ray.data.read_datasource(source, override_num_blocks=len(tasks), concurrency=concurrency)
    for e in ray_exprs:
        ds = ds.filter(expr=e)
    return ds


# ---------------------------------------------------------------------------------------------------------
# Patient-level split


def volume_split(volume_ids: Iterable[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split volume (patient) ids into (train ids, val ids), deterministically.

    Volumes are ranked by ``sha256(f"{seed}:{volume_id}")`` (independent of listing order and of
    Python's hash seed) and the first ``round(val_fraction * n)`` go to
    validation (at least one and at most ``n - 1`` when ``val_fraction > 0`` and ``n >= 2``). With a
    single volume everything is training data (a patient-level split needs two patients).
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    ids = sorted({str(v) for v in volume_ids})
    n_val = int(round(float(val_fraction) * len(ids)))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    elif len(ids) < 2:
        n_val = 0
        if val_fraction > 0:
            log.warning("volume_split: %d volume(s); no patient-level validation split possible", len(ids))
    ranked = sorted(ids, key=lambda v: hashlib.sha256(f"{int(seed)}:{v}".encode()).hexdigest())
    return sorted(ranked[n_val:]), sorted(ranked[:n_val])


def split_by_volume(
    ds_or_url: ray.data.Dataset | str | Store,
    val_fraction: float = 0.2,
    seed: int = 0,
    **read_kwargs: Any,
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(train, val) datasets split by patient (``volume_id``), never by image.

    ``ds_or_url``: a dataset URL (volume ids come from the manifest; each side is read with
    :func:`read_drrs` and ``read_kwargs``, the volume filter pushed down to the scan) or a
    ``ray.data.Dataset`` that has a ``volume_id`` column (e.g. ``read_drrs(url, columns="all")``).
    See :func:`volume_split` for how volumes are assigned. The val dataset is empty when there is a
    single volume.
    """
    import ray.data

    if isinstance(ds_or_url, ray.data.Dataset):
        if "volume_id" not in ds_or_url.columns():
            raise StorageError("split_by_volume: the dataset has no 'volume_id' column; pass the dataset URL, "
                               "or read it with columns including 'volume_id'")
        ids: set[str] = set()  # one streaming pass over the column (Dataset.unique would shuffle)
        for b in ds_or_url.select_columns(["volume_id"]).iter_batches(batch_size=None, batch_format="pyarrow"):
            ids.update(str(v) for v in b.column("volume_id").unique().to_pylist())
        train_ids, val_ids = volume_split(ids, val_fraction, seed)
        from ray.data.expressions import col

        return (ds_or_url.filter(expr=col("volume_id").is_in(train_ids)),
                ds_or_url.filter(expr=col("volume_id").is_in(val_ids or ["\0no-volume"])))

    unknown = set(read_kwargs) - {"columns", "filter", "float_line_integral", "storage_options", "override_num_blocks",
                                  "concurrency"}
    if unknown:
        raise TypeError(f"split_by_volume: unexpected read_drrs arguments {sorted(unknown)}")
    store = open_dataset_store(ds_or_url, read_kwargs.get("storage_options"))
    ids = dataset_volume_ids(store)
    train_ids, val_ids = volume_split(ids, val_fraction, seed)
    user_filter = read_kwargs.pop("filter", None)
    columns = read_kwargs.pop("columns", None)

    def side(vol_ids: list[str]) -> ray.data.Dataset:
        filters = [] if user_filter is None else [user_filter]
        filters.append({"volume_id": vol_ids})
        return _read_drrs(store, columns, filters=filters,
                          float_line_integral=read_kwargs.get("float_line_integral", False),
                          storage_options=None, override_num_blocks=read_kwargs.get("override_num_blocks"),
                          concurrency=read_kwargs.get("concurrency"))

    train = side(train_ids)
    return train, (side(val_ids) if val_ids else train.limit(0))


def dataset_volume_ids(url: str | Store, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Volume ids of the committed shards (from the manifest; Parquet ``volume_id`` columns if absent)."""
    import pyarrow.parquet as pq

    store = open_dataset_store(url, storage_options)
    manifest = _committed(store)
    ids: set[str] = set()
    for e in manifest.values():
        if e.volume_ids:
            ids.update(e.volume_ids)
        else:
            for key in e.keys_of("parquet"):
                with store.open_read(key) as fh:
                    ids.update(str(v) for v in pq.read_table(fh, columns=["volume_id"]).column("volume_id").to_pylist())
    return sorted(ids)


# ---------------------------------------------------------------------------------------------------------
# Plain pyarrow index (used by the torch datasets)


@dataclass(frozen=True)
class _Group:
    file: int  # index into _DrrIndex.paths
    row_group: int
    rows: np.ndarray  # (n,) positions of the kept rows inside the row group
    first: int  # index of its first kept row in the dataset order


class _DrrIndex:
    """Which rows a torch dataset serves, their metadata (decoded once), and row-group reads."""

    def __init__(
        self,
        url: str | Store,
        columns: Sequence[str] | str | None,
        filter: FilterSpec | None,  # noqa: A002
        volume_ids: Iterable[str] | None,
        float_line_integral: bool,
        storage_options: Mapping[str, Any] | None,
        cache_row_groups: int,
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.store = open_dataset_store(url, storage_options)
        self.url = self.store.url
        manifest = _committed(self.store)
        self.file_metadata = _file_metadata(self.store, manifest)
        self.float_line_integral = float_line_integral
        self.cache_row_groups = max(1, int(cache_row_groups))
        with self.store.open_read(manifest.keys_of("parquet")[0]) as fh:
            schema = pq.read_schema(fh)
        self.columns = _select_columns(schema, columns)
        self.pixel_columns = [c for c in self.columns if c in PIXEL_COLUMNS]

        dict_filters: list[dict[str, list[Any]]] = []
        arrow_filter = None
        if isinstance(filter, Mapping):
            dict_filters.append(_check_filter_dict(filter, schema))
        elif filter is not None:
            if not _is_arrow_expression(filter):
                raise StorageError("filter: the torch datasets take a dict or a pyarrow.compute.Expression")
            arrow_filter = filter
        if volume_ids is not None:
            dict_filters.append({"volume_id": [str(v) for v in volume_ids]})
        for d in dict_filters:
            e = _arrow_expression(d)
            arrow_filter = e if arrow_filter is None else arrow_filter & e

        entries = _prune_entries(manifest, dict_filters)
        self.paths: list[str] = [self.store.path(k) for e in entries for k in e.keys_of("parquet")]
        self._keys: list[str] = [k for e in entries for k in e.keys_of("parquet")]
        meta_cols = [n for n in schema.names if n != IMAGE and n not in PIXEL_COLUMNS]
        tables = []
        groups: list[_Group] = []
        first = 0
        for fi, key in enumerate(self._keys):
            with self.store.open_read(key) as fh:
                pf = pq.ParquetFile(fh)
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
                tab = pf.read(columns=meta_cols)
            mask = _filter_mask(tab, arrow_filter) if arrow_filter is not None else np.ones(tab.num_rows, bool)
            start = 0
            for g, size in enumerate(sizes):
                rows = np.flatnonzero(mask[start:start + size])
                if len(rows):
                    groups.append(_Group(fi, g, rows, first))
                    first += len(rows)
                start += size
            tables.append(tab.filter(pa.array(mask)))
        self.groups = groups
        self.n = first
        meta = pa.concat_tables(tables, promote_options="permissive") if tables else None
        self.meta: dict[str, np.ndarray] = (
            {c: column_to_numpy(c, meta.column(c)) for c in self.columns if c not in PIXEL_COLUMNS}
            if meta is not None else {}
        )
        self._group_starts = np.array([g.first for g in groups] + [first], np.int64)
        self._cache: collections.OrderedDict[tuple[int, int], Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._fs: Any = None
        self._fs_pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()
        state["_fs"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def locate(self, i: int) -> tuple[_Group, int]:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} images")
        i %= self.n
        gi = int(np.searchsorted(self._group_starts, i, side="right") - 1)
        g = self.groups[gi]
        return g, int(g.rows[i - g.first])

    def read_group(self, g: _Group) -> Any:
        """The image (+ decode) columns of one row group, cached (LRU of ``cache_row_groups``)."""
        import pyarrow.parquet as pq

        key = (g.file, g.row_group)
        with self._lock:
            tab = self._cache.get(key)
            if tab is not None:
                self._cache.move_to_end(key)
                return tab
        with self.filesystem().open_input_file(self.paths[g.file]) as fh:
            pf = pq.ParquetFile(fh, pre_buffer=True)
            tab = pf.read_row_group(g.row_group, columns=read_columns(self.pixel_columns, pf.schema_arrow.names))
        with self._lock:
            self._cache[key] = tab
            while len(self._cache) > self.cache_row_groups:
                self._cache.popitem(last=False)
        return tab

    def filesystem(self) -> Any:
        """The dataset's pyarrow filesystem in this process: a forked DataLoader worker opens its own fsspec
        filesystem (s3fs and other async filesystems cannot be used across a fork)."""
        pid = os.getpid()
        if pid != self._fs_pid:
            if self.store.protocol != "file":
                import fsspec

                from drrfarm.sinks import Store

                fs = fsspec.filesystem(self.store.protocol, **getattr(self.store.fs, "storage_options", {}))
                self.store = Store(self.store.url, self.store.protocol, fs, self.store.root, self.store.retry)
            self._fs, self._fs_pid = None, pid
        if self._fs is None:
            self._fs = _arrow_fs(self.store)
        return self._fs

    def row(self, i: int, image: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {IMAGE: image}
        for c, arr in self.meta.items():
            out[c] = arr[i]
        return out

    def image_of(self, tab: Any, pos: int) -> np.ndarray:
        img = decode_images_any_shape(tab.slice(pos, 1), float_line_integral=self.float_line_integral)[0]
        return np.array(img)  # own, writable copy (torch dislikes read-only Arrow views)

    def pixels_of(self, tab: Any, pos: int) -> dict[str, np.ndarray]:
        """The selected pixel annotations (masks, thickness) of one row of a row group."""
        one = tab.slice(pos, 1)
        return {c: decode_pixel_column(one, c)[0] for c in self.pixel_columns}

    def group_table(self, g: _Group, ks: np.ndarray | None = None) -> Any:
        """The row group's kept rows (``ks``: only those, positions into ``g.rows``, in that order)."""
        return self.read_group(g).take(g.rows if ks is None else g.rows[ks])

    def group_images(self, g: _Group, ks: np.ndarray | None = None) -> np.ndarray | list[np.ndarray]:
        return decode_images_any_shape(self.group_table(g, ks), float_line_integral=self.float_line_integral)

    def group_pixels(self, g: _Group, ks: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The selected pixel annotations of a row group's kept rows: name -> (n, L, H, W)."""
        if not self.pixel_columns:
            return {}
        tab = self.group_table(g, ks)
        return {c: decode_pixel_column(tab, c) for c in self.pixel_columns}


def read_metadata(
    url: str | Store,
    columns: Sequence[str] | str | None = "all",
    *,
    filter: FilterSpec | None = None,  # noqa: A002
    volume_ids: Iterable[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Metadata columns of every committed row (no pixels read; pyarrow only), as numpy arrays in
    dataset order -- e.g. label statistics before training. Same columns/filter rules as the torch
    datasets (``filter``: dict or ``pyarrow.compute.Expression``)."""
    index = _DrrIndex(url, columns, filter, volume_ids, False, storage_options, 1)
    return dict(index.meta)


def _filter_mask(table: Any, expr: Any) -> np.ndarray:
    """Boolean row mask of ``table.filter(expr)`` (expression evaluated on the table)."""
    import pyarrow as pa

    idx = pa.table({"__row": pa.array(np.arange(table.num_rows))})
    for name in table.column_names:
        idx = idx.append_column(name, table.column(name))
    kept = np.asarray(idx.filter(expr).column("__row").to_numpy(zero_copy_only=False), np.int64)
    mask = np.zeros(table.num_rows, bool)
    mask[kept] = True
    return mask


# ---------------------------------------------------------------------------------------------------------
# PyTorch datasets (torch imported on first use: Ray Data workers that only decode never import it)

_TORCH_CLASSES = ("DrrTorchDataset", "DrrIterableDataset", "RowGroupSampler")


def _to_torch_row(row: dict[str, Any]) -> dict[str, Any]:
    import torch

    img = row[IMAGE]
    row[IMAGE] = torch.from_numpy(img) if isinstance(img, np.ndarray) else img
    return row


def _torch_dtype(stored: str, float_line_integral: bool) -> Any:
    import torch

    return torch.float32 if float_line_integral else {"uint16": torch.uint16, "float16": torch.float16,
                                                      "float32": torch.float32}[stored]


def _batch_tensor(shape: tuple[int, ...], dtype: Any) -> Any:
    """An uninitialised tensor for a batch: in shared memory inside a DataLoader worker (as default_collate
    allocates its batches), so that handing it to the main process copies nothing."""
    import torch

    if torch.utils.data.get_worker_info() is not None:
        try:
            proto = torch.empty(0, dtype=dtype)
            storage = proto._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
            return proto.new(storage).resize_(*shape)
        except (AttributeError, RuntimeError):  # pragma: no cover - a torch without the private helper
            pass
    return torch.empty(shape, dtype=dtype)


def _meta_to_torch(values: np.ndarray) -> Any:
    """A batch's metadata column as default_collate would give it: a tensor, or a list of str."""
    import torch

    if values.dtype == object:
        return values.tolist()
    return torch.from_numpy(np.ascontiguousarray(values))


class _TorchBatcher:
    """Fills batches of a torch dataset row by row: each image decoded straight into the batch tensor (no per-row
    arrays, no collate copy), float line integrals multiplied on the way; a batch ends at ``batch_size`` rows or
    where the image shape/dtype changes (datasets mixing sweeps)."""

    def __init__(self, index: _DrrIndex, batch_size: int) -> None:
        self.index = index
        self.batch_size = int(batch_size)
        self.tensor: Any = None
        self.view: np.ndarray | None = None
        self.key: tuple[int, int, str] | None = None
        self.rows: list[int] = []
        self.pixels: dict[str, list[np.ndarray]] = {}
        self.scratch: np.ndarray | None = None

    def add_table(self, tab: Any, positions: np.ndarray, rows: np.ndarray) -> Iterator[dict[str, Any]]:
        """Adds rows ``positions`` of a row group's table (``rows``: their dataset indices), in that order; yields
        every batch that fills up. The table's cells are read where they are (no ``take`` copy)."""
        from drrfarm.sinks.parquet import IMAGE_DTYPES, binary_cells, decode_cell_into

        n = tab.num_rows
        cells = binary_cells(tab.column(IMAGE))
        codecs = tab.column(IMAGE_CODEC_COLUMN).to_pylist() if IMAGE_CODEC_COLUMN in tab.column_names else [None] * n
        hs = np.asarray(tab.column("height").to_numpy(zero_copy_only=False)).tolist()
        ws = np.asarray(tab.column("width").to_numpy(zero_copy_only=False)).tolist()
        dts = tab.column("image_dtype").to_pylist()
        scales = np.asarray(tab.column("image_scale").cast("float64").to_numpy(zero_copy_only=False), np.float64)
        pixels = {c: decode_pixel_column(tab.take(positions), c) for c in self.index.pixel_columns} \
            if self.index.pixel_columns else {}
        flt = self.index.float_line_integral
        for i, j in enumerate(positions.tolist()):
            if hs[j] is None or ws[j] is None or dts[j] not in IMAGE_DTYPES:
                raise StorageError(f"image row {int(rows[i])} without height/width/image_dtype: not a drrfarm shard?")
            key = (int(hs[j]), int(ws[j]), str(dts[j]))
            if self.key is not None and key != self.key:
                yield self.finish()
            if self.tensor is None:
                self.key = key
                self.tensor = _batch_tensor((self.batch_size, key[0], key[1]), _torch_dtype(key[2], flt))
                self.view = self.tensor.numpy()
            k = len(self.rows)
            stored = np.dtype(IMAGE_DTYPES[key[2]])
            if flt:
                if self.scratch is None or self.scratch.shape != key[:2] or self.scratch.dtype != stored:
                    self.scratch = np.empty(key[:2], stored)
                decode_cell_into(cells[j], codecs[j], stored, self.scratch, int(rows[i]))
                s = scales[j] if np.isfinite(scales[j]) else 1.0
                np.multiply(self.scratch, np.float32(s), out=self.view[k], dtype=np.float32)
            else:
                decode_cell_into(cells[j], codecs[j], stored, self.view[k], int(rows[i]))
            self.rows.append(int(rows[i]))
            for c, a in pixels.items():
                self.pixels.setdefault(c, []).append(a[i])
            if len(self.rows) == self.batch_size:
                yield self.finish()

    def finish(self) -> dict[str, Any]:
        """The batch collected so far (``image`` (b, H, W), metadata columns as tensors / lists of str)."""
        import torch

        b = len(self.rows)
        idx = np.asarray(self.rows, np.int64)
        out: dict[str, Any] = {IMAGE: self.tensor[:b] if b < self.batch_size else self.tensor}
        for c, arr in self.index.meta.items():
            out[c] = _meta_to_torch(arr[idx])
        for c, parts in self.pixels.items():
            out[c] = torch.from_numpy(np.stack(parts))
        self.tensor = self.view = self.key = None
        self.rows, self.pixels = [], {}
        return out

    @property
    def pending(self) -> int:
        return len(self.rows)


def _define_torch_classes() -> None:
    import torch
    from torch.utils.data import Dataset, IterableDataset, Sampler

    class DrrTorchDataset(Dataset):
        """Map-style PyTorch dataset over a drrfarm dataset's committed Parquet shards (pyarrow only, no Ray).

        ``ds[i]`` is a dict: ``image`` (H, W) torch tensor (stored dtype, or float32 with
        ``float_line_integral``), metadata as numpy scalars/arrays and ``str`` (see
        :mod:`drrfarm.data`); ``torch.utils.data.default_collate`` batches it. Metadata of every row is
        read and decoded once at construction (no pixels); images are read one row group at a time,
        with an LRU cache of ``cache_row_groups`` row groups -- shuffle with :meth:`sampler` (random
        row-group order, random order inside each) rather than a fully random permutation, which would
        read one row group per image. ``volume_ids`` keeps those volumes only (see :func:`volume_split`).
        """

        def __init__(
            self,
            url: str | Store,
            columns: Sequence[str] | str | None = "all",
            *,
            filter: FilterSpec | None = None,  # noqa: A002
            volume_ids: Iterable[str] | None = None,
            float_line_integral: bool = False,
            storage_options: Mapping[str, Any] | None = None,
            transform: Any = None,
            cache_row_groups: int = 2,
        ) -> None:
            self.index = _DrrIndex(url, columns, filter, volume_ids, float_line_integral, storage_options,
                                   cache_row_groups)
            self.transform = transform

        def __len__(self) -> int:
            return self.index.n

        def __getitem__(self, i: int) -> dict[str, Any]:
            g, pos = self.index.locate(int(i))
            tab = self.index.read_group(g)
            row = self.index.row(int(i) % self.index.n, self.index.image_of(tab, pos))
            row.update(self.index.pixels_of(tab, pos))
            row = _to_torch_row(row)
            return self.transform(row) if self.transform is not None else row

        @property
        def file_metadata(self) -> dict[str, str]:
            return dict(self.index.file_metadata)

        def metadata(self, column: str) -> np.ndarray:
            """One metadata column for every row (numpy; see the module doc), without reading pixels."""
            return self.index.meta[column]

        def sampler(self, shuffle: bool = True, seed: int = 0) -> RowGroupSampler:
            """A sampler visiting row groups one at a time (shuffled per epoch with ``shuffle``)."""
            return RowGroupSampler(self, shuffle=shuffle, seed=seed)

    class RowGroupSampler(Sampler):
        """Indices of a :class:`DrrTorchDataset` grouped by row group: row groups in random order, rows
        in random order inside each (``shuffle``), so the dataset's row-group cache is hit. Call
        :meth:`set_epoch` for a new order each epoch (seeded by ``seed`` and the epoch)."""

        def __init__(self, dataset: DrrTorchDataset, shuffle: bool = True, seed: int = 0) -> None:
            self.index = dataset.index
            self.shuffle = shuffle
            self.seed = int(seed)
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __len__(self) -> int:
            return self.index.n

        def __iter__(self) -> Iterator[int]:
            groups = list(range(len(self.index.groups)))
            rng = np.random.default_rng([self.seed, self.epoch])
            if self.shuffle:
                rng.shuffle(groups)
            for gi in groups:
                g = self.index.groups[gi]
                order = np.arange(len(g.rows))
                if self.shuffle:
                    rng.shuffle(order)
                yield from (g.first + int(k) for k in order)

    class DrrIterableDataset(IterableDataset):
        """Iterable PyTorch dataset streaming a drrfarm dataset row group by row group (pyarrow only).

        Row groups are split round-robin across distributed ranks (``rank``/``world_size``, default
        from ``torch.distributed`` when initialised) and then across DataLoader workers, so each row is
        served once per epoch overall (with fewer row groups than workers, row groups are split into parts of
        rows). With ``shuffle``, row-group order and row order inside each group are shuffled, seeded by
        ``seed`` and the epoch (:meth:`set_epoch`).

        Items: with ``batch_size`` None, one dict per row, as :class:`DrrTorchDataset`'s (batch them with the
        DataLoader's ``batch_size``); with ``batch_size``, ready batches -- ``image`` (B, H, W) decoded straight
        into the batch tensor (in shared memory in a worker, so nothing is copied on the way to the main
        process), metadata as tensors and strings as lists, like ``default_collate`` would make them, at a
        fraction of its cost. Use those with ``DataLoader(ds, batch_size=None, ...)`` or :meth:`loader`; the
        last batch of each worker may be short (``drop_last`` drops it), and ``transform`` gets whole batches.
        """

        def __init__(
            self,
            url: str | Store,
            columns: Sequence[str] | str | None = "all",
            *,
            filter: FilterSpec | None = None,  # noqa: A002
            volume_ids: Iterable[str] | None = None,
            float_line_integral: bool = False,
            storage_options: Mapping[str, Any] | None = None,
            transform: Any = None,
            shuffle: bool = False,
            seed: int = 0,
            rank: int | None = None,
            world_size: int | None = None,
            batch_size: int | None = None,
            drop_last: bool = False,
        ) -> None:
            if batch_size is not None and int(batch_size) < 1:
                raise ValueError(f"batch_size must be >= 1 or None, got {batch_size!r}")
            self.index = _DrrIndex(url, columns, filter, volume_ids, float_line_integral, storage_options, 1)
            self.transform = transform
            self.shuffle = shuffle
            self.seed = int(seed)
            self.epoch = 0
            self.rank = rank
            self.world_size = world_size
            self.batch_size = None if batch_size is None else int(batch_size)
            self.drop_last = bool(drop_last)

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __len__(self) -> int:  # rows over all ranks/workers (a hint for progress bars)
            return self.index.n

        def loader(self, num_workers: int | None = None, *, pin_memory: bool | None = None,
                   prefetch_factor: int = 4, **kwargs: Any) -> torch.utils.data.DataLoader:
            """A DataLoader serving this dataset's batches (needs ``batch_size``): ``num_workers`` defaults to the
            CPUs this process may use, at most one per row group; ``pin_memory`` to whether CUDA is available."""
            if self.batch_size is None:
                raise ValueError("loader() serves ready batches: construct the dataset with batch_size=...")
            if num_workers is None:
                cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                num_workers = max(0, min(cpus, len(self.index.groups)))
            if pin_memory is None:
                pin_memory = torch.cuda.is_available()
            extra = {"prefetch_factor": prefetch_factor, "persistent_workers": kwargs.pop("persistent_workers", True)} \
                if num_workers > 0 else {}
            return torch.utils.data.DataLoader(self, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                               **extra, **kwargs)

        def _place(self) -> tuple[int, int]:
            """(slot of this worker, number of slots) over ranks x DataLoader workers."""
            rank, world = self.rank, self.world_size
            if rank is None or world is None:
                dist = torch.distributed
                if dist.is_available() and dist.is_initialized():
                    rank, world = dist.get_rank(), dist.get_world_size()
                else:
                    rank, world = 0, 1
            info = torch.utils.data.get_worker_info()
            wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
            return rank * nw + wid, world * nw

        def _my_units(self) -> list[tuple[int, np.ndarray]]:
            """This worker's share of the epoch: (row group, positions of its kept rows in serving order)."""
            slot, slots = self._place()
            groups = self.index.groups
            order = list(range(len(groups)))
            if self.shuffle:
                np.random.default_rng([self.seed, self.epoch]).shuffle(order)
            parts = 1 if len(order) >= slots else -(-slots // max(1, len(order)))
            units: list[tuple[int, np.ndarray]] = []
            for gi in order:
                n = len(groups[gi].rows)
                ks = np.random.default_rng([self.seed, self.epoch, 2, gi]).permutation(n) if self.shuffle \
                    else np.arange(n)
                units += [(gi, part) for part in np.array_split(ks, min(parts, n)) if len(part)]
            return units[slot::slots]

        def __iter__(self) -> Iterator[dict[str, Any]]:
            if self.batch_size is not None:
                yield from self._batches()
                return
            for gi, ks in self._my_units():
                g = self.index.groups[gi]
                imgs = self.index.group_images(g, ks)
                pixels = self.index.group_pixels(g, ks)
                for j, k in enumerate(ks):
                    row = self.index.row(g.first + int(k), np.array(imgs[j]))
                    row.update({c: np.array(a[j]) for c, a in pixels.items()})
                    row = _to_torch_row(row)
                    yield self.transform(row) if self.transform is not None else row

        def _batches(self) -> Iterator[dict[str, Any]]:
            batcher = _TorchBatcher(self.index, int(self.batch_size or 1))
            for gi, ks in self._my_units():
                g = self.index.groups[gi]
                for batch in batcher.add_table(self.index.read_group(g), g.rows[ks], g.first + ks):
                    yield self.transform(batch) if self.transform is not None else batch
            if batcher.pending and not self.drop_last:
                batch = batcher.finish()
                yield self.transform(batch) if self.transform is not None else batch

    for cls in (DrrTorchDataset, DrrIterableDataset, RowGroupSampler):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls


def __getattr__(name: str) -> Any:
    if name in _TORCH_CLASSES:
        _define_torch_classes()
        return globals()[name]
    if name == "_DrrShardDatasource":  # pickled by reference: defined on first access in any process
        return _datasource_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DECODE_COLUMNS",
    "IMAGE",
    "VECTOR_SHAPES",
    "DrrIterableDataset",  # noqa: F822 - defined on first access (module __getattr__)
    "DrrTorchDataset",  # noqa: F822 - defined on first access (module __getattr__)
    "RowGroupSampler",  # noqa: F822 - defined on first access (module __getattr__)
    "column_to_numpy",
    "dataset_info",
    "dataset_volume_ids",
    "decode_table",
    "open_dataset_store",
    "read_drrs",
    "read_metadata",
    "plan_read_tasks",
    "split_by_volume",
    "stream_drrs",
    "stream_info",
    "stream_metadata",
    "stream_split_by_volume",
    "to_float_line_integrals",
    "volume_split",
]
