"""Opening a shard's Parquet file for reading in few requests (:class:`ParquetShard`): used by Ray Data's read
tasks (:mod:`drrfarm.data.shards`) and the torch datasets (:mod:`drrfarm.data.index`).

pyarrow reading an object store through ``PyFileSystem(FSSpecHandler(fs))`` costs four requests per file and
row group read: two HEADs (``isfile`` and the file's ``info``), a GET of the footer, and a GET from the first
column chunk wanted to the end of the read-ahead block (s3fs: 50 MiB past the end of the request), all through
the file object's read-ahead cache (one more copy of the bytes). On an object store every request is a round
trip, and a GET of a few bytes of a large object can cost the server nearly as much as the whole object. Here,
for files of an fsspec filesystem:

* a whole file whose size is known (the manifest records it) and at most :data:`WHOLE_FILE_BYTES`: one GET
  (``cat_file``), parsed from memory;
* otherwise the footer by one GET of the file's tail (none when the caller holds the file's metadata, as the torch
  index and the row-group read plan do), then one ``cat_ranges`` call per row group for the column chunks it
  needs (merged across gaps of up to :data:`MERGE_GAP_BYTES`: one GET for the usual layout), held in memory only
  while that row group is read.

Local files (pyarrow's native filesystem) are read by pyarrow as before (``pre_buffer``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from drrfarm.errors import StorageError

log = logging.getLogger(__name__)

#: a whole file at most this large is fetched with one request (larger ones row group by row group)
WHOLE_FILE_BYTES = 128 << 20
#: bytes of a file's tail fetched for its footer (a second request when the footer is larger)
FOOTER_SAMPLE_BYTES = 64 << 10
#: column chunks of a row group at most this far apart are fetched in one range
MERGE_GAP_BYTES = 1 << 20


def fsspec_filesystem(filesystem: Any) -> Any | None:
    """The fsspec filesystem behind a pyarrow ``PyFileSystem(FSSpecHandler(fs))`` (None for pyarrow's own
    filesystems, which read through pyarrow as before)."""
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.PyFileSystem) and isinstance(filesystem.handler, pafs.FSSpecHandler):
        return filesystem.handler.fs
    return None


def _chunk_range(col: Any) -> tuple[int, int]:
    """[start, end) of a column chunk in its file (as parquet-cpp computes it: the dictionary page first)."""
    start = int(col.data_page_offset)
    dict_offset = col.dictionary_page_offset if col.has_dictionary_page else None
    if dict_offset is not None and 0 < int(dict_offset) < start:
        start = int(dict_offset)
    return start, start + int(col.total_compressed_size)


def row_group_ranges(metadata: Any, row_group: int, columns: Sequence[str] | None,
                     max_gap: int | None = None) -> list[tuple[int, int]]:
    """Byte ranges [start, end) holding the column chunks of ``columns`` (top-level names; None: all) in one row
    group, neighbours at most ``max_gap`` (default :data:`MERGE_GAP_BYTES`) apart merged."""
    max_gap = MERGE_GAP_BYTES if max_gap is None else int(max_gap)
    rg = metadata.row_group(row_group)
    wanted = None if columns is None else set(columns)
    spans = []
    for j in range(rg.num_columns):
        col = rg.column(j)
        path = col.path_in_schema
        if wanted is None or path in wanted or path.split(".", 1)[0] in wanted:
            spans.append(_chunk_range(col))
    spans.sort()
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start - merged[-1][1] <= max_gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


class _PartsFile:
    """A read-only file of ``size`` bytes whose reads are served from fetched parts (zero-copy views); a read
    outside them fetches its range (one request, logged: the planned ranges missed it)."""

    def __init__(self, fs: Any, path: str, size: int, where: str) -> None:
        self.fs = fs
        self.path = path
        self._size = int(size)
        self.where = where
        self.parts: list[tuple[int, memoryview]] = []
        self.pos = 0
        self.closed = False

    # the file protocol pyarrow's PythonFile uses
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = int(pos) if whence == 0 else self.pos + int(pos) if whence == 1 else self._size + int(pos)
        return self.pos

    def read(self, n: int | None = -1) -> Any:
        start = self.pos
        end = self._size if n is None or n < 0 else min(self._size, start + int(n))
        self.pos = max(start, end)
        if end <= start:
            return b""
        for p_start, data in self.parts:
            if p_start <= start and end <= p_start + len(data):
                return data[start - p_start:end - p_start]
        log.debug("%s: bytes %d-%d were not fetched ahead; fetching them", self.where, start, end)
        return fetch_ranges(self.fs, self.path, [(start, end)], self.where)[0]

    def close(self) -> None:
        self.closed = True
        self.parts = []


def fetch_ranges(fs: Any, path: str, ranges: Sequence[tuple[int, int]], where: str) -> list[Any]:
    """The bytes of ``ranges`` of a file (one ``cat_ranges`` call: concurrent requests on async filesystems);
    a :class:`StorageError` naming the file when a range cannot be read in full."""
    if not ranges:
        return []
    try:
        out = fs.cat_ranges([path] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges], on_error="raise")
    except Exception as exc:
        raise StorageError(f"reading {where} (bytes {ranges[0][0]}-{ranges[-1][1]}) failed: "
                           f"{type(exc).__name__}: {exc}") from exc
    for (s, e), data in zip(ranges, out, strict=True):
        if isinstance(data, BaseException):  # pragma: no cover - on_error="raise" raises instead
            raise StorageError(f"reading {where} (bytes {s}-{e}) failed: {type(data).__name__}: {data}")
        if len(data) != e - s:
            raise StorageError(f"reading {where}: bytes {s}-{e} returned {len(data)} bytes, not {e - s} "
                               "(the file is shorter than its Parquet metadata says)")
    return [memoryview(d) for d in out]


def _fetch(fs: Any, where: str, fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:
        raise StorageError(f"reading {where} failed: {type(exc).__name__}: {exc}") from exc


class ParquetShard:
    """One Parquet file of a dataset, opened for reading some of its row groups and columns.

    ``filesystem``: the dataset's pyarrow filesystem (:func:`drrfarm.sinks.dataset.arrow_filesystem`);
    ``size``: the file's bytes when known (the manifest's); ``metadata``: its ``FileMetaData`` when the caller
    holds it (no footer request); ``whole``: False reads row group by row group even when the file is small
    enough to fetch whole (a read of some row groups only). See the module docstring for the requests made.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, filesystem: Any, path: str, *, size: int | None = None, metadata: Any = None,
                 whole: bool = True) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        self.fs = fsspec_filesystem(filesystem)
        self._parts: _PartsFile | None = None
        self._handle: Any = None
        if self.fs is None:  # pyarrow's own filesystem (local files): pyarrow reads, as before
            self._handle = filesystem.open_input_file(path)
            try:
                self.file = pq.ParquetFile(self._handle, pre_buffer=True, metadata=metadata)
            except BaseException:
                self._handle.close()
                raise
            return
        self.where = self.fs.unstrip_protocol(path)
        if metadata is None and whole and size is not None and int(size) <= WHOLE_FILE_BYTES:
            data = _fetch(self.fs, self.where, lambda: self.fs.cat_file(path, start=0))
            self.file = self._parse(lambda: pq.ParquetFile(pa.BufferReader(data), pre_buffer=False))
            return
        if size is None:
            size = _fetch(self.fs, self.where, lambda: self.fs.size(path))
        if metadata is None:
            metadata = self._footer(int(size))
        self._parts = _PartsFile(self.fs, path, int(size), self.where)
        self._handle = pa.PythonFile(self._parts, mode="r")
        # pre_buffer off: pyarrow reads each column chunk in one call, from the parts fetched for it (its read
        # coalescing would ask for the gaps between the chunks wanted as well)
        self.file = self._parse(lambda: pq.ParquetFile(self._handle, metadata=metadata, pre_buffer=False))

    def _parse(self, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise StorageError(f"{self.where}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc

    def _footer(self, size: int) -> Any:
        """The file's metadata from its tail (one request; two when the footer is larger than the sample)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = min(size, FOOTER_SAMPLE_BYTES)
        tail = fetch_ranges(self.fs, self.path, [(size - n, size)], self.where)[0]
        if len(tail) < 8 or bytes(tail[-4:]) != b"PAR1":
            raise StorageError(f"{self.where}: no Parquet footer ends at byte {size} (its size): not a Parquet file, "
                               "or not the file the manifest committed")
        need = int.from_bytes(tail[-8:-4], "little") + 8
        if need > size:
            raise StorageError(f"{self.where}: its Parquet footer says {need} bytes, the file has {size}")
        if need > len(tail):
            tail = fetch_ranges(self.fs, self.path, [(size - need, size)], self.where)[0]
        return self._parse(lambda: pq.read_metadata(pa.BufferReader(tail[len(tail) - need:])))

    @property
    def metadata(self) -> Any:
        return self.file.metadata

    @property
    def schema_arrow(self) -> Any:
        return self.file.schema_arrow

    @property
    def num_row_groups(self) -> int:
        return int(self.file.num_row_groups)

    def _prefetch(self, row_groups: Sequence[int], columns: Sequence[str] | None) -> None:
        if self._parts is None:
            return
        ranges = [r for g in row_groups for r in row_group_ranges(self.file.metadata, g, columns)]
        self._parts.parts = list(zip([s for s, _ in ranges], fetch_ranges(self.fs, self.path, ranges, self.where),
                                     strict=True))

    def read_row_group(self, row_group: int, columns: Sequence[str] | None = None) -> Any:
        """One row group's ``columns`` (None: all) as a pyarrow Table."""
        self._prefetch([row_group], columns)
        try:
            return self.file.read_row_group(row_group, columns=None if columns is None else list(columns))
        finally:
            if self._parts is not None:
                self._parts.parts = []

    def read(self, columns: Sequence[str] | None = None) -> Any:
        """Every row group's ``columns`` as one pyarrow Table."""
        import pyarrow as pa

        if self._parts is None:
            return self.file.read(columns=None if columns is None else list(columns))
        tables = [self.read_row_group(g, columns) for g in range(self.num_row_groups)]
        return pa.concat_tables(tables) if tables else self.file.schema_arrow.empty_table().select(
            list(columns) if columns is not None else self.file.schema_arrow.names)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        if self._parts is not None:
            self._parts.close()

    def __enter__(self) -> ParquetShard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
