"""The row layout of every reader and the decoding of shard tables into it (numpy; torch only in
:func:`to_float_line_integrals`).

Shared by Ray Data (:mod:`drrfarm.data.raydata`), the torch datasets (:mod:`drrfarm.data.torch_datasets`) and
the stream (:mod:`drrfarm.farm.stream`); the row layout is described in :mod:`drrfarm.data`. Parquet decoding
is the sinks' own (:func:`drrfarm.sinks.decode_images`, :func:`drrfarm.sinks.dequantize`); this module turns
tables into the arrays of a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from drrfarm.errors import StorageError
from drrfarm.sinks.annotations import decode_pixel_column as decode_annotation_column
from drrfarm.sinks.parquet import IMAGE_CODEC_COLUMN, decode_images, dequantize

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

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


def is_numeric(t: Any) -> bool:
    """Whether an Arrow type is numbers (or lists of numbers): what ``iter_torch_batches`` can turn into tensors."""
    import pyarrow as pa

    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return is_numeric(t.value_type)
    return False


def select_columns(schema: pa.Schema, columns: Sequence[str] | str | None) -> list[str]:
    """Metadata columns to return (without the image)."""
    names = [n for n in schema.names if n != IMAGE]
    if columns is None:
        return [n for n in names if is_numeric(schema.field(n).type) or n in PIXEL_COLUMNS]
    if isinstance(columns, str):
        if columns == "all":
            return names
        columns = [columns]
    bad = [c for c in columns if c not in names and c != IMAGE]
    if bad:
        raise StorageError(f"columns: unknown {bad}; available: {sorted(names)}")
    return [c for c in dict.fromkeys(columns) if c != IMAGE]


def _combine(col: Any) -> Any:
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def column_to_numpy(name: str, col: Any) -> np.ndarray:
    """One metadata column (pyarrow Array/ChunkedArray of B rows) as a numpy array (see :mod:`drrfarm.data`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = _combine(col)
    t = col.type
    n = len(col)
    if name in VECTOR_SHAPES or pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        if not is_numeric(t):
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
    arrays: ``image`` (B, H, W) plus ``columns`` (see :mod:`drrfarm.data` for dtypes and shapes)."""
    out: dict[str, Any] = {IMAGE: decode_images_any_shape(table, float_line_integral=float_line_integral)}
    for name in columns:
        out[name] = decode_pixel_column(table, name) if name in PIXEL_COLUMNS else \
            column_to_numpy(name, table.column(name))
    return out


def to_float_line_integrals(batch: Mapping[str, Any], device: Any = None, *, non_blocking: bool = True) -> Any:
    """float32 values ``stored * image_scale`` (line integrals for the default ``output: line_integral``) of a
    batch's images, computed on ``device`` (default: where the image already is).

    ``batch``: a batch of :func:`~drrfarm.data.read_drrs` (``iter_torch_batches``, images in the stored dtype) or
    of the torch datasets, with ``image`` (B, H, W) and ``image_scale`` (B,) -- tensors or numpy arrays; a list of
    images (datasets mixing shapes) gives a list. Only the stored uint16 and the scales cross to the device and the
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
    def values(col: str) -> list[Any]:
        return _combine(table.column(col)).to_pylist()

    return decode_annotation_column(name, values(name), values("mask_count"), values("height"), values("width"))


def read_columns(columns: Sequence[str], schema_names: Sequence[str] = ()) -> list[str]:
    """The Parquet columns to read for ``columns`` (the image, its decode columns, pixel dependencies);
    ``schema_names``: the file's columns, to add ``image_codec`` where the shards have it."""
    deps = PIXEL_DEPENDS if any(c in PIXEL_COLUMNS for c in columns) else ()
    codec = [IMAGE_CODEC_COLUMN] if IMAGE_CODEC_COLUMN in schema_names else []
    return list(dict.fromkeys([IMAGE, *DECODE_COLUMNS, *codec, *deps, *columns]))
