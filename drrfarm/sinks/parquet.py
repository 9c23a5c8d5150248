"""Parquet shard encoding: one row per image, metadata columns, raw little-endian image bytes.

Image column decision -- measured with ``python benchmarks/bench_sinks.py --layouts 256 --ray`` (256
noisy 512x512 uint16 images, 2 shared CPU cores under load, pyarrow 25, Ray 2.60, images/s)::

    layout  codec   write  file MiB  pyarrow->numpy->torch  ray.data.read_parquet
    binary  none     1063     128.0                   2318                   138
    tensor  none      408     256.0                    306                   169
    binary  zstd-3    257      88.8                    507                   166
    tensor  zstd-3    159      92.3                    246                   117

The ``image`` column is ``large_binary`` holding each image's raw C-order little-endian bytes, with
``height``, ``width`` and ``image_dtype`` columns describing it. pyarrow's canonical
``fixed_shape_tensor`` extension type lost where it matters:

* Parquet has no 16-bit integer physical type, so ``fixed_shape_tensor<uint16>`` is stored as INT32:
  twice the bytes uncompressed, 1.6-2.6x slower to write.
* pyarrow -> numpy -> torch: raw bytes decode with zero copies (one ``np.frombuffer`` over the
  column's data buffer, :func:`decode_images`), 2-7x faster than ``to_numpy_ndarray()``.
* ``ray.data.read_parquet``: equal within noise (per-block overhead dominates on 2 cores); Ray hands
  binary cells to numpy as ``bytes`` objects, which :func:`images_from_batch` stacks into (B, H, W).
* The column type does not depend on the image shape, so shards of different sizes share one schema.

Vector/matrix columns (K, R, t, P, source_world_mm, isocentre_world_mm) are ``list<float64>``
(row-major, length checked on write), not ``fixed_size_list``: pyarrow 25 cannot read a *null*
``fixed_size_list`` cell back from Parquet, and isocentre_world_mm is null without a C-arm.

Values: ``uint16`` images are quantised (``float = value * image_scale``; the ``image_scale`` column is
per row), ``float16``/``float32`` images are stored as-is with ``image_scale`` 1.0. The image column is
zstd-compressed by default at level 1 (:data:`IMAGE_ZSTD_LEVEL`): on the sample chest CT at 1024² (uint16
line integrals, Joseph, 2026-12-03, 2-core x86 host) level 1 encodes a noisy image in 3.4 ms (1.931 MB)
and a noiseless one in 3.6 ms (1.907 MB); level 3 takes 4.6 ms (1.929 MB) and 11.7 ms (1.845 MB): level 3
saves 0.1-3 % of the bytes for 1.4-3x the CPU, and a GPU renders faster than a few cores compress at
level 3. ``compression="none"`` trades size for faster encode/decode), without dictionary encoding or
statistics; row groups hold ~64 MiB of pixels by default so a
streaming reader needs one row group in memory at a time.

Image codec (the ``image_codec`` column, per row): ``raw`` -- the bytes above, the column compressed by
Parquet (zstd level 1); ``zstd-delta`` (the default for uint16) -- each image on its own: every row minus
the row above it (modulo 2¹⁶, PNG's "Up" predictor), the high bytes then the low bytes (two planes), zstd
level 1; the column itself uncompressed. On the sample chest CT at 1024² that stores a noisy image in
1.52 MB and a noiseless one in 0.87 MB (raw + zstd: 1.93 and 1.91 MB), and since every image is coded
separately a writer codes a shard's images on all its cores (numpy and zstd release the GIL).
:func:`decode_images` and :func:`images_from_batch` undo it; files without the column are ``raw``.

File (schema) metadata: the caller's ``spec_sha256``, ``drrfarm_version``, ``mlflow_run_id``,
``sweep_id`` (plus anything else it passes), and ``drrfarm.format``, ``drrfarm.image_encoding``,
``drrfarm.image_dtype``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from drrfarm.errors import StorageError

IMAGE_COLUMN = "image"
IMAGE_CODEC_COLUMN = "image_codec"
FORMAT_TAG = "drrfarm-shard/1"
IMAGE_ENCODING = "raw-le-bytes"
IMAGE_CODECS = ("raw", "zstd-delta")
IMAGE_DTYPES: dict[str, str] = {"uint16": "<u2", "float16": "<f2", "float32": "<f4"}
ROW_GROUP_TARGET_BYTES = 64 << 20
IMAGE_ZSTD_LEVEL = 1  # zstd level of the image column (see the module docstring)

# (column, kind, length) -- kind: i64 | i32 | f64 | str | vec (list<float64> of exactly `length`
# values, row-major for matrices)
ROW_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("image_index", "i64", 0),
    ("seed", "i64", 0),
    ("shard_id", "str", 0),
    ("sweep_id", "str", 0),
    ("volume_id", "str", 0),
    ("volume_sha256", "str", 0),
    ("height", "i32", 0),
    ("width", "i32", 0),
    ("image_dtype", "str", 0),
    ("image_codec", "str", 0),
    ("image_scale", "f64", 0),
    ("pixel_mm", "f64", 0),
    ("K", "vec", 9),
    ("R", "vec", 9),
    ("t", "vec", 3),
    ("P", "vec", 12),
    ("source_world_mm", "vec", 3),
    ("alpha_deg", "f64", 0),
    ("beta_deg", "f64", 0),
    ("gamma_deg", "f64", 0),
    ("isocentre_world_mm", "vec", 3),
    ("sdd_mm", "f64", 0),
    ("kvp", "f64", 0),
    ("al_mm", "f64", 0),
    ("cu_mm", "f64", 0),
    ("spectrum_name", "str", 0),
    ("mean_energy_kev", "f64", 0),
    ("photons", "i64", 0),
    ("detector", "str", 0),
    ("output", "str", 0),
    ("scatter", "str", 0),
    ("scatter_photons", "i64", 0),
    ("scatter_seconds", "f64", 0),
)
KNOWN_COLUMNS = frozenset(name for name, _, _ in ROW_COLUMNS)
VECTOR_LENGTHS = {name: n for name, kind, n in ROW_COLUMNS if kind == "vec"}
FILE_METADATA_KEYS = ("spec_sha256", "drrfarm_version", "mlflow_run_id", "sweep_id")


def _arrow_type(kind: str, n: int):
    import pyarrow as pa

    return {
        "i64": pa.int64(),
        "i32": pa.int32(),
        "f64": pa.float64(),
        "str": pa.string(),
        # variable-length list, length checked on write: pyarrow 25 cannot read back a *null*
        # fixed_size_list cell from Parquet ("Expected all lists to be of size=3"), and vectors
        # such as isocentre_world_mm are null when no C-arm is used.
        "vec": pa.list_(pa.float64()),
    }[kind]


def default_rows_per_row_group(image_nbytes: int) -> int:
    """Rows per row group for ~64 MiB of pixels (1..1024)."""
    return int(min(1024, max(1, ROW_GROUP_TARGET_BYTES // max(1, image_nbytes))))


def delta_planes(image: np.ndarray) -> np.ndarray:
    """The ``zstd-delta`` transform of a (H, W) uint16 image before compression: each row minus the row
    above (modulo 2¹⁶), then its high-byte plane followed by its low-byte plane: (2·H·W,) uint8."""
    d = np.empty(image.shape, np.uint16)
    d[0] = image[0]
    np.subtract(image[1:], image[:-1], out=d[1:])
    pairs = d.reshape(-1).view(np.uint8).reshape(-1, 2)  # little-endian: [low, high]
    out = np.empty(2 * d.size, np.uint8)
    out[: d.size] = pairs[:, 1]
    out[d.size :] = pairs[:, 0]
    return out


def undo_delta_planes(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`delta_planes`: (H, W) uint16."""
    n = height * width
    d = np.empty(n, np.uint16)
    pairs = d.view(np.uint8).reshape(-1, 2)
    pairs[:, 1] = planes[:n]
    pairs[:, 0] = planes[n : 2 * n]
    image = d.reshape(height, width)
    for i in range(1, height):  # row by row: 3-4x faster than np.cumsum(axis=0); wraps modulo 2¹⁶, as encoded
        np.add(image[i], image[i - 1], out=image[i])
    return image


def _zstd():
    import pyarrow as pa

    return pa.Codec("zstd", compression_level=IMAGE_ZSTD_LEVEL)


def _compressed(image: np.ndarray):
    """One (H, W) uint16 image in the ``zstd-delta`` codec, in zstd's own output buffer (a pyarrow Buffer)."""
    return _zstd().compress(delta_planes(image), asbytes=False)


def encode_image(image: np.ndarray) -> bytes:
    """One (H, W) uint16 image in the ``zstd-delta`` codec."""
    return _compressed(image).to_pybytes()


def _encode_cell(image: np.ndarray):
    """One image in the ``zstd-delta`` codec as a one-row large_binary array over zstd's own output buffer
    (no copy, so a thread holds the GIL only for bookkeeping)."""
    import pyarrow as pa

    buf = _compressed(image)
    offsets = pa.py_buffer(np.array([0, buf.size], np.int64))
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, buf])


def decode_image(data: Any, height: int, width: int) -> np.ndarray:
    """One ``zstd-delta`` cell back to (H, W) uint16."""
    raw = _zstd().decompress(data, decompressed_size=2 * height * width, asbytes=False)
    return undo_delta_planes(np.frombuffer(raw, np.uint8), height, width)


def _encoded_array(images: np.ndarray, executor: Any = None):
    """Every image in the ``zstd-delta`` codec, a chunk each (coded in parallel on ``executor``; the
    Parquet writer reads the chunks where they are)."""
    import pyarrow as pa

    cells = list(executor.map(_encode_cell, images)) if executor is not None and len(images) > 1 else \
        [_encode_cell(im) for im in images]
    return pa.chunked_array(cells, type=pa.large_binary())


def _image_array(images: np.ndarray):
    """Zero-copy large_binary array over a (B, H, W) little-endian C-contiguous array."""
    import pyarrow as pa

    b = images.shape[0]
    per = int(np.prod(images.shape[1:])) * images.dtype.itemsize
    flat = np.ascontiguousarray(images).view(np.uint8).reshape(-1)
    offsets = np.arange(b + 1, dtype=np.int64) * per
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), b, [None, pa.py_buffer(offsets), pa.py_buffer(flat)]
    )


def _column(name: str, kind: str, n: int, rows: Sequence[Mapping[str, Any]]):
    import pyarrow as pa

    values: list[Any] = []
    for i, r in enumerate(rows):
        v = r.get(name)
        if v is None:
            values.append(None)
            continue
        try:
            if kind == "vec":
                a = np.asarray(v, dtype=np.float64).reshape(-1)
                if a.size != n:
                    raise ValueError(f"expected {n} values, got {a.size}")
                values.append(a.tolist())
            elif kind in ("i64", "i32"):
                values.append(int(v))
            elif kind == "f64":
                values.append(float(v))
            else:
                values.append(str(v))
        except (TypeError, ValueError) as exc:
            raise StorageError(f"row {i} field {name!r}: {exc}") from exc
    return pa.array(values, type=_arrow_type(kind, n))


def _extra_column(name: str, rows: Sequence[Mapping[str, Any]]):
    import pyarrow as pa

    def py(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        return v

    try:
        return pa.array([py(r.get(name)) for r in rows])
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise StorageError(f"extra row field {name!r} cannot be stored in Parquet: {exc}") from exc


def encode_parquet(
    images: np.ndarray,
    rows: Sequence[Mapping[str, Any]],
    file_metadata: Mapping[str, str],
    *,
    rows_per_row_group: int | None = None,
    compression: str = "zstd",
    compression_level: int | None = IMAGE_ZSTD_LEVEL,
    image_codec: str | None = None,
    executor: Any = None,
) -> memoryview:
    """Encode one shard as Parquet: the file's bytes (a read-only view of the encoder's buffer).

    ``image_codec``: ``raw`` or ``zstd-delta`` (uint16 only); None: ``zstd-delta`` for uint16 with
    ``compression="zstd"``, else ``raw``. ``executor``: codes the images in parallel.

    images: (B, H, W) uint16 / float16 / float32 -- the stored values. rows: B dicts of per-row
    metadata (known columns in :data:`ROW_COLUMNS`, missing ones null; extra keys become inferred
    columns). file_metadata: str -> str, stored in the schema metadata.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if images.ndim != 3 or images.shape[0] != len(rows):
        raise StorageError(f"images must be (B, H, W) with B == len(rows); got {images.shape}, {len(rows)} rows")
    name = {"u2": "uint16", "f2": "float16", "f4": "float32"}.get(f"{images.dtype.kind}{images.dtype.itemsize}")
    if name is None:
        raise StorageError(f"image dtype {images.dtype} is not one of {sorted(IMAGE_DTYPES)}")
    images = images.astype(IMAGE_DTYPES[name], copy=False)
    if image_codec is None:
        image_codec = "zstd-delta" if name == "uint16" and compression == "zstd" else "raw"
    if image_codec not in IMAGE_CODECS or (image_codec == "zstd-delta" and name != "uint16"):
        raise StorageError(f"image_codec {image_codec!r}: choose from {list(IMAGE_CODECS)} (zstd-delta: uint16 only)")

    coded = image_codec != "raw"
    cols: dict[str, Any] = {IMAGE_COLUMN: _encoded_array(images, executor) if coded else _image_array(images)}
    for col, kind, n in ROW_COLUMNS:
        cols[col] = _column(col, kind, n, rows) if col != IMAGE_CODEC_COLUMN else \
            _column(col, kind, n, [{col: image_codec}] * len(rows))
    extras = sorted({k for r in rows for k in r} - KNOWN_COLUMNS - {IMAGE_COLUMN})
    for col in extras:
        cols[col] = _extra_column(col, rows)

    meta = {str(k): "" if v is None else str(v) for k, v in file_metadata.items()}
    meta.update(
        {"drrfarm.format": FORMAT_TAG, "drrfarm.image_encoding": IMAGE_ENCODING if not coded else image_codec,
         "drrfarm.image_dtype": name}
    )
    table = pa.table(cols).replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})

    if rows_per_row_group is None:
        rows_per_row_group = default_rows_per_row_group(images[0].nbytes if len(images) else 1)
    others = [c for c in table.column_names if c != IMAGE_COLUMN]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=max(1, int(rows_per_row_group)),
        compression={IMAGE_COLUMN: "none" if coded else compression, **dict.fromkeys(others, "zstd")},
        compression_level={IMAGE_COLUMN: compression_level}
        if not coded and compression in ("zstd", "gzip", "brotli") and compression_level is not None
        else None,
        use_dictionary=[c for c in others if pa.types.is_string(table.schema.field(c).type)],
        write_statistics=others,
    )
    return memoryview(sink.getvalue())  # no copy into a bytes object (that copy would hold the GIL)


def _decode_binary_column(col, heights: np.ndarray, widths: np.ndarray, dtypes: Sequence[str],
                          codecs: Sequence[str | None] | None = None) -> np.ndarray:
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(col)
    if n == 0:
        return np.zeros((0, 0, 0), np.float32)
    if None in dtypes or None in heights.tolist() or None in widths.tolist():
        raise StorageError("image rows without height/width/image_dtype: not a drrfarm shard?")
    if len(set(dtypes)) != 1 or len(set(heights.tolist())) != 1 or len(set(widths.tolist())) != 1:
        raise StorageError("images of different shapes/dtypes in one batch: decode them row by row")
    dt = np.dtype(IMAGE_DTYPES[dtypes[0]])
    h, w = int(heights[0]), int(widths[0])
    if codecs is not None and any(c not in (None, "raw") for c in codecs):
        return _decode_cells(col.to_pylist(), h, w, dt, codecs)
    per = h * w * dt.itemsize
    otype = np.int64 if pa.types.is_large_binary(col.type) else np.int32
    offsets = np.frombuffer(col.buffers()[1], otype)[col.offset : col.offset + n + 1]
    if col.null_count or not np.all(np.diff(offsets) == per):
        raise StorageError(f"image column: values are not all {per} bytes ({h}x{w} {dtypes[0]})")
    data = np.frombuffer(col.buffers()[2], np.uint8)[int(offsets[0]) : int(offsets[-1])]
    return data.view(dt).reshape(n, h, w)


def _decode_cells(cells: Sequence[Any], h: int, w: int, dt: np.dtype, codecs: Sequence[str | None]) -> np.ndarray:
    """(B, H, W) from per-row cells in their codecs (``raw`` or ``zstd-delta``)."""
    out = np.empty((len(cells), h, w), dt)
    for i, (cell, codec) in enumerate(zip(cells, codecs, strict=True)):
        if cell is None:
            raise StorageError(f"image column: row {i} is null")
        if codec in (None, "raw"):
            if len(cell) != h * w * dt.itemsize:
                raise StorageError(f"image column: row {i} is not {h * w * dt.itemsize} bytes ({h}x{w} {dt})")
            out[i] = np.frombuffer(cell, dt).reshape(h, w)
        elif codec == "zstd-delta" and dt == np.uint16:
            try:
                out[i] = decode_image(cell, h, w)
            except Exception as exc:  # noqa: BLE001 - a corrupt cell names its row
                raise StorageError(f"image column: row {i} does not decode as {codec}: {exc}") from exc
        else:
            raise StorageError(f"image column: row {i} has unknown codec {codec!r} for {dt}")
    return out


def _codecs(table) -> list[str | None] | None:
    names = table.schema.names if hasattr(table, "schema") else list(table)
    return table.column(IMAGE_CODEC_COLUMN).to_pylist() if IMAGE_CODEC_COLUMN in names else None


def decode_images(table) -> np.ndarray:
    """(B, H, W) images in their stored dtype from a pyarrow Table/RecordBatch of a shard (zero copy for
    the ``raw`` codec)."""
    heights = np.asarray(table.column("height").to_numpy(zero_copy_only=False))
    widths = np.asarray(table.column("width").to_numpy(zero_copy_only=False))
    dtypes = table.column("image_dtype").to_pylist()
    return _decode_binary_column(table.column(IMAGE_COLUMN), heights, widths, dtypes, _codecs(table))


def images_from_batch(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """(B, H, W) images from a Ray Data numpy batch (``image``, ``height``, ``width``, ``image_dtype``)."""
    raw = batch[IMAGE_COLUMN]
    n = len(raw)
    if n == 0:
        return np.zeros((0, 0, 0), np.float32)
    dt = np.dtype(IMAGE_DTYPES[str(batch["image_dtype"][0])])
    h, w = int(batch["height"][0]), int(batch["width"][0])
    codecs = batch.get(IMAGE_CODEC_COLUMN) if hasattr(batch, "get") else None
    return _decode_cells(list(raw), h, w, dt, [None] * n if codecs is None else [str(c) for c in codecs])


def dequantize(images: np.ndarray, image_scale: np.ndarray | float) -> np.ndarray:
    """float32 values (B, H, W) from stored images and their per-row ``image_scale`` (B,)."""
    s = np.asarray(image_scale, np.float32)
    if s.ndim == 1:
        s = s[:, None, None]
    return np.multiply(images, s, dtype=np.float32)


def read_shard(source: Any) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, str]]:
    """(images (B,H,W) stored dtype, rows without the image, file metadata) from bytes/a file object."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(source, bytes | bytearray | memoryview):
        source = pa.BufferReader(bytes(source))
    table = pq.read_table(source)
    images = decode_images(table)
    rows = table.drop_columns([IMAGE_COLUMN]).to_pylist()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return images, rows, meta
