"""Object-store access for dataset output: any fsspec URL, atomic puts, bounded retries, safe keys.

A :class:`Store` is the root of one dataset (``/data/run1``, ``file:///data/run1``,
``s3://bucket/prefix``, ``memory://name``, or any other fsspec protocol). Every key handed to it is
relative to that root and is checked by :func:`safe_key`, so nothing can escape the prefix.

Credentials and endpoints: for ``s3://`` the filesystem is s3fs, configured only by the standard AWS
chain -- ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``~/.aws/config``, instance roles,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``. URLs carrying credentials (``s3://key:secret@bucket``) are
rejected, and neither credentials nor endpoints are ever logged.

Atomicity of :meth:`Store.put_bytes`: on object stores (s3, gcs, azure, memory) a single PUT of the
complete object is atomic -- the key either does not exist or holds the whole object -- so objects
are written directly to their final key. On local disks (and other filesystems) the bytes go to
``_tmp/<uuid>`` under the root first, are fsynced, and are renamed into place (``os.replace`` /
``fs.mv``). Shard-level atomicity (several files, then the manifest entry) is built on top of this by
:mod:`drrfarm.sinks.writer`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from drrfarm.errors import StorageError

log = logging.getLogger("drrfarm.sinks")

T = TypeVar("T")

TMP_PREFIX = "_tmp"
"""Key prefix for in-flight temporary objects (local/generic filesystems only)."""

_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._=+-]*$")
_SHARD_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MAX_KEY_LEN = 900  # S3 allows 1024 bytes for prefix + key

# Object stores where one PUT of a complete object is atomic: write straight to the final key.
_DIRECT_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})

# Exception class names (anywhere in the MRO) that mean "the network/server hiccupped; try again".
_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "HTTPClientError",
        "ProxyConnectionError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "IncompleteRead",
        "ResponseParserError",
        "FSTimeoutError",
        "ClientPayloadError",
        "ClientConnectionError",
        "ServerDisconnectedError",
        "ClientOSError",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EBUSY,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        getattr(errno, "EREMOTEIO", 121),
    }
)
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling", "ThrottlingException"}
)


# --------------------------------------------------------------------------------------------- keys


def safe_key(key: str) -> str:
    """Validate a key relative to a store root; returns it unchanged or raises StorageError.

    Allowed: ``/``-separated components of ``[A-Za-z0-9_][A-Za-z0-9._=+-]*`` -- no absolute paths, no
    ``.``/``..``/empty components, no backslashes, spaces, control or non-ASCII characters, at most
    900 characters.
    """
    if not isinstance(key, str) or not key:
        raise StorageError(f"invalid storage key {key!r}: must be a non-empty string")
    if len(key) > _MAX_KEY_LEN:
        raise StorageError(f"invalid storage key {key[:60]!r}...: longer than {_MAX_KEY_LEN} characters")
    if key.startswith("/") or "\\" in key or "://" in key:
        raise StorageError(f"invalid storage key {key!r}: must be relative to the output prefix")
    for part in key.split("/"):
        if part in ("", ".", "..") or not _COMPONENT_RE.match(part):
            raise StorageError(
                f"invalid storage key {key!r}: component {part!r} is empty, '.', '..' or has characters "
                "outside [A-Za-z0-9._=+-]"
            )
    return key


def safe_name(text: object, *, max_len: int = 120) -> str:
    """Normalise an arbitrary identifier (volume id, ...) into one safe key component.

    Characters outside ``[A-Za-z0-9._=+-]`` become ``_``, leading dots are dropped, the result is cut
    to ``max_len``; never empty (``"_"``). Different inputs can map to the same name.
    """
    s = re.sub(r"[^A-Za-z0-9._=+-]", "_", str(text)).lstrip(".")[:max_len]
    if s.startswith(("-", "+", "=")):
        s = "_" + s[1:]
    return s or "_"


def check_shard_id(shard_id: str) -> str:
    """Shard ids become key components verbatim, so they are validated, not normalised."""
    if not isinstance(shard_id, str) or not _SHARD_ID_RE.match(shard_id):
        raise StorageError(
            f"invalid shard_id {shard_id!r}: use 1-200 characters of [A-Za-z0-9._=+-], starting with a "
            "letter or digit"
        )
    return shard_id


def redact_url(url: str) -> str:
    """The URL with any ``user:password@`` part replaced by ``***@`` (for error messages)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1***@", url)


# ------------------------------------------------------------------------------------------ retries


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: delays base_s, 2*base_s, ... capped at max_delay_s, with jitter."""

    attempts: int = 6
    base_s: float = 0.5
    max_delay_s: float = 8.0
    jitter: float = 0.25

    def delay_s(self, attempt: int) -> float:
        """Sleep before retry number ``attempt`` (1-based)."""
        d = min(self.max_delay_s, self.base_s * (2 ** (attempt - 1)))
        return d * (1.0 + self.jitter * random.random())


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection failures, timeouts, throttling, HTTP 5xx."""
    if isinstance(exc, StorageError | FileNotFoundError | PermissionError | FileExistsError):
        return False
    if isinstance(exc, IsADirectoryError | NotADirectoryError | ValueError | TypeError):
        return False
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(e).__mro__):
            return True
        resp = getattr(e, "response", None)
        if isinstance(resp, Mapping):
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = resp.get("Error", {}).get("Code")
            if (isinstance(status, int) and status >= 500) or code in _TRANSIENT_CODES:
                return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS and type(e) is OSError:
            return True
        e = e.__cause__ or e.__context__
    return False


def _describe(exc: BaseException) -> str:
    """One line for logs/errors; endpoint URLs are replaced by <endpoint> (they come from the AWS
    environment/config chain and are not logged)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    msg = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'/]+(/[^\s\"']*)?", "<endpoint>", msg)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


# -------------------------------------------------------------------------------------------- store


def _listing_version(info: Mapping[str, Any]) -> tuple[Any, ...]:
    """An object's version as its listing tells it: the ETag, else size, mtime and inode; () if neither."""
    if info.get("ETag"):
        return ("etag", str(info["ETag"]), info.get("size"))
    if info.get("mtime") is not None:
        return ("mtime", float(info["mtime"]), info.get("size"), info.get("ino"))
    return ()


class Store:
    """A dataset root on some fsspec filesystem. Create with :func:`open_store`.

    Attributes: ``url`` (normalised, credential-free URL of the root), ``protocol``, ``fs`` (the fsspec
    filesystem), ``root`` (the root as an ``fs`` path), ``retry`` (:class:`RetryPolicy`).
    """

    def __init__(self, url: str, protocol: str, fs: Any, root: str, retry: RetryPolicy) -> None:
        self.url = url
        self.protocol = protocol
        self.fs = fs
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.retry = retry
        self._local = protocol in ("file", "local")

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __reduce__(self):  # pickles as its URL: the receiving process re-reads the AWS env chain
        return (_unpickle_store, (self.url, self.retry))

    # -- paths
    def path(self, key: str) -> str:
        """Filesystem path of ``key`` (validated) under the root."""
        safe_key(key)
        return f"{self.root}/{key}" if self.root not in ("", "/") else f"{self.root}{key}"

    def url_for(self, key: str) -> str:
        """Full URL of ``key`` (what another process or Ray Data would open)."""
        return f"{self.url.rstrip('/')}/{safe_key(key)}"

    # -- retries
    def call(self, what: str, fn: Callable[[], T], *, attempts: int | None = None) -> T:
        """Run ``fn`` with bounded retries on transient errors; StorageError naming ``what`` otherwise."""
        n = attempts or self.retry.attempts
        for attempt in range(1, n + 1):
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                transient = is_transient(exc)
                if transient and attempt < n:
                    delay = self.retry.delay_s(attempt)
                    log.warning(
                        "%s: transient error (%s), retry %d/%d in %.1f s",
                        what, _describe(exc), attempt, n - 1, delay,
                    )
                    time.sleep(delay)
                    continue
                kind = f"gave up after {n} attempts" if transient else "failed"
                raise StorageError(f"{what} {kind}: {_describe(exc)}") from exc
        raise AssertionError("unreachable")

    # -- writes
    def put_bytes(self, key: str, data: bytes | memoryview) -> None:
        """Atomically create/replace ``key`` with ``data`` (see module docstring), with retries."""
        path = self.path(key)
        if not self._local and not isinstance(data, bytes):
            data = bytes(data)  # object-store clients want bytes
        if self._local:
            self.call(f"writing {self.url_for(key)}", lambda: self._put_local(path, data))
        elif self.protocol in _DIRECT_PUT_PROTOCOLS:
            self.call(f"writing {self.url_for(key)}", lambda: self.fs.pipe_file(path, data))
        else:
            tmp = self.path(f"{TMP_PREFIX}/{uuid.uuid4().hex}")

            def put_then_move() -> None:
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)

            self.call(f"writing {self.url_for(key)}", put_then_move)

    def put_many(self, items: Mapping[str, bytes]) -> None:
        """put_bytes for several keys; object stores upload them concurrently (each PUT is atomic)."""
        if not items:
            return
        if self.protocol in _DIRECT_PUT_PROTOCOLS and self.protocol != "memory":
            paths = {self.path(k): v for k, v in items.items()}
            first = self.url_for(next(iter(items)))
            self.call(f"writing {len(paths)} objects ({first}, ...)", lambda: self.fs.pipe(paths))
        else:
            for k, v in items.items():
                self.put_bytes(k, v)

    def _put_local(self, path: str, data: bytes) -> None:
        tmp_dir = os.path.join(self.root, TMP_PREFIX)
        os.makedirs(tmp_dir, exist_ok=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(tmp_dir, uuid.uuid4().hex)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, key: str, *, missing_ok: bool = True) -> None:
        """Delete ``key``; a missing key is fine unless ``missing_ok`` is False."""
        path = self.path(key)

        def rm() -> None:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                if not missing_ok:
                    raise

        self.call(f"deleting {self.url_for(key)}", rm)

    # -- reads
    def get_bytes(self, key: str) -> bytes:
        """The whole object; StorageError (from FileNotFoundError) if missing."""
        path = self.path(key)
        return self.call(f"reading {self.url_for(key)}", lambda: self.fs.cat_file(path))

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Several objects at once (concurrent on object stores); missing keys raise StorageError."""
        keys = list(keys)
        if not keys:
            return {}
        lookup = {self.fs._strip_protocol(self.path(k)): k for k in keys}

        def cat() -> dict[str, bytes]:
            out = self.fs.cat(list(lookup), on_error="raise")
            return {lookup[self.fs._strip_protocol(p)]: v for p, v in out.items()}

        return self.call(f"reading {len(keys)} objects under {self.url}", cat)

    def exists(self, key: str) -> bool:
        path = self.path(key)
        self._invalidate(path)
        return self.call(f"checking {self.url_for(key)}", lambda: bool(self.fs.exists(path)))

    def size(self, key: str) -> int:
        """Size in bytes of ``key``; StorageError if missing."""
        path = self.path(key)
        self._invalidate(path)
        return int(self.call(f"stat {self.url_for(key)}", lambda: self.fs.info(path)["size"]))

    def list(self, prefix: str) -> list[str]:
        """Keys (relative to the root, sorted) of all files under ``prefix`` ("" = everything)."""
        return sorted(self._find(prefix, detail=False))

    def open_read(self, key: str):
        """A seekable binary file object for ``key`` (for Parquet footers / row groups)."""
        path = self.path(key)
        return self.call(f"opening {self.url_for(key)}", lambda: self.fs.open(path, "rb"))

    def clean_tmp(self, older_than_s: float = 3600.0) -> int:
        """Delete temporaries under ``_tmp/`` left by killed writers (local stores only); returns count.

        Only files older than ``older_than_s`` go, so writers still running are not disturbed.
        """
        if not self._local:
            return 0
        tmp_dir = os.path.join(self.root, TMP_PREFIX)
        removed = 0
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(tmp_dir):
                p = os.path.join(tmp_dir, name)
                with contextlib.suppress(OSError):
                    if os.path.isfile(p) and now - os.path.getmtime(p) > older_than_s:
                        os.unlink(p)
                        removed += 1
        return removed

    def list_versions(self, prefix: str) -> dict[str, tuple[Any, ...]]:
        """Keys under ``prefix`` (as :meth:`list`) with a version of each from the listing itself: the object's
        ETag (object stores) or its size and modification time (files); () where the listing tells none."""
        return {key: _listing_version(info) for key, info in sorted(self._find(prefix, detail=True).items())}

    def _find(self, prefix: str, *, detail: bool) -> dict[str, Any]:
        """Files under ``prefix`` by key (relative to the root): the listing's info of each with ``detail``,
        else None."""
        base = self.path(prefix) if prefix else self.root
        self._invalidate(base)
        what = self.url_for(prefix) if prefix else self.url

        def find() -> dict[str, Any]:
            try:
                found = self.fs.find(base, detail=detail)
            except FileNotFoundError:
                return {}
            root = self.fs._strip_protocol(self.root).rstrip("/")
            out: dict[str, Any] = {}
            for p, info in (found.items() if detail else ((p, None) for p in found)):
                p = self.fs._strip_protocol(p)
                if p.startswith(root + "/"):
                    out[p[len(root) + 1 :]] = info
            return out

        return self.call(f"listing {what}", find)

    def _invalidate(self, path: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    # -- preflight
    def probe(self, *, attempts: int = 3) -> None:
        """Write, read back and delete a small probe object; StorageError naming the URL on failure."""
        key = f"{TMP_PREFIX}/probe-{uuid.uuid4().hex}"
        payload = b"drrfarm write probe\n"
        saved = self.retry
        self.retry = RetryPolicy(attempts=attempts, base_s=saved.base_s, max_delay_s=saved.max_delay_s)
        try:
            try:
                self.put_bytes(key, payload)
                if self.get_bytes(key) != payload:
                    raise StorageError(f"output URL {self.url}: probe object read back differently")
                self.delete(key)
            except StorageError as exc:
                raise StorageError(f"output URL {self.url} is not writable: {_hint(exc)}") from exc
        finally:
            self.retry = saved


def _hint(exc: StorageError) -> str:
    cause = exc.__cause__
    text = str(exc)
    if isinstance(cause, FileNotFoundError) and "bucket" in str(cause).lower():
        return f"the bucket does not exist ({text})"
    if isinstance(cause, PermissionError):
        return f"access denied -- check the AWS credentials/permissions or directory permissions ({text})"
    if cause is not None and is_transient(cause):
        return f"cannot reach the storage endpoint (AWS_ENDPOINT_URL / AWS config) ({text})"
    return text


def _unpickle_store(url: str, retry: RetryPolicy) -> Store:
    return open_store(url, probe=False, retry=retry)


# -------------------------------------------------------------------------------------- open_store


def _s3_filesystem() -> Any:
    """s3fs filesystem configured only from the AWS environment/config chain."""
    try:
        from drrfarm.sinks.s3_filesystem import BoundedRetryS3FileSystem
    except ImportError as exc:  # pragma: no cover - s3fs is a dependency
        raise StorageError("s3:// output needs the 's3fs' package (pip install s3fs)") from exc
    client_kwargs: dict[str, Any] = {}
    ignore = os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and not ignore:
        # botocore >= 1.31 reads these itself; passing them explicitly also covers older versions.
        client_kwargs["endpoint_url"] = endpoint
    config_kwargs = {
        "retries": {"max_attempts": 2, "mode": "standard"},  # our own bounded backoff sits on top
        "connect_timeout": 10,
        "read_timeout": 120,
    }
    return BoundedRetryS3FileSystem(client_kwargs=client_kwargs, config_kwargs=config_kwargs,
                                    skip_instance_cache=True)


def _split_url(url: str) -> tuple[str, str]:
    """(protocol, rest) with protocol 'file' for plain paths."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", url)
    if not m:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\\]", url) and not re.match(r"^[A-Za-z]:[\\/]", url):
            raise StorageError(f"output URL {url!r}: not a path and not a scheme:// URL")
        return "file", url
    return m.group(1).lower(), m.group(2)


def open_store(url: str, *, probe: bool = True, retry: RetryPolicy | None = None) -> Store:
    """Open the dataset root at ``url`` (path or fsspec URL); with ``probe``, preflight a write/delete.

    Raises StorageError naming the URL for an unknown scheme, credentials in the URL, a bad bucket name,
    a missing bucket, bad credentials, an unreachable endpoint, or an unwritable local directory --
    before any rendering starts.
    """
    if not isinstance(url, str) or not url.strip():
        raise StorageError(f"output URL {url!r}: must be a non-empty string")
    url = url.strip()
    shown = redact_url(url)
    protocol, rest = _split_url(url)
    if "@" in rest.split("/", 1)[0]:
        raise StorageError(
            f"output URL {shown}: credentials in URLs are not accepted; use the AWS environment/config "
            "chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)"
        )
    if "?" in rest or "#" in rest:
        raise StorageError(f"output URL {shown}: query strings and fragments are not supported")
    retry = retry or RetryPolicy()

    if protocol in ("file", "local"):
        import fsspec

        path = os.path.abspath(os.path.expanduser(rest)) if rest else ""
        if not path:
            raise StorageError(f"output URL {shown}: empty path")
        if os.path.exists(path) and not os.path.isdir(path):
            raise StorageError(f"output URL {shown}: {path} exists and is not a directory")
        if probe:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"output URL {shown} is not writable: {_describe(exc)}") from exc
        store = Store(f"file://{path}", "file", fsspec.filesystem("file"), path, retry)
    else:
        import fsspec

        if protocol not in fsspec.available_protocols():
            raise StorageError(
                f"output URL {shown}: unknown URL scheme '{protocol}://' (use a local path, file://, s3://, "
                "memory:// or another fsspec protocol)"
            )
        parts = [p for p in rest.split("/") if p]
        if not parts and protocol != "memory":
            raise StorageError(f"output URL {shown}: no bucket/container in the URL")
        for p in parts:
            if p in (".", ".."):
                raise StorageError(f"output URL {shown}: '.' and '..' are not allowed in the URL")
        if protocol in ("s3", "s3a"):
            if not _BUCKET_RE.match(parts[0]):
                raise StorageError(f"output URL {shown}: {parts[0]!r} is not a valid S3 bucket name")
            fs = _s3_filesystem()
            root = "/".join(parts)
        elif protocol == "memory":
            fs = fsspec.filesystem("memory")
            root = "/" + "/".join(parts)
        else:
            try:
                fs = fsspec.filesystem(protocol)
            except (ImportError, ValueError) as exc:
                raise StorageError(f"output URL {shown}: cannot load the '{protocol}' filesystem: {exc}") from exc
            root = fs._strip_protocol(url).rstrip("/")
        norm = f"{protocol}://{'/'.join(parts)}" if protocol != "memory" else f"memory:/{root}"
        store = Store(norm, protocol, fs, root, retry)
    if probe:
        store.probe()
    return store
