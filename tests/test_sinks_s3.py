"""drrfarm.sinks against a real S3-compatible server (moto server mode on 127.0.0.1, see s3server.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_sinks import FILE_META, assert_rows_match, make_images, make_rows

from drrfarm.errors import StorageError
from drrfarm.sinks import (
    AsyncShardWriter,
    ShardSink,
    decode_png16,
    finalize_manifest,
    images_from_batch,
    open_store,
    parquet_dataset,
    read_manifest,
    read_shard,
)
from drrfarm.sinks.manifest import verify_shard
from drrfarm.sinks.store import RetryPolicy

pytest.importorskip("s3fs")

REPO = Path(__file__).resolve().parents[1]


def write_sweep(url: str, n_shards: int = 2, per: int = 3, formats=("parquet", "png")) -> dict:
    sink = ShardSink(url, formats=formats)
    written = {}
    for s in range(n_shards):
        images, rows = make_images(per, seed=s), make_rows(per, volume_id=f"vol{s % 2}", start=per * s)
        sink.write_shard(f"s{s:04d}", images, rows, FILE_META)
        written[f"s{s:04d}"] = (images, rows)
    return written


def test_s3_round_trip_pyarrow_and_png(s3_server):
    url = f"{s3_server.url}/runs/r1"
    written = write_sweep(url)
    m = read_manifest(url)
    assert sorted(m) == sorted(written) and m.total_rows == 6
    store = open_store(url, probe=False)
    assert store.url == "s3://drrfarm-test/runs/r1"
    for sid, (images, rows) in written.items():
        entry = m[sid]
        assert verify_shard(store, entry, checksums=True)
        stored, read_rows, meta = read_shard(store.get_bytes(entry.keys_of("parquet")[0]))
        assert meta["spec_sha256"] == FILE_META["spec_sha256"] and meta["mlflow_run_id"] == "run123"
        scale = np.array([r["image_scale"] for r in read_rows])[:, None, None]
        assert np.all(np.abs(stored * scale - images) <= scale * 0.5 + 1e-6)
        assert_rows_match(rows, read_rows)
        for i, key in enumerate(entry.keys_of("png")):
            assert np.array_equal(decode_png16(store.get_bytes(key)), stored[i])
    # the objects are really on the server (boto3 straight to the endpoint)
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="runs/r1/parquet/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "runs/r1/parquet/s0000.parquet",
        "runs/r1/parquet/s0001.parquet",
    ]
    # pyarrow.dataset through the same AWS env chain
    import pyarrow.dataset as ds

    paths, fs = parquet_dataset(url)
    table = ds.dataset(paths, filesystem=fs, format="parquet").to_table()
    assert table.num_rows == 6
    doc = finalize_manifest(url, {"mlflow_run_id": "run123"})
    assert doc["totals"]["rows"] == 6 and read_manifest(url).finalized_at


def test_s3_manifest_versions_come_from_the_listing(s3_server):
    """On S3 an entry's version is its ETag: the same after a second listing, another after a rewrite."""
    url = f"{s3_server.url}/runs/versions"
    write_sweep(url, n_shards=2, formats=("parquet",))
    store = open_store(url, probe=False)
    before = store.list_versions("_manifest")
    assert sorted(before) == ["_manifest/s0000.json", "_manifest/s0001.json"]
    assert all(v[0] == "etag" for v in before.values()) and store.list_versions("_manifest") == before
    sink = ShardSink(url, formats=("parquet",))
    sink.write_shard("s0001", make_images(4, seed=7), make_rows(4, volume_id="vol1", start=50), FILE_META)
    after = store.list_versions("_manifest")
    assert after["_manifest/s0000.json"] == before["_manifest/s0000.json"]
    assert after["_manifest/s0001.json"] != before["_manifest/s0001.json"]
    assert read_manifest(url)["s0001"].rows == 4


def test_s3_round_trip_ray_data(s3_server):
    ray = pytest.importorskip("ray")
    url = f"{s3_server.url}/runs/ray"
    written = write_sweep(url, n_shards=3, per=4)
    paths, fs = parquet_dataset(url)
    # address="local": always a private cluster, never one another process on this machine started
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        dataset = ray.data.read_parquet(paths, filesystem=fs)
        got = {}
        for batch in dataset.iter_batches(batch_size=5, batch_format="numpy"):
            imgs = images_from_batch(batch)
            for j, idx in enumerate(batch["image_index"]):
                got[int(idx)] = (imgs[j], float(batch["image_scale"][j]), batch["P"][j], str(batch["shard_id"][j]))
    finally:
        ray.shutdown()
    assert sorted(got) == list(range(12))
    for sid, (images, rows) in written.items():
        for i, row in enumerate(rows):
            img, scale, P, shard = got[row["image_index"]]
            assert shard == sid and img.dtype == np.uint16
            assert np.all(np.abs(img * scale - images[i]) <= scale * 0.5 + 1e-6)
            assert np.allclose(np.asarray(P, float), np.asarray(row["P"]).reshape(-1))


def test_s3_outage_during_writes_is_retried(s3_server, caplog):
    url = f"{s3_server.url}/runs/outage"
    sink = ShardSink(url, formats=("parquet", "png"))
    sink.store.retry = RetryPolicy(attempts=8, base_s=0.25, max_delay_s=2.0)
    shards = {f"s{i:04d}": (make_images(2, seed=i), make_rows(2, start=2 * i)) for i in range(6)}
    first = "s0000"
    sink.write_shard(first, *shards[first], FILE_META)

    s3_server.stop()
    restarter = threading.Timer(3.0, s3_server.start)
    restarter.start()
    t0 = time.monotonic()
    with AsyncShardWriter(sink, max_pending=2) as w:
        futs = [w.submit(sid, imgs, rows, FILE_META) for sid, (imgs, rows) in shards.items() if sid != first]
    restarter.join()
    assert time.monotonic() - t0 >= 2.5  # the writes really waited for the server
    assert all(f.result().rows == 2 for f in futs)
    assert "transient error" in caplog.text  # retries happened ...
    assert f"127.0.0.1:{s3_server.port}" not in caplog.text  # ... and never logged the endpoint
    assert "drrfarm-test-secret" not in caplog.text

    m = read_manifest(url, verify=True)
    assert sorted(m) == sorted(shards) and m.total_rows == 12
    store = open_store(url, probe=False)
    expected = sorted(k for e in m.values() for k in e.keys)
    on_server = [k for k in store.list("") if not k.startswith("_manifest/")]
    assert on_server == expected  # nothing lost, nothing duplicated, no stray temporaries
    for e in m.values():
        assert verify_shard(store, e, checksums=True)


def test_s3_preflight_missing_bucket_and_unreachable(s3_server, monkeypatch):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x.*bucket does not exist"):
        open_store("s3://no-such-bucket/x")
    with pytest.raises(StorageError, match="no-such-bucket"):
        ShardSink("s3://no-such-bucket/x")
    s3_server.stop()
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"s3://drrfarm-test/x.*cannot reach") as ei:
        open_store(f"{s3_server.url}/x")
    assert time.monotonic() - t0 < 30
    assert f"127.0.0.1:{s3_server.port}" not in str(ei.value)  # endpoints are not logged/echoed
    s3_server.start()
    open_store(f"{s3_server.url}/x")  # back up: fine again


def test_s3_preflight_bad_credentials(s3_server, monkeypatch):
    # moto accepts any key by default; enable_auth() makes it check keys against its IAM users
    key_id, secret = s3_server.enable_auth()
    open_store(f"{s3_server.url}/ok")  # the IAM user's key works
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(StorageError, match=r"s3://drrfarm-test/ok.*access denied") as ei:
        open_store(f"{s3_server.url}/ok")
    assert "wrong-secret-value" not in str(ei.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    with pytest.raises(StorageError, match="access denied"):
        ShardSink(f"{s3_server.url}/ok")


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_sinks import FILE_META, make_images, make_rows
    from drrfarm.sinks import ShardSink
    from drrfarm.sinks.store import Store

    url, marker, stage = sys.argv[1], sys.argv[2], sys.argv[3]
    sink = ShardSink(url, formats=("parquet", "png"))

    def hang(what):
        open(marker, "w").write(what)
        time.sleep(120)

    if stage == "before-rename":  # local: temp file written, os.replace not yet done
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith(".parquet"):
                hang(str(src))
            return real_replace(src, dst)
        os.replace = replace
    else:  # every file of the shard is in place, the manifest entry is not
        real_put = Store.put_bytes
        def put(self, key, data):
            if key.startswith("_manifest/"):
                hang(key)
            return real_put(self, key, data)
        Store.put_bytes = put
    sink.write_shard("s0001", make_images(3, seed=1), make_rows(3), FILE_META)
    """
)


@pytest.mark.parametrize("where", ["local-before-rename", "local-before-commit", "s3-before-commit"])
def test_writer_killed_mid_shard(where, tmp_path, request):
    if where.startswith("s3"):
        s3 = request.getfixturevalue("s3_server")
        url = f"{s3.url}/runs/killed"
    else:
        url = str(tmp_path / "ds")
    stage = where.split("-", 1)[1]
    marker = tmp_path / "marker"
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER.format(tests=str(REPO / "tests")))
    ShardSink(url).write_shard("s0000", make_images(3), make_rows(3), FILE_META)  # one good shard first

    proc = subprocess.Popen([sys.executable, str(script), url, str(marker), stage], cwd=REPO, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"writer never reached the kill point (rc={proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    m = read_manifest(url)
    assert sorted(m) == ["s0000"]  # the killed shard is not committed
    store = open_store(url, probe=False)
    keys = store.list("")
    if stage == "before-rename":
        assert "parquet/s0001.parquet" not in keys  # no partial object under a final key
        assert any(k.startswith("_tmp/") for k in keys)  # only an in-flight temporary
        assert store.clean_tmp(older_than_s=0) >= 1 and not store.list("_tmp")
    else:
        assert "parquet/s0001.parquet" in keys  # files present, yet uncommitted
    assert parquet_dataset(url)[0] == [store.path("parquet/s0000.parquet")]

    entry = ShardSink(url, formats=("parquet", "png")).write_shard(  # resume rewrites it
        "s0001", make_images(3, seed=1), make_rows(3), FILE_META
    )
    m = read_manifest(url)
    assert sorted(m) == ["s0000", "s0001"] and verify_shard(store, entry, checksums=True)


def test_s3_store_filesystem_keeps_its_bounded_retries_when_pickled(s3_server):
    """The store's filesystem travels to Ray and DataLoader workers by pickle: its retry bound travels with it."""
    import pickle

    import s3fs

    fs = open_store(f"{s3_server.url}/runs/pickled", probe=False).fs
    clone = pickle.loads(pickle.dumps(fs))
    assert fs.retries == clone.retries == 2 < s3fs.S3FileSystem.retries
    assert clone.client_kwargs == fs.client_kwargs
