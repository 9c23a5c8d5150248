"""Contact sheet: a grid of sample images, each normalised to 8 bits, as PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from drrfarm.errors import StorageError
from drrfarm.sinks.dataset import sample_images


def to_uint8(image: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """(H, W) uint8: the image's [lo_pct, hi_pct] percentile window mapped to 0..255 (NaN -> 0)."""
    x = np.asarray(image, np.float64)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.zeros(x.shape, np.uint8)
    lo, hi = np.percentile(finite, [lo_pct, hi_pct])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.full(x.shape, 128 if hi != 0 else 0, np.uint8)
    y = (np.nan_to_num(x, nan=lo) - lo) / (hi - lo)
    return (np.clip(y, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def contact_sheet_png(
    source: str | np.ndarray | Sequence[np.ndarray], n: int = 16, *, tile_px: int = 256, gap_px: int = 2
) -> bytes:
    """PNG bytes of a grid of up to ``n`` images.

    source: a dataset URL (images sampled evenly over its committed rows), a (N, H, W) array, or a
    sequence of (H, W) arrays. Each image is normalised on its own and fit into tile_px x tile_px.
    """
    from PIL import Image

    if n < 1:
        raise StorageError(f"contact sheet: n must be >= 1, got {n}")
    if isinstance(source, str):
        images = [img for img, _ in sample_images(source, n)]
    else:
        arr = source if isinstance(source, np.ndarray) else None
        images = list(arr) if arr is not None and arr.ndim == 3 else [np.asarray(a) for a in source]
        if arr is not None and arr.ndim == 2:
            images = [arr]
        if len(images) > n:
            idx = sorted({int(round(x)) for x in np.linspace(0, len(images) - 1, n)})
            images = [images[i] for i in idx]
    if not images:
        raise StorageError("contact sheet: no images")
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("L", (cols * tile_px + (cols + 1) * gap_px, rows * tile_px + (rows + 1) * gap_px), 0)
    for i, img in enumerate(images):
        if img.ndim != 2:
            raise StorageError(f"contact sheet: image {i} has shape {img.shape}, expected (H, W)")
        tile = Image.fromarray(to_uint8(img))
        f = tile_px / max(tile.width, tile.height)
        size = (max(1, round(tile.width * f)), max(1, round(tile.height * f)))
        tile = tile.resize(size, Image.Resampling.BOX if f < 1 else Image.Resampling.NEAREST)
        r, c = divmod(i, cols)
        x0 = gap_px + c * (tile_px + gap_px) + (tile_px - tile.width) // 2
        y0 = gap_px + r * (tile_px + gap_px) + (tile_px - tile.height) // 2
        sheet.paste(tile, (x0, y0))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
