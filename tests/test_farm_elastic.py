"""Elastic GPU farms on a multi-node Ray cluster (``ray.cluster_utils.Cluster``; nodes declare GPUs, the
actors render with the CPU backend since no real GPU is there): a GPU node that joins mid-sweep gets an
actor, a node that leaves loses only its shards' attempts, every image ends up stored exactly once."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_farm import assert_exactly_once, base_spec, local_cluster, write_phantom, write_spec


@pytest.fixture()
def gpu_cluster() -> Iterator[Any]:
    """Head (the driver only) and one worker node with 1 CPU and 1 GPU."""
    yield from local_cluster({"num_cpus": 1, "num_gpus": 1})


def test_gpu_nodes_join_and_leave_mid_sweep(gpu_cluster: Any, tmp_path: Path) -> None:
    from drrfarm.farm.driver import run_sweep

    write_phantom(tmp_path / "a.nii.gz")
    write_phantom(tmp_path / "b.nii.gz", bone_shift=3)
    out = tmp_path / "out"
    spec = base_spec(tmp_path, out, backend="auto", farm={"max_actors": 4},
                     poses={"carm": {"alpha_deg": {"range": [-30, 30], "num": 12}, "beta_deg": [0, 15]}},
                     image={"size": 48, "pixel_mm": 5.5},
                     output={"url": str(out), "formats": ["parquet"], "shard_size": 2})
    spec_path = write_spec(tmp_path / "s.yaml", spec)
    state: dict[str, Any] = {"added": None, "removed": None, "nodes": set(), "events": []}

    def on_event(event: str, data: dict[str, Any]) -> None:
        state["events"].append(event)
        if event != "shard_done":
            return
        state["nodes"].add(data["node_id"])
        if state["added"] is None:  # a GPU node joins after the first shard
            state["added"] = gpu_cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
        elif state["removed"] is None and data["node_id"] == state["added"].node_id:
            # the new node works: the first one leaves (spot preemption), with the processes it ran
            node = next(n for n in gpu_cluster.worker_nodes if n.node_id != state["added"].node_id)
            state["removed"] = node.node_id
            pids = list(state.setdefault("pids", {}).get(node.node_id, []))
            gpu_cluster.remove_node(node, allow_graceful=False)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        state.setdefault("pids", {}).setdefault(data["node_id"], set()).add(data["pid"])

    summary = run_sweep(spec_path, progress=False, tracking=False, callback=on_event)
    assert summary.complete and summary.failures == 0
    assert summary.actors_added >= 1 and "actor_added" in state["events"]
    assert state["removed"] is not None and len(state["nodes"]) == 2  # both GPU nodes rendered
    assert_exactly_once(spec_path, str(out))


def test_an_elastic_farm_follows_the_cluster_gpus_from_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU at start: no actor and no error; GPUs join: one actor each, up to farm.max_actors; the driver asks
    the autoscaler for farm.max_actors GPUs once and withdraws the request at the end."""
    from drrfarm.farm import driver
    from drrfarm.farm.plan import make_plan
    from drrfarm.farm.spec import load_spec

    write_phantom(tmp_path / "a.nii.gz")
    write_phantom(tmp_path / "b.nii.gz")
    spec = load_spec(write_spec(tmp_path / "s.yaml", base_spec(tmp_path, tmp_path / "o", backend="cuda",
                                                               farm={"max_actors": 3, "cpus_per_gpu": 4})))
    plan = make_plan(spec)
    gpus = {"n": 0}
    requests: list[int] = []
    monkeypatch.setattr(driver, "_cluster_resources", lambda: {"GPU": float(gpus["n"]), "CPU": 8.0})
    monkeypatch.setattr(driver._Farm, "_new_actor", lambda self: object())
    monkeypatch.setattr(driver._Farm, "request_gpus", lambda self, n: requests.append(n))
    farm = driver._Farm(plan, [s.index for s in plan.shards], None, 0, True, "cuda",
                        driver.Progress(1, 0, enabled=False), None, None, None, 60.0, elastic=True)
    farm.start_actors()
    assert farm.slots == []
    farm.grow(interval_s=0.0)
    assert farm.slots == [] and requests == [3]
    gpus["n"] = 2
    farm.grow(interval_s=0.0)
    assert len(farm.slots) == 2 and farm.actors_added == 2
    gpus["n"] = 8  # more GPUs than the cap
    farm.grow(interval_s=0.0)
    assert len(farm.slots) == 3 and requests == [3]
    farm.slots[0].state = "dead"  # an actor lost for good: the GPUs left start a new one
    farm.grow(interval_s=0.0)
    assert len(farm.slots) == 4 and sum(s.state == "ok" for s in farm.slots) == 3
