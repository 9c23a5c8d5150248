"""The rows a plain-pyarrow reader serves (no Ray): which row groups hold them, their metadata decoded once,
and cached row-group reads. Used by the torch datasets (:mod:`drrfarm.data.torch_datasets`) and
:func:`read_metadata`.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from drrfarm.data.columns import (
    IMAGE,
    PIXEL_COLUMNS,
    column_to_numpy,
    decode_images_any_shape,
    decode_pixel_column,
    read_columns,
    select_columns,
)
from drrfarm.data.dataset import committed_manifest, file_metadata, open_dataset_store, shard_schema
from drrfarm.data.filters import FilterSpec, filter_mask, prune_entries, reader_filters
from drrfarm.data.parquet_io import ParquetShard
from drrfarm.sinks.dataset import arrow_filesystem
from drrfarm.sinks.store import Store

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa


@dataclass(frozen=True)
class RowGroup:
    """The rows a torch dataset serves from one Parquet row group."""

    file: int  # index into DrrIndex.paths
    row_group: int
    rows: np.ndarray  # (n,) positions of the kept rows inside the row group
    first: int  # index of its first kept row in the dataset order


class DrrIndex:
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
        self.store = open_dataset_store(url, storage_options)
        self.url = self.store.url
        manifest = committed_manifest(self.store)
        self.file_metadata = file_metadata(self.store, manifest)
        self.float_line_integral = float_line_integral
        self.cache_row_groups = max(1, int(cache_row_groups))
        schema = shard_schema(self.store, manifest)
        self.columns = select_columns(schema, columns)
        self.pixel_columns = [c for c in self.columns if c in PIXEL_COLUMNS]

        dict_filters, arrow_filter = reader_filters(filter, volume_ids, schema)
        entries = prune_entries(manifest, dict_filters)
        self.paths: list[str] = [self.store.path(k) for e in entries for k in e.keys_of("parquet")]
        self._keys: list[str] = [k for e in entries for k in e.keys_of("parquet")]
        self._sizes: list[int | None] = [e.bytes.get(k) for e in entries for k in e.keys_of("parquet")]
        self._file_meta: list[Any] = []  # each file's FileMetaData (read_group needs no footer request)
        meta_cols = [n for n in schema.names if n != IMAGE and n not in PIXEL_COLUMNS]
        groups, meta = self._scan(meta_cols, arrow_filter)
        self.groups = groups
        self.n = sum(len(g.rows) for g in groups)
        self.meta: dict[str, np.ndarray] = (
            {c: column_to_numpy(c, meta.column(c)) for c in self.columns if c not in PIXEL_COLUMNS}
            if meta is not None else {}
        )
        self._group_starts = np.array([g.first for g in groups] + [self.n], np.int64)
        self._cache: collections.OrderedDict[tuple[int, int], Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._fs: Any = None
        self._fs_pid = os.getpid()

    def _scan(self, meta_cols: Sequence[str], arrow_filter: Any) -> tuple[list[RowGroup], pa.Table | None]:
        """The row groups holding kept rows, in dataset order, and the kept rows' metadata columns (one table;
        None without files): every file's metadata columns are read once, no pixels."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        groups: list[RowGroup] = []
        first = 0
        remote = None if self.store.protocol == "file" else arrow_filesystem(self.store)
        for fi, key in enumerate(self._keys):
            if remote is None:
                with self.store.open_read(key) as fh:
                    pf = pq.ParquetFile(fh)
                    tab = pf.read(columns=meta_cols)
            else:  # the footer and the metadata columns' ranges only
                with ParquetShard(remote, self.paths[fi], size=self._sizes[fi], whole=False) as pf:
                    tab = pf.read(columns=meta_cols)
            self._file_meta.append(pf.metadata)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            mask = filter_mask(tab, arrow_filter) if arrow_filter is not None else np.ones(tab.num_rows, bool)
            start = 0
            for g, size in enumerate(sizes):
                rows = np.flatnonzero(mask[start:start + size])
                if len(rows):
                    groups.append(RowGroup(fi, g, rows, first))
                    first += len(rows)
                start += size
            tables.append(tab.filter(pa.array(mask)))
        return groups, (pa.concat_tables(tables, promote_options="permissive") if tables else None)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()
        state["_fs"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def locate(self, i: int) -> tuple[RowGroup, int]:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} images")
        i %= self.n
        gi = int(np.searchsorted(self._group_starts, i, side="right") - 1)
        g = self.groups[gi]
        return g, int(g.rows[i - g.first])

    def read_group(self, g: RowGroup) -> Any:
        """The image (+ decode) columns of one row group, cached (LRU of ``cache_row_groups``): one request on an
        object store (the file's metadata is known; see :class:`~drrfarm.data.parquet_io.ParquetShard`)."""
        key = (g.file, g.row_group)
        with self._lock:
            tab = self._cache.get(key)
            if tab is not None:
                self._cache.move_to_end(key)
                return tab
        with ParquetShard(self.filesystem(), self.paths[g.file], size=self._sizes[g.file],
                          metadata=self._file_meta[g.file], whole=False) as pf:
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

                fs = fsspec.filesystem(self.store.protocol, **getattr(self.store.fs, "storage_options", {}))
                self.store = Store(self.store.url, self.store.protocol, fs, self.store.root, self.store.retry)
            self._fs, self._fs_pid = None, pid
        if self._fs is None:
            self._fs = arrow_filesystem(self.store)
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

    def group_table(self, g: RowGroup, ks: np.ndarray | None = None) -> Any:
        """The row group's kept rows (``ks``: only those, positions into ``g.rows``, in that order)."""
        return self.read_group(g).take(g.rows if ks is None else g.rows[ks])

    def group_images(self, g: RowGroup, ks: np.ndarray | None = None) -> np.ndarray | list[np.ndarray]:
        return decode_images_any_shape(self.group_table(g, ks), float_line_integral=self.float_line_integral)

    def group_pixels(self, g: RowGroup, ks: np.ndarray | None = None) -> dict[str, np.ndarray]:
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
    index = DrrIndex(url, columns, filter, volume_ids, False, storage_options, 1)
    return dict(index.meta)
