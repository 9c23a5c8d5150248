"""Dataset output: Parquet/PNG shards on any fsspec URL, atomic commits, a manifest, async writing.

Public API (imported lazily so that ``drrfarm.sinks.commands`` stays cheap for the CLI)::

    open_store(url, *, probe=True) -> Store
    ShardSink(url, formats=("parquet",), image_dtype="uint16", rows_per_row_group=None)
        .write_shard(shard_id, images, rows, file_metadata, *, image_scale=None) -> ShardEntry
    AsyncShardWriter(sink, max_pending=2).submit(...) -> Future[ShardEntry]; .close()
    read_manifest(url, *, verify=False) -> Manifest;  finalize_manifest(url, extra) -> dict
    parquet_dataset(url) -> (paths, pyarrow filesystem)  # for ray.data.read_parquet / pyarrow.dataset
    decode_images(table), images_from_batch(batch), dequantize(images, image_scale)
    contact_sheet_png(url_or_arrays, n=16) -> bytes

Layout under the output URL::

    parquet/<shard_id>.parquet
    png/<volume_id>/<shard_id>/<image_index:08d>.png   (+ .json sidecar)
    _manifest/<shard_id>.json      one per committed shard (the commit point)
    manifest.json                  consolidated by finalize_manifest
    _tmp/                          in-flight temporaries on local/generic filesystems
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Store": "store",
    "RetryPolicy": "store",
    "open_store": "store",
    "safe_key": "store",
    "safe_name": "store",
    "ShardSink": "writer",
    "AsyncShardWriter": "writer",
    "parquet_key": "writer",
    "ShardEntry": "manifest",
    "Manifest": "manifest",
    "read_manifest": "manifest",
    "finalize_manifest": "manifest",
    "verify_shard": "manifest",
    "decode_images": "parquet",
    "images_from_batch": "parquet",
    "dequantize": "parquet",
    "read_shard": "parquet",
    "parquet_dataset": "dataset",
    "sample_images": "dataset",
    "encode_png16": "png",
    "decode_png16": "png",
    "png_keys": "png",
    "contact_sheet_png": "contact_sheet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'drrfarm.sinks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"drrfarm.sinks.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
