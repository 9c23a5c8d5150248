"""Soak: a long CPU sweep under the faults a week on preemptible cloud GPUs brings, checked image by image.

On a local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head that runs only the driver and two
1-CPU worker nodes), a sweep of ``--images`` tiny images in shards of ``--shard-size`` is written to a real
S3-compatible server on 127.0.0.1 (moto, as in the tests) while:

* a render actor is SIGKILLed every ``--kill-every`` seconds;
* the S3 endpoint goes down once for ``--outage`` seconds (connections refused and reset);
* one worker node is removed (its processes killed) and a new one added.

Then every planned image must be in the dataset exactly once (manifest vs plan, every Parquet file read
back). The driver's resident memory is sampled every second (flat = the same from 25 % of the sweep on),
and its CPU time per shard is measured (what one driver costs per shard, i.e. how many shards per minute it
can keep up with).

    python benchmarks/soak_farm.py --images 20000 --shard-size 10 --json soak.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _serve_s3(port: int, conn: Any) -> None:
    """The S3 server, in a process of its own (so the driver's memory is the driver's): stop/start on command,
    objects kept in memory across an outage."""
    import logging

    from s3server import _make_server_class

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = _make_server_class()(port)
    server.start()
    conn.send("up")
    while True:
        cmd = conn.recv()
        if cmd == "exit":
            server.stop()
            return
        getattr(server, cmd)()  # "stop" | "start"
        conn.send(cmd)


def check_exactly_once(plan: Any, url: str) -> None:
    """Every planned shard committed once with its rows; every planned image in exactly one Parquet row."""
    from drrfarm.sinks import open_store, read_manifest, read_shard

    manifest = read_manifest(url)
    assert sorted(manifest) == plan.shard_ids(), "manifest and plan differ"
    store = open_store(url)
    seen: set[int] = set()
    for sid, entry in manifest.items():
        assert entry.rows == plan.shard(sid).n_images, sid
        (key,) = entry.keys_of("parquet")
        _, rows, _ = read_shard(store.get_bytes(key))
        for r in rows:
            idx = int(r["image_index"])
            assert idx not in seen, f"image {idx} stored twice"
            seen.add(idx)
    assert seen == set(range(plan.n_images)), "images missing"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--shard-size", type=int, default=10)
    ap.add_argument("--size", type=int, default=8, help="detector pixels per side")
    ap.add_argument("--kill-every", type=float, default=20.0)
    ap.add_argument("--outage", type=float, default=10.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(k, v)

    import multiprocessing

    import yaml
    from s3server import BUCKET, _free_port
    from test_farm import write_phantom

    # the S3 server first: worker nodes inherit the endpoint and keys from this process's environment
    port = _free_port()
    control, child_end = multiprocessing.get_context("fork").Pipe()
    s3 = multiprocessing.get_context("fork").Process(target=_serve_s3, args=(port, child_end), daemon=True)
    s3.start()
    assert control.recv() == "up"

    def s3_command(cmd: str) -> None:
        control.send(cmd)
        assert control.recv() == cmd

    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "soak-key", "AWS_SECRET_ACCESS_KEY":
                       "soak-secret", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                       "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"})
    os.environ.pop("AWS_PROFILE", None)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)

    import ray
    from ray.cluster_utils import Cluster

    from drrfarm.farm.driver import run_sweep
    from drrfarm.farm.plan import make_plan
    from drrfarm.farm.spec import load_spec

    tmp = Path(tempfile.mkdtemp(prefix="drrfarm-soak-"))
    write_phantom(tmp / "ct.nii.gz", n=16)
    n_poses = max(1, args.images // 2)
    spec = {"seed": 11, "volumes": [{"id": "ct", "path": str(tmp / "ct.nii.gz")}],
            "poses": {"carm": {"alpha_deg": {"range": [-40, 40], "num": n_poses}}},
            "spectra": {"mono_kev": [50, 70]}, "detector": {"model": "ideal", "output": "line_integral"},
            "image": {"size": args.size, "pixel_mm": 64.0 / args.size},
            "output": {"url": f"s3://{BUCKET}/soak", "formats": ["parquet"], "shard_size": args.shard_size},
            "tracking": {"enabled": False}, "backend": "cpu",
            "farm": {"max_shard_retries": 10, "max_actor_restarts": -1}}
    spec_path = tmp / "soak.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    plan = make_plan(load_spec(spec_path))
    print(f"soak: {plan.n_images} images in {plan.n_shards} shards -> {spec['output']['url']} ({endpoint})",
          flush=True)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)

    lock = threading.Lock()
    state: dict[str, Any] = {"done": 0, "pids": {}, "kills": 0, "outage": None, "node_swap": None,
                             "rss": [], "t0": time.monotonic()}

    def on_event(event: str, data: dict[str, Any]) -> None:
        if event != "shard_done":
            return
        with lock:
            state["done"] += 1
            state["pids"][data["pid"]] = data["node_id"]
        if state["node_swap"] is None and state["done"] >= 0.6 * plan.n_shards:
            swap_node()  # here, on the driver's (main) thread: Ray adds nodes only from the main thread

    def swap_node() -> None:
        node = next(iter(cluster.worker_nodes))
        with lock:
            doomed = [p for p, n in state["pids"].items() if n == node.node_id]
        cluster.remove_node(node, allow_graceful=False)
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        state["node_swap"] = state["done"]

    def chaos() -> None:
        last_kill = time.monotonic()
        while not state.get("stop"):
            time.sleep(0.5)
            now = time.monotonic()
            state["rss"].append((now - state["t0"], state["done"], _rss_mib()))
            frac = state["done"] / plan.n_shards
            if now - last_kill >= args.kill_every:
                last_kill = now
                with lock:
                    pids = list(state["pids"])
                if pids:
                    pid = random.choice(pids)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        state["kills"] += 1
                    except ProcessLookupError:
                        pass
                    with lock:
                        state["pids"].pop(pid, None)
            if state["outage"] is None and frac >= 0.3:
                state["outage"] = (state["done"], time.monotonic())
                s3_command("stop")
                time.sleep(args.outage)
                s3_command("start")

    cpu0 = time.process_time()
    t0 = time.monotonic()
    th = threading.Thread(target=chaos, daemon=True)
    th.start()
    try:
        summary = run_sweep(str(spec_path), num_actors=2, progress=False, tracking=False, callback=on_event,
                            stall_timeout_s=600)
    finally:
        state["stop"] = True
        th.join()
    wall = time.monotonic() - t0
    driver_cpu = time.process_time() - cpu0  # includes the chaos thread (sleeping, mostly): an upper bound
    check_exactly_once(plan, summary.output_url)
    rss = state["rss"]
    quarter = next((r for r in rss if r[1] >= 0.25 * plan.n_shards), rss[0])
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "images": plan.n_images,
        "shards": plan.n_shards, "complete": summary.complete, "exactly_once": True, "wall_s": wall,
        "images_per_s": plan.n_images / wall, "retries": summary.retries, "actor_errors": summary.actor_errors,
        "actors_replaced": summary.actors_replaced, "timeouts": summary.timeouts, "actors_killed": state["kills"],
        "outage_at_shard": state["outage"][0] if state["outage"] else None, "outage_s": args.outage,
        "node_swapped_at_shard": state["node_swap"],
        "driver_rss_mib_at_25": quarter[2], "driver_rss_mib_end": rss[-1][2] if rss else None,
        "driver_rss_mib_max_after_25": max(r[2] for r in rss if r[0] >= quarter[0]) if rss else None,
        "driver_cpu_s": driver_cpu, "driver_cpu_ms_per_shard": 1e3 * driver_cpu / plan.n_shards,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    ray.shutdown()
    cluster.shutdown()
    control.send("exit")
    s3.join(10)
    return 0 if summary.complete else 1


if __name__ == "__main__":
    sys.exit(main())
