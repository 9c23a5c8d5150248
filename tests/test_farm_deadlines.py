"""Hung actors: a shard in flight past its deadline gets its actor killed and replaced and is retried; the
deadline comes from the shards measured so far, with a floor and an override."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from test_farm import assert_exactly_once, base_spec, write_phantom, write_spec

from drrfarm.farm.driver import DEADLINE_FACTOR, DEADLINE_MIN_SHARDS, shard_deadline_s


def test_deadline_is_derived_from_measured_shards_with_a_floor_and_an_override() -> None:
    assert shard_deadline_s([], None, 300.0) is None  # nothing measured yet: the first shards load volumes
    assert shard_deadline_s([1.0] * (DEADLINE_MIN_SHARDS - 1), None, 300.0) is None
    assert shard_deadline_s([1.0] * DEADLINE_MIN_SHARDS, None, 300.0) == 300.0  # the floor
    slow = [40.0] * 20 + [60.0]
    assert shard_deadline_s(slow, None, 30.0) == pytest.approx(DEADLINE_FACTOR * 40.0)
    assert shard_deadline_s(slow, 5.0, 300.0) == 5.0  # the setting wins
    assert shard_deadline_s([], 7.5, 300.0) == 7.5


def test_spec_validates_the_deadline_settings(tmp_path: Path) -> None:
    from drrfarm.errors import SpecError
    from drrfarm.farm.spec import load_spec

    write_phantom(tmp_path / "a.nii.gz")
    write_phantom(tmp_path / "b.nii.gz")
    good = load_spec(write_spec(tmp_path / "g.yaml", base_spec(tmp_path, tmp_path / "o", farm={
        "shard_timeout_s": 12.5, "shard_timeout_floor_s": 60})))
    assert good.farm.shard_timeout_s == 12.5 and good.farm.shard_timeout_floor_s == 60.0
    with pytest.raises(SpecError, match="farm.shard_timeout_s"):
        load_spec(write_spec(tmp_path / "b.yaml", base_spec(tmp_path, tmp_path / "o", farm={"shard_timeout_s": 0})))


def test_a_hung_actor_is_replaced_and_its_shard_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One actor hangs in shard 2's first attempt (alive, never answering): past the deadline it is killed and
    replaced, the shard is rendered again, every image ends up stored exactly once and the summary counts it."""
    import ray

    from drrfarm.farm import worker
    from drrfarm.farm.driver import run_sweep

    write_phantom(tmp_path / "a.nii.gz")
    write_phantom(tmp_path / "b.nii.gz", bone_shift=3)
    out = tmp_path / "out"
    spec_path = write_spec(tmp_path / "s.yaml", base_spec(tmp_path, out, farm={"shard_timeout_s": 8}))

    class HangsOnce(worker.RenderWorker):
        def render_shard(self, task: Any) -> dict[str, Any]:
            if task.shard_index == 2 and task.attempt == 0:
                time.sleep(3600)  # a wedged device or a hung filesystem call
            return super().render_shard(task)

    monkeypatch.setattr(worker, "render_actor_class", lambda: ray.remote(HangsOnce))
    events: list[str] = []
    ray.shutdown()
    t0 = time.monotonic()
    summary = run_sweep(spec_path, num_actors=2, progress=False, tracking=False,
                        callback=lambda e, d: events.append(e))
    assert summary.complete and summary.failures == 0
    assert summary.timeouts == 1 and summary.actors_replaced >= 1 and "shard_timeout" in events
    assert summary.retries >= 1
    assert time.monotonic() - t0 < 600
    assert_exactly_once(spec_path, str(out))
