"""The sweep driver: plan, preflight, resume, schedule shards on render actors, finalise.

:func:`run_sweep` is what ``drrfarm sweep``, ``drrfarm demo`` and ``jobs/sweep.py`` call.

Exactly once
------------
A shard is *committed* when its manifest entry exists at the output URL (the sink writes the
entry last, after the shard's files are in their final keys). The driver trusts only the
manifest: at start it renders just the planned shards the manifest lacks (resume; a finished
sweep is a no-op that starts no Ray at all), and at the end it checks every planned shard is
there. A retried shard has the same id, the same keys and (deterministic seeds) the same bytes,
and committing it again replaces its entry, so a retry can never duplicate an image — even when
the first attempt did commit and only its reply was lost.

Fault tolerance
---------------
Actors are created with ``max_restarts`` (Ray restarts a crashed actor, also on another node
when its node is lost) and ``max_task_retries=0``: the driver itself re-queues the shards of a
failed call (bounded by ``farm.max_shard_retries`` per shard). A shard in flight longer than its
deadline (:func:`shard_deadline_s`: ``farm.shard_timeout_s``, or 10x the p95 of the shards measured so far,
at least ``farm.shard_timeout_floor_s``) means its actor is alive but hung: the actor is killed and
replaced, the shard retried, the summary counts the timeout. After an actor error the driver
probes the actor (a ``ping`` that waits for the restart); if it is dead for good it is replaced
with a fresh one (bounded). Application errors that cannot succeed on retry (bad volume file,
unknown material, impossible geometry) fail their shard at once. In-flight work is bounded to
``farm.inflight_per_actor`` shards per actor (default 2 on CPU actors: one rendering, one being
written; on GPU actors the actor's encoder threads + 2, so the GPU has a shard queued while the others
are encoded and written), so memory stays flat however long the sweep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import drrfarm
from drrfarm.errors import (
    BackendError,
    DrrfarmError,
    GeometryError,
    MaterialError,
    PhysicsError,
    SpecError,
    SpectrumError,
    StorageError,
    VolumeError,
)
from drrfarm.farm import worker
from drrfarm.farm.compile import camera_for, physics_for, spectrum_request
from drrfarm.farm.plan import WARM_POSES, Plan, format_bytes, make_plan
from drrfarm.farm.spec import SweepSpec, load_spec
from drrfarm.inputs import resolve_input, sample_name
from drrfarm.samples.downloads import SAMPLES
from drrfarm.sinks import contact_sheet_png, finalize_manifest, open_store, read_manifest
from drrfarm.spectrum import get_spectrum
from drrfarm.tracking.tracker import open_tracker
from drrfarm.volume import validate_material_names

#: application errors a retry cannot fix: their shard fails at once
PERMANENT_ERRORS = (VolumeError, MaterialError, GeometryError, PhysicsError, SpectrumError, SpecError)
#: environment variables forwarded to render actors through Ray's runtime env (where the object store is,
#: which profile and files to read, caches: no secrets -- the runtime env is visible to anyone who can read
#: the dashboard or the job's config)
FORWARDED_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                 "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE", "DRRFARM_CACHE")
#: credentials: forwarded only with ``forward_credentials`` (``--forward-credentials``); by default actors use
#: their own environment or the node's instance / pod role
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
PREFLIGHT_CAMERAS = 20_000  # poses whose cameras the driver builds before starting (all, up to this)
DEADLINE_MIN_SHARDS = 3  # shards measured before a derived deadline applies (the first load volumes)
DEADLINE_PERCENTILE = 95.0
DEADLINE_FACTOR = 10.0  # a shard may take this many times the measured p95 before its actor counts as hung


def shard_deadline_s(durations: Any, override_s: float | None, floor_s: float) -> float | None:
    """Seconds a shard may stay in flight on one actor before the actor counts as hung: ``override_s``
    when set, else ``DEADLINE_FACTOR`` x the p95 of the shards measured so far (dispatch to result), never
    below ``floor_s``; None until ``DEADLINE_MIN_SHARDS`` shards are measured."""
    if override_s is not None:
        return float(override_s)
    if len(durations) < DEADLINE_MIN_SHARDS:
        return None
    import numpy as np

    return max(float(floor_s), DEADLINE_FACTOR * float(np.percentile(np.asarray(durations), DEADLINE_PERCENTILE)))


@dataclass
class SweepSummary:
    """What a sweep did. ``complete``: every planned shard is in the manifest."""

    sweep_id: str
    spec_sha256: str
    output_url: str
    run_id: str | None = None
    tracking_uri: str | None = None
    images_total: int = 0
    shards_total: int = 0
    shards_skipped: int = 0  # already committed when the sweep started (resume)
    images_skipped: int = 0
    shards_rendered: int = 0
    images_rendered: int = 0
    retries: int = 0
    failures: int = 0
    failed_shards: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    actor_errors: int = 0
    actors_replaced: int = 0
    timeouts: int = 0  # shards past their deadline: their actor was killed and replaced
    actors_added: int = 0  # elastic GPU farms: actors started for GPUs that joined during the sweep
    actors: int = 0
    backend: str = ""
    seconds: float = 0.0
    render_seconds: float = 0.0  # from the first shard dispatched to the last result
    images_per_s: float = 0.0
    scatter_seconds: float = 0.0  # summed over the actors: what the scatter estimate cost
    shard_seconds: dict[str, float] = field(default_factory=dict)  # mean per shard: render, copy, encode, write
    bytes_written: int = 0
    inflight_per_actor: int = 0
    encode_threads: int = 0
    complete: bool = False
    rendered_shards: list[str] = field(default_factory=list)
    per_actor: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: str = "FINISHED"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """The end-of-sweep summary printed to stderr."""
        lines = [
            f"sweep {self.sweep_id}: {'complete' if self.complete else 'INCOMPLETE'} -> {self.output_url}",
            f"  images  {self.images_rendered} rendered, {self.images_skipped} already done, "
            f"{self.images_total} planned",
            f"  shards  {self.shards_rendered} rendered, {self.shards_skipped} already done, "
            f"{self.shards_total} planned",
            f"  retries {self.retries}, failures {self.failures}, actor errors {self.actor_errors}, "
            f"actors replaced {self.actors_replaced}, timeouts {self.timeouts}",
        ]
        if self.images_rendered:
            lines.append(f"  throughput {self.images_per_s:.2f} images/s on {self.actors} {self.backend} actor(s); "
                         f"{_fmt_duration(self.seconds)} total")
        if self.shard_seconds:
            t = self.shard_seconds
            lines.append(f"  per shard render {t.get('render_s', 0):.3f} s, copy {t.get('copy_s', 0):.3f} s, encode "
                         f"{t.get('encode_s', 0):.3f} s, write {t.get('write_s', 0):.3f} s ({self.inflight_per_actor} "
                         f"in flight per actor, {self.encode_threads} encoder threads); "
                         f"{format_bytes(self.bytes_written)} written")
        if self.scatter_seconds > 0:
            lines.append(f"  scatter {self.scatter_seconds:.1f} s of actor time "
                         f"({self.scatter_seconds / max(1, self.images_rendered) * 1e3:.1f} ms per image)")
        for sid in self.failed_shards[:10]:
            lines.append(f"  failed {sid}: {self.errors.get(sid, '?')}")
        if len(self.failed_shards) > 10:
            lines.append(f"  ... and {len(self.failed_shards) - 10} more failed shards")
        if self.run_id:
            lines.append(f"  provenance run {self.run_id}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# preflight


def preflight(plan: Plan, check_local_files: bool = True) -> list[Any]:
    """Fail fast, before any rendering: spectra build, materials exist, physics and cameras are valid,
    local inputs exist (skipped with ``check_local_files=False``, e.g. for a remote ``ray://`` cluster
    whose nodes see other files). Returns the spectra. Raises SpecError naming the spec key."""
    spec = plan.spec
    src = spec.source
    spectra = []
    for item in spec.spectra.items:
        try:
            spectra.append(get_spectrum(spectrum_request(item, spec.spectra.n_bins)))
        except DrrfarmError as exc:
            raise SpecError(f"{src}: {item.key_path}: {exc}") from None
    for i, v in enumerate(spec.volumes):
        where = f"volumes[{i}].materials"
        try:
            validate_material_names(v.materials.material_names(), where)
        except MaterialError as exc:
            raise SpecError(f"{src}: {exc}") from None
        inputs = [("path", v.resolved, v.relpath)]
        if v.materials.method == "labels":
            inputs.append(("materials.label_map", v.materials.label_map_resolved or "", None))
            if v.materials.table_path_resolved:
                inputs.append(("materials.table", v.materials.table_path_resolved, None))
        for key, path, rel in inputs:
            name = sample_name(path)
            if name is not None:
                if name not in SAMPLES:
                    raise SpecError(f"{src}: volumes[{i}].{key}: unknown sample dataset {name!r}")
                continue
            if ("://" in path and not path.startswith("file://")) or not check_local_files:
                continue  # remote: checked by the worker that loads it
            local = resolve_input(path[len("file://"):] if path.startswith("file://") else path, rel)
            if not os.path.exists(local):
                raise SpecError(f"{src}: volumes[{i}].{key}: file not found: {path}")
    for p in spec.detector.photons:
        try:
            physics_for(spec, p)
        except PhysicsError as exc:
            raise SpecError(f"{src}: detector: {exc}") from None
    key = "poses.carm" if spec.poses.carm is not None else "poses.explicit"
    for i in range(min(len(plan.poses), PREFLIGHT_CAMERAS)):
        try:
            camera_for(spec, plan.poses.pose(i))
        except GeometryError as exc:
            raise SpecError(f"{src}: {key}: pose {i}: {exc}") from None
    return spectra


# ------------------------------------------------------------------------------------------------
# progress


def _fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Progress bar on a stream (stderr): images done/total, images/s, ETA, retries/failures.

    On a terminal it redraws one line; otherwise it prints a line every ``interval_s`` seconds.
    """

    def __init__(self, total_images: int, already_done: int, enabled: bool = True, stream: TextIO | None = None,
                 interval_s: float = 10.0) -> None:
        self.total = total_images
        self.base = already_done
        self.done = already_done
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if not self.tty else 0.2
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self._last = 0.0
        self._printed: tuple[int, int, int] | None = None
        self.retries = 0
        self.failures = 0

    def rate(self) -> float:
        if self.t_first is None:
            return 0.0
        dt = time.perf_counter() - self.t_first
        return (self.done - self.base) / dt if dt > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        remaining = self.total - self.done
        eta = remaining / rate if rate > 0 else float("inf")
        frac = self.done / self.total if self.total else 1.0
        width = 24
        filled = int(round(frac * width))
        bar = "#" * filled + "." * (width - filled)
        extra = ""
        if self.retries or self.failures:
            extra = f"  retries {self.retries} failures {self.failures}"
        return (f"[{bar}] {self.done}/{self.total} images  {rate:.2f} img/s  "
                f"ETA {_fmt_duration(eta) if remaining else '0s'}{extra}")

    def update(self, images_done: int, retries: int = 0, failures: int = 0, force: bool = False) -> None:
        if images_done > self.done and self.t_first is None:
            self.t_first = self.t0
        self.done, self.retries, self.failures = images_done, retries, failures
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        state = (self.done, self.retries, self.failures)
        if force and state == self._printed:
            return
        self._printed = state
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def close(self) -> None:
        if self.enabled:
            self.update(self.done, self.retries, self.failures, force=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()


# ------------------------------------------------------------------------------------------------
# Ray connection


def connect_ray(address: str | None, runtime_env: dict[str, Any] | None = None) -> bool:
    """Connect to Ray; returns True when this call started a local instance (to shut down later).

    ``None``: reuse an initialised Ray, else start a local one bound to 127.0.0.1 without the
    dashboard (``RAY_ADDRESS`` set in the environment counts as an address). ``"auto"``: the
    running cluster on this machine. ``"ray://host:port"``: Ray Client.
    """
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # bind a local instance to the loopback interface (read when Ray is first imported; on Linux Ray
        # otherwise resolves 127.0.0.1 to the host's address)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
        return True
    ray.init(address=address, **kwargs)
    return False


def cpus_per_gpu_of_cluster() -> float:
    """CPUs per GPU of the cluster's GPU nodes (the smallest ratio, whole CPUs, at least 1)."""
    import ray

    ratios = [float(n["Resources"].get("CPU", 0.0)) / float(n["Resources"]["GPU"]) for n in ray.nodes()
              if n.get("Alive") and float(n.get("Resources", {}).get("GPU", 0.0)) > 0]
    return float(max(1, math.floor(min(ratios)))) if ratios else 1.0


def _cluster_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


# ------------------------------------------------------------------------------------------------
# the scheduler


class _Slot:
    """Driver-side state of one render actor."""

    def __init__(self, index: int, handle: Any) -> None:
        self.index = index
        self.handle = handle
        self.inflight: dict[Any, int] = {}  # ObjectRef -> shard index
        self.sent: dict[Any, float] = {}  # ObjectRef -> when it was dispatched (time.monotonic)
        self.volumes: set[int] = set()  # volumes it holds (reported) or is loading (assigned)
        self.state = "ok"  # ok | probing
        self.probe: Any = None
        self.errors = 0
        self.images = 0
        self.shards = 0
        self.busy_s = 0.0  # from its first shard dispatched to its last result
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.info: dict[str, Any] = {}
        self.generation = 0
        self.bytes_resident: int | None = None


class _Farm:
    def __init__(self, plan: Plan, todo: list[int], run_id: str | None, num_actors: int, use_gpu: bool,
                 backend: str, progress: Progress, tracker: Any, callback: Callable[[str, dict[str, Any]], None] | None,
                 runtime_env: dict[str, Any] | None, stall_timeout_s: float, elastic: bool = False) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.farm = plan.spec.farm
        self.run_id = run_id
        self.num_actors = num_actors
        self.use_gpu = use_gpu
        self.backend = backend
        self.progress = progress
        self.tracker = tracker
        self.callback = callback
        self.runtime_env = runtime_env
        self.stall_timeout_s = stall_timeout_s
        self.elastic = elastic  # add an actor for each GPU that joins (up to farm.max_actors)
        self.max_actors = self.farm.max_actors or len(todo)
        self.actors_added = 0
        self._last_grow = 0.0
        self._requested_gpus = 0
        self.queues: OrderedDict[int, deque[int]] = OrderedDict()
        for i in todo:
            self.queues.setdefault(plan.shards[i].volume_index, deque()).append(i)
        self.remaining = set(todo)
        self.attempts: dict[int, int] = {}
        self.done: list[str] = []
        self.failed: dict[str, str] = {}
        self.retries = 0
        self.actor_errors = 0
        self.actors_replaced = 0
        self.timeouts = 0
        self.durations: deque[float] = deque(maxlen=500)  # dispatch -> result of the latest shards, seconds
        self.replace_budget = max(2, 2 * num_actors)
        self.images_done = plan.n_images - sum(plan.shards[i].n_images for i in todo)
        self.images_rendered = 0
        self.volume_infos: dict[int, dict[str, Any]] = {}
        self.slots: list[_Slot] = []
        self.cpus_per_gpu = (self.farm.cpus_per_gpu or cpus_per_gpu_of_cluster()) if use_gpu else None
        self.encode_threads = max(1, int(self.cpus_per_gpu if use_gpu else self.farm.cpus_per_actor))
        img = plan.spec.image
        self.inflight = self.farm.inflight(use_gpu, self.encode_threads,
                                           plan.spec.output.shard_size * img.height * img.width)
        self.shard_seconds: dict[str, float] = {}  # summed over shards: render, copy, encode, write
        self.bytes_written = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self._last_metrics = 0.0
        self.scatter_s = 0.0

    # -- actors ------------------------------------------------------------------------------------
    def _new_actor(self) -> Any:
        cpus = self.cpus_per_gpu if self.use_gpu else self.farm.cpus_per_actor
        opts = worker.actor_options(self.use_gpu, cpus, self.farm.max_actor_restarts, self.inflight + 1,
                                    self.runtime_env)
        backend_options: dict[str, Any] = {}
        if self.backend == "cpu":
            backend_options["threads"] = max(1, int(self.farm.cpus_per_actor))
        return worker.render_actor_class().options(**opts).remote(
            self.spec, self.run_id, self.backend, self.inflight, 2, backend_options, True, self.encode_threads,
            switch_interval_s=self.farm.switch_interval_s(self.use_gpu))

    def _first_volumes(self) -> list[int]:
        """The volume each new actor loads before the clock starts: round robin over the volumes with work."""
        vols = [v for v, q in self.queues.items() if q]
        return [vols[i % len(vols)] for i in range(len(self.slots))] if vols else [None] * len(self.slots)

    def start_actors(self, startup_timeout_s: float = 600.0, straggler_s: float = 60.0) -> None:
        """Create the actors and wait until they are up: all of them, or at least one plus ``straggler_s``
        (an actor that cannot be placed yet joins later: its first shard simply waits for it)."""
        import ray

        self.slots = [_Slot(i, self._new_actor()) for i in range(self.num_actors)]
        if not self.slots and self.elastic:
            return  # GPUs join later: grow() adds their actors
        pings = {}
        poses = self.plan.sample_poses(WARM_POSES) if self.use_gpu else []
        for s, v in zip(self.slots, self._first_volumes(), strict=True):
            pings[s.handle.start.remote([] if v is None else [v], poses)] = s
            if v is not None:
                s.volumes.add(v)
        deadline = time.monotonic() + startup_timeout_s
        pending = list(pings)
        ok = 0
        while pending and time.monotonic() < deadline:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            for ref in ready:
                try:
                    pings[ref].info = ray.get(ref)
                    if ok == 0:
                        deadline = min(deadline, time.monotonic() + straggler_s)
                    ok += 1
                except ray.exceptions.RayError as exc:
                    raise BackendError(f"render actor {pings[ref].index} failed to start: {_short(exc)}") from None
        if not ok:
            raise BackendError(
                f"no render actor started within {startup_timeout_s:.0f} s (requested {self.num_actors} actor(s) "
                f"with {'1 GPU' if self.use_gpu else f'{self.farm.cpus_per_actor:g} CPU'} each; "
                f"cluster has {_cluster_resources()})")

    def shutdown_actors(self) -> None:
        import ray

        if self._requested_gpus:
            self.request_gpus(0)  # let the autoscaler scale the GPU workers back down

        for s in self.slots:
            with contextlib.suppress(Exception):
                ray.kill(s.handle, no_restart=True)

    # -- assignment --------------------------------------------------------------------------------
    def _pick(self, slot: _Slot) -> int | None:
        queues = {v: q for v, q in self.queues.items() if q}
        if not queues:
            return None
        for v in slot.volumes:  # a volume it already holds
            if v in queues:
                return queues[v].popleft()
        held: dict[int, int] = {}
        for other in self.slots:
            if other is not slot:
                for v in other.volumes:
                    held[v] = held.get(v, 0) + 1
        # a volume nobody holds (largest queue first), else the one with most work per holder
        v = max(queues, key=lambda k: (held.get(k, 0) == 0, len(queues[k]) / (1 + held.get(k, 0))))
        if len(slot.volumes) >= 2:
            slot.volumes.pop()  # the actor keeps two volumes (LRU); forget one
        slot.volumes.add(v)
        return queues[v].popleft()

    def assign(self) -> None:
        for slot in self.slots:
            if slot.state != "ok":
                continue
            while len(slot.inflight) < self.inflight:
                i = self._pick(slot)
                if i is None:
                    return
                attempt = self.attempts.get(i, 0)
                ref = slot.handle.render_shard.remote(self.plan.task(i, attempt=attempt))
                slot.inflight[ref] = i
                slot.sent[ref] = time.monotonic()
                if slot.t_first is None:
                    slot.t_first = time.perf_counter()
                if self.t_first is None:
                    self.t_first = time.perf_counter()
                    self.progress.t_first = time.perf_counter()

    def _requeue(self, i: int, reason: str, permanent: bool = False) -> None:
        sid = self.plan.shards[i].shard_id
        self.attempts[i] = self.attempts.get(i, 0) + 1
        if permanent or self.attempts[i] > self.farm.max_shard_retries:
            self.failed[sid] = reason
            self.remaining.discard(i)
            self._emit("shard_failed", {"shard_id": sid, "error": reason, "attempts": self.attempts[i]})
            return
        self.retries += 1
        self.queues.setdefault(self.plan.shards[i].volume_index, deque()).appendleft(i)
        self._emit("shard_retry", {"shard_id": sid, "error": reason, "attempt": self.attempts[i]})

    def requeue_missing(self, indices: list[int]) -> None:
        """Render again shards reported done but absent from the manifest (e.g. a lost actor's late
        rewrite uncommitted them); they count as retries."""
        for i in indices:
            sid = self.plan.shards[i].shard_id
            if sid in self.done:
                self.done.remove(sid)
                self.images_done -= self.plan.shards[i].n_images
                self.images_rendered -= self.plan.shards[i].n_images
            self.remaining.add(i)
            self.retries += 1
            self.queues.setdefault(self.plan.shards[i].volume_index, deque()).append(i)
            self._emit("shard_retry", {"shard_id": sid, "error": "not in the manifest after the sweep"})

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback(event, data)

    # -- results -----------------------------------------------------------------------------------
    def _on_result(self, slot: _Slot, ref: Any) -> None:
        import ray

        i = slot.inflight.pop(ref)
        sent = slot.sent.pop(ref, None)
        shard = self.plan.shards[i]
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.actor_errors += 1
            slot.errors += 1
            self._requeue(i, f"actor lost: {_short(exc)}")
            self._start_probe(slot, exc)
            return
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            permanent = isinstance(cause, PERMANENT_ERRORS)
            self._requeue(i, _short(cause if cause is not None else exc), permanent=permanent)
            return
        except ray.exceptions.RayError as exc:  # object lost, worker crashed, ...
            self.actor_errors += 1
            self._requeue(i, f"ray error: {_short(exc)}")
            self._start_probe(slot, exc)
            return
        if sent is not None:
            self.durations.append(time.monotonic() - sent)
        if i not in self.remaining:  # e.g. failed meanwhile; a commit still counts
            self.failed.pop(shard.shard_id, None)
        self.remaining.discard(i)
        self.done.append(shard.shard_id)
        n = int(stats.get("images", shard.n_images))
        self.images_done += n
        self.images_rendered += n
        slot.images += n
        slot.shards += 1
        slot.t_last = time.perf_counter()
        slot.busy_s = slot.t_last - (slot.t_first or slot.t_last)
        self.scatter_s += float(stats.get("scatter_s", 0.0))
        for key in ("render_s", "copy_s", "encode_s", "write_s", "seconds"):
            self.shard_seconds[key] = self.shard_seconds.get(key, 0.0) + float(stats.get(key, 0.0))
        self.bytes_written += int(stats.get("bytes", 0))
        slot.volumes = set(stats.get("resident_volumes", [])) | {self.plan.shards[j].volume_index
                                                                 for j in slot.inflight.values()}
        slot.info = {k: stats.get(k) for k in ("actor_id", "node_id", "host", "pid", "gpu_ids",
                                               "cuda_visible_devices", "gpu_name", "backend")}
        cache = stats.get("backend_cache") or {}
        if "bytes_resident" in cache:
            slot.bytes_resident = int(cache["bytes_resident"])
        vinfo = stats.get("volume_info")
        if vinfo and shard.volume_index not in self.volume_infos:
            self.volume_infos[shard.volume_index] = vinfo
        self.t_last = time.perf_counter()
        self._emit("shard_done", stats)

    def _start_probe(self, slot: _Slot, exc: Exception) -> None:
        if slot.state == "probing":
            return
        slot.state = "probing"
        slot.volumes = set()
        # waits through a restart (max_task_retries=-1); raises ActorDiedError once the actor is dead for good
        slot.probe = slot.handle.ping.options(max_task_retries=-1).remote()
        self._emit("actor_lost", {"slot": slot.index, "error": _short(exc), **slot.info})

    def _on_probe(self, slot: _Slot) -> None:
        import ray

        ref, slot.probe = slot.probe, None
        try:
            ray.get(ref)
            slot.state = "ok"
            slot.generation += 1
            self._emit("actor_back", {"slot": slot.index})
        except ray.exceptions.RayError as exc:
            # dead for good (restarts exhausted): requeue anything still attributed to it, replace it
            for r, i in list(slot.inflight.items()):
                slot.inflight.pop(r)
                slot.sent.pop(r, None)
                self._requeue(i, f"actor dead: {_short(exc)}")
            self._replace(slot, _short(exc))

    def _replace(self, slot: _Slot, reason: str) -> None:
        """Kill ``slot``'s actor for good and start a fresh one in its place (bounded by the budget)."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(slot.handle, no_restart=True)
        slot.volumes = set()
        if self.actors_replaced < max(self.replace_budget, 2 * len(self.slots)):  # elastic farms grow it
            self.actors_replaced += 1
            slot.handle = self._new_actor()
            slot.state = "ok"
            slot.generation += 1
            self._emit("actor_replaced", {"slot": slot.index, "error": reason})
        else:
            slot.state = "dead"
            self._emit("actor_dead", {"slot": slot.index, "error": reason})

    def check_deadlines(self) -> None:
        """An actor holding a shard past its deadline is hung (a wedged GPU, a stuck filesystem call):
        kill and replace it; the late shard is retried (a timeout), the others it held go back unharmed."""
        deadline = shard_deadline_s(self.durations, self.farm.shard_timeout_s, self.farm.shard_timeout_floor_s)
        if deadline is None:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.state != "ok":
                continue
            late = [r for r, t in slot.sent.items() if now - t > deadline]
            if not late:
                continue
            self.timeouts += len(late)
            for r, i in list(slot.inflight.items()):
                slot.inflight.pop(r)
                slot.sent.pop(r, None)
                if r in late:
                    self._emit("shard_timeout", {"shard_id": self.plan.shards[i].shard_id, "slot": slot.index,
                                                 "deadline_s": deadline, **slot.info})
                    self._requeue(i, f"no result within {deadline:.0f} s: actor hung, replaced")
                else:  # not its fault: back to the front of its queue, no attempt counted
                    self.queues.setdefault(self.plan.shards[i].volume_index, deque()).appendleft(i)
            self._replace(slot, f"a shard passed its {deadline:.0f} s deadline")

    def grow(self, interval_s: float = 2.0) -> None:
        """Elastic GPU farms: start an actor for each GPU the cluster has beyond the live actors (GPUs that
        joined; none at first on a cluster scaling from zero), up to ``farm.max_actors`` and the shards left.
        Actors on a node that leaves die; their shards are retried elsewhere and Ray restarts them where a
        GPU is free."""
        now = time.monotonic()
        if not self.elastic or now - self._last_grow < interval_s:
            return
        if self._last_grow == 0.0 and self.farm.max_actors:
            self.request_gpus(min(self.farm.max_actors, len(self.remaining)))
        self._last_grow = now
        gpus = int(_cluster_resources().get("GPU", 0))
        live = sum(1 for s in self.slots if s.state in ("ok", "probing"))
        for _ in range(min(gpus, self.max_actors, len(self.remaining)) - live):
            slot = _Slot(len(self.slots), self._new_actor())
            self.slots.append(slot)
            self.actors_added += 1
            self._emit("actor_added", {"slot": slot.index, "gpus": gpus})

    def request_gpus(self, n: int) -> None:
        """Ask the cluster's autoscaler for ``n`` GPUs (0 withdraws the request); a cluster without an
        autoscaler ignores it."""
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{"GPU": 1}] * int(n))
            self._requested_gpus = int(n)
        except Exception as exc:  # noqa: BLE001 - scaling is best effort; the sweep goes on with what it has
            print(f"drrfarm: warning: could not ask the autoscaler for {n} GPU(s): {_short(exc)}", file=sys.stderr)

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        import ray

        last_progress = time.monotonic()
        while self.remaining:
            self.grow()
            self.assign()
            waiting: dict[Any, tuple[_Slot, str]] = {}
            for slot in self.slots:
                for ref in slot.inflight:
                    waiting[ref] = (slot, "task")
                if slot.probe is not None:
                    waiting[slot.probe] = (slot, "probe")
            if not waiting:
                if not self.elastic and not any(s.state in ("ok", "probing") for s in self.slots):
                    raise BackendError("every render actor is dead and the replacement budget is spent")
                time.sleep(0.2)  # elastic: waiting for a GPU to join (the stall timeout bounds it)
            else:
                ready, _ = ray.wait(list(waiting), num_returns=1, timeout=1.0)
                if ready:
                    ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
                for ref in ready:
                    slot, kind = waiting[ref]
                    if kind == "task":
                        self._on_result(slot, ref)
                    else:
                        self._on_probe(slot)
                if ready:
                    last_progress = time.monotonic()
            self.check_deadlines()
            if any(s.state == "ok" and s.inflight for s in self.slots):
                last_progress = time.monotonic()  # a live actor is working (shards may be long): not a stall
            if time.monotonic() - last_progress > self.stall_timeout_s:
                raise BackendError(f"no live render actor for {self.stall_timeout_s:.0f} s (actors: "
                                   f"{[s.state for s in self.slots]}; cluster: {_cluster_resources()})")
            self.progress.update(self.images_done, self.retries, len(self.failed))
            self._log_metrics()
        self.progress.update(self.images_done, self.retries, len(self.failed), force=True)
        self._log_metrics(force=True)

    def _log_metrics(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tracker is None or (not force and now - self._last_metrics < 5.0):
            return
        self._last_metrics = now
        metrics = {"images_done": float(self.images_done), "images_per_s": self.progress.rate(),
                   "scatter_seconds": self.scatter_s,
                   "retries": float(self.retries), "failures": float(len(self.failed)),
                   "actor_errors": float(self.actor_errors)}
        for s in self.slots:
            if s.busy_s > 0:
                metrics[f"actor_{s.index}_images_per_s"] = s.images / s.busy_s
            if s.bytes_resident is not None:
                metrics[f"actor_{s.index}_volume_bytes_resident"] = float(s.bytes_resident)
        _safe(self.tracker, "log_metrics", metrics, self.images_done)


# ------------------------------------------------------------------------------------------------
# entry point


def _short(exc: BaseException | None, limit: int = 300) -> str:
    if exc is None:
        return "unknown error"
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _safe(obj: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call a tracker method; a tracking problem never stops a sweep."""
    fn = getattr(obj, method, None)
    if fn is None:
        return None
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        print(f"drrfarm: warning: tracking {method} failed: {_short(exc)}", file=sys.stderr)
        return None


def forwarded_env(credentials: bool = False) -> dict[str, str]:
    """The driver's environment variables that render actors get through Ray's runtime env: the object
    store's location and settings (:data:`FORWARDED_ENV`), and its keys (:data:`CREDENTIAL_ENV`) only
    when ``credentials`` is True."""
    names = FORWARDED_ENV + (CREDENTIAL_ENV if credentials else ())
    return {k: os.environ[k] for k in names if os.environ.get(k)}


def _committed(manifest: Any) -> dict[str, Any]:
    """``{shard_id: entry}`` of a manifest object (mapping or object with ``shards``)."""
    if manifest is None:
        return {}
    shards = getattr(manifest, "shards", manifest)
    return dict(shards)


def _entry_rows(entry: Any) -> int | None:
    rows = entry.get("rows") if isinstance(entry, dict) else getattr(entry, "rows", None)
    return int(rows) if rows is not None else None


def committed_shards(plan: Plan, url: str) -> dict[str, Any]:
    """Planned shards committed at ``url``: ``{shard_id: manifest entry}``. A manifest that lists shards
    of another sweep raises StorageError (one output = one dataset)."""
    entries = _committed(read_manifest(url))
    foreign = sorted(s for s in entries if not s.startswith(plan.sweep_id + "-"))
    if foreign:
        raise StorageError(
            f"{url}: the output already holds shards of another sweep ({foreign[0]}, ...); this spec's sweep id is "
            f"{plan.sweep_id}. Write to another output URL (--output) or remove the old dataset.")
    planned = set(plan.shard_ids())
    out = {}
    for sid, entry in entries.items():
        if sid not in planned:
            raise StorageError(f"{url}: manifest lists {sid}, which this spec does not plan (corrupt manifest?)")
        rows = _entry_rows(entry)
        if rows is not None and rows != plan.shard(sid).n_images:
            continue  # wrong row count: not trusted, re-rendered
        out[sid] = entry
    return out


def run_sweep(spec_path: str | os.PathLike[str] | SweepSpec, address: str | None = None, output: str | None = None,
              tracking: bool = True, num_actors: int | None = None, progress: bool = True, *,
              backend: str | None = None, callback: Callable[[str, dict[str, Any]], None] | None = None,
              stall_timeout_s: float = 900.0, stream: TextIO | None = None,
              forward_credentials: bool = False) -> SweepSummary:
    """Render every missing shard of a sweep spec and return its summary.

    ``spec_path``: YAML file (or an already loaded :class:`SweepSpec`); ``address``: None (local Ray
    on 127.0.0.1, or the Ray this process is already connected to), ``"auto"`` or ``"ray://..."``;
    ``output``: overrides the spec's output URL; ``tracking``: False disables MLflow whatever the
    spec says; ``num_actors``: render actors (default: one per GPU, else one per
    ``farm.cpus_per_actor`` CPUs, never more than the missing shards); ``progress``: progress bar on
    stderr; ``backend``: overrides the spec's backend; ``callback(event, data)``: observer of
    ``shard_done`` / ``shard_retry`` / ``shard_failed`` / ``actor_lost`` / ``actor_back`` /
    ``actor_replaced`` events (tests use it to inject faults); ``forward_credentials``: also hand the
    driver's AWS keys to the actors through Ray's runtime env (visible in the dashboard and the job's
    config; by default actors use their own environment or their node's instance / pod role).
    """
    t_start = time.perf_counter()
    stream = stream or sys.stderr
    if isinstance(spec_path, SweepSpec):
        spec = spec_path.with_output(output)
        spec_file = spec.source
    else:
        spec = load_spec(spec_path, output=output)
        spec_file = str(spec_path)
    if backend is not None:
        spec = dataclasses.replace(spec, backend=backend)
    plan = make_plan(spec)
    summary = SweepSummary(sweep_id=plan.sweep_id, spec_sha256=plan.spec_sha256, output_url=spec.output.url,
                           images_total=plan.n_images, shards_total=plan.n_shards)

    preflight(plan, check_local_files=not (address or "").startswith("ray://"))
    open_store(spec.output.url)  # probe write/delete: a bad URL or credentials fail here, not after an hour
    done = committed_shards(plan, spec.output.url)
    todo = [s.index for s in plan.shards if s.shard_id not in done]
    summary.shards_skipped = len(done)
    summary.images_skipped = plan.images_in(set(done))
    if not todo:
        summary.complete = True
        summary.seconds = time.perf_counter() - t_start
        if progress:
            print(f"drrfarm: sweep {plan.sweep_id} is already complete at {spec.output.url} "
                  f"({plan.n_shards} shards, {plan.n_images} images); nothing to do", file=stream)
        return summary

    enabled = bool(tracking and spec.tracking.enabled)
    tracker = open_tracker(enabled, spec.tracking.experiment, spec.tracking.tracking_uri, spec.output.url,
                           plan.spec_sha256)
    _safe(tracker, "log_spec", spec.to_dict(), spec_file if os.path.exists(spec_file) else None, plan.counts())
    _safe(tracker, "log_tags", {"drrfarm.sweep_id": plan.sweep_id, "drrfarm.resumed_shards": str(len(done)),
                                "drrfarm.backend": spec.backend})
    _safe(tracker, "flush")  # creates (or finds) the run now, so shards carry its id
    run_id = getattr(tracker, "run_id", None)
    summary.run_id = run_id
    summary.tracking_uri = getattr(tracker, "tracking_uri", None)

    env_vars = forwarded_env(credentials=forward_credentials)
    runtime_env = {"env_vars": env_vars} if env_vars else None
    started_ray = connect_ray(address)
    farm = None
    status = "FAILED"
    try:
        res = _cluster_resources()
        gpus = int(res.get("GPU", 0))
        use_gpu = spec.backend == "cuda" or (spec.backend == "auto" and gpus > 0)
        actor_backend = spec.backend if spec.backend != "auto" else ("auto" if use_gpu else "cpu")
        if num_actors is None:
            num_actors = spec.farm.actors
        # without a fixed number, a GPU farm follows the GPUs: an actor per GPU now (none is fine: a
        # cluster scaling from zero), more as GPUs join, up to farm.max_actors
        elastic = use_gpu and num_actors is None
        if num_actors is None:
            num_actors = gpus if use_gpu else max(1, int(res.get("CPU", 1) // spec.farm.cpus_per_actor))
        num_actors = max(0 if elastic else 1, min(int(num_actors), len(todo)))
        if elastic and num_actors == 0 and progress:
            print(f"drrfarm: the cluster has no GPU yet; waiting up to {stall_timeout_s:.0f} s for one to join",
                  file=stream)
        summary.actors = num_actors
        summary.backend = "cuda" if use_gpu and actor_backend != "cpu" else actor_backend
        bar = Progress(plan.n_images, plan.n_images - sum(plan.shards[i].n_images for i in todo), enabled=progress,
                       stream=stream)
        if progress:
            print(f"drrfarm: sweep {plan.sweep_id}: {len(todo)} of {plan.n_shards} shards to render "
                  f"({plan.images_in({plan.shards[i].shard_id for i in todo})} images) on {num_actors} "
                  f"{summary.backend} actor(s) -> {spec.output.url}", file=stream)
        farm = _Farm(plan, todo, run_id, num_actors, use_gpu, actor_backend, bar, tracker, callback, runtime_env,
                     stall_timeout_s, elastic=elastic)
        farm.start_actors()
        tags = {}
        for slot in farm.slots:
            for key in ("host", "node_id", "gpu_ids", "cuda_visible_devices", "gpu_name", "backend"):
                if slot.info.get(key) not in (None, "", []):
                    tags[f"drrfarm.actor.{slot.index}.{key}"] = str(slot.info[key])
        _safe(tracker, "log_tags", tags)
        bar.start()
        farm.run()
        for _ in range(2):  # trust the manifest, not the replies: re-render anything that is not committed
            final = committed_shards(plan, spec.output.url)
            missing = [i for i in todo if plan.shards[i].shard_id not in final
                       and plan.shards[i].shard_id not in farm.failed]
            if not missing:
                break
            farm.requeue_missing(missing)
            farm.run()
        bar.close()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if farm is not None:
            farm.shutdown_actors()
            summary.retries = farm.retries
            summary.failures = len(farm.failed)
            summary.failed_shards = sorted(farm.failed)
            summary.errors = dict(farm.failed)
            summary.actor_errors = farm.actor_errors
            summary.actors_replaced = farm.actors_replaced
            summary.timeouts = farm.timeouts
            summary.actors_added = farm.actors_added
            summary.actors = len(farm.slots)
            summary.shards_rendered = len(farm.done)
            summary.rendered_shards = sorted(farm.done)
            summary.images_rendered = farm.images_rendered
            summary.scatter_seconds = farm.scatter_s
            n_done = max(1, len(farm.done))
            summary.shard_seconds = {k: v / n_done for k, v in farm.shard_seconds.items()}
            summary.bytes_written = farm.bytes_written
            summary.inflight_per_actor = farm.inflight
            summary.encode_threads = farm.encode_threads
            if farm.t_first is not None and farm.t_last is not None:
                summary.render_seconds = farm.t_last - farm.t_first
            summary.per_actor = {
                str(s.index): {"images": s.images, "shards": s.shards, "errors": s.errors,
                               "images_per_s": s.images / s.busy_s if s.busy_s else 0.0, **s.info}
                for s in farm.slots}
            if farm.volume_infos:
                _safe(tracker, "log_inputs", [
                    {"uri": v.get("uri"), "sha256": v.get("sha256"), "shape": v.get("shape"),
                     "spacing_mm": v.get("spacing_mm"), "volume_id": v.get("volume_id")}
                    for _, v in sorted(farm.volume_infos.items())])
        summary.seconds = time.perf_counter() - t_start
        if summary.render_seconds > 0:
            summary.images_per_s = summary.images_rendered / summary.render_seconds
        elif summary.seconds > 0:
            summary.images_per_s = summary.images_rendered / summary.seconds
        try:
            final = committed_shards(plan, spec.output.url)
            summary.complete = len(final) == plan.n_shards
        except DrrfarmError as exc:
            final = {}
            print(f"drrfarm: warning: cannot read the manifest back: {exc}", file=stream)
        if status == "FINISHED" and not summary.complete:
            status = "FAILED"
        summary.status = status
        _finish(plan, spec, summary, tracker, final, status, stream)
        if started_ray:
            import ray

            ray.shutdown()
    if progress:
        print(summary.format(), file=stream)
    return summary


def _finish(plan: Plan, spec: SweepSpec, summary: SweepSummary, tracker: Any, final: dict[str, Any], status: str,
            stream: TextIO) -> None:
    """Finalise the manifest (sinks) and the provenance run (contact sheet, summary)."""
    manifest_json: dict[str, Any] = {}
    extra = {"spec_sha256": plan.spec_sha256, "sweep_id": plan.sweep_id, "mlflow_run_id": summary.run_id or "",
             "drrfarm_version": drrfarm.__version__, "complete": summary.complete,
             "planned": {"shards": plan.n_shards, "images": plan.n_images}, "spec": spec.content_dict()}
    try:
        manifest_json = finalize_manifest(spec.output.url, extra)
    except DrrfarmError as exc:
        print(f"drrfarm: warning: finalising the manifest failed: {exc}", file=stream)
    if tracker is None:
        return
    sheet = None
    if summary.images_rendered or summary.images_skipped:
        try:
            sheet = contact_sheet_png(spec.output.url)
        except Exception as exc:  # noqa: BLE001 - a contact sheet is a nicety
            print(f"drrfarm: warning: contact sheet failed: {_short(exc)}", file=stream)
    _safe(tracker, "finish", manifest_json, sheet, summary.to_dict(), status)


def describe_plan(spec_path: str | os.PathLike[str], output: str | None = None) -> str:
    """The text ``drrfarm plan`` prints."""
    plan = make_plan(load_spec(spec_path, output=output))
    return plan.describe()


__all__ = ["Progress", "SweepSummary", "committed_shards", "connect_ray", "describe_plan", "format_bytes",
           "preflight", "run_sweep"]
