"""Loading a drrfarm dataset for training: Ray Data, plain PyTorch, patient-level splits.

Everything here reads through the dataset's manifest (:func:`drrfarm.sinks.read_manifest`): only
committed shards are read, a shard still being written or left half-written by a killed worker is
invisible. Parquet decoding is the sinks' own (:func:`drrfarm.sinks.decode_images`,
:func:`drrfarm.sinks.dequantize`); this package only turns metadata columns into arrays.

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

Modules, by job: :mod:`drrfarm.data.columns` (the row layout and its decoding), :mod:`drrfarm.data.dataset`
(opening a dataset: store, committed manifest, file metadata), :mod:`drrfarm.data.filters` (row filters),
:mod:`drrfarm.data.splits` (patient-level splits), :mod:`drrfarm.data.parquet_io` (a shard's Parquet file read in
few requests: one GET per file or row group on an object store), :mod:`drrfarm.data.shards` (read tasks and their
reader), :mod:`drrfarm.data.raydata` (:func:`read_drrs`, :func:`split_by_volume`; the Ray Datasource is in
:mod:`drrfarm.data.datasource`), :mod:`drrfarm.data.index` (rows, metadata and row-group reads without Ray;
:func:`read_metadata`), :mod:`drrfarm.data.torch_datasets` (the PyTorch datasets) and
:mod:`drrfarm.data.batch_slots` (reusable shared-memory slots between DataLoader workers and the training
process). Everything public is importable from ``drrfarm.data``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from drrfarm.data.columns import (
    BOOL_LISTS,
    DECODE_COLUMNS,
    IMAGE,
    INT_NULL,
    LIST_ROW_SHAPES,
    NULLABLE_INT_AS_FLOAT,
    PIXEL_COLUMNS,
    PIXEL_DEPENDS,
    VECTOR_SHAPES,
    column_to_numpy,
    decode_images_any_shape,
    decode_pixel_column,
    decode_table,
    read_columns,
    to_float_line_integrals,
)
from drrfarm.data.dataset import dataset_info, dataset_volume_ids, open_dataset_store
from drrfarm.data.filters import FilterSpec
from drrfarm.data.index import read_metadata
from drrfarm.data.raydata import read_drrs, split_by_volume
from drrfarm.data.shards import plan_read_tasks
from drrfarm.data.splits import volume_split

if TYPE_CHECKING:  # pragma: no cover
    from drrfarm.data.torch_datasets import DrrIterableDataset, DrrTorchDataset, RowGroupSampler
    from drrfarm.farm.stream import stream_drrs, stream_info, stream_metadata, stream_split_by_volume

# handed on when first used: the torch datasets (so that importing drrfarm.data does not import torch) and the
# farm's stream, which decodes with drrfarm.data.columns (the stream sits above this package)
_TORCH_NAMES = frozenset({"DrrIterableDataset", "DrrTorchDataset", "RowGroupSampler"})
_STREAM_NAMES = frozenset({"stream_drrs", "stream_info", "stream_metadata", "stream_split_by_volume"})


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        from drrfarm.data import torch_datasets as source  # imports torch
    elif name in _STREAM_NAMES:
        from drrfarm.farm import stream as source
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(source, name)
    globals()[name] = value
    return value


__all__ = [
    "BOOL_LISTS",
    "DECODE_COLUMNS",
    "IMAGE",
    "INT_NULL",
    "LIST_ROW_SHAPES",
    "NULLABLE_INT_AS_FLOAT",
    "PIXEL_COLUMNS",
    "PIXEL_DEPENDS",
    "VECTOR_SHAPES",
    "DrrIterableDataset",
    "DrrTorchDataset",
    "FilterSpec",
    "RowGroupSampler",
    "column_to_numpy",
    "dataset_info",
    "dataset_volume_ids",
    "decode_images_any_shape",
    "decode_pixel_column",
    "decode_table",
    "open_dataset_store",
    "read_columns",
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
