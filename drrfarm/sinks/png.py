"""16-bit grayscale PNG per image plus a JSON sidecar, for people who browse images.

Layout (relative to the dataset root)::

    png/<volume_id>/<shard_id>/<image_index:08d>.png    16-bit grayscale (PNG bit depth 16, colour type 0)
    png/<volume_id>/<shard_id>/<image_index:08d>.json   the row's metadata (same values as the Parquet row)

``volume_id`` is normalised by :func:`drrfarm.sinks.store.safe_name`. Pixel values are the uint16
quantised image; ``float = value * image_scale`` with ``image_scale`` from the sidecar. Pillow writes
and reads these as mode ``"I;16"``; the round trip is bit-exact.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from drrfarm.errors import StorageError
from drrfarm.sinks.store import safe_name

PNG_PREFIX = "png"


def png_keys(volume_id: object, shard_id: str, image_index: int) -> tuple[str, str]:
    """(png key, json sidecar key) of one image."""
    base = f"{PNG_PREFIX}/{safe_name(volume_id)}/{shard_id}/{int(image_index):08d}"
    return base + ".png", base + ".json"


def encode_png16(image: np.ndarray, *, compress_level: int = 1) -> bytes:
    """PNG bytes of a (H, W) uint16 image, 16-bit grayscale."""
    from PIL import Image

    if image.ndim != 2 or image.dtype != np.uint16:
        raise StorageError(f"PNG images must be (H, W) uint16, got {image.shape} {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.astype("<u2", copy=False))).save(
        buf, format="PNG", compress_level=compress_level
    )
    return buf.getvalue()


def decode_png16(data: bytes) -> np.ndarray:
    """(H, W) uint16 from 16-bit grayscale PNG bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise StorageError(f"PNG is mode {im.mode!r}, expected 16-bit grayscale")
        arr = np.array(im)
    return arr.astype(np.uint16, copy=False)


def jsonable(value: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays/tuples; non-finite floats become null."""
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def sidecar_json(row: Mapping[str, Any], file_metadata: Mapping[str, str], png_key: str) -> bytes:
    """Sidecar bytes: the row's metadata plus ``png_key``, ``image_dtype`` and the dataset metadata."""
    doc = jsonable(dict(row))
    doc["png_key"] = png_key
    doc["png_dtype"] = "uint16"
    doc["dataset"] = jsonable(dict(file_metadata))
    return (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
