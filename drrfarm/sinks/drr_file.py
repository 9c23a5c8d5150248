"""One DRR as files: a 16-bit PNG, its JSON sidecar and optionally the float32 ``.npy`` array.

What ``drrfarm render`` and :meth:`drrfarm.api.Renderer.save` write; ``float = value × image_scale``
with ``image_scale`` from the sidecar. Every file is written atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from drrfarm.errors import StorageError
from drrfarm.physics import quantize_uint16
from drrfarm.sinks.png import encode_png16

__all__ = ["output_paths", "write_drr"]


def output_paths(out_png: str | Path, npy: bool = False) -> list[Path]:
    """The files :func:`write_drr` writes for ``out_png`` (PNG, JSON sidecar, optional NPY), checked before
    any work is done: none may be a folder, and their folder must exist or be creatable, and be writable.

    Raises :class:`~drrfarm.errors.StorageError` naming the path.
    """
    out_png = Path(out_png)
    if out_png.name in ("", ".", ".."):
        raise StorageError(f"output file {str(out_png)!r} is not a file name; give a .png path")
    paths = [out_png, out_png.with_suffix(".json")] + ([out_png.with_suffix(".npy")] if npy else [])
    if len(set(paths)) != len(paths):
        raise StorageError(f"output file {out_png}: the image and its sidecar would share this name; give a .png path")
    try:
        if out_png.is_dir():
            raise StorageError(f"output file {out_png} is a folder; give a file path such as {out_png / 'drr.png'}")
        for path in paths[1:]:
            if path.is_dir():
                raise StorageError(f"output file {out_png}: {path} is a folder, so it cannot be written")
        existing = out_png.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StorageError(f"output file {out_png}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"output file {out_png}: folder {existing} is not writable")
    except OSError as exc:
        raise StorageError(f"output file {out_png}: {exc.strerror or exc}") from None
    return paths


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise StorageError(f"output file {path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StorageError(f"output file {path}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_drr(image: np.ndarray, sidecar: dict[str, Any], out_png: str | Path, npy: bool = False) -> list[Path]:
    """Write ``out.png`` (16-bit, ``value × image_scale`` = output), ``out.json`` and optionally ``out.npy``."""
    written = output_paths(out_png, npy=npy)
    out_png = written[0]
    quantised, scale = quantize_uint16(image, sidecar["physics"]["output"])
    sidecar = {**sidecar, "image_scale": scale, "image_dtype": "uint16"}
    _atomic_write(out_png, encode_png16(quantised))
    _atomic_write(written[1], json.dumps(sidecar, indent=2).encode())
    if npy:
        buf = io.BytesIO()
        np.save(buf, image.astype(np.float32))
        _atomic_write(written[2], buf.getvalue())
    return written
