"""Shard writing: ShardSink (encode + atomic upload + manifest commit) and AsyncShardWriter (off the
render thread, bounded).

Commit protocol of :meth:`ShardSink.write_shard` (the manifest entry is the commit point):

1. validate and encode everything in memory (Parquet bytes, PNG + JSON bytes, sha256 of each);
2. remove any existing manifest entry for the shard id (a rewrite is uncommitted until step 4);
3. put every file at its final, deterministic key -- each put is atomic (see
   :mod:`drrfarm.sinks.store`) and retried with bounded backoff; a rewrite replaces the same keys, so
   nothing is ever duplicated;
4. put ``_manifest/<shard_id>.json``.

A writer killed anywhere before step 4 leaves no committed shard: readers trust only the manifest,
and resume simply writes the shard again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from drrfarm import __version__
from drrfarm.errors import DrrfarmError, StorageError
from drrfarm.sinks import manifest as _manifest
from drrfarm.sinks import parquet as _parquet  # encode_parquet looked up per call (tests swap the codec)
from drrfarm.sinks.annotations import parquet_cells, png_files, split_pixel_fields
from drrfarm.sinks.manifest import ShardEntry
from drrfarm.sinks.parquet import (
    IMAGE_ZSTD_LEVEL,
    VECTOR_LENGTHS,
    DeltaPlanes,
    is_float_vector,
)
from drrfarm.sinks.png import encode_png16, png_keys, sidecar_json
from drrfarm.sinks.store import Store, check_shard_id, open_store

log = logging.getLogger("drrfarm.sinks")

FORMATS = ("parquet", "png")
PARQUET_PREFIX = "parquet"
UINT16_MAX = 65535


def parquet_key(shard_id: str) -> str:
    """Key of a shard's Parquet file."""
    return f"{PARQUET_PREFIX}/{check_shard_id(shard_id)}.parquet"


def auto_scale(image: np.ndarray) -> float:
    """Scale that maps the image's max |value| to 65535 (1.0 for an all-zero/non-finite image)."""
    finite = np.abs(image[np.isfinite(image)])
    m = float(finite.max()) if finite.size else 0.0
    return m / UINT16_MAX if m > 0 else 1.0


def quantize(images: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, int]:
    """(uint16 images = round(x / scale) clipped to [0, 65535], number of clipped/non-finite pixels).

    images: (B, H, W) float; scales: (B,) > 0. Works image by image (float64, bounded temporaries).
    """
    b = images.shape[0]
    out = np.empty(images.shape, np.uint16)
    bad = 0
    for i in range(b):
        q = np.divide(images[i], scales[i], dtype=np.float64)
        n_bad = int(np.count_nonzero(~((q >= -0.5) & (q <= UINT16_MAX + 0.5))))  # NaN counts as bad
        if n_bad:
            bad += n_bad
            q[np.isnan(q)] = 0.0
        np.clip(q, 0.0, float(UINT16_MAX), out=q)
        np.rint(q, out=q)
        out[i] = q
    return out, bad


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ShardSink:
    """Writes shards to one dataset URL; knows nothing about Ray. Safe to share between threads.

    url: path or fsspec URL (preflighted on construction with a probe write/delete), or an open Store.
    formats: subset of ("parquet", "png"). image_dtype: Parquet image dtype "uint16" (quantised,
    ``float = value * image_scale``), "float16" or "float32" (PNG is always uint16).
    rows_per_row_group: Parquet rows per row group (None: ~64 MiB of pixels).
    """

    def __init__(
        self,
        url: str | Store,
        formats: Sequence[str] = ("parquet",),
        image_dtype: str = "uint16",
        rows_per_row_group: int | None = None,
        *,
        parquet_compression: str = "zstd",
        parquet_compression_level: int | None = None,
        png_compress_level: int = 1,
    ) -> None:
        if isinstance(formats, str):
            formats = (formats,)
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise StorageError(f"formats {list(formats)!r}: choose from {list(FORMATS)}")
        if image_dtype not in ("uint16", "float16", "float32"):
            raise StorageError(f"image_dtype {image_dtype!r}: choose uint16, float16 or float32")
        if rows_per_row_group is not None and rows_per_row_group < 1:
            raise StorageError(f"rows_per_row_group must be >= 1, got {rows_per_row_group}")
        self.store = url if isinstance(url, Store) else open_store(url)
        self.url = self.store.url
        self.formats = tuple(dict.fromkeys(formats))
        self.image_dtype = image_dtype
        self.rows_per_row_group = rows_per_row_group
        self.parquet_compression = parquet_compression
        if parquet_compression_level is None and parquet_compression == "zstd":
            parquet_compression_level = IMAGE_ZSTD_LEVEL
        self.parquet_compression_level = parquet_compression_level
        self.png_compress_level = png_compress_level

    def __repr__(self) -> str:
        return f"ShardSink({self.url!r}, formats={self.formats}, image_dtype={self.image_dtype!r})"

    @property
    def takes_delta_planes(self) -> bool:
        """Whether this sink stores uint16 Parquet with the delta codec and nothing else, so a renderer can hand
        :meth:`prepare` the codec's transform (:class:`~drrfarm.sinks.parquet.DeltaPlanes`) instead of pixels."""
        return self.formats == ("parquet",) and self.image_dtype == "uint16" and self.parquet_compression == "zstd"

    # ------------------------------------------------------------------ preparation
    def _scales(self, images: np.ndarray, rows: Sequence[Mapping[str, Any]], image_scale: Any) -> np.ndarray:
        b = images.shape[0]
        if image_scale is not None:
            s = np.broadcast_to(np.asarray(image_scale, np.float64), (b,)).copy()
        elif all(r.get("image_scale") is not None for r in rows):
            s = np.array([float(r["image_scale"]) for r in rows], np.float64)
        elif images.dtype == np.uint16:
            raise StorageError("uint16 images need image_scale (argument or rows[i]['image_scale'])")
        else:
            s = np.array([auto_scale(im) for im in images], np.float64)
        if not np.all(np.isfinite(s) & (s > 0)):
            raise StorageError(f"image_scale must be finite and > 0, got {s.tolist()}")
        return s

    def _uint16(self, images: np.ndarray, scales: np.ndarray, shard_id: str) -> np.ndarray:
        if images.dtype == np.uint16:
            return images
        q, bad = quantize(images, scales)
        if bad:
            log.warning("shard %s: %d pixel(s) outside [0, 65535*scale] or non-finite were clipped",
                        shard_id, bad)
        return q

    def prepare(
        self,
        shard_id: str,
        images: np.ndarray | DeltaPlanes,
        rows: Sequence[Mapping[str, Any]],
        file_metadata: Mapping[str, Any] | None = None,
        image_scale: Any = None,
        executor: Executor | None = None,
    ) -> tuple[dict[str, bytes | memoryview], ShardEntry]:
        """Encode a shard in memory: ({key: bytes}, the entry to commit). No I/O.

        ``images``: as :meth:`write_shard`, or uint16 images as :class:`~drrfarm.sinks.parquet.DeltaPlanes`
        (same bytes; only zstd left to run when the shard is uint16 Parquet alone).

        ``executor``: codes the images (PNGs, Parquet ``zstd-delta`` cells) in parallel -- numpy, zstd and
        zlib release the GIL; the bytes are the same."""
        check_shard_id(shard_id)
        if isinstance(images, DeltaPlanes) and not self.takes_delta_planes:
            images = images.images()  # another output needs the pixels
        if not isinstance(images, DeltaPlanes):
            images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3 or images.shape[0] == 0:
            raise StorageError(f"shard {shard_id}: images must be (B, H, W) with B >= 1, got {images.shape}")
        if images.dtype not in (np.float32, np.float64, np.float16, np.uint16):
            raise StorageError(f"shard {shard_id}: images dtype {images.dtype} (use float32 or uint16)")
        b, h, w = images.shape
        if len(rows) != b:
            raise StorageError(f"shard {shard_id}: {b} images but {len(rows)} rows")

        meta = {str(k): "" if v is None else str(v) for k, v in (file_metadata or {}).items()}
        meta.setdefault("drrfarm_version", __version__)
        for k in ("spec_sha256", "mlflow_run_id", "sweep_id"):
            meta.setdefault(k, "")

        need_uint16 = self.image_dtype == "uint16" or "png" in self.formats
        scales = self._scales(images, rows, image_scale) if need_uint16 or images.dtype == np.uint16 else None
        q = self._uint16(images, scales, shard_id) if need_uint16 else None
        if self.image_dtype == "uint16":
            stored, stored_scales = q, scales
        else:
            f = images.astype(np.float32) * scales[:, None, None] if images.dtype == np.uint16 else images
            stored = f.astype(self.image_dtype)
            stored_scales = np.ones(b)

        norm: list[dict[str, Any]] = []
        pixel_fields: list[dict[str, np.ndarray]] = []  # masks / thickness per row (sinks.annotations)
        for i, r in enumerate(rows):
            row, fields = split_pixel_fields(r, h, w, f"shard {shard_id}: row {i}")
            pixel_fields.append(fields)
            for key, want in (("shard_id", shard_id), ("height", h), ("width", w)):
                if row.get(key) is not None and row[key] != want:
                    raise StorageError(f"shard {shard_id}: row {i} has {key}={row[key]!r}, expected {want!r}")
                row[key] = want
            row.setdefault("image_index", i)
            if row["image_index"] is None:
                row["image_index"] = i
            if row.get("sweep_id") is None and meta.get("sweep_id"):
                row["sweep_id"] = meta["sweep_id"]
            for name, n in VECTOR_LENGTHS.items():  # matrices row-major, flat: same in Parquet and JSON
                if row.get(name) is not None and not is_float_vector(row[name], n):
                    try:
                        a = np.asarray(row[name], dtype=np.float64).reshape(-1)
                    except (TypeError, ValueError) as exc:
                        raise StorageError(f"shard {shard_id}: row {i} field {name!r}: {exc}") from exc
                    if a.size != n:
                        raise StorageError(f"shard {shard_id}: row {i} field {name!r} has {a.size} values, "
                                           f"expected {n}")
                    row[name] = a.tolist()
            row["image_dtype"] = self.image_dtype
            row["image_scale"] = float(stored_scales[i])
            norm.append(row)
        indices = [int(r["image_index"]) for r in norm]
        if len(set(indices)) != b:
            raise StorageError(f"shard {shard_id}: duplicate image_index values")

        files: dict[str, bytes] = {}
        if "parquet" in self.formats:
            parquet_rows = [{**row, **parquet_cells(f)} for row, f in zip(norm, pixel_fields, strict=True)]
            files[parquet_key(shard_id)] = _parquet.encode_parquet(
                stored, parquet_rows, meta, rows_per_row_group=self.rows_per_row_group,
                compression=self.parquet_compression, compression_level=self.parquet_compression_level,
                executor=executor,
            )
        if "png" in self.formats:
            level = self.png_compress_level
            if executor is not None and b > 1:
                pngs = list(executor.map(lambda im: encode_png16(im, compress_level=level), q))
            else:
                pngs = [encode_png16(im, compress_level=level) for im in q]
            for i, row in enumerate(norm):
                png_key, json_key = png_keys(row.get("volume_id") or "_", shard_id, row["image_index"])
                if png_key in files:
                    raise StorageError(f"shard {shard_id}: two images map to {png_key}")
                files[png_key] = pngs[i]
                extra, side_keys = png_files(pixel_fields[i], png_key, self.png_compress_level)
                files.update(extra)
                side = {**row, **side_keys, "image_dtype": "uint16", "image_scale": float(scales[i])}
                files[json_key] = sidecar_json(side, meta, png_key)

        entry = ShardEntry(
            shard_id=shard_id,
            rows=b,
            keys=tuple(files),
            sha256={k: _sha256(v) for k, v in files.items()},
            bytes={k: len(v) for k, v in files.items()},
            formats=self.formats,
            image_dtype=self.image_dtype,
            height=h,
            width=w,
            volume_ids=tuple(dict.fromkeys(str(r.get("volume_id") or "") for r in norm)),
            file_metadata=meta,
        )
        return files, entry

    # ------------------------------------------------------------------ writing
    def write_shard(
        self,
        shard_id: str,
        images: np.ndarray,
        rows: Sequence[Mapping[str, Any]],
        file_metadata: Mapping[str, Any] | None = None,
        *,
        image_scale: Any = None,
    ) -> ShardEntry:
        """Encode and atomically commit one shard; returns its manifest entry.

        images: (B, H, W) float32 values (or uint16 already quantised, with image_scale).
        rows: B dicts of per-row metadata (see drrfarm.sinks.parquet.ROW_COLUMNS).
        image_scale: float or (B,) for uint16 quantisation; default rows[i]['image_scale'], else
        per image max/65535. file_metadata: spec_sha256, drrfarm_version, mlflow_run_id, sweep_id.
        """
        files, entry = self.prepare(shard_id, images, rows, file_metadata, image_scale)
        return self.commit(files, entry)

    def commit(self, files: Mapping[str, bytes | memoryview], entry: ShardEntry) -> ShardEntry:
        """Upload prepared files, then commit the manifest entry last."""
        from dataclasses import replace

        _manifest.uncommit(self.store, entry.shard_id)
        big = {k: v for k, v in files.items() if k.endswith(".parquet")}
        small = {k: v for k, v in files.items() if k not in big}
        for k, v in big.items():
            self.store.put_bytes(k, v)
        for chunk in _chunks(list(small.items()), 64):
            self.store.put_many(dict(chunk))
        entry = replace(entry, committed_at=_manifest.utc_now())
        _manifest.commit_entry(self.store, entry)
        log.debug("committed shard %s (%d rows, %d files) to %s", entry.shard_id, entry.rows,
                  len(entry.keys), self.url)
        return entry

    def is_committed(self, shard_id: str) -> bool:
        """True if the shard has a manifest entry."""
        return self.store.exists(_manifest.entry_key(shard_id))


def _chunks(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]


class AsyncShardWriter:
    """Runs ``sink.write_shard`` on a bounded thread pool next to the renderer.

    At most ``max_pending`` shards are queued or in flight (their images stay referenced until
    written -- do not modify arrays after submitting them); ``submit`` blocks when that many are
    pending (backpressure). The first failure is re-raised by the next ``submit`` and by ``close``.
    """

    def __init__(self, sink: ShardSink, max_pending: int = 2, max_workers: int | None = None) -> None:
        if max_pending < 1:
            raise StorageError(f"max_pending must be >= 1, got {max_pending}")
        self.sink = sink
        self.max_pending = max_pending
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pool = ThreadPoolExecutor(
            max_workers=max_workers or min(max_pending, 4), thread_name_prefix="drrfarm-shard-writer"
        )
        self._lock = threading.Lock()
        self._futures: list[Future[ShardEntry]] = []
        self._error: BaseException | None = None
        self._closed = False
        self.entries: list[ShardEntry] = []

    def __enter__(self) -> AsyncShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: drain quietly, keep the original exception
            try:
                self.close()
            except Exception as err:
                log.warning("while closing the shard writer: %s", err)

    @property
    def pending(self) -> int:
        """Shards queued or being written."""
        with self._lock:
            return sum(1 for f in self._futures if not f.done())

    def _raise_if_failed(self) -> None:
        with self._lock:
            err = self._error
        if err is not None:
            raise err

    def _done(self, fut: Future[ShardEntry]) -> None:
        try:
            exc = fut.exception()
            with self._lock:
                if exc is not None and self._error is None:
                    self._error = exc
                elif exc is None:
                    self.entries.append(fut.result())
        finally:
            self._slots.release()

    def _write(self, shard_id: str, images: Any, rows: list, file_metadata: Any, kwargs: dict) -> ShardEntry:
        try:
            return self.sink.write_shard(shard_id, images, rows, file_metadata, **kwargs)
        except DrrfarmError:
            raise
        except Exception as exc:  # an encoding bug or MemoryError: still a StorageError for the caller
            raise StorageError(f"shard {shard_id}: writing failed: {type(exc).__name__}: {exc}") from exc

    def submit(
        self,
        shard_id: str,
        images: np.ndarray,
        rows: Sequence[Mapping[str, Any]],
        file_metadata: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Future[ShardEntry]:
        """Queue a shard; blocks while ``max_pending`` shards are pending; raises an earlier failure."""
        if self._closed:
            raise StorageError("AsyncShardWriter is closed")
        self._raise_if_failed()
        self._slots.acquire()
        try:
            self._raise_if_failed()
            fut = self._pool.submit(self._write, shard_id, images, list(rows), file_metadata, kwargs)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()] + [fut]
        fut.add_done_callback(self._done)
        return fut

    def close(self) -> list[ShardEntry]:
        """Wait for every pending shard; returns the entries written; raises the first failure."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)
        self._raise_if_failed()
        return list(self.entries)
