"""The read tasks of :func:`~drrfarm.data.read_drrs`: which files and row groups each one reads
(:func:`plan_read_tasks`) and the reader that decodes them (:class:`ShardReader`). Ray is imported only where
it is used: in the reader's call (a Ray read task) and to count the cluster's CPUs.

Images are decoded where the data is read -- one task per file, or per row group when files are fewer than
twice the cluster's CPUs -- straight from the Parquet cells into the output arrays, so decoding uses every
core and the training process only slices ready (B, H, W) arrays. On an object store a task fetches its file,
or its row group, with one request (:class:`~drrfarm.data.parquet_io.ParquetShard`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from drrfarm.data.columns import IMAGE, PIXEL_COLUMNS, column_to_numpy, decode_pixel_column, decode_table, read_columns
from drrfarm.data.parquet_io import ParquetShard
from drrfarm.sinks.dataset import arrow_filesystem
from drrfarm.sinks.parquet import IMAGE_DTYPES

if TYPE_CHECKING:  # pragma: no cover
    from drrfarm.sinks.manifest import ShardEntry
    from drrfarm.sinks.store import Store


@dataclass(frozen=True)
class ReadUnit:
    """A part of a read task: a Parquet file, all its row groups (None) or some."""

    path: str  # in the dataset's pyarrow filesystem
    row_groups: tuple[int, ...] | None
    rows: int  # before filters
    nbytes: int  # its images, decoded to the stored dtype
    size: int | None = None  # the file's bytes (the manifest's)
    metadata: Any = field(default=None, compare=False, repr=False)  # its FileMetaData, when read while planning

    def open(self, filesystem: Any) -> ParquetShard:
        """The file, opened to read this unit's row groups (see :class:`~drrfarm.data.parquet_io.ParquetShard`)."""
        return ParquetShard(filesystem, self.path, size=self.size, metadata=self.metadata,
                            whole=self.row_groups is None)


class ShardReader:
    """The read function of one :func:`~drrfarm.data.read_drrs` read task (a plain picklable object; no torch import).

    Reads its files' row groups one at a time (only the columns needed), keeps the rows passing
    ``arrow_filter``, decodes them (:func:`decode_table`: the images straight from their cells, no per-row
    Python objects) and yields one Ray block per row group. ``empty_image``: (dtype, H, W) of the dataset's
    images when all shards agree, for the empty block of a task whose rows were all filtered out (its
    columns must still have the dataset's types).
    """

    def __init__(self, units: Sequence[ReadUnit], filesystem: Any, columns: Sequence[str], float_line_integral: bool,
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
        for unit in self.units:
            with unit.open(self.filesystem) as pf:
                cols = self._file_columns(pf.schema_arrow.names)
                groups = range(pf.num_row_groups) if unit.row_groups is None else unit.row_groups
                for g in groups:
                    tab = pf.read_row_group(g, columns=cols)
                    if self.arrow_filter is not None:
                        tab = tab.filter(self.arrow_filter)
                    if tab.num_rows:
                        yield tab

    def batch(self, table: Any) -> dict[str, Any]:
        """A table of rows as the dict of numpy arrays of a block (see :mod:`drrfarm.data`)."""
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
            with self.units[0].open(self.filesystem) as pf:
                empty = pf.schema_arrow.empty_table().select(read_columns(self.columns, pf.schema_arrow.names))
            yield BlockAccessor.batch_to_block(self.batch(empty))


def _available_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to (else of this machine)."""
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001 - a cluster without resources information: the machine's count
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _row_group_units(store: Store, units: Sequence[ReadUnit]) -> list[ReadUnit]:
    """Every file's row groups as units of their own (the Parquet footers read in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    fs = arrow_filesystem(store)

    def split(u: ReadUnit) -> list[ReadUnit]:
        with ParquetShard(fs, u.path, size=u.size, whole=False) as pf:  # the footer only
            meta = pf.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        total = max(1, sum(sizes))
        return [ReadUnit(u.path, (g,), n, u.nbytes * n // total, u.size, meta) for g, n in enumerate(sizes) if n]

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(units)))) as pool:
        return [p for parts in pool.map(split, units) for p in parts]


def plan_read_tasks(store: Store, entries: Sequence[ShardEntry], tasks: int | None = None,
                    cpus: int | None = None) -> list[tuple[ReadUnit, ...]]:
    """The read tasks of :func:`~drrfarm.data.read_drrs`: which files / row groups each one reads.

    Parallelism follows the data and the cores: one task per Parquet file (its row groups streamed as
    blocks) when there are at least twice as many files as ``cpus`` (default: the Ray cluster's CPUs);
    otherwise one per row group (the footers are read to find them), so that a few large shards still keep
    every core busy. ``tasks`` (``override_num_blocks``) asks for that many instead: row groups are split
    off or consecutive units merged to come close.
    """
    files: list[ReadUnit] = []
    for e in entries:
        keys = e.keys_of("parquet")
        per_pixel = np.dtype(IMAGE_DTYPES.get(e.image_dtype, "<u2")).itemsize
        for k in keys:
            rows = e.rows // max(1, len(keys))
            files.append(ReadUnit(store.path(k), None, rows, rows * e.height * e.width * per_pixel, e.bytes.get(k)))
    want = int(tasks) if tasks else 2 * (cpus or _available_cpus())
    units = files if len(files) >= want else _row_group_units(store, files)
    if not units:
        units = files
    if tasks is None or len(units) <= want:
        return [(u,) for u in units]
    per = -(-len(units) // want)  # merge consecutive units into `tasks` tasks
    return [tuple(units[i : i + per]) for i in range(0, len(units), per)]
