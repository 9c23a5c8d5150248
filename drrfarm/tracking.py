"""Provenance with MLflow: one sweep (= one dataset) is one MLflow run.

The farm driver opens a tracker with :func:`open_tracker` and logs the flattened spec, the input CTs,
progress metrics and, at the end, the manifest, a contact sheet and a summary. Workers never touch
MLflow; ``mlflow`` is imported lazily, only by the driver, only when tracking is enabled.

Run identity: a run is found again (resume) by its tags ``drrfarm.spec_sha256`` and
``drrfarm.output_url`` (the normalised, redacted output URL) inside the experiment.

Store (when neither ``tracking_uri`` nor ``MLFLOW_TRACKING_URI`` is given):

- local output folder ``<out>``: SQLite ``sqlite:///<out>/mlruns.db``, artifacts in ``<out>/mlartifacts``;
- remote output (``s3://...``): ``sqlite:///<cwd>/mlruns.db``, artifacts in ``<cwd>/mlartifacts``.

Outages: no :class:`Tracker` method ever raises. A failing call is logged as a warning and buffered
(bounded); buffered calls are retried, oldest first, on later calls (with exponential backoff between
attempts) and at :meth:`Tracker.finish`, which waits at most ``finish_timeout_s`` before giving up.
While the tracker talks to MLflow, HTTP retries and timeouts are made short through the environment
(``MLFLOW_HTTP_REQUEST_*``) so a dead server costs seconds, not minutes.

Secrets: everything logged (params, tags, dataset inputs, artifact text) goes through :func:`redact`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import getpass
import hashlib
import json
import logging
import math
import os
import platform
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from drrfarm.errors import TrackingError

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "drrfarm"
SPEC_SHA_TAG = "drrfarm.spec_sha256"
OUTPUT_URL_TAG = "drrfarm.output_url"
DB_FILENAME = "mlruns.db"
ARTIFACTS_DIRNAME = "mlartifacts"
REDACTED = "***"

#: MLflow limits (mlflow.utils.validation): value lengths, key length, entities per log_batch call.
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_KEY_CHARS = 250
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_DATASET_DIGEST_CHARS = 36
_MAX_INPUT_TAG_VALUE_CHARS = 500

_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# ----------------------------------------------------------------------------------------------------
# Redaction
# ----------------------------------------------------------------------------------------------------

_SECRET_ENV_NAMES = frozenset(
    {
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_CONNECTION_STRING",
    }
)
# *_TOKEN, *SECRET*, *_PASSWORD (and a few obvious key/credential names).
_SECRET_ENV_NAME_RE = re.compile(
    r"(^|_)(TOKEN|PASSWORD|PASSWD)$|SECRET|(^|_)(API|ACCESS|PRIVATE)_?KEY($|_)|CONNECTION_STRING$", re.I
)
# Values too generic to be a secret (a flag such as FOO_SECRET_ENABLED=1 must not blank out every "1").
_TRIVIAL_VALUES = frozenset({"true", "false", "yes", "no", "none", "null", "on", "off"})
_MIN_SECRET_CHARS = 4  # shorter values are ignored
_MIN_SUBSTRING_SECRET_CHARS = 8  # shorter values are only redacted where a whole string equals them

# scheme://userinfo@host -> scheme://***@host (userinfo may hold unescaped '@'; stops at / ? # quotes space)
_USERINFO_RE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s\"'<>\\]*@")
# ?X-Amz-Signature=...&token=... -> value blanked
_QUERY_SECRET_RE = re.compile(
    r"(?P<key>[?&;][^=&#\s\"']*(?:token|signature|sig|secret|passw(?:or)?d|pwd|credential|api[_-]?key"
    r"|access[_-]?key)[^=&#\s\"']*=)[^&#\s\"']*",
    re.I,
)
# Mapping keys / "key: value" lines whose value is a secret by name.
_SECRET_KEY_WORDS = r"(?:secret|passw(?:or)?d|token|credential|api[_-]?key|access[_-]?key|private[_-]?key)"
_SECRET_KEY_RE = re.compile(_SECRET_KEY_WORDS, re.I)
_SECRET_LINE_RE = re.compile(
    r"(?im)^(?P<key>[ \t\-]*[\"']?[\w.\-]*" + _SECRET_KEY_WORDS + r"[\w.\-]*[\"']?[ \t]*[:=][ \t]*)\S.*$"
)


def is_secret_env_name(name: str) -> bool:
    """True if the environment variable ``name`` holds a credential (its value is redacted)."""
    return name.upper() in _SECRET_ENV_NAMES or bool(_SECRET_ENV_NAME_RE.search(name))


def _secret_values() -> tuple[list[str], set[str]]:
    """(substring secrets longest first, whole-string secrets) from the current environment."""
    subs: set[str] = set()
    whole: set[str] = set()
    for name, value in os.environ.items():
        if not value or not is_secret_env_name(name):
            continue
        value = value.strip()
        if len(value) < _MIN_SECRET_CHARS or value.lower() in _TRIVIAL_VALUES:
            continue
        whole.add(value)
        if len(value) >= _MIN_SUBSTRING_SECRET_CHARS:
            subs.add(value)
            encoded = quote(value, safe="")
            if encoded != value:
                subs.add(encoded)
    return sorted(subs, key=len, reverse=True), whole


def _redact_str(text: str, secrets: tuple[list[str], set[str]]) -> str:
    subs, whole = secrets
    if text.strip() in whole:
        return REDACTED
    for value in subs:
        if value in text:
            text = text.replace(value, REDACTED)
    text = _USERINFO_RE.sub(r"\g<scheme>" + REDACTED + "@", text)
    text = _QUERY_SECRET_RE.sub(r"\g<key>" + REDACTED, text)
    return _SECRET_LINE_RE.sub(r"\g<key>" + REDACTED, text)


def _redact_obj(obj: Any, secrets: tuple[list[str], set[str]]) -> Any:
    if isinstance(obj, str):
        return _redact_str(obj, secrets)
    if isinstance(obj, PurePath):
        return _redact_str(str(obj), secrets)
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            new_key = _redact_str(key, secrets) if isinstance(key, str) else key
            if (
                isinstance(key, str)
                and _SECRET_KEY_RE.search(key)
                and not isinstance(value, (Mapping, list, tuple))
                and value is not None
            ):
                out[new_key] = REDACTED
            else:
                out[new_key] = _redact_obj(value, secrets)
        return out
    if isinstance(obj, tuple):
        return tuple(_redact_obj(v, secrets) for v in obj)
    if isinstance(obj, (list, set, frozenset)):
        return [_redact_obj(v, secrets) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _redact_obj(dataclasses.asdict(obj), secrets)
    return obj


def redact(obj: Any) -> Any:
    """Return ``obj`` with credentials replaced by ``"***"``.

    Strings (also inside dicts, lists, tuples, paths, dataclasses) lose: any occurrence of the value of
    a secret environment variable (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
    ``AWS_ACCESS_KEY_ID``, ``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, ``*_TOKEN``,
    ``*SECRET*``, ``*_PASSWORD``, ...), URL userinfo (``s3://key:secret@bucket`` ->
    ``s3://***@bucket``), secret-looking query parameters (``?X-Amz-Signature=...``) and the values of
    mapping keys / ``key: value`` lines named like a secret (``password``, ``token``, ``access_key``).
    Dataclasses and sets come back as dicts and lists; other objects are returned unchanged.
    """
    return _redact_obj(obj, _secret_values())


# ----------------------------------------------------------------------------------------------------
# Params, keys and values
# ----------------------------------------------------------------------------------------------------

_KEY_BAD_CHARS_RE = re.compile(r"[^\w.\- ]")


def _safe_key(key: str) -> str:
    """An MLflow-valid param/metric/tag key: [A-Za-z0-9_.- ], not '.'/'..', at most 250 chars."""
    key = _KEY_BAD_CHARS_RE.sub("_", str(key)).strip() or "_"
    if key in (".", ".."):
        key = "_"
    if len(key) > MAX_KEY_CHARS:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = f"{key[: MAX_KEY_CHARS - 9]}_{digest}"
    return key


def _truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` chars, with a marker saying how long it was."""
    if len(text) <= limit:
        return text
    marker = f"...[truncated, {len(text)} chars]"
    return text[: limit - len(marker)] + marker


def _json_default(obj: Any) -> Any:
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, bytes):
        return f"<{len(obj)} bytes>"
    return str(obj)


def _value_str(value: Any) -> str:
    """Param/tag text of one value: strings as is, scalars and lists as JSON."""
    if isinstance(value, str):
        return value
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return json.dumps(value, default=_json_default, allow_nan=True)
    except (TypeError, ValueError):
        return str(value)


def flatten_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into ``{"a.b.c": "value"}``; lists become JSON strings.

    Values are redacted and truncated to MLflow's param limit (6000 chars); keys are made MLflow-safe.
    """
    secrets = _secret_values()
    out: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
            return
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            walk(dataclasses.asdict(node), path)
            return
        key = _safe_key(path or "value")
        if (
            _SECRET_KEY_RE.search(path.rsplit(".", 1)[-1])
            and node is not None
            and not isinstance(node, (list, tuple, Mapping))
        ):
            out[key] = REDACTED
            return
        text = _value_str(_redact_obj(node, secrets))
        out[key] = _truncate(_redact_str(text, secrets), MAX_PARAM_VALUE_CHARS)

    walk(obj, prefix)
    return out


def _flatten_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten_metrics(value, path))
            continue
        try:
            out[_safe_key(path)] = float(value)
        except (TypeError, ValueError):
            log.warning("tracking: metric %r is not a number (%r); not logged", path, type(value).__name__)
    return out


def _json_text(obj: Any) -> str:
    """Redacted, indented JSON text of ``obj``."""
    secrets = _secret_values()
    text = json.dumps(_redact_obj(obj, secrets), indent=2, default=_json_default, allow_nan=True)
    return _redact_str(text, secrets)


# ----------------------------------------------------------------------------------------------------
# URLs and the default store
# ----------------------------------------------------------------------------------------------------


def _local_path(url: str | PurePath) -> Path | None:
    """The local path of ``url`` (plain path or file:// URL), or None for a remote URL."""
    text = str(url)
    parts = urlsplit(text)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme == "" or (len(parts.scheme) == 1 and text[1:2] == ":"):  # also C:\ paths
        return Path(text)
    return None


def normalize_output_url(output_url: str | PurePath) -> str:
    """Absolute resolved path for local outputs, URL without trailing '/' otherwise (not redacted)."""
    local = _local_path(output_url)
    if local is not None:
        return str(local.expanduser().resolve())
    text = str(output_url)
    stripped = text.rstrip("/")
    return stripped if "://" in stripped and not stripped.endswith(":") else text


def resolve_tracking_uri(tracking_uri: str | None, output_url: str | PurePath) -> str:
    """The tracking URI used: explicit > ``MLFLOW_TRACKING_URI`` > SQLite under the output folder
    (local output) > SQLite in the current directory (remote output)."""
    if tracking_uri:
        return tracking_uri
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env_uri:
        return env_uri
    local = _local_path(output_url)
    folder = local.expanduser().resolve() if local is not None else Path.cwd().resolve()
    return f"sqlite:///{folder / DB_FILENAME}"


def _sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for other URIs and in-memory SQLite)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for a new experiment: next to a SQLite file (``mlartifacts/``), else the store's."""
    db = _sqlite_file(tracking_uri)
    return (db.parent / ARTIFACTS_DIRNAME).as_uri() if db is not None else None


# ----------------------------------------------------------------------------------------------------
# Environment description
# ----------------------------------------------------------------------------------------------------

_ENV_TAGS_CACHE: dict[str, str] | None = None


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_info() -> dict[str, str]:
    """Commit (and dirty flag) of the git checkout holding this package, if any."""
    pkg_dir = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", "-C", str(pkg_dir), *args], capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    # Only trust the repository if it actually tracks this package (not e.g. a venv inside a repo).
    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return {}
    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    info = {"drrfarm.git_commit": commit, "mlflow.source.git.commit": commit}
    status = git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        info["drrfarm.git_dirty"] = "true" if status else "false"
    return info


def environment_tags() -> dict[str, str]:
    """Versions and hardware of the driver: drrfarm, git commit, Python, ray, pycuda, CUDA, torch, GPUs.

    Cached per process. GPU names come from ``torch.cuda`` when it sees GPUs (the driver may have none;
    the farm can add the workers' GPUs with :meth:`Tracker.log_tags`).
    """
    global _ENV_TAGS_CACHE
    if _ENV_TAGS_CACHE is not None:
        return dict(_ENV_TAGS_CACHE)
    import drrfarm

    tags: dict[str, str] = {
        "drrfarm.version": str(getattr(drrfarm, "__version__", "unknown")),
        "python.version": platform.python_version(),
        "python.implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }
    tags.update(_git_info())
    for dist in ("ray", "pycuda", "torch", "mlflow", "mlflow-skinny", "numpy"):
        version = _dist_version(dist)
        if version:
            tags[f"{dist}.version"] = version
    with contextlib.suppress(Exception):
        import torch

        if torch.version.cuda:
            tags["cuda.version"] = str(torch.version.cuda)
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            tags["gpu.count"] = str(len(names))
            tags["gpu.names"] = json.dumps(names)
    if "pycuda.version" in tags:
        with contextlib.suppress(Exception):
            import pycuda.driver as cuda_driver

            tags["cuda.driver_version"] = str(cuda_driver.get_driver_version())
            tags["pycuda.cuda_version"] = ".".join(str(v) for v in cuda_driver.get_version())
    tags.setdefault("gpu.names", "[]")
    _ENV_TAGS_CACHE = tags
    return dict(tags)


# ----------------------------------------------------------------------------------------------------
# MLflow HTTP settings, only while the tracker talks to MLflow
# ----------------------------------------------------------------------------------------------------

_ENV_LOCK = threading.RLock()


@contextlib.contextmanager
def _scoped_env(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    with _ENV_LOCK:
        saved = {name: os.environ.get(name) for name in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for name, old in saved.items():
                if old is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old


# ----------------------------------------------------------------------------------------------------
# Trackers
# ----------------------------------------------------------------------------------------------------


class Tracker:
    """What the farm driver logs to. This base class logs nothing; see :class:`MlflowTracker`.

    No method raises. ``run_id`` is None until a run exists (always None when tracking is off).
    """

    enabled: bool = False

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (written into shard metadata), or None."""
        return None

    @property
    def tracking_uri(self) -> str | None:
        """The (redacted) tracking URI, or None."""
        return None

    @property
    def experiment_id(self) -> str | None:
        """The MLflow experiment id, or None."""
        return None

    def log_spec(
        self, spec_dict: Mapping[str, Any], spec_path: str | PurePath | None, counts: Mapping[str, Any]
    ) -> None:
        """Params: the flattened spec and ``counts.<name>``; artifact ``spec/<file name>``."""

    def log_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (redacted, values as text)."""

    def log_inputs(self, volumes: list[Mapping[str, Any]]) -> None:
        """Input CTs (``uri, sha256, shape, spacing_mm``) as dataset inputs and ``input.<i>.*``."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics at ``step`` (nested mappings become dotted keys)."""

    def flush(self) -> bool:
        """Try to send buffered calls now; True if nothing is left buffered."""
        return True

    def finish(
        self,
        manifest_json: Mapping[str, Any] | None = None,
        contact_sheet_png: bytes | None = None,
        summary: Mapping[str, Any] | None = None,
        status: str = "FINISHED",
        *,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        """Log ``manifest.json``, ``contact_sheet.png``, ``summary.json`` and end the run."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Ends a run that :meth:`finish` did not end (FAILED on exception)."""


class NullTracker(Tracker):
    """Tracking turned off: every method does nothing; ``run_id`` is None."""


@dataclasses.dataclass
class _Op:
    """One buffered MLflow call."""

    kind: str  # "params" | "tags" | "inputs" | "metrics" | "artifact" | "terminate"
    payload: Any
    label: str


class _PermanentError(Exception):
    """A call MLflow will never accept (bad request, permission): dropped, not retried."""


_TRANSIENT_ERROR_CODES = frozenset(
    {
        "INTERNAL_ERROR",
        "TEMPORARILY_UNAVAILABLE",
        "REQUEST_LIMIT_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "DEADLINE_EXCEEDED",
        "ABORTED",
        "IO_ERROR",
        "SERVICE_UNDER_MAINTENANCE",
        "WORKSPACE_TEMPORARILY_UNAVAILABLE",
        "UNKNOWN",
        "DATA_LOSS",
    }
)


def _is_transient(exc: BaseException) -> bool:
    """True for outages worth retrying (network, 5xx/429, I/O, locked DB); False for rejected calls."""
    if isinstance(exc, _PermanentError):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    mod = type(exc).__module__
    if mod.startswith(("requests", "urllib3", "sqlalchemy")):
        return True
    error_code = getattr(exc, "error_code", None)
    if error_code is not None:
        status = None
        with contextlib.suppress(Exception):
            status = exc.get_http_status_code()  # type: ignore[attr-defined]
        if (
            status is not None
            and (status >= 500 or status == 429)
            and error_code not in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
        ):
            return True
        return error_code in _TRANSIENT_ERROR_CODES
    return False


class MlflowTracker(Tracker):
    """Logs one sweep to one MLflow run through ``MlflowClient``; buffers and retries on outages.

    Use :func:`open_tracker`. Thread-safe (one lock); every public method returns promptly when the
    store is unreachable (at most one short HTTP attempt per backoff period).
    """

    enabled = True

    def __init__(
        self,
        experiment: str,
        tracking_uri: str,
        output_url: str,
        spec_sha256: str,
        *,
        http_timeout_s: int = 5,
        finish_timeout_s: float = 30.0,
        max_pending: int = 10_000,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 120.0,
    ) -> None:
        self._experiment = experiment or DEFAULT_EXPERIMENT
        self._tracking_uri = tracking_uri
        self._output_url = normalize_output_url(output_url)
        self._output_url_tag = _truncate(redact(self._output_url), MAX_TAG_VALUE_CHARS)
        self._spec_sha256 = str(spec_sha256)
        self._http_env = {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # our buffer is the retry loop
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(http_timeout_s))),
        }
        self._finish_timeout_s = float(finish_timeout_s)
        self._max_pending = max(1, int(max_pending))
        self._initial_backoff_s = float(initial_backoff_s)
        self._max_backoff_s = float(max_backoff_s)
        self._lock = threading.RLock()
        self._pending: collections.deque[_Op] = collections.deque()
        self._client: Any = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._known_params: dict[str, str] | None = None
        self._resumed = False
        self._dead = False  # gave up for good (permanent setup error)
        self._finished = False
        self._warned_after_finish = False
        self._failing = False
        self._backoff_s = self._initial_backoff_s
        self._next_try = 0.0
        self._dropped = 0
        self._last_error = ""

    # -- properties ---------------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def tracking_uri(self) -> str | None:
        return redact(self._tracking_uri)

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def resumed(self) -> bool:
        """True if an existing run (same spec hash and output URL) was reopened."""
        return self._resumed

    @property
    def pending(self) -> int:
        """Number of calls buffered, waiting for the store."""
        return len(self._pending)

    # -- public API (never raises) ------------------------------------------------------------------

    def log_spec(
        self, spec_dict: Mapping[str, Any], spec_path: str | PurePath | None, counts: Mapping[str, Any]
    ) -> None:
        def build() -> list[_Op]:
            params = flatten_params(spec_dict)
            params.update(flatten_params(dict(counts or {}), prefix="counts"))
            ops = [_Op("params", params, "spec params")]
            name, text = "spec.json", None
            if spec_path:
                name = Path(str(spec_path)).name or name
                try:
                    text = Path(str(spec_path)).read_text(encoding="utf-8", errors="replace")
                except OSError as exc:
                    log.warning(
                        "tracking: cannot read spec file %s (%s); logging the parsed spec", redact(str(spec_path)), exc
                    )
                    name = Path(name).stem + ".json"
            text = _json_text(spec_dict) if text is None else redact(text)
            ops.append(_Op("artifact", ("spec", name, text.encode("utf-8")), f"spec/{name}"))
            return ops

        self._call("log_spec", build)

    def log_tags(self, tags: Mapping[str, Any]) -> None:
        self._call("log_tags", lambda: [_Op("tags", self._tag_dict(tags), "tags")])

    def log_inputs(self, volumes: list[Mapping[str, Any]]) -> None:
        def build() -> list[_Op]:
            datasets, params, tags = [], {}, {}
            for i, vol in enumerate(volumes):
                vol = redact(dict(vol))
                spacing = vol.get("spacing_mm", vol.get("spacing"))
                uri = str(vol.get("uri", vol.get("source", "")))
                sha = str(vol.get("sha256", ""))
                shape = list(vol["shape"]) if vol.get("shape") is not None else None
                spacing = list(spacing) if spacing is not None else None
                params.update(
                    flatten_params(
                        {"uri": uri, "sha256": sha, "shape": shape, "spacing_mm": spacing}, prefix=f"input.{i}"
                    )
                )
                tags[f"input.{i}.sha256"] = sha
                name = str(vol.get("volume_id") or vol.get("name") or _uri_name(uri) or f"volume-{i}")
                datasets.append(
                    {
                        "name": _truncate(name, 500),
                        "digest": sha[:32] or hashlib.sha256(uri.encode()).hexdigest()[:32],
                        "source_type": _source_type(uri),
                        "source": json.dumps({"uri": uri}),
                        "profile": json.dumps(
                            {"sha256": sha, "shape": shape, "spacing_mm": spacing, "index": i}, default=_json_default
                        ),
                        "sha256": sha,
                    }
                )
            tags["drrfarm.inputs.count"] = str(len(datasets))
            return [
                _Op("inputs", datasets, "dataset inputs"),
                _Op("params", params, "input params"),
                _Op("tags", self._tag_dict(tags), "input tags"),
            ]

        self._call("log_inputs", build)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        def build() -> list[_Op]:
            values = _flatten_metrics(metrics)
            if not values:
                return []
            ts_ms = int(time.time() * 1000)
            step_i = int(step) if step is not None else 0
            return [_Op("metrics", [(k, v, ts_ms, step_i) for k, v in values.items()], "metrics")]

        self._call("log_metrics", build)

    def flush(self) -> bool:
        try:
            with self._lock:
                return self._flush(force=True)
        except Exception as exc:  # never raise
            self._warn("flush failed unexpectedly: %s", exc)
            return False

    def finish(
        self,
        manifest_json: Mapping[str, Any] | None = None,
        contact_sheet_png: bytes | None = None,
        summary: Mapping[str, Any] | None = None,
        status: str = "FINISHED",
        *,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        if manifest_json is None:
            manifest_json = manifest
        try:
            with self._lock:
                if self._finished or self._dead:
                    return
                ops: list[_Op] = []
                status_u = str(status).upper()
                if status_u not in _RUN_STATUSES:
                    self._warn("unknown run status %r; using FAILED", status)
                    status_u = "FAILED"
                if manifest_json is not None:
                    ops.append(
                        _Op("artifact", (None, "manifest.json", _json_text(manifest_json).encode()), "manifest.json")
                    )
                if contact_sheet_png:
                    png = bytes(contact_sheet_png)
                    if png.startswith(_PNG_SIGNATURE):
                        ops.append(_Op("artifact", (None, "contact_sheet.png", png), "contact_sheet.png"))
                    else:
                        self._warn("contact sheet is not PNG data; not logged")
                if summary is not None:
                    ops.append(_Op("artifact", (None, "summary.json", _json_text(summary).encode()), "summary.json"))
                ops.append(_Op("tags", {"drrfarm.status": status_u}, "status tag"))
                ops.append(_Op("terminate", status_u, f"end run ({status_u})"))
                for op in ops:
                    self._enqueue(op)
                self._finished = True
                self._drain(self._finish_timeout_s)
        except Exception as exc:  # never raise
            self._warn("finish failed unexpectedly: %s", exc)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._finished:
            self.finish(status="FAILED" if exc_type is not None else "FINISHED")

    # -- internals ----------------------------------------------------------------------------------

    def _tag_dict(self, tags: Mapping[str, Any]) -> dict[str, str]:
        secrets = _secret_values()
        out = {}
        for key, value in dict(tags or {}).items():
            text = REDACTED if _SECRET_KEY_RE.search(str(key)) else _value_str(_redact_obj(value, secrets))
            out[_safe_key(_redact_str(str(key), secrets))] = _truncate(_redact_str(text, secrets), MAX_TAG_VALUE_CHARS)
        return out

    def _warn(self, msg: str, *args: Any) -> None:
        log.warning("tracking: " + msg, *[redact(str(a)) for a in args])

    def _call(self, name: str, build: Callable[[], list[_Op]]) -> None:
        """Build the ops of one public call, buffer them, flush if due. Never raises."""
        try:
            with self._lock:
                if self._dead:
                    return
                if self._finished:
                    if not self._warned_after_finish:
                        self._warn("%s after finish() is ignored (and so are later calls)", name)
                        self._warned_after_finish = True
                    return
                for op in build():
                    self._enqueue(op)
                self._flush(force=False)
        except Exception as exc:
            self._warn("%s failed unexpectedly (%s: %s); continuing without it", name, type(exc).__name__, exc)

    def _enqueue(self, op: _Op) -> None:
        if len(self._pending) >= self._max_pending:
            # Drop the oldest metrics first; spec/inputs/artifacts matter more than a progress point.
            idx = next((i for i, o in enumerate(self._pending) if o.kind == "metrics"), 0)
            dropped = self._pending[idx]
            del self._pending[idx]
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                self._warn(
                    "buffer full (%s calls); dropped %s buffered call(s) so far (latest: %s)",
                    self._max_pending,
                    self._dropped,
                    dropped.label,
                )
        self._pending.append(op)

    def _get_client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self._tracking_uri)
        return self._client

    def _flush(self, force: bool) -> bool:
        """Send buffered calls in order; stop at the first outage and back off. True if all sent."""
        if self._dead:
            return True
        if not self._pending and self._run_id is not None:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        sent = 0
        with _scoped_env(self._http_env):
            try:
                if self._run_id is None:
                    self._ensure_run()
                while self._pending:
                    batch = self._take_batch()
                    try:
                        self._execute(batch)
                    except Exception as exc:
                        if _is_transient(exc):
                            raise
                        self._warn("MLflow rejected %s (%s); dropped", batch[0].label, exc)
                    for _ in batch:
                        self._pending.popleft()
                    sent += len(batch)
            except Exception as exc:
                if self._run_id is None and not _is_transient(exc):
                    self._give_up(f"cannot set up the MLflow run ({type(exc).__name__}: {exc})")
                    return True
                self._on_failure(exc)
                return False
        if self._failing:
            log.warning("tracking: MLflow at %s is reachable again; sent %d buffered call(s)", self.tracking_uri, sent)
        self._failing = False
        self._backoff_s = self._initial_backoff_s
        self._next_try = 0.0
        return True

    def _on_failure(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        if not self._failing:
            self._warn(
                "MLflow at %s unreachable (%s); buffering %s call(s), retrying with backoff",
                self.tracking_uri,
                _short(self._last_error),
                len(self._pending),
            )
        self._failing = True
        self._next_try = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2.0, self._max_backoff_s)

    def _give_up(self, why: str) -> None:
        self._last_error = why
        self._warn(
            "giving up on tracking for this sweep: %s; %s call(s) not logged; the sweep continues",
            _short(why),
            len(self._pending),
        )
        self._pending.clear()
        self._dead = True

    def _drain(self, timeout_s: float) -> None:
        """Flush until nothing is buffered or ``timeout_s`` has passed (then drop and warn)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            if self._flush(force=True):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._warn(
                    "MLflow still unreachable after %ss (%s); %s call(s) not logged%s",
                    round(timeout_s, 1),
                    _short(self._last_error),
                    len(self._pending),
                    "" if self._run_id else " and no run was created",
                )
                self._pending.clear()
                return
            time.sleep(min(self._backoff_s, remaining))

    def _take_batch(self) -> list[_Op]:
        """The next op, or a run of consecutive metrics ops (up to 1000 values) sent as one batch."""
        first = self._pending[0]
        if first.kind != "metrics":
            return [first]
        batch, count = [], 0
        for op in self._pending:
            if op.kind != "metrics" or (batch and count + len(op.payload) > _MAX_METRICS_PER_BATCH):
                break
            batch.append(op)
            count += len(op.payload)
        return batch

    # -- MLflow calls -------------------------------------------------------------------------------

    def _ensure_experiment(self, client: Any) -> str:
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(self._experiment)
        if exp is None:
            try:
                return str(
                    client.create_experiment(self._experiment, artifact_location=_artifact_location(self._tracking_uri))
                )
            except MlflowException as exc:  # created meanwhile by someone else
                if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = client.get_experiment_by_name(self._experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            self._warn("experiment %r was deleted; restoring it", self._experiment)
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)

    def _find_run(self, client: Any, experiment_id: str) -> Any:
        sha = self._spec_sha256
        safe = re.fullmatch(r"[\w.:\-]+", sha) is not None
        filter_string = f"tags.`{SPEC_SHA_TAG}` = '{sha}'" if safe else ""
        runs = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, order_by=["attributes.start_time DESC"]
        )
        matches = [
            r
            for r in runs
            if r.data.tags.get(SPEC_SHA_TAG) == sha and r.data.tags.get(OUTPUT_URL_TAG) == self._output_url_tag
        ]
        if len(matches) > 1:
            self._warn(
                "%s runs match spec %s and output %s; resuming the newest (%s)",
                len(matches),
                sha[:12],
                self._output_url_tag,
                matches[0].info.run_id,
            )
        return matches[0] if matches else None

    def _ensure_run(self) -> None:
        """Find (resume) or create the run of this spec + output; log the dataset location."""
        db = _sqlite_file(self._tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        client = self._get_client()
        experiment_id = self._ensure_experiment(client)
        run = self._find_run(client, experiment_id)
        if run is not None:
            run_id = run.info.run_id
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            resumes = int(run.data.tags.get("drrfarm.resume_count", "0") or 0) + 1
            client.set_tag(run_id, "drrfarm.resume_count", str(resumes))
            self._resumed = True
            self._known_params = dict(run.data.params)
        else:
            tags = {SPEC_SHA_TAG: self._spec_sha256, OUTPUT_URL_TAG: self._output_url_tag}
            with contextlib.suppress(Exception):
                tags["mlflow.user"] = getpass.getuser()
            name = _safe_key(f"{_uri_name(self._output_url) or 'sweep'}-{self._spec_sha256[:8]}")
            run = client.create_run(experiment_id, tags=tags, run_name=name)
            run_id = run.info.run_id
            self._known_params = {}
        location = {
            "output_url": self._output_url_tag,
            "spec_sha256": self._spec_sha256,
            "mlflow_run_id": run_id,
            "mlflow_experiment": self._experiment,
            "mlflow_experiment_id": experiment_id,
            "tracking_uri": self.tracking_uri,
        }
        self._experiment_id = experiment_id
        self._run_id = run_id
        # First in line, sent by the caller's flush (a failure there no longer re-resolves the run).
        self._pending.appendleft(
            _Op("artifact", (None, "dataset_location.json", _json_text(location).encode()), "dataset_location.json")
        )
        log.info(
            "tracking: %s MLflow run %s in experiment %r at %s",
            "resumed" if self._resumed else "created",
            run_id,
            self._experiment,
            self.tracking_uri,
        )

    def _execute(self, batch: list[_Op]) -> None:
        client, run_id = self._get_client(), self._run_id
        kind = batch[0].kind
        if kind == "metrics":
            from mlflow.entities import Metric

            metrics = [Metric(k, v, ts, step) for op in batch for (k, v, ts, step) in op.payload]
            client.log_batch(run_id, metrics=metrics, synchronous=True)
        elif kind == "params":
            self._log_params(client, run_id, batch[0].payload)
        elif kind == "tags":
            from mlflow.entities import RunTag

            items = [RunTag(k, v) for k, v in batch[0].payload.items()]
            for i in range(0, len(items), _MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, tags=items[i : i + _MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)
        elif kind == "inputs":
            self._log_datasets(client, run_id, batch[0].payload)
        elif kind == "artifact":
            folder, name, data = batch[0].payload
            self._log_bytes(client, run_id, folder, name, data)
        elif kind == "terminate":
            client.set_terminated(run_id, status=batch[0].payload)
        else:  # pragma: no cover - programming error
            raise _PermanentError(f"unknown op {kind!r}")

    def _log_params(self, client: Any, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        if self._known_params is None:
            self._known_params = dict(client.get_run(run_id).data.params)
        known = self._known_params
        conflicts = [k for k, v in params.items() if k in known and known[k] != v]
        if conflicts:
            self._warn(
                "params already logged with other values are kept (MLflow params are immutable): %s",
                ", ".join(conflicts[:10]) + (" ..." if len(conflicts) > 10 else ""),
            )
        new = [Param(k, v) for k, v in params.items() if k not in known]
        for i in range(0, len(new), _MAX_PARAMS_TAGS_PER_BATCH):
            chunk = new[i : i + _MAX_PARAMS_TAGS_PER_BATCH]
            client.log_batch(run_id, params=chunk, synchronous=True)
            known.update({p.key: p.value for p in chunk})

    def _log_datasets(self, client: Any, run_id: str, datasets: list[dict[str, Any]]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for d in datasets:
            entity = Dataset(
                name=d["name"],
                digest=d["digest"][:_MAX_DATASET_DIGEST_CHARS],
                source_type=d["source_type"],
                source=d["source"],
                schema=None,
                profile=d["profile"],
            )
            tags = [
                InputTag("mlflow.data.context", "ct_volume"),
                InputTag("drrfarm.sha256", d["sha256"][:_MAX_INPUT_TAG_VALUE_CHARS]),
            ]
            inputs.append(DatasetInput(dataset=entity, tags=tags))
        if inputs:
            client.log_inputs(run_id, datasets=inputs)

    @staticmethod
    def _log_bytes(client: Any, run_id: str, folder: str | None, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="drrfarm-mlflow-") as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            client.log_artifact(run_id, str(path), artifact_path=folder)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _uri_name(uri: str) -> str:
    """Last path component of a path or URL ('' if none)."""
    path = urlsplit(uri).path if "://" in uri else uri
    return PurePath(path.rstrip("/")).name if path else ""


def _source_type(uri: str) -> str:
    scheme = urlsplit(uri).scheme if "://" in uri else ""
    if scheme in ("", "file"):
        return "local"
    return {"https": "http", "s3a": "s3", "s3n": "s3", "gcs": "gs"}.get(scheme, scheme)


def open_tracker(
    enabled: bool,
    experiment: str | None,
    tracking_uri: str | None,
    output_url: str | PurePath,
    spec_sha256: str,
    *,
    http_timeout_s: int = 5,
    finish_timeout_s: float = 30.0,
    max_pending: int = 10_000,
) -> Tracker:
    """Open the tracker of one sweep: the MLflow run of (``spec_sha256``, ``output_url``), resumed if any.

    Args:
        enabled: False -> :class:`NullTracker` (nothing logged, no file created).
        experiment: MLflow experiment name (default ``"drrfarm"``), created if missing.
        tracking_uri: MLflow tracking URI; None -> ``MLFLOW_TRACKING_URI`` or the default SQLite store
            (see :func:`resolve_tracking_uri`).
        output_url: where the dataset is written (local path or URL); logged redacted.
        spec_sha256: hash of the sweep spec; with the output URL it identifies the run.
        http_timeout_s: MLflow HTTP timeout while the tracker talks (no HTTP-level retries).
        finish_timeout_s: how long :meth:`Tracker.finish` keeps retrying buffered calls.
        max_pending: most calls buffered during an outage (oldest metrics dropped first).

    Raises:
        TrackingError: only for configuration errors found now (mlflow missing, unsupported tracking
            URI, credentials rejected) -- never for an unreachable store, which is retried later.
    """
    if not enabled:
        return NullTracker()
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise TrackingError(
            "tracking is on but mlflow is not installed (pip install mlflow-skinny); "
            "install it or run with --no-tracking"
        ) from exc
    uri = resolve_tracking_uri(tracking_uri, output_url)
    tracker = MlflowTracker(
        experiment or DEFAULT_EXPERIMENT,
        uri,
        str(output_url),
        spec_sha256,
        http_timeout_s=http_timeout_s,
        finish_timeout_s=finish_timeout_s,
        max_pending=max_pending,
    )
    try:
        with tracker._lock, _scoped_env(tracker._http_env):
            tracker._get_client()
    except Exception as exc:
        if _is_transient(exc):  # e.g. the SQLite folder is not writable yet: retried on later calls
            log.warning(
                "tracking: MLflow store %s not usable yet (%s); will retry", redact(uri), _short(str(redact(str(exc))))
            )
        else:
            raise TrackingError(
                f"MLflow tracking URI {redact(uri)!r} cannot be used: {_short(str(redact(str(exc))))}; "
                "fix it or run with --no-tracking"
            ) from exc
    try:
        env_tags = environment_tags()
    except Exception as exc:  # describing the environment must not stop a sweep
        log.warning("tracking: cannot describe the environment (%s)", exc)
        env_tags = {}
    tracker.log_tags(env_tags)
    if tracker._dead:
        raise TrackingError(
            f"MLflow at {redact(uri)!r} refused to set up the run ({_short(redact(tracker._last_error))}); "
            "fix the configuration or run with --no-tracking"
        )
    return tracker


__all__ = [
    "DEFAULT_EXPERIMENT",
    "OUTPUT_URL_TAG",
    "SPEC_SHA_TAG",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "environment_tags",
    "flatten_params",
    "is_secret_env_name",
    "normalize_output_url",
    "open_tracker",
    "redact",
    "resolve_tracking_uri",
]
