"""Ray Data: :func:`read_drrs` (a dataset's committed shards as a ``ray.data.Dataset``) and
:func:`split_by_volume` (by patient). Ray is imported when they run, not with this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from drrfarm.data.columns import DECODE_COLUMNS, IMAGE, select_columns
from drrfarm.data.dataset import committed_manifest, dataset_volume_ids, open_dataset_store, shard_schema
from drrfarm.data.filters import (
    FilterSpec,
    arrow_expression,
    check_filter_dict,
    is_arrow_expression,
    prune_entries,
    to_arrow_filter,
)
from drrfarm.data.shards import plan_read_tasks
from drrfarm.data.splits import volume_split
from drrfarm.errors import StorageError
from drrfarm.sinks.dataset import arrow_filesystem
from drrfarm.sinks.parquet import IMAGE_DTYPES

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from drrfarm.sinks.store import Store


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
            GPU, rather keep uint16 and call :func:`~drrfarm.data.to_float_line_integrals` on the device: half the bytes
            through the object store, the driver and PCIe.
        storage_options: fsspec options for the dataset's filesystem (default: the AWS env chain).
        override_num_blocks: the number of read tasks (default: one per file, or per row group when there are
            fewer files than twice the cluster's CPUs; see :func:`plan_read_tasks`).
        concurrency: at most this many read tasks at once (default: as many as the cluster's CPUs allow).

    Each read task reads and decodes its row groups (zstd and the delta transform without the GIL held,
    no per-row Python objects) and hands Ray one block per row group, so decoding runs on every core of
    the cluster and ``iter_torch_batches`` only slices ready (B, H, W) arrays. Works with
    ``iter_torch_batches`` (``image`` as a (B, H, W) tensor of the stored dtype -- torch.uint16 for uint16
    shards; :func:`~drrfarm.data.to_float_line_integrals` makes float32 line integrals on the GPU) and with Ray Train's
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
    import ray.data

    from drrfarm.data.datasource import DrrShardDatasource  # imports Ray

    store = open_dataset_store(url, storage_options)
    manifest = committed_manifest(store)
    schema = shard_schema(store, manifest)
    missing = [c for c in (IMAGE, *DECODE_COLUMNS) if c not in schema.names]
    if missing:
        raise StorageError(f"{store.url}: shards lack columns {missing}; not a drrfarm Parquet dataset")
    out_columns = select_columns(schema, columns)

    dict_filters: list[dict[str, list[Any]]] = []
    arrow_exprs: list[Any] = []
    ray_exprs: list[Any] = []  # not expressible in pyarrow: Dataset.filter after decoding
    for flt in filters:
        if isinstance(flt, Mapping):
            d = check_filter_dict(flt, schema)
            dict_filters.append(d)
            arrow_exprs.append(arrow_expression(d))
        elif is_arrow_expression(flt):
            arrow_exprs.append(flt)
        else:  # ray.data.expressions.Expr or an expression string
            converted = to_arrow_filter(flt)
            (ray_exprs if converted is None else arrow_exprs).append(flt if converted is None else converted)
    entries = prune_entries(manifest, dict_filters)
    if not entries:
        raise StorageError(f"{store.url}: no committed shard holds the requested volumes {dict_filters}")
    arrow_filter = None
    for e in arrow_exprs:
        arrow_filter = e if arrow_filter is None else arrow_filter & e

    tasks = plan_read_tasks(store, entries, override_num_blocks)
    shapes = {(e.image_dtype, e.height, e.width) for e in entries}
    stored = max(np.dtype(IMAGE_DTYPES.get(d, "<u2")).itemsize for d, _, _ in shapes)
    source = DrrShardDatasource(tasks, arrow_filesystem(store), out_columns, float_line_integral, arrow_filter,
                                shapes.pop() if len(shapes) == 1 else None,
                                4 / stored if float_line_integral else 1.0)
    ds = ray.data.read_datasource(source, override_num_blocks=len(tasks), concurrency=concurrency)
    for e in ray_exprs:
        ds = ds.filter(expr=e)
    return ds


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
