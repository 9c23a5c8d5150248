"""Opening a dataset: its store, the manifest of committed shards, file metadata and summaries (no pixel read).

Everything in :mod:`drrfarm.data` reads through the dataset's manifest (:func:`drrfarm.sinks.read_manifest`):
only committed shards are read, a shard still being written or left half-written by a killed worker is
invisible.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from drrfarm.errors import StorageError
from drrfarm.sinks.manifest import Manifest, read_manifest
from drrfarm.sinks.store import Store, open_store

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa


def open_dataset_store(url: str | Store, storage_options: Mapping[str, Any] | None = None) -> Store:
    """The sinks :class:`~drrfarm.sinks.Store` of a dataset root, read-only (no probe write).

    ``storage_options`` (fsspec keyword arguments, e.g. ``{"anon": True}`` or
    ``{"client_kwargs": {"endpoint_url": ...}}``) replace the store's default filesystem, which
    otherwise comes from the standard AWS environment/config chain for ``s3://``.
    """
    store = url if isinstance(url, Store) else open_store(str(url), probe=False)
    if storage_options:
        import fsspec

        # same root/URL normalisation as the sinks, another filesystem instance
        store = Store(store.url, store.protocol, fsspec.filesystem(store.protocol, **dict(storage_options)),
                      store.root, store.retry)
    return store


def committed_manifest(store: Store) -> Manifest:
    """The dataset's manifest of committed shards; a :class:`~drrfarm.errors.StorageError` when it has no
    committed Parquet shard."""
    manifest = read_manifest(store)
    if not manifest:
        raise StorageError(f"{store.url}: no committed shards (no manifest entries) -- is this a drrfarm dataset?")
    if not manifest.keys_of("parquet"):
        raise StorageError(f"{store.url}: the dataset has no Parquet shards (PNG only); read_drrs needs Parquet")
    return manifest


def shard_schema(store: Store, manifest: Manifest) -> pa.Schema:
    """The Arrow schema (with the file metadata) of the dataset's first committed Parquet shard."""
    import pyarrow.parquet as pq

    with store.open_read(manifest.keys_of("parquet")[0]) as fh:
        return pq.read_schema(fh)


def file_metadata(store: Store, manifest: Manifest) -> dict[str, str]:
    """File-level metadata of the dataset: manifest extra > shard entries > first Parquet footer."""
    meta: dict[str, str] = {}
    for entry in manifest.values():
        for k, v in entry.file_metadata.items():
            if v and not meta.get(k):
                meta[k] = v
    for k in ("spec_sha256", "drrfarm_version", "mlflow_run_id", "sweep_id"):
        v = manifest.extra.get(k)
        if v:
            meta[k] = str(v)
    if not meta.get("mlflow_run_id"):
        raw = shard_schema(store, manifest).metadata or {}
        for k, v in raw.items():
            ks, vs = k.decode(), v.decode()
            if vs and not meta.get(ks):
                meta[ks] = vs
    return meta


def dataset_info(url: str | Store, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A summary of a dataset from its manifest (no pixel is read).

    Returns ``{"url", "shards", "rows", "volume_ids", "image_dtype", "height", "width", "finalized",
    "mlflow_run_id", "spec_sha256", "sweep_id", "drrfarm_version", "file_metadata"}``; the run id is the
    provenance (MLflow) run of the sweep that wrote the dataset ("" when it was not tracked).
    """
    store = open_dataset_store(url, storage_options)
    manifest = committed_manifest(store)
    meta = file_metadata(store, manifest)
    entries = list(manifest.values())
    return {
        "url": store.url,
        "shards": len(entries),
        "rows": manifest.total_rows,
        "volume_ids": sorted({v for e in entries for v in e.volume_ids}),
        "image_dtype": sorted({e.image_dtype for e in entries}),
        "height": sorted({e.height for e in entries}),
        "width": sorted({e.width for e in entries}),
        "finalized": bool(manifest.finalized_at),
        "mlflow_run_id": meta.get("mlflow_run_id", ""),
        "spec_sha256": meta.get("spec_sha256", ""),
        "sweep_id": meta.get("sweep_id", ""),
        "drrfarm_version": meta.get("drrfarm_version", ""),
        "file_metadata": meta,
    }


def dataset_volume_ids(url: str | Store, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Volume ids of the committed shards (from the manifest; Parquet ``volume_id`` columns if absent)."""
    import pyarrow.parquet as pq

    store = open_dataset_store(url, storage_options)
    manifest = committed_manifest(store)
    ids: set[str] = set()
    for e in manifest.values():
        if e.volume_ids:
            ids.update(e.volume_ids)
        else:
            for key in e.keys_of("parquet"):
                with store.open_read(key) as fh:
                    ids.update(str(v) for v in pq.read_table(fh, columns=["volume_id"]).column("volume_id").to_pylist())
    return sorted(ids)
