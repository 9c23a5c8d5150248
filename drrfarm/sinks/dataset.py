"""Reading a written dataset: committed Parquet files for Ray Data / pyarrow, and image sampling.

``pyarrow.fs.S3FileSystem`` (which Ray Data uses for ``s3://`` strings) ignores ``AWS_ENDPOINT_URL``,
so :func:`parquet_dataset` hands out a pyarrow filesystem wrapping the same fsspec filesystem the
writer used (same AWS environment chain)::

    paths, fs = parquet_dataset("s3://bucket/run1")
    ds = ray.data.read_parquet(paths, filesystem=fs)
    for batch in ds.iter_batches(batch_format="numpy"):
        x = dequantize(images_from_batch(batch), batch["image_scale"])   # (B, H, W) float32
"""

from __future__ import annotations

from typing import Any

import numpy as np

from drrfarm.errors import StorageError
from drrfarm.sinks.manifest import Manifest, read_manifest
from drrfarm.sinks.parquet import IMAGE_COLUMN, decode_images, dequantize
from drrfarm.sinks.png import decode_png16
from drrfarm.sinks.store import Store, open_store


def _store(url: str | Store) -> Store:
    return url if isinstance(url, Store) else open_store(url, probe=False)


def arrow_filesystem(store: Store) -> Any:
    """A pyarrow FileSystem for the store's paths (local: native; others: fsspec-backed)."""
    import pyarrow.fs as pafs

    if store.protocol == "file":
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(store.fs))


def parquet_dataset(url: str | Store, manifest: Manifest | None = None) -> tuple[list[str], Any]:
    """(paths of committed Parquet shards, pyarrow filesystem) -- only shards in the manifest."""
    store = _store(url)
    manifest = manifest if manifest is not None else read_manifest(store)
    return [store.path(k) for k in manifest.keys_of("parquet")], arrow_filesystem(store)


def _spread(total: int, n: int) -> list[int]:
    if total <= 0 or n <= 0:
        return []
    n = min(n, total)
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, n)})


def sample_images(url: str | Store, n: int = 16) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Up to ``n`` (float32 image (H, W), row metadata) pairs spread evenly over the committed rows."""
    import pyarrow.parquet as pq

    store = _store(url)
    manifest = read_manifest(store)
    if not manifest:
        raise StorageError(f"{store.url}: no committed shards (no manifest entries)")
    picks = _spread(manifest.total_rows, n)
    out: list[tuple[np.ndarray, dict[str, Any]]] = []
    start = 0
    for entry in manifest.values():
        local = [p - start for p in picks if start <= p < start + entry.rows]
        start += entry.rows
        if not local:
            continue
        pq_keys = entry.keys_of("parquet")
        if pq_keys:
            with store.open_read(pq_keys[0]) as f:
                pf = pq.ParquetFile(f)
                bounds = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
                for r in local:
                    g = int(np.searchsorted(bounds, r, side="right") - 1)
                    tab = pf.read_row_group(g)
                    one = tab.slice(r - int(bounds[g]), 1)
                    img = dequantize(decode_images(one), one.column("image_scale").to_numpy())[0]
                    out.append((img, one.drop_columns([IMAGE_COLUMN]).to_pylist()[0]))
        else:
            import json

            pngs = entry.keys_of("png")
            for r in local:
                key = pngs[r]
                side = json.loads(store.get_bytes(key[: -len(".png")] + ".json"))
                img = decode_png16(store.get_bytes(key)).astype(np.float32) * float(side.get("image_scale", 1.0))
                out.append((img, side))
    return out
