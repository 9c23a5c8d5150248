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
level 1, in an uncompressed column; ``delta-planes`` -- the same transform, the column compressed by
Parquet (zstd level 1). On the sample chest CT at 1024² the transform stores a noisy image in 1.52 MB and
a noiseless one in 0.87 MB (raw + zstd: 1.93 and 1.91 MB). ``zstd-delta`` is the default because each
image is coded separately, so a writer codes a shard on all its cores (numpy and zstd release the GIL; a
GPU worker hands it the transform made on the GPU, :class:`DeltaPlanes`, so only zstd runs on the CPU).
``delta-planes`` compresses a shard in one call that releases the GIL throughout -- 64 noisy 512² images
in 46 ms on one core against 71 ms -- but on one core: on a 16-core GPU node it wrote 17 % fewer 1024²
images per second (2026-12-03, ``benchmarks/RESULTS.md``). :func:`decode_images` and
:func:`images_from_batch` undo both; files without the column are ``raw``.

File (schema) metadata: the caller's ``spec_sha256``, ``drrfarm_version``, ``mlflow_run_id``,
``sweep_id`` (plus anything else it passes), and ``drrfarm.format``, ``drrfarm.image_encoding``,
``drrfarm.image_dtype``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from drrfarm.errors import StorageError

IMAGE_COLUMN = "image"
IMAGE_CODEC_COLUMN = "image_codec"
FORMAT_TAG = "drrfarm-shard/1"
IMAGE_ENCODING = "raw-le-bytes"
IMAGE_CODECS = ("raw", "zstd-delta", "delta-planes")
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


def delta_planes(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The delta transform of the ``zstd-delta`` and ``delta-planes`` codecs of a (H, W) uint16 image: each row
    minus the row above (modulo 2¹⁶), then its high-byte plane followed by its low-byte plane: (2·H·W,) uint8
    (written into ``out`` when given)."""
    d = np.empty(image.shape, np.uint16)
    d[0] = image[0]
    np.subtract(image[1:], image[:-1], out=d[1:])
    pairs = d.reshape(-1).view(np.uint8).reshape(-1, 2)  # little-endian: [low, high]
    if out is None:
        out = np.empty(2 * d.size, np.uint8)
    out[: d.size] = pairs[:, 1]
    out[d.size :] = pairs[:, 0]
    return out


def undo_delta_planes(planes: np.ndarray, height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`delta_planes`: (H, W) uint16 (written into ``out``, a C-contiguous (H, W) uint16 array,
    when given). 1024²: ~0.9 ms on one core (the row-by-row loop it replaces: ~2.3 ms); see :func:`undo_row_deltas`."""
    n = height * width
    image = np.empty((height, width), np.uint16) if out is None else out
    if image.shape != (height, width) or image.dtype != np.uint16 or not image.flags.c_contiguous:
        raise StorageError(f"undo_delta_planes: out must be a C-contiguous ({height}, {width}) uint16 array")
    flat = image.reshape(-1)
    flat[:] = planes[:n]  # high bytes
    np.left_shift(flat, 8, out=flat)
    np.bitwise_or(flat, planes[n : 2 * n], out=flat)  # | low bytes: the row differences
    return undo_row_deltas(image)


def _scan_block_rows(height: int) -> int:
    """Rows per block of :func:`undo_row_deltas`' blocked running sum: ~√H/1.4 (16 at 512, 23 at 1024), which
    measured fastest at 512² and 1024² (about 2·√H numpy calls, each image's data still in cache)."""
    return max(2, int(round(np.sqrt(height) / 1.4)))


def undo_row_deltas(image: np.ndarray) -> np.ndarray:
    """In place: every row plus the (restored) row above it, modulo 2¹⁶ -- the running sum down each column that
    inverts :func:`delta_planes`' row differences, on an (H, W) uint16 array (rows: axis 0); returns it.

    A blocked scan rather than H row additions or ``np.cumsum(axis=0)`` (strided, 4x slower than the row loop):
    running sums inside every block of k ≈ √H rows at once (k - 1 numpy calls over all blocks), then each block
    plus the last row of the block above (H/k calls). ~2√H calls of H·W/√H values: 4x faster than the row loop
    at 1024² (0.6 vs 2.2 ms) and the GIL is held only between calls."""
    h = image.shape[0]
    k = _scan_block_rows(h)
    nb = h // k
    if nb < 2 or not image.flags.c_contiguous:
        for i in range(1, h):
            np.add(image[i], image[i - 1], out=image[i])
        return image
    blocks = image[: nb * k].reshape(nb, k, *image.shape[1:])  # a view (C-contiguous)
    for j in range(1, k):
        np.add(blocks[:, j], blocks[:, j - 1], out=blocks[:, j])
    for b in range(1, nb):
        np.add(blocks[b], blocks[b - 1, k - 1], out=blocks[b])
    for i in range(nb * k, h):
        np.add(image[i], image[i - 1], out=image[i])
    return image


class DeltaPlanes:
    """A shard's (B, H, W) uint16 images already delta-transformed -- ``planes`` (B, 2·H·W) uint8, each row the
    :func:`delta_planes` of one image (the CUDA backend makes them on the GPU) -- so that only zstd remains to
    be run. Accepted wherever a shard's uint16 images are (:func:`encode_parquet`,
    :meth:`drrfarm.sinks.ShardSink.prepare`); :meth:`images` undoes the transform for other outputs."""

    __slots__ = ("planes", "shape")
    dtype = np.dtype(np.uint16)
    ndim = 3

    def __init__(self, planes: np.ndarray, height: int, width: int) -> None:
        planes = np.asarray(planes)
        h, w = int(height), int(width)
        if planes.dtype != np.uint8 or planes.ndim != 2 or h < 1 or w < 1 or planes.shape[1] != 2 * h * w:
            raise StorageError(f"delta planes: need (B, 2*{h}*{w}) uint8, got {planes.shape} {planes.dtype}")
        self.planes = planes
        self.shape = (planes.shape[0], h, w)

    def __len__(self) -> int:
        return self.shape[0]

    @classmethod
    def of(cls, images: np.ndarray) -> DeltaPlanes:
        """The transform of (B, H, W) uint16 ``images``, made on the CPU."""
        b, h, w = images.shape
        planes = np.empty((b, 2 * h * w), np.uint8)
        for im, row in zip(images, planes, strict=True):
            delta_planes(im, out=row)
        return cls(planes, h, w)

    def images(self) -> np.ndarray:
        """The (B, H, W) uint16 images (undoes the transform on the CPU)."""
        _, h, w = self.shape
        return np.stack([undo_delta_planes(p, h, w) for p in self.planes]) if len(self) else \
            np.zeros(self.shape, np.uint16)


@functools.cache
def _zstd():
    """The image codec's zstd (one object for all threads: Arrow's zstd codec keeps no state between calls)."""
    import pyarrow as pa

    return pa.Codec("zstd", compression_level=IMAGE_ZSTD_LEVEL)


def _compressed(image: np.ndarray):
    """One (H, W) uint16 image in the ``zstd-delta`` codec, in zstd's own output buffer (a pyarrow Buffer)."""
    return _zstd().compress(delta_planes(image), asbytes=False)


def encode_image(image: np.ndarray) -> bytes:
    """One (H, W) uint16 image in the ``zstd-delta`` codec."""
    return _compressed(image).to_pybytes()


def _cell(buf):
    """A one-row large_binary array over ``buf`` (zstd's own output buffer: no copy)."""
    import pyarrow as pa

    offsets = pa.py_buffer(np.array([0, buf.size], np.int64))
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, buf])


def _encode_cells(images: Sequence[np.ndarray], transformed: bool) -> list[Any]:
    """Images (or their delta planes, ``transformed``) in the ``zstd-delta`` codec, a one-row array each; a
    thread holds the GIL only for bookkeeping."""
    zstd = _zstd()
    return [_cell(zstd.compress(im if transformed else delta_planes(im), asbytes=False)) for im in images]


def _encoded_array(images: np.ndarray | DeltaPlanes, executor: Any = None):
    """Every image in the ``zstd-delta`` codec, a chunk each (coded in parallel on ``executor``, a few images
    per task; the Parquet writer reads the chunks where they are)."""
    import pyarrow as pa

    transformed = isinstance(images, DeltaPlanes)
    items = images.planes if transformed else images
    n = len(items)
    if executor is None or n < 2:
        cells = _encode_cells(items, transformed)
    else:
        per = max(1, n // 16)
        groups = [items[i : i + per] for i in range(0, n, per)]
        cells = [c for part in executor.map(lambda g: _encode_cells(g, transformed), groups) for c in part]
    return pa.chunked_array(cells, type=pa.large_binary())


def _zstd_content_size(data: Any) -> int | None:
    """The decompressed size a zstd frame's header declares (None: not declared or not a zstd frame)."""
    head = memoryview(data)[:18].tobytes()
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = head[4]
    single, fcs_flag, did = (fhd >> 5) & 1, fhd >> 6, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(head) < pos + size:
        return None
    value = int.from_bytes(head[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def decode_image(data: Any, height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """One ``zstd-delta`` cell (bytes or any buffer: a pyarrow Buffer slice is not copied) back to (H, W) uint16,
    written into ``out`` when given. zstd runs without the GIL, the transform holds it only between numpy calls."""
    want = 2 * height * width
    declared = _zstd_content_size(data)
    if declared is not None and declared != want:
        raise StorageError(f"zstd-delta cell holds {declared} bytes, not {want} ({height}x{width} uint16)")
    raw = _zstd().decompress(data, decompressed_size=want, asbytes=False)
    return undo_delta_planes(np.frombuffer(raw, np.uint8), height, width, out)




def _image_array(images: np.ndarray):
    """Zero-copy large_binary array over a (B, ...) little-endian C-contiguous array, a row per cell."""
    import pyarrow as pa

    b = images.shape[0]
    per = int(np.prod(images.shape[1:])) * images.dtype.itemsize
    flat = np.ascontiguousarray(images).view(np.uint8).reshape(-1)
    offsets = np.arange(b + 1, dtype=np.int64) * per
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), b, [None, pa.py_buffer(offsets), pa.py_buffer(flat)]
    )


_PYTHON_TYPES = {"i64": int, "i32": int, "f64": float, "str": str}


def is_float_vector(value: Any, n: int) -> bool:
    """True when ``value`` is already a list of ``n`` Python floats (a row vector as stored: nothing to convert)."""
    return type(value) is list and len(value) == n and all(type(x) is float for x in value)


def _column(name: str, kind: str, n: int, rows: Sequence[Mapping[str, Any]]):
    import pyarrow as pa

    given = [r.get(name) for r in rows]
    if kind == "vec":
        ready = all(v is None or is_float_vector(v, n) for v in given)
    else:
        want = _PYTHON_TYPES[kind]
        ready = all(v is None or type(v) is want for v in given)
    if ready:  # the values as stored (the common case): pyarrow converts the list in one call
        return pa.array(given, type=_arrow_type(kind, n))
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
    images: np.ndarray | DeltaPlanes,
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

    ``image_codec``: ``raw``, ``zstd-delta`` or ``delta-planes`` (the last two uint16 only); None:
    ``zstd-delta`` for uint16 with ``compression="zstd"``, else ``raw``. ``executor``: codes the images of
    ``zstd-delta`` in parallel (the other codecs are compressed by the Parquet writer in one call that
    releases the GIL).

    images: (B, H, W) uint16 / float16 / float32 -- the stored values -- or uint16 images as
    :class:`DeltaPlanes`. rows: B dicts of per-row metadata (known columns in :data:`ROW_COLUMNS`,
    missing ones null; extra keys become inferred columns). file_metadata: str -> str, stored in the
    schema metadata.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if images.ndim != 3 or images.shape[0] != len(rows):
        raise StorageError(f"images must be (B, H, W) with B == len(rows); got {images.shape}, {len(rows)} rows")
    name = {"u2": "uint16", "f2": "float16", "f4": "float32"}.get(f"{images.dtype.kind}{images.dtype.itemsize}")
    if name is None:
        raise StorageError(f"image dtype {images.dtype} is not one of {sorted(IMAGE_DTYPES)}")
    if image_codec is None:
        image_codec = "zstd-delta" if name == "uint16" and compression == "zstd" else "raw"
    if image_codec not in IMAGE_CODECS or (image_codec != "raw" and name != "uint16"):
        raise StorageError(f"image_codec {image_codec!r}: choose from {list(IMAGE_CODECS)} (all but raw: uint16 "
                           "only)")
    if isinstance(images, DeltaPlanes) and image_codec == "raw":
        images = images.images()
    if not isinstance(images, DeltaPlanes):
        images = images.astype(IMAGE_DTYPES[name], copy=False)
    if image_codec == "delta-planes" and not isinstance(images, DeltaPlanes):
        images = DeltaPlanes.of(images)

    per_image = image_codec == "zstd-delta"  # cells compressed one by one; else Parquet compresses the column
    image_cells = images.planes if isinstance(images, DeltaPlanes) else images
    cols: dict[str, Any] = {IMAGE_COLUMN: _encoded_array(images, executor) if per_image else _image_array(image_cells)}
    for col, kind, n in ROW_COLUMNS:
        cols[col] = _column(col, kind, n, rows) if col != IMAGE_CODEC_COLUMN else \
            _column(col, kind, n, [{col: image_codec}] * len(rows))
    extras = sorted({k for r in rows for k in r} - KNOWN_COLUMNS - {IMAGE_COLUMN})
    for col in extras:
        cols[col] = _extra_column(col, rows)

    meta = {str(k): "" if v is None else str(v) for k, v in file_metadata.items()}
    meta.update(
        {"drrfarm.format": FORMAT_TAG,
         "drrfarm.image_encoding": IMAGE_ENCODING if image_codec == "raw" else image_codec,
         "drrfarm.image_dtype": name}
    )
    table = pa.table(cols).replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})

    if rows_per_row_group is None:
        rows_per_row_group = default_rows_per_row_group(images.shape[1] * images.shape[2] * images.dtype.itemsize)
    others = [c for c in table.column_names if c != IMAGE_COLUMN]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=max(1, int(rows_per_row_group)),
        compression={IMAGE_COLUMN: "none" if per_image else compression, **dict.fromkeys(others, "zstd")},
        compression_level={IMAGE_COLUMN: compression_level}
        if not per_image and compression in ("zstd", "gzip", "brotli") and compression_level is not None
        else None,
        use_dictionary=[c for c in others if pa.types.is_string(table.schema.field(c).type)],
        write_statistics=others,
    )
    return memoryview(sink.getvalue())  # no copy into a bytes object (that copy would hold the GIL)


def _decode_binary_column(col, heights: np.ndarray, widths: np.ndarray, dtypes: Sequence[str],
                          codecs: Sequence[str | None] | None = None) -> np.ndarray:
    import pyarrow as pa

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
        return _decode_cells(binary_cells(col), h, w, dt, codecs)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    per = h * w * dt.itemsize
    otype = np.int64 if pa.types.is_large_binary(col.type) else np.int32
    offsets = np.frombuffer(col.buffers()[1], otype)[col.offset : col.offset + n + 1]
    if col.null_count or not np.all(np.diff(offsets) == per):
        raise StorageError(f"image column: values are not all {per} bytes ({h}x{w} {dtypes[0]})")
    data = np.frombuffer(col.buffers()[2], np.uint8)[int(offsets[0]) : int(offsets[-1])]
    return data.view(dt).reshape(n, h, w)


def binary_cells(col) -> list[Any]:
    """The cells of a binary/large_binary pyarrow Array (or one-chunk ChunkedArray) as zero-copy pyarrow Buffer
    slices (None for nulls) -- unlike ``to_pylist()``, which copies every cell into a ``bytes`` object."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        return [c for chunk in col.chunks for c in binary_cells(chunk)]
    n = len(col)
    if n == 0:
        return []
    otype = np.int64 if pa.types.is_large_binary(col.type) else np.int32
    validity, offsets_buf, data = col.buffers()[:3]
    offsets = np.frombuffer(offsets_buf, otype)[col.offset : col.offset + n + 1].tolist()
    valid = [True] * n if not col.null_count else col.is_valid().to_pylist()
    if data is None:
        data = pa.py_buffer(b"")
    return [data.slice(offsets[i], offsets[i + 1] - offsets[i]) if valid[i] else None for i in range(n)]


def decode_cell_into(cell: Any, codec: str | None, dtype: Any, out: np.ndarray, row: int = 0) -> np.ndarray:
    """One image cell (bytes or a buffer) in its codec (``raw``/None, ``delta-planes`` or ``zstd-delta``) decoded
    into ``out``, a C-contiguous (H, W) array of the stored ``dtype``; ``row`` only names the row in errors."""
    dt = np.dtype(dtype)
    h, w = out.shape
    if cell is None:
        raise StorageError(f"image column: row {row} is null")
    if codec in (None, "raw"):
        if len(cell) != h * w * dt.itemsize:
            raise StorageError(f"image column: row {row} is not {h * w * dt.itemsize} bytes ({h}x{w} {dt})")
        out[...] = np.frombuffer(cell, dt).reshape(h, w)
    elif codec == "delta-planes" and dt == np.uint16:
        if len(cell) != 2 * h * w:
            raise StorageError(f"image column: row {row} is not {2 * h * w} bytes ({h}x{w} delta planes)")
        undo_delta_planes(np.frombuffer(cell, np.uint8), h, w, out)
    elif codec == "zstd-delta" and dt == np.uint16:
        try:
            decode_image(cell, h, w, out)
        except Exception as exc:  # noqa: BLE001 - a corrupt cell names its row
            raise StorageError(f"image column: row {row} does not decode as {codec}: {exc}") from exc
    else:
        raise StorageError(f"image column: row {row} has unknown codec {codec!r} for {dt}")
    return out


def _decode_cells(cells: Sequence[Any], h: int, w: int, dt: np.dtype, codecs: Sequence[str | None],
                  out: np.ndarray | None = None) -> np.ndarray:
    """(B, H, W) from per-row cells (bytes or buffers) in their codecs (:func:`decode_cell_into`), each decoded
    straight into its row of the result (or of ``out``)."""
    if out is None:
        out = np.empty((len(cells), h, w), dt)
    for i, (cell, codec) in enumerate(zip(cells, codecs, strict=True)):
        decode_cell_into(cell, codec, dt, out[i], i)
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
