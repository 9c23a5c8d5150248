"""The Ray farm on CPU: exactly-once output, determinism, resume, and faults on a multi-node local cluster.

One ``ray.cluster_utils.Cluster`` (a head without CPUs plus 1-CPU worker nodes, all on 127.0.0.1) is
shared by the tests of this module; volumes are small NIfTI phantoms and images are 32-48 px.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

from drrfarm.errors import SpecError, StorageError
from drrfarm.farm.plan import make_plan
from drrfarm.farm.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- helpers


def write_phantom(path: Path, n: int = 32, spacing_mm: float = 4.0, bone_shift: int = 0) -> Path:
    """A water-ish box with a bone rod, centred on the origin, as int16 HU NIfTI."""
    hu = np.full((n, n, n), -1000, np.int16)
    c = n // 2
    hu[c - 10 : c + 10, c - 8 : c + 8, c - 12 : c + 12] = 40
    hu[c - 2 + bone_shift : c + 2 + bone_shift, c - 2 : c + 2, c - 10 : c + 10] = 900
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = -spacing_mm * (n - 1) / 2
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    return path


def write_two_phantoms(d: Path) -> Path:
    """``a.nii.gz`` and ``b.nii.gz`` (its bone shifted) in ``d``: the two volumes of :func:`base_spec`."""
    write_phantom(d / "a.nii.gz")
    write_phantom(d / "b.nii.gz", bone_shift=3)
    return d


def base_spec(tmp: Path, out: Path, **changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "seed": 5,
        "volumes": [{"id": "a", "path": str(tmp / "a.nii.gz")}, {"id": "b", "path": str(tmp / "b.nii.gz")}],
        "poses": {"carm": {"alpha_deg": {"range": [-30, 30], "num": 4}, "beta_deg": [0, 15]}},
        "spectra": {"mono_kev": [50, 70]},
        "detector": {"model": "ideal", "output": "line_integral"},
        "image": {"size": 32, "pixel_mm": 8.0},
        "output": {"url": str(out), "formats": ["parquet", "png"], "shard_size": 2},
        "tracking": {"enabled": False},
    }
    d.update(copy.deepcopy(changes))
    return d


def write_spec(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def read_dataset(url: str) -> tuple[dict[int, np.ndarray], dict[int, dict[str, Any]], dict[str, dict[str, str]]]:
    """All committed images by image_index (asserting no index appears twice), rows, file metadata."""
    from drrfarm.sinks import read_manifest, read_shard

    m = read_manifest(url)
    images: dict[int, np.ndarray] = {}
    rows: dict[int, dict[str, Any]] = {}
    meta: dict[str, dict[str, str]] = {}
    root = url.removeprefix("file://")
    for sid, entry in m.items():
        (key,) = entry.keys_of("parquet")
        imgs, rs, md = read_shard(Path(root, key).read_bytes())
        meta[sid] = md
        for im, r in zip(imgs, rs, strict=True):
            idx = int(r["image_index"])
            assert idx not in images, f"image {idx} stored twice"
            assert r["shard_id"] == sid
            images[idx], rows[idx] = im, r
    return images, rows, meta


def assert_exactly_once(spec_path: Path | str, url: str) -> None:
    """Manifest vs plan: every planned shard committed once with its rows, every image once, nothing extra."""
    from drrfarm.sinks import read_manifest

    plan = make_plan(load_spec(spec_path, output=url))
    m = read_manifest(url)
    assert sorted(m) == plan.shard_ids()
    for sid, entry in m.items():
        assert entry.rows == plan.shard(sid).n_images
    images, rows, _ = read_dataset(url)
    assert sorted(images) == list(range(plan.n_images))
    root = Path(url.removeprefix("file://"))
    assert sorted(p.name for p in (root / "parquet").iterdir()) == sorted(f"{s}.parquet" for s in plan.shard_ids())
    if "png" in plan.spec.output.formats:
        assert len(list((root / "png").rglob("*.png"))) == plan.n_images


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = write_two_phantoms(tmp_path_factory.mktemp("phantoms"))
    (d / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    return d


def local_cluster(*workers: dict[str, Any]) -> Iterator[Any]:
    """A local multi-node Ray cluster on the loopback interface: a head with no CPUs or GPUs (it runs only the
    driver) and one worker node per ``workers`` entry (``add_node`` arguments); connected while it lives."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": False})
    for args in workers:
        c.add_node(node_ip_address="127.0.0.1", **args)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Head + two 1-CPU worker nodes."""
    yield from local_cluster({"num_cpus": 1}, {"num_cpus": 1})


# --------------------------------------------------------------------------------------------- no Ray


def test_preflight_fails_before_rendering(phantoms: Path, tmp_path: Path) -> None:
    from drrfarm.farm.driver import run_sweep

    out = tmp_path / "out"
    missing = base_spec(phantoms, out, volumes=[{"path": str(tmp_path / "nope.nii.gz")}])
    with pytest.raises(SpecError, match=r"volumes\[0\]\.path: file not found"):
        run_sweep(write_spec(tmp_path / "s1.yaml", missing), tracking=False, progress=False)
    bad_material = base_spec(phantoms, out, volumes=[{"path": str(phantoms / "a.nii.gz"),
                                                      "materials": {"above": "unobtainium"}}])
    with pytest.raises(SpecError, match=r"volumes\[0\]\.materials.*unobtainium"):
        run_sweep(write_spec(tmp_path / "s2.yaml", bad_material), tracking=False, progress=False)
    bad_preset = base_spec(phantoms, out, spectra={"presets": ["95KV_AL99"]})
    with pytest.raises(SpecError, match=r"spectra\.presets\[0\]"):
        run_sweep(write_spec(tmp_path / "s3.yaml", bad_preset), tracking=False, progress=False)
    with pytest.raises(StorageError):
        run_sweep(write_spec(tmp_path / "s4.yaml", base_spec(phantoms, out)), output="nosuchproto://x/y",
                  tracking=False, progress=False)
    assert not out.exists()
    # one output URL holds one dataset: a shard of another sweep there stops the run before rendering
    from drrfarm.sinks import ShardSink

    other = tmp_path / "other"
    ShardSink(str(other)).write_shard("0123456789ab-000000", np.ones((1, 4, 4), np.float32),
                                      [{"image_index": 0}], {})
    with pytest.raises(StorageError, match="holds shards of another sweep"):
        run_sweep(write_spec(tmp_path / "s5.yaml", base_spec(phantoms, other)), tracking=False, progress=False)


def test_worker_renders_what_the_backend_renders(phantoms: Path, tmp_path: Path) -> None:
    """RenderWorker without Ray: a committed shard holds exactly the bare backend's images (quantised)."""
    from drrfarm.farm.compile import camera_for, load_material_volume, physics_for
    from drrfarm.farm.worker import RenderWorker
    from drrfarm.render import get_backend
    from drrfarm.sinks import dequantize, read_shard
    from drrfarm.spectrum import get_spectrum

    spec = load_spec(write_spec(tmp_path / "s.yaml", base_spec(phantoms, tmp_path / "out",
                                                               detector={"model": "csi", "photons": [2000]})))
    plan = make_plan(spec)
    task = plan.task(plan.shards[3])
    w = RenderWorker(spec, run_id="run-x", backend="cpu")
    stats = w.render_shard(task)
    w.close()
    assert stats["shard_id"] == task.shard_id and stats["images"] == task.n_images and stats["volume_loaded"]
    assert stats["volume_info"]["sha256"] and stats["volume_info"]["shape"] == [32, 32, 32]
    assert w.resident_volumes() == [task.volume_index]

    _, mv, wfp = load_material_volume(spec.volumes[task.volume_index])
    backend = get_backend("cpu")
    handle = backend.prepare(mv, wfp)
    cams = [camera_for(spec, p) for p in task.poses]
    ref = backend.render(handle, cams, get_spectrum("mono:50"), physics_for(spec, 2000), list(task.seeds))
    key = f"parquet/{task.shard_id}.parquet"
    images, rows, meta = read_shard((tmp_path / "out" / key).read_bytes())
    got = dequantize(images, np.array([r["image_scale"] for r in rows]))
    np.testing.assert_allclose(got, np.clip(ref, 0, None), atol=rows[0]["image_scale"] / 2 + 1e-7)
    assert meta["mlflow_run_id"] == "run-x" and meta["spec_sha256"] == spec.sha256
    r = rows[0]
    assert r["seed"] == task.seeds[0] and r["image_index"] == task.image_indices[0]
    assert r["volume_id"] == spec.volumes[task.volume_index].id and r["photons"] == 2000
    np.testing.assert_allclose(np.reshape(r["P"], (3, 4)), cams[0].P)


def test_camera_cache_builds_each_pose_once_in_one_batch(tmp_path: Path) -> None:
    """A shard's cameras are built together, cached by pose, and equal the one-by-one cameras and columns."""
    from drrfarm.farm.compile import CameraCache, camera_columns, camera_for

    d = base_spec(tmp_path, tmp_path / "out")
    d["poses"] = {"carm": {"alpha_deg": {"range": [-30, 30], "num": 5}, "beta_deg": [0, 15],
                           "sdd_mm": [1000, 1100]}}
    spec = load_spec(write_spec(tmp_path / "s.yaml", d))
    plan = make_plan(spec)
    poses = [plan.poses.pose(i) for i in range(plan.n_poses)]
    cache = CameraCache(spec)
    first = cache.get_many(poses[:7])
    assert cache.get_many(poses[:7])[3][0] is first[3][0]  # cached: the same object
    for pose, (cam, cols) in zip(poses, cache.get_many(poses), strict=True):
        one = camera_for(spec, pose)
        assert cam.sdd_mm == pytest.approx(pose.sdd_mm)
        np.testing.assert_array_equal(cam.R, one.R)
        np.testing.assert_array_equal(cam.t, one.t)
        assert cols == camera_columns(one)
        assert cols["P"] == [float(x) for x in one.P.ravel()]
        assert cols["source_world_mm"] == [float(x) for x in one.source_world_mm.ravel()]


def test_worker_sets_the_switch_interval_of_its_process(phantoms: Path, tmp_path: Path) -> None:
    import sys

    from drrfarm.farm.worker import RenderWorker

    spec = load_spec(write_spec(tmp_path / "s.yaml", base_spec(phantoms, tmp_path / "out")))
    before = sys.getswitchinterval()
    try:
        RenderWorker(spec, backend="cpu", warm_up=False, switch_interval_s=0.0007).close()
        assert sys.getswitchinterval() == pytest.approx(0.0007)
        sys.setswitchinterval(before)
        RenderWorker(spec, backend="cpu", warm_up=False).close()
        assert sys.getswitchinterval() == before  # None leaves it
    finally:
        sys.setswitchinterval(before)


def test_worker_recovers_from_a_failed_write(phantoms: Path, tmp_path: Path) -> None:
    """A storage failure fails that shard only; the next shards (and the retry) are committed."""
    from drrfarm.farm.worker import RenderWorker

    spec = load_spec(write_spec(tmp_path / "s.yaml", base_spec(phantoms, tmp_path / "out")))
    plan = make_plan(spec)
    w = RenderWorker(spec, backend="cpu")
    real = w.sink.commit
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StorageError("simulated outage")
        return real(*args, **kwargs)

    w.sink.commit = flaky  # type: ignore[method-assign]
    with pytest.raises(StorageError, match="simulated outage"):
        w.render_shard(plan.task(0))
    assert w.render_shard(plan.task(1))["shard_id"] == plan.shards[1].shard_id
    assert w.render_shard(plan.task(0))["shard_id"] == plan.shards[0].shard_id  # the retry
    w.close()


def test_routing_prefers_actors_holding_the_volume(phantoms: Path, tmp_path: Path) -> None:
    from drrfarm.farm.driver import Progress, _Farm, _Slot

    spec = load_spec(write_spec(tmp_path / "s.yaml", base_spec(phantoms, tmp_path / "out")))
    plan = make_plan(spec)
    farm = _Farm(plan, [s.index for s in plan.shards], None, 2, False, "cpu", Progress(1, 0, enabled=False),
                 None, None, None, 60.0)
    s0, s1 = _Slot(0, None), _Slot(1, None)
    farm.slots = [s0, s1]
    first = plan.shards[farm._pick(s0)].volume_index
    second = plan.shards[farm._pick(s1)].volume_index
    assert first != second  # spread: the second actor takes the volume nobody holds
    for _ in range(5):
        assert plan.shards[farm._pick(s0)].volume_index == first
        assert plan.shards[farm._pick(s1)].volume_index == second


# --------------------------------------------------------------------------------------------- on Ray


def test_two_actors_every_image_exactly_once_then_noop(cluster: Any, phantoms: Path, tmp_path: Path) -> None:
    from drrfarm.farm.driver import run_sweep

    out = tmp_path / "out"
    spec_path = write_spec(tmp_path / "s.yaml", base_spec(phantoms, out, tracking={"enabled": True,
                                                                                   "experiment": "farm-test"}))
    events: list[dict[str, Any]] = []
    s = run_sweep(spec_path, num_actors=2, progress=False, callback=lambda e, d: events.append({"event": e, **d}))
    plan = make_plan(load_spec(spec_path))
    assert s.complete and s.failures == 0 and s.shards_rendered == plan.n_shards == 16
    assert s.images_rendered == plan.n_images == 32 and s.actors == 2
    assert_exactly_once(spec_path, str(out))
    done = [e for e in events if e["event"] == "shard_done"]
    assert len({e["actor_id"] for e in done}) == 2  # both actors worked
    assert all(e["backend"] == "cpu" and e["gpu_ids"] == [] for e in done)
    # provenance: the run id is in every shard, the manifest is finalised with the spec hash
    _, _, meta = read_dataset(str(out))
    assert s.run_id and {m["mlflow_run_id"] for m in meta.values()} == {s.run_id}
    import json

    doc = json.loads((out / "manifest.json").read_text())
    assert doc["extra"]["spec_sha256"] == plan.spec_sha256 and doc["totals"]["rows"] == 32
    # a finished sweep reruns as a no-op
    again = run_sweep(spec_path, num_actors=2, progress=False)
    assert again.complete and again.shards_rendered == 0 and again.shards_skipped == 16


def test_same_spec_twice_is_bit_identical_and_seed_matters(cluster: Any, phantoms: Path, tmp_path: Path) -> None:
    from drrfarm.farm.driver import run_sweep

    changes = {"detector": {"model": "photon_counting", "photons": [3000], "output": "transmission"},
               "poses": {"carm": {"alpha_deg": {"uniform": [-20, 20]}, "beta_deg": [0, 10], "samples": 3}},
               "output": {"url": "unused", "formats": ["parquet"], "shard_size": 3, "image_dtype": "float32"}}
    spec_a = write_spec(tmp_path / "a.yaml", base_spec(phantoms, tmp_path, **changes))
    spec_b = write_spec(tmp_path / "b.yaml", base_spec(phantoms, tmp_path, **{**changes, "seed": 6}))
    urls = [str(tmp_path / n) for n in ("run1", "run2", "seed6")]
    run_sweep(spec_a, output=urls[0], num_actors=2, progress=False)
    run_sweep(spec_a, output=urls[1], num_actors=1, progress=False)
    run_sweep(spec_b, output=urls[2], num_actors=2, progress=False)
    (i1, r1, _), (i2, r2, _), (i3, r3, _) = (read_dataset(u) for u in urls)
    assert sorted(i1) == sorted(i2) == list(range(24))
    for k in i1:
        assert i1[k].dtype == np.float32
        np.testing.assert_array_equal(i1[k], i2[k])
        assert r1[k] == r2[k]
    assert all(r1[k]["seed"] != r3[k]["seed"] for k in i1)
    assert all(not np.array_equal(i1[k], i3[k]) for k in i1)
    assert any(r1[k]["alpha_deg"] != r3[k]["alpha_deg"] for k in i1)  # random poses follow the seed


def test_actor_killed_mid_sweep(cluster: Any, phantoms: Path, tmp_path: Path) -> None:
    from drrfarm.farm.driver import run_sweep

    out = tmp_path / "out"
    spec_path = write_spec(tmp_path / "s.yaml", base_spec(phantoms, out, output={
        "url": str(out), "formats": ["parquet"], "shard_size": 1}))
    killed: list[int] = []

    def on_event(event: str, data: dict[str, Any]) -> None:
        if event == "shard_done" and not killed:
            killed.append(data["pid"])
            os.kill(data["pid"], signal.SIGKILL)  # the render actor's process dies mid-sweep

    s = run_sweep(spec_path, num_actors=2, progress=False, callback=on_event)
    assert killed and s.complete and s.failures == 0
    assert s.actor_errors >= 1 and s.retries >= 1
    assert_exactly_once(spec_path, str(out))


def test_worker_node_removed_mid_sweep(cluster: Any, phantoms: Path, tmp_path: Path) -> None:
    from drrfarm.farm.driver import run_sweep

    spare = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # room for the actor to come back
    cluster.wait_for_nodes()
    out = tmp_path / "out"
    spec_path = write_spec(tmp_path / "s.yaml", base_spec(phantoms, out, output={
        "url": str(out), "formats": ["parquet"], "shard_size": 1}))
    removed: list[str] = []

    def on_event(event: str, data: dict[str, Any]) -> None:
        if event == "shard_done" and not removed:
            node = next(n for n in cluster.worker_nodes if n.node_id == data["node_id"])
            removed.append(node.node_id)
            # lose the machine: its raylet and object store (remove_node), and the processes it ran
            cluster.remove_node(node, allow_graceful=False)
            os.kill(data["pid"], signal.SIGKILL)

    s = run_sweep(spec_path, num_actors=2, progress=False, callback=on_event)
    assert removed and s.complete and s.failures == 0 and s.actor_errors >= 1
    assert_exactly_once(spec_path, str(out))
    if spare not in cluster.worker_nodes:  # keep two worker nodes for later tests
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()


def test_driver_killed_then_resume(cluster: Any, phantoms: Path, tmp_path: Path) -> None:
    from drrfarm.farm.driver import run_sweep
    from drrfarm.sinks import read_manifest

    out = tmp_path / "out"
    spec_path = write_spec(tmp_path / "s.yaml", base_spec(
        phantoms, out, image={"size": 48, "pixel_mm": 6.0}, spectra={"mono_kev": [50, 60, 70]},
        output={"url": str(out), "formats": ["parquet"], "shard_size": 2}))
    total = make_plan(load_spec(spec_path)).n_shards  # 24 shards
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "drrfarm.cli", "sweep", str(spec_path), "--address", cluster.address,
         "--no-tracking", "--actors", "2", "--quiet"], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "_manifest").is_dir() and len(list((out / "_manifest").glob("*.json"))) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    time.sleep(3.0)  # Ray tears down the dead driver's actors
    before = set(read_manifest(str(out)))
    assert 0 < len(before) < total
    s = run_sweep(spec_path, num_actors=2, progress=False, tracking=False)
    assert s.complete and s.shards_skipped == len(before)
    assert set(s.rendered_shards) == set(make_plan(load_spec(spec_path)).shard_ids()) - before  # only the missing
    assert_exactly_once(spec_path, str(out))


def test_bad_volume_fails_its_shards_without_retrying(cluster: Any, phantoms: Path, tmp_path: Path) -> None:
    from drrfarm.farm.driver import run_sweep

    out = tmp_path / "out"
    spec_path = write_spec(tmp_path / "s.yaml", base_spec(phantoms, out, volumes=[
        {"id": "good", "path": str(phantoms / "a.nii.gz")}, {"id": "bad", "path": str(phantoms / "broken.nii.gz")}]))
    s = run_sweep(spec_path, num_actors=2, progress=False)
    plan = make_plan(load_spec(spec_path))
    bad = {sh.shard_id for sh in plan.shards if sh.volume_index == 1}
    assert not s.complete and s.status == "FAILED"
    assert set(s.failed_shards) == bad and s.retries == 0
    assert all("VolumeError" in s.errors[sid] for sid in bad)
    assert s.shards_rendered == plan.n_shards - len(bad)


def test_cli_sweep_on_its_own_local_ray(phantoms: Path, tmp_path: Path) -> None:
    """`drrfarm sweep` without --address starts (and stops) a local Ray on 127.0.0.1."""
    out = tmp_path / "out"
    spec_path = write_spec(tmp_path / "s.yaml", base_spec(phantoms, out, spectra={"mono_kev": [60]}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "drrfarm.cli", "sweep", str(spec_path), "--no-tracking", "--actors", "2"]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "complete" in r.stderr and "16/16 images" in r.stderr
    assert_exactly_once(spec_path, str(out))
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "already complete" in r.stderr
