"""The manifest: which shards are committed, with row counts, sizes and sha256 of every file.

Concurrency-safe by construction: each writer commits a shard by putting one small JSON object,
``_manifest/<shard_id>.json``, *after* every file of the shard is in place. Nothing is ever
read-modify-written, so any number of writers can commit at once. At the end of a sweep
:func:`finalize_manifest` consolidates the entries into ``manifest.json`` (plus the caller's
``extra``: spec hash, run id, summary) for loaders that cannot list a prefix.

:func:`read_manifest` is what resume and loaders trust: a shard whose files exist but whose entry
does not is **not** committed. Per-shard entries win over ``manifest.json`` (they may be newer);
``manifest.json`` alone is used when ``_manifest/`` is absent (e.g. a dataset copied without it).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from drrfarm.errors import StorageError
from drrfarm.sinks.png import jsonable
from drrfarm.sinks.store import Store, check_shard_id, open_store

log = logging.getLogger("drrfarm.sinks")

MANIFEST_PREFIX = "_manifest"
MANIFEST_KEY = "manifest.json"
MANIFEST_FORMAT = "drrfarm-manifest/1"


def entry_key(shard_id: str) -> str:
    """Key of a shard's manifest entry."""
    return f"{MANIFEST_PREFIX}/{check_shard_id(shard_id)}.json"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ShardEntry:
    """One committed shard. ``keys`` are relative to the dataset root; sha256/bytes are per key."""

    shard_id: str
    rows: int
    keys: tuple[str, ...]
    sha256: dict[str, str]
    bytes: dict[str, int]
    formats: tuple[str, ...] = ("parquet",)
    image_dtype: str = "uint16"
    height: int = 0
    width: int = 0
    volume_ids: tuple[str, ...] = ()
    file_metadata: dict[str, str] = field(default_factory=dict)
    committed_at: str = ""

    @property
    def total_bytes(self) -> int:
        return int(sum(self.bytes.values()))

    def keys_of(self, fmt: str) -> list[str]:
        """Keys of one format: ``parquet`` (.parquet), ``png`` (.png) or ``json`` (PNG sidecars)."""
        suffix = {"parquet": ".parquet", "png": ".png", "json": ".json"}[fmt]
        return [k for k in self.keys if k.endswith(suffix)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id,
            "rows": self.rows,
            "formats": list(self.formats),
            "image_dtype": self.image_dtype,
            "height": self.height,
            "width": self.width,
            "volume_ids": list(self.volume_ids),
            "files": [{"key": k, "bytes": self.bytes[k], "sha256": self.sha256[k]} for k in self.keys],
            "file_metadata": dict(self.file_metadata),
            "committed_at": self.committed_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardEntry:
        files = d["files"]
        return cls(
            shard_id=str(d["shard_id"]),
            rows=int(d["rows"]),
            keys=tuple(str(f["key"]) for f in files),
            sha256={str(f["key"]): str(f["sha256"]) for f in files},
            bytes={str(f["key"]): int(f["bytes"]) for f in files},
            formats=tuple(d.get("formats", ("parquet",))),
            image_dtype=str(d.get("image_dtype", "uint16")),
            height=int(d.get("height", 0)),
            width=int(d.get("width", 0)),
            volume_ids=tuple(d.get("volume_ids", ())),
            file_metadata={str(k): str(v) for k, v in d.get("file_metadata", {}).items()},
            committed_at=str(d.get("committed_at", "")),
        )


class Manifest(Mapping[str, ShardEntry]):
    """Committed shards of a dataset: a read-only mapping ``shard_id -> ShardEntry``.

    Also: ``url``, ``extra`` (from :func:`finalize_manifest`, else {}), ``finalized_at`` ("" if not
    finalized), ``total_rows``, ``total_bytes``, :meth:`keys_of`, :meth:`urls`, :meth:`to_dict`.
    """

    def __init__(
        self, url: str, shards: Mapping[str, ShardEntry], extra: Mapping[str, Any] | None = None,
        finalized_at: str = "",
    ) -> None:
        self.url = url
        self.shards = dict(sorted(shards.items()))
        self.extra = dict(extra or {})
        self.finalized_at = finalized_at

    def __getitem__(self, shard_id: str) -> ShardEntry:
        return self.shards[shard_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shards)

    def __len__(self) -> int:
        return len(self.shards)

    def __repr__(self) -> str:
        return f"Manifest({self.url!r}, shards={len(self)}, rows={self.total_rows})"

    @property
    def total_rows(self) -> int:
        return sum(e.rows for e in self.shards.values())

    @property
    def total_bytes(self) -> int:
        return sum(e.total_bytes for e in self.shards.values())

    def keys_of(self, fmt: str = "parquet") -> list[str]:
        """Keys of committed files of one format, in shard order."""
        return [k for e in self.shards.values() for k in e.keys_of(fmt)]

    def urls(self, fmt: str = "parquet") -> list[str]:
        """Full URLs of committed files of one format (e.g. for ``ray.data.read_parquet``)."""
        base = self.url.rstrip("/")
        return [f"{base}/{k}" for k in self.keys_of(fmt)]

    def to_dict(self) -> dict[str, Any]:
        """The ``manifest.json`` document."""
        return {
            "format": MANIFEST_FORMAT,
            "url": self.url,
            "finalized_at": self.finalized_at,
            "totals": {"shards": len(self), "rows": self.total_rows, "bytes": self.total_bytes},
            "extra": self.extra,
            "shards": [e.to_dict() for e in self.shards.values()],
        }


def commit_entry(store: Store, entry: ShardEntry) -> None:
    """Put the shard's entry (the commit point; call only after all its files are in place)."""
    data = json.dumps(entry.to_dict(), sort_keys=True).encode()
    store.put_bytes(entry_key(entry.shard_id), data)


def uncommit(store: Store, shard_id: str) -> None:
    """Remove a shard's entry (before rewriting it), so a crash mid-rewrite leaves it uncommitted."""
    store.delete(entry_key(shard_id))


#: Parsed manifest entries of this process by (store URL, key): (the object's version in the listing, entry).
#: Reading a manifest again (every epoch of a loader calls it) fetches only the entries whose version changed.
_ENTRY_CACHE: OrderedDict[tuple[str, str], tuple[tuple[Any, ...], ShardEntry]] = OrderedDict()
_ENTRY_CACHE_LOCK = threading.Lock()
ENTRY_CACHE_SIZE = 200_000


def _read_entries(store: Store) -> dict[str, ShardEntry]:
    versions = {k: v for k, v in store.list_versions(MANIFEST_PREFIX).items() if k.endswith(".json")}
    out: dict[str, ShardEntry] = {}
    fetch = []
    with _ENTRY_CACHE_LOCK:
        for key, version in versions.items():
            hit = _ENTRY_CACHE.get((store.url, key)) if version else None
            if hit is not None and hit[0] == version:
                out[hit[1].shard_id] = hit[1]
            else:
                fetch.append(key)
    blobs = store.get_many(fetch) if fetch else {}
    for key, blob in blobs.items():
        try:
            e = ShardEntry.from_dict(json.loads(blob))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable manifest entry %s: %s", store.url_for(key), exc)
            continue
        if entry_key(e.shard_id) != key:
            log.warning("ignoring manifest entry %s: names shard %r", store.url_for(key), e.shard_id)
            continue
        out[e.shard_id] = e
        if versions[key]:
            with _ENTRY_CACHE_LOCK:
                _ENTRY_CACHE[(store.url, key)] = (versions[key], e)
                _ENTRY_CACHE.move_to_end((store.url, key))
                while len(_ENTRY_CACHE) > ENTRY_CACHE_SIZE:
                    _ENTRY_CACHE.popitem(last=False)
    return out


def _read_consolidated(store: Store) -> dict[str, Any] | None:
    if not store.exists(MANIFEST_KEY):
        return None
    try:
        doc = json.loads(store.get_bytes(MANIFEST_KEY))
    except ValueError as exc:
        raise StorageError(f"{store.url_for(MANIFEST_KEY)} is not valid JSON: {exc}") from exc
    if doc.get("format") != MANIFEST_FORMAT:
        raise StorageError(f"{store.url_for(MANIFEST_KEY)}: unknown format {doc.get('format')!r}")
    return doc


def read_manifest(url: str | Store, *, verify: bool = False) -> Manifest:
    """Committed shards at ``url`` (empty Manifest when there are none).

    With ``verify``, shards with a missing file or a file of the wrong size are dropped (logged);
    checksums are not recomputed (see :func:`verify_shard`).
    """
    store = url if isinstance(url, Store) else open_store(url, probe=False)
    shards = _read_entries(store)
    doc = _read_consolidated(store)
    extra: dict[str, Any] = {}
    finalized_at = ""
    if doc is not None:
        extra = dict(doc.get("extra", {}))
        finalized_at = str(doc.get("finalized_at", ""))
        if not shards and not store.list(MANIFEST_PREFIX):
            shards = {e["shard_id"]: ShardEntry.from_dict(e) for e in doc.get("shards", [])}
    if verify:
        shards = {sid: e for sid, e in shards.items() if verify_shard(store, e, checksums=False)}
    return Manifest(store.url, shards, extra, finalized_at)


def verify_shard(store: Store, entry: ShardEntry, *, checksums: bool = True) -> bool:
    """True if every file of ``entry`` exists with the recorded size (and sha256 with ``checksums``)."""
    import hashlib

    for key in entry.keys:
        try:
            if store.size(key) != entry.bytes[key]:
                log.warning("shard %s: %s has the wrong size", entry.shard_id, store.url_for(key))
                return False
            if checksums and hashlib.sha256(store.get_bytes(key)).hexdigest() != entry.sha256[key]:
                log.warning("shard %s: %s fails its sha256", entry.shard_id, store.url_for(key))
                return False
        except StorageError as exc:
            log.warning("shard %s: %s", entry.shard_id, exc)
            return False
    return True


def finalize_manifest(url: str | Store, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the consolidated ``manifest.json`` from the committed entries; returns its document."""
    store = url if isinstance(url, Store) else open_store(url, probe=False)
    m = Manifest(store.url, _read_entries(store), jsonable(dict(extra or {})), utc_now())
    doc = m.to_dict()
    store.put_bytes(MANIFEST_KEY, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    return doc
