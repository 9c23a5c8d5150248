"""The MLflow store of a sweep: which tracking URI (explicit, ``MLFLOW_TRACKING_URI``, or a local
SQLite file), where a SQLite store keeps its artifacts, and output URLs normalised for run lookup.

Default store (when neither ``tracking_uri`` nor ``MLFLOW_TRACKING_URI`` is given):

- local output folder ``<out>``: SQLite ``sqlite:///<out>/mlruns.db``, artifacts in ``<out>/mlartifacts``;
- remote output (``s3://...``): ``sqlite:///<cwd>/mlruns.db``, artifacts in ``<cwd>/mlartifacts``.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from urllib.parse import unquote, urlsplit

DB_FILENAME = "mlruns.db"
ARTIFACTS_DIRNAME = "mlartifacts"


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


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for other URIs and in-memory SQLite)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for a new experiment: next to a SQLite file (``mlartifacts/``), else the store's."""
    db = sqlite_file(tracking_uri)
    return (db.parent / ARTIFACTS_DIRNAME).as_uri() if db is not None else None
