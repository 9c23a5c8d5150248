"""Provenance with MLflow: one sweep (= one dataset) is one MLflow run.

The farm driver opens a tracker with :func:`open_tracker` and logs the flattened spec, the input CTs,
progress metrics and, at the end, the manifest, a contact sheet and a summary. Workers never touch
MLflow; ``mlflow`` is imported lazily, only by the driver, only when tracking is enabled.

Run identity: a run is found again (resume) by its tags ``drrfarm.spec_sha256`` and
``drrfarm.output_url`` (the normalised, redacted output URL) inside the experiment. The store is
chosen by :func:`drrfarm.tracking.store.resolve_tracking_uri`.

Outages: no :class:`Tracker` method ever raises. A failing call is logged as a warning and buffered
(bounded); buffered calls are retried, oldest first, on later calls (with exponential backoff between
attempts) and at :meth:`Tracker.finish`, which waits at most ``finish_timeout_s`` before giving up.
While the tracker talks to MLflow, HTTP retries and timeouts are made short through the environment
(``MLFLOW_HTTP_REQUEST_*``) so a dead server costs seconds, not minutes.

Secrets: everything logged (params, tags, dataset inputs, artifact text) goes through
:func:`drrfarm.tracking.redaction.redact`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import getpass
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import urlsplit

from drrfarm.errors import TrackingError
from drrfarm.tracking.environment import environment_tags
from drrfarm.tracking.params import (
    MAX_TAG_VALUE_CHARS,
    flatten_metrics,
    flatten_params,
    json_default,
    json_text,
    safe_key,
    truncate,
    value_str,
)
from drrfarm.tracking.redaction import REDACTED, SECRET_KEY_RE, redact, redact_obj, redact_str, secret_values
from drrfarm.tracking.store import artifact_location, normalize_output_url, resolve_tracking_uri, sqlite_file

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "drrfarm"
SPEC_SHA_TAG = "drrfarm.spec_sha256"
OUTPUT_URL_TAG = "drrfarm.output_url"

#: MLflow limits (mlflow.utils.validation): entities per log_batch call, dataset digest and input tag lengths.
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_DATASET_DIGEST_CHARS = 36
_MAX_INPUT_TAG_VALUE_CHARS = 500

_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

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
        self._output_url_tag = truncate(redact(self._output_url), MAX_TAG_VALUE_CHARS)
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
            text = json_text(spec_dict) if text is None else redact(text)
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
                        "name": truncate(name, 500),
                        "digest": sha[:32] or hashlib.sha256(uri.encode()).hexdigest()[:32],
                        "source_type": _source_type(uri),
                        "source": json.dumps({"uri": uri}),
                        "profile": json.dumps(
                            {"sha256": sha, "shape": shape, "spacing_mm": spacing, "index": i}, default=json_default
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
            values = flatten_metrics(metrics)
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
                        _Op("artifact", (None, "manifest.json", json_text(manifest_json).encode()), "manifest.json")
                    )
                if contact_sheet_png:
                    png = bytes(contact_sheet_png)
                    if png.startswith(_PNG_SIGNATURE):
                        ops.append(_Op("artifact", (None, "contact_sheet.png", png), "contact_sheet.png"))
                    else:
                        self._warn("contact sheet is not PNG data; not logged")
                if summary is not None:
                    ops.append(_Op("artifact", (None, "summary.json", json_text(summary).encode()), "summary.json"))
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
        secrets = secret_values()
        out = {}
        for key, value in dict(tags or {}).items():
            text = REDACTED if SECRET_KEY_RE.search(str(key)) else value_str(redact_obj(value, secrets))
            out[safe_key(redact_str(str(key), secrets))] = truncate(redact_str(text, secrets), MAX_TAG_VALUE_CHARS)
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
                    client.create_experiment(self._experiment, artifact_location=artifact_location(self._tracking_uri))
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
        db = sqlite_file(self._tracking_uri)
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
            name = safe_key(f"{_uri_name(self._output_url) or 'sweep'}-{self._spec_sha256[:8]}")
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
            _Op("artifact", (None, "dataset_location.json", json_text(location).encode()), "dataset_location.json")
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
    "open_tracker",
]
