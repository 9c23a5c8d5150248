"""Per-image pixel annotations next to the image: label/tool masks and projected thickness.

A row handed to :class:`drrfarm.sinks.ShardSink` may carry

* ``masks``: (L, H, W) bool -- stored as packed bits: ``ceil(L / 16)`` uint16 planes, bit ``i % 16`` of
  plane ``i // 16`` is mask ``i`` (:func:`pack_mask_bits`);
* ``thickness_mm``: (L, H, W) float -- stored as float16 (mm).

Parquet: ``masks`` and ``thickness_mm`` are binary cells of the planes' raw little-endian bytes,
``mask_count`` (int) is L; H and W are the row's ``height`` / ``width``. The names of the L masks are
the file metadata ``drrfarm.mask_names`` (a JSON list). PNG: ``<image>_masks.png`` (16-bit grayscale
of plane 0; ``_masks1.png``, ... for more than 16 masks) and ``<image>_thickness<i>.png`` (16-bit,
``value × THICKNESS_PNG_SCALE_MM`` mm) next to the image, listed in the JSON sidecar
(``mask_pngs``, ``thickness_pngs``, ``thickness_png_scale_mm``, ``mask_count``).

Other annotation fields (landmarks, tool poses) are plain lists and need no encoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from drrfarm.errors import StorageError
from drrfarm.sinks.png import encode_png16

MASKS = "masks"
THICKNESS = "thickness_mm"
MASK_COUNT = "mask_count"
PIXEL_FIELDS = (MASKS, THICKNESS)
THICKNESS_PNG_SCALE_MM = 0.01  # 16-bit thickness PNGs: 0.01 mm per unit (up to 655 mm)


def pack_mask_bits(masks: np.ndarray) -> np.ndarray:
    """(L, H, W) bool -> (ceil(L / 16), H, W) uint16: bit ``i % 16`` of plane ``i // 16`` is mask ``i``."""
    m = np.asarray(masks, dtype=bool)
    L, H, W = m.shape
    out = np.zeros(((L + 15) // 16, H, W), dtype=np.uint16)
    for i in range(L):
        out[i // 16] |= m[i].astype(np.uint16) << np.uint16(i % 16)
    return out


def unpack_mask_bits(planes: np.ndarray, n_masks: int) -> np.ndarray:
    """Inverse of :func:`pack_mask_bits`: (P, H, W) uint16 -> (n_masks, H, W) bool."""
    planes = np.asarray(planes, dtype=np.uint16)
    if n_masks == 0:
        return np.zeros((0, *planes.shape[1:]), dtype=bool)
    return np.stack([(planes[i // 16] >> np.uint16(i % 16)) & 1 for i in range(n_masks)]).astype(bool)


def _pixel_array(row: Mapping[str, Any], name: str, h: int, w: int, where: str) -> np.ndarray | None:
    value = row.get(name)
    if value is None:
        return None
    a = np.asarray(value)
    if a.ndim != 3 or a.shape[1:] != (h, w):
        raise StorageError(f"{where} field {name!r}: expected (L, {h}, {w}), got {a.shape}")
    return a


def split_pixel_fields(row: Mapping[str, Any], h: int, w: int, where: str
                       ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(the row without its pixel annotations, {name: (L, H, W) array}); checks shapes and counts."""
    rest = {k: v for k, v in row.items() if k not in PIXEL_FIELDS}
    fields = {n: a for n in PIXEL_FIELDS if (a := _pixel_array(row, n, h, w, where)) is not None}
    counts = {len(a) for a in fields.values()}
    if len(counts) > 1:
        raise StorageError(f"{where}: masks and thickness_mm must have the same number of labels, got {counts}")
    if fields:
        rest[MASK_COUNT] = counts.pop()
    return rest, fields


def parquet_cells(fields: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """The Parquet binary cells of one row's pixel annotations."""
    cells: dict[str, bytes] = {}
    if MASKS in fields:
        cells[MASKS] = pack_mask_bits(fields[MASKS]).astype("<u2").tobytes()
    if THICKNESS in fields:
        cells[THICKNESS] = np.asarray(fields[THICKNESS], dtype="<f2").tobytes()
    return cells


def png_files(fields: Mapping[str, np.ndarray], image_key: str, compress_level: int = 1
              ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """({key: PNG bytes}, sidecar entries) of one image's pixel annotations, keyed next to ``image_key``."""
    base = image_key[: -len(".png")] if image_key.endswith(".png") else image_key
    files: dict[str, bytes] = {}
    side: dict[str, Any] = {}
    if MASKS in fields:
        planes = pack_mask_bits(fields[MASKS])
        keys = [f"{base}_masks{'' if p == 0 else p}.png" for p in range(len(planes))]
        for key, plane in zip(keys, planes, strict=True):
            files[key] = encode_png16(plane, compress_level=compress_level)
        side["mask_pngs"] = keys
    if THICKNESS in fields:
        th = np.asarray(fields[THICKNESS], dtype=np.float64) / THICKNESS_PNG_SCALE_MM
        keys = [f"{base}_thickness{i}.png" for i in range(len(th))]
        for key, plane in zip(keys, th, strict=True):
            q = np.rint(np.clip(np.nan_to_num(plane), 0.0, 65535.0)).astype(np.uint16)
            files[key] = encode_png16(q, compress_level=compress_level)
        side["thickness_pngs"] = keys
        side["thickness_png_scale_mm"] = THICKNESS_PNG_SCALE_MM
    return files, side


def decode_pixel_column(name: str, cells: Sequence[Any], counts: Sequence[Any], heights: Sequence[Any],
                        widths: Sequence[Any]) -> np.ndarray:
    """Decode a ``masks`` ((B, L, H, W) bool) or ``thickness_mm`` ((B, L, H, W) float32) column.

    Rows without the field (null) decode to all-False / NaN; rows must share (L, H, W) (else an
    object array of per-row arrays is returned)."""
    per: list[np.ndarray | None] = []
    for cell, n, h, w in zip(cells, counts, heights, widths, strict=True):
        if cell is None or n is None:
            per.append(None)
            continue
        n, h, w = int(n), int(h), int(w)
        buf = cell if isinstance(cell, (bytes, bytearray, memoryview)) else bytes(cell)
        if name == MASKS:
            planes = np.frombuffer(buf, "<u2").reshape(-1, h, w)
            per.append(unpack_mask_bits(planes, n))
        else:
            per.append(np.frombuffer(buf, "<f2").reshape(n, h, w).astype(np.float32))
    shapes = {a.shape for a in per if a is not None}
    if len(shapes) > 1:
        out = np.empty(len(per), dtype=object)
        out[:] = per
        return out
    shape = shapes.pop() if shapes else (0, int(heights[0]) if len(heights) else 0,
                                         int(widths[0]) if len(widths) else 0)
    fill: Any = False if name == MASKS else np.nan
    result = np.full((len(per), *shape), fill, dtype=bool if name == MASKS else np.float32)
    for i, a in enumerate(per):
        if a is not None:
            result[i] = a
    return result
