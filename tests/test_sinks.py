"""drrfarm.sinks on local paths and memory://: encoding, keys, atomic commits, manifest, async writer, CLI."""

from __future__ import annotations

import argparse
import io
import json
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drrfarm.errors import StorageError
from drrfarm.sinks import (
    AsyncShardWriter,
    ShardSink,
    contact_sheet_png,
    decode_png16,
    finalize_manifest,
    open_store,
    read_manifest,
    read_shard,
    safe_key,
    safe_name,
)
from drrfarm.sinks.manifest import verify_shard
from drrfarm.sinks.parquet import ROW_COLUMNS, decode_images, dequantize
from drrfarm.sinks.png import encode_png16
from drrfarm.sinks.store import Store, check_shard_id, redact_url

FILE_META = {"spec_sha256": "ab" * 32, "drrfarm_version": "0.1.0", "mlflow_run_id": "run123", "sweep_id": "sw1"}


def make_rows(n: int, volume_id: str = "vol1", start: int = 0) -> list[dict]:
    """Rows with the contract keys (K/R as 3x3 arrays, P as 3x4); shard_id/height/width are filled in."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "image_index": start + i,
                "seed": 1000 + start + i,
                "sweep_id": "sw1",
                "volume_id": volume_id,
                "volume_sha256": "cd" * 32,
                "pixel_mm": 0.194,
                "K": np.array([[1000.0, 0, 31.5], [0, 1000.0, 23.5], [0, 0, 1]]),
                "R": np.eye(3),
                "t": np.array([0.0, 0.0, 530.0]),
                "P": np.arange(12, dtype=float).reshape(3, 4) + i,
                "source_world_mm": [0.0, -530.0, 0.0],
                "alpha_deg": 10.0 * i,
                "beta_deg": -5.0,
                "gamma_deg": 0.0,
                "isocentre_world_mm": [0.0, 0.0, 0.0],
                "sdd_mm": 1020.0,
                "kvp": 90.0,
                "al_mm": 4.0,
                "cu_mm": 0.0,
                "spectrum_name": "90KV_AL40",
                "mean_energy_kev": 48.25,
                "photons": 10000 if i % 2 else None,
                "detector": "ideal",
                "output": "line_integral",
            }
        )
    return rows


def make_images(n: int, h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, h, w)) * 7.0).astype(np.float32)


def flat(v) -> list:
    return np.asarray(v, dtype=float).reshape(-1).tolist() if v is not None else None


def assert_rows_match(written: list[dict], read: list[dict]) -> None:
    for w, r in zip(written, read, strict=True):
        for name, kind, _ in ROW_COLUMNS:
            if name in ("image_scale", "image_dtype", "image_codec", "height", "width", "shard_id"):
                continue
            if kind == "vec":
                assert r[name] == flat(w.get(name)), name
            else:
                assert r[name] == w.get(name), name


# ------------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "key", ["../x", "/abs/x", "a/../b", "a/./b", "a//b", "a\\b", "a b", "caf\u00e9", "", "s3://b/k", "a/\n", ".."]
)
def test_safe_key_rejects(key):
    with pytest.raises(StorageError):
        safe_key(key)


def test_safe_key_accepts_and_names_normalise():
    assert safe_key("png/vol_1/s0/00000001.png") == "png/vol_1/s0/00000001.png"
    for raw in ("../../etc/passwd", "..", "chest ct/1", "\u00fcml\u00e4ut", "-rf", ""):
        name = safe_name(raw)
        safe_key(name)  # one valid component
        assert "/" not in name and not name.startswith(".")
    for bad in ("../x", "a/b", ".hidden", "", "x" * 201, "a b"):
        with pytest.raises(StorageError):
            check_shard_id(bad)


def test_hostile_volume_id_stays_under_prefix(tmp_path):
    root = tmp_path / "out"
    sink = ShardSink(str(root), formats=("parquet", "png"))
    rows = make_rows(2, volume_id="../../../escaped")
    entry = sink.write_shard("s0", make_images(2), rows, FILE_META)
    assert all(k.startswith(("parquet/", "png/")) for k in entry.keys)
    assert not (tmp_path / "escaped").exists()
    outside = [p for p in tmp_path.rglob("*") if root not in p.parents and p != root]
    assert outside == []
    with pytest.raises(StorageError):
        sink.write_shard("../s1", make_images(1), make_rows(1), FILE_META)


# -------------------------------------------------------------------------------- parquet and png


@pytest.mark.parametrize("dtype", ["uint16", "float16", "float32"])
def test_parquet_round_trip_local(tmp_path, dtype):
    sink = ShardSink(str(tmp_path), formats=("parquet",), image_dtype=dtype, rows_per_row_group=2)
    images, rows = make_images(5), make_rows(5)
    entry = sink.write_shard("s0", images, rows, FILE_META)
    assert entry.rows == 5 and entry.keys == ("parquet/s0.parquet",)
    path = tmp_path / "parquet" / "s0.parquet"
    pf = pq.ParquetFile(path)
    assert pf.num_row_groups == 3
    meta = {k.decode(): v.decode() for k, v in pf.schema_arrow.metadata.items()}
    for k, v in FILE_META.items():
        assert meta[k] == v
    assert meta["drrfarm.image_dtype"] == dtype

    stored, read_rows, _ = read_shard(path.read_bytes())
    assert stored.dtype == np.dtype(dtype) and stored.shape == (5, 24, 32)
    values = dequantize(stored, np.array([r["image_scale"] for r in read_rows]))
    if dtype == "uint16":
        scale = np.array([r["image_scale"] for r in read_rows])[:, None, None]
        assert np.all(np.abs(values - images) <= scale * 0.5 + 1e-6)
    elif dtype == "float16":
        assert np.array_equal(stored, images.astype(np.float16))
    else:
        assert np.array_equal(stored, images)
    assert_rows_match(rows, read_rows)
    assert all(r["height"] == 24 and r["width"] == 32 and r["image_dtype"] == dtype for r in read_rows)
    codec = "zstd-delta" if dtype == "uint16" else "raw"  # uint16 images are coded one by one
    assert all(r["image_codec"] == codec for r in read_rows) and meta["drrfarm.image_encoding"] in (codec,
                                                                                                  "raw-le-bytes")
    # decoding the pyarrow table gives the same pixels
    assert np.array_equal(decode_images(pq.read_table(path)), stored)


def test_uint16_with_given_scale_and_clipping(tmp_path, caplog):
    sink = ShardSink(str(tmp_path))
    images = np.array([[[0.0, 1.0], [2.5, 1e9]], [[-3.0, np.nan], [0.5, 0.25]]], np.float32)
    sink.write_shard("s0", images, make_rows(2), FILE_META, image_scale=0.25)
    stored, rows, _ = read_shard((tmp_path / "parquet/s0.parquet").read_bytes())
    assert stored[0].tolist() == [[0, 4], [10, 65535]] and stored[1].tolist() == [[0, 0], [2, 1]]
    assert [r["image_scale"] for r in rows] == [0.25, 0.25]
    assert "clipped" in caplog.text
    # already-quantised uint16 input is stored unchanged with the scale from the rows
    q = np.array([[[1, 65535]]], np.uint16)
    rows = make_rows(1)
    rows[0]["image_scale"] = 0.5
    sink.write_shard("s1", q, rows, FILE_META)
    stored, rows, _ = read_shard((tmp_path / "parquet/s1.parquet").read_bytes())
    assert stored.tolist() == [[[1, 65535]]] and rows[0]["image_scale"] == 0.5
    with pytest.raises(StorageError, match="image_scale"):
        sink.write_shard("s2", q, make_rows(1), FILE_META)


def test_png_round_trip_bit_exact(tmp_path):
    img = np.arange(300 * 257, dtype=np.uint32).reshape(300, 257) * 7919 % 65536
    img = img.astype(np.uint16)
    img[0, :3] = [0, 32768, 65535]
    assert np.array_equal(decode_png16(encode_png16(img)), img)
    raw = encode_png16(img)
    assert raw[24] == 16 and raw[25] == 0  # IHDR bit depth 16, colour type 0 (grayscale)

    sink = ShardSink(str(tmp_path), formats=("parquet", "png"))
    images, rows = make_images(3), make_rows(3, volume_id="chest ct")
    entry = sink.write_shard("s7", images, rows, FILE_META)
    stored, read_rows, _ = read_shard((tmp_path / "parquet/s7.parquet").read_bytes())
    for i in range(3):
        png = tmp_path / "png" / "chest_ct" / "s7" / f"{i:08d}.png"
        assert np.array_equal(decode_png16(png.read_bytes()), stored[i])
        side = json.loads(png.with_suffix(".json").read_text())
        assert side["image_scale"] == read_rows[i]["image_scale"]
        assert side["K"] == flat(rows[i]["K"]) and side["seed"] == rows[i]["seed"]
        assert side["dataset"]["spec_sha256"] == FILE_META["spec_sha256"]
        assert side["png_key"] == f"png/chest_ct/s7/{i:08d}.png"
    assert len(entry.keys) == 1 + 2 * 3


def test_png_only_float_storage(tmp_path):
    sink = ShardSink(f"file://{tmp_path}", formats=("png",), image_dtype="float32")
    images = make_images(2)
    entry = sink.write_shard("s0", images, make_rows(2), FILE_META)
    assert entry.formats == ("png",) and not any(k.endswith(".parquet") for k in entry.keys)
    side = json.loads((tmp_path / "png/vol1/s0/00000001.json").read_text())
    q = decode_png16((tmp_path / "png/vol1/s0/00000001.png").read_bytes())
    assert np.max(np.abs(q * side["image_scale"] - images[1])) <= side["image_scale"] * 0.5 + 1e-6


# ---------------------------------------------------------------------------- manifest / atomicity


def test_manifest_and_finalize(tmp_path):
    url = str(tmp_path)
    sink = ShardSink(url, formats=("parquet", "png"))
    for s in range(3):
        sink.write_shard(f"s{s}", make_images(2, seed=s), make_rows(2, start=2 * s), FILE_META)
    m = read_manifest(url)
    assert sorted(m) == ["s0", "s1", "s2"] and m.total_rows == 6
    e = m["s1"]
    import hashlib

    for k in e.keys:
        data = (tmp_path / k).read_bytes()
        assert e.bytes[k] == len(data) and e.sha256[k] == hashlib.sha256(data).hexdigest()
    doc = finalize_manifest(url, {"spec_sha256": "ab" * 32, "mlflow_run_id": "run123"})
    assert doc["totals"] == {"shards": 3, "rows": 6, "bytes": m.total_bytes}
    # a loader with only manifest.json (no _manifest/ listing) sees the same shards
    for p in (tmp_path / "_manifest").iterdir():
        p.unlink()
    m2 = read_manifest(url)
    assert sorted(m2) == ["s0", "s1", "s2"] and m2.extra["mlflow_run_id"] == "run123" and m2.finalized_at
    assert [e.to_dict() for e in m2.values()] == [e.to_dict() for e in m.values()]


def test_manifest_read_again_fetches_only_changed_entries(tmp_path, monkeypatch):
    """A loader reads the manifest every epoch: unchanged entries come from this process's cache (their version in
    the listing is the same), a rewritten one is fetched again and read as it is now."""
    url = str(tmp_path)
    sink = ShardSink(url, formats=("parquet",))
    for s in range(3):
        sink.write_shard(f"s{s}", make_images(2, seed=s), make_rows(2, start=2 * s), FILE_META)
    fetched: list[str] = []
    real_get_many = Store.get_many

    def counting(self, keys):
        keys = list(keys)
        fetched.extend(keys)
        return real_get_many(self, keys)

    monkeypatch.setattr(Store, "get_many", counting)
    first = read_manifest(url)
    assert sorted(fetched) == ["_manifest/s0.json", "_manifest/s1.json", "_manifest/s2.json"]
    fetched.clear()
    again = read_manifest(url)
    assert fetched == [] and sorted(again) == sorted(first) == ["s0", "s1", "s2"]
    assert [again[k] for k in sorted(again)] == [first[k] for k in sorted(first)]
    sink.write_shard("s1", make_images(3, seed=9), make_rows(3, start=40), FILE_META)  # rewritten: 3 rows now
    now = read_manifest(url)
    assert fetched == ["_manifest/s1.json"] and now["s1"].rows == 3 and now.total_rows == 7


def test_injected_failure_before_commit_leaves_no_committed_shard(tmp_path, monkeypatch):
    url = str(tmp_path)
    sink = ShardSink(url, formats=("parquet", "png"))
    images, rows = make_images(3), make_rows(3)
    real_put = Store.put_bytes

    def failing_put(self, key, data):
        if key.startswith("_manifest/"):
            raise StorageError("injected: writer died before the commit")
        return real_put(self, key, data)

    monkeypatch.setattr(Store, "put_bytes", failing_put)
    with pytest.raises(StorageError, match="injected"):
        sink.write_shard("s0", images, rows, FILE_META)
    assert (tmp_path / "parquet/s0.parquet").exists()  # files are there ...
    assert "s0" not in read_manifest(url)  # ... but the shard is not committed
    assert not sink.is_committed("s0")
    from drrfarm.sinks import parquet_dataset

    assert parquet_dataset(url)[0] == []

    monkeypatch.setattr(Store, "put_bytes", real_put)
    entry = sink.write_shard("s0", images, rows, FILE_META)  # resume rewrites it
    assert read_manifest(url)["s0"].sha256 == entry.sha256
    assert verify_shard(open_store(url, probe=False), entry)

    # a failed *rewrite* of a committed shard un-commits it (no stale entry pointing at new bytes)
    monkeypatch.setattr(Store, "put_bytes", failing_put)
    with pytest.raises(StorageError):
        sink.write_shard("s0", images, rows, FILE_META)
    assert "s0" not in read_manifest(url)


def test_verify_detects_damage(tmp_path):
    sink = ShardSink(str(tmp_path))
    entry = sink.write_shard("s0", make_images(2), make_rows(2), FILE_META)
    store = open_store(str(tmp_path), probe=False)
    assert verify_shard(store, entry)
    p = tmp_path / "parquet/s0.parquet"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    assert not verify_shard(store, entry)
    assert "s0" in read_manifest(str(tmp_path), verify=True)  # size check only: same size
    p.write_bytes(bytes(data[:-10]))
    assert "s0" not in read_manifest(str(tmp_path), verify=True)


def test_memory_url_round_trip():
    url = "memory://drrfarm-test-sinks"
    sink = ShardSink(url, formats=("parquet", "png"))
    images = make_images(2)
    sink.write_shard("s0", images, make_rows(2), FILE_META)
    m = read_manifest(url)
    store = open_store(url, probe=False)
    stored, rows, _ = read_shard(store.get_bytes(m["s0"].keys_of("parquet")[0]))
    assert np.array_equal(decode_png16(store.get_bytes(m["s0"].keys_of("png")[1])), stored[1])
    store.fs.rm(store.root, recursive=True)


# ------------------------------------------------------------------------------------- preflight


def test_preflight_errors_name_the_url(tmp_path):
    with pytest.raises(StorageError, match=r"unknown URL scheme 'nosuch://'"):
        open_store("nosuch://bucket/x")
    with pytest.raises(StorageError) as ei:
        open_store("s3://AKIAEXAMPLE:supersecret@bucket/prefix")
    assert "supersecret" not in str(ei.value) and "credentials" in str(ei.value)
    assert redact_url("s3://a:b@c/d") == "s3://***@c/d"
    with pytest.raises(StorageError, match="not a valid S3 bucket name"):
        open_store("s3://Bad_Bucket!/x")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="a_file"):
        open_store(str(blocker / "sub"))  # parent is a regular file: cannot be created
    with pytest.raises(StorageError, match="not a directory"):
        open_store(str(blocker))
    with pytest.raises(StorageError):
        ShardSink("nosuch://x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_preflight_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="not writable"):
            open_store(str(ro))
    finally:
        ro.chmod(0o700)


def test_bad_shard_inputs(tmp_path):
    sink = ShardSink(str(tmp_path))
    with pytest.raises(StorageError, match="2 images but 1 rows"):
        sink.write_shard("s0", make_images(2), make_rows(1), FILE_META)
    rows = make_rows(1)
    rows[0]["K"] = [1.0, 2.0]
    with pytest.raises(StorageError, match="'K'"):
        sink.write_shard("s0", make_images(1), rows, FILE_META)
    rows = make_rows(1)
    rows[0]["height"] = 999
    with pytest.raises(StorageError, match="height"):
        sink.write_shard("s0", make_images(1), rows, FILE_META)
    with pytest.raises(StorageError):
        ShardSink(str(tmp_path), formats=("jpeg",))
    with pytest.raises(StorageError):
        ShardSink(str(tmp_path), image_dtype="int8")
    assert read_manifest(str(tmp_path)).total_rows == 0


# ---------------------------------------------------------------------------------- async writer


class _SlowSink:
    def __init__(self, fail_on: str | None = None) -> None:
        self.release = threading.Event()
        self.started: list[str] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def write_shard(self, shard_id, images, rows, file_metadata):
        with self.lock:
            self.started.append(shard_id)
        self.release.wait(10)
        if shard_id == self.fail_on:
            raise StorageError(f"boom in {shard_id}")
        return shard_id


def test_async_writer_backpressure_and_drain():
    sink = _SlowSink()
    w = AsyncShardWriter(sink, max_pending=2)
    w.submit("a", None, [], {})
    w.submit("b", None, [], {})
    blocked = threading.Event()
    done = threading.Event()

    def third():
        blocked.set()
        w.submit("c", None, [], {})
        done.set()

    t = threading.Thread(target=third)
    t.start()
    blocked.wait(5)
    time.sleep(0.3)
    assert not done.is_set() and w.pending == 2  # the third submit waits for a free slot
    sink.release.set()
    t.join(5)
    assert done.is_set()
    assert sorted(w.close()) == ["a", "b", "c"]


def test_async_writer_surfaces_errors():
    sink = _SlowSink(fail_on="b")
    sink.release.set()
    w = AsyncShardWriter(sink, max_pending=1)
    w.submit("a", None, [], {})
    w.submit("b", None, [], {})
    with pytest.raises(StorageError, match="boom in b"):
        for name in "cdefgh":
            w.submit(name, None, [], {})
    with pytest.raises(StorageError, match="boom in b"):
        w.close()


def test_async_writer_real_sink(tmp_path):
    sink = ShardSink(str(tmp_path), formats=("parquet", "png"))
    with AsyncShardWriter(sink, max_pending=2) as w:
        futs = [w.submit(f"s{i}", make_images(2, seed=i), make_rows(2, start=2 * i), FILE_META) for i in range(5)]
    assert [f.result().rows for f in futs] == [2] * 5
    assert sorted(read_manifest(str(tmp_path))) == [f"s{i}" for i in range(5)]


# -------------------------------------------------------------------------------- contact sheet/CLI


def test_contact_sheet_from_arrays_and_url(tmp_path):
    from PIL import Image

    png = contact_sheet_png(make_images(5, 40, 60), n=4, tile_px=64)
    im = Image.open(io.BytesIO(png))
    assert im.mode == "L" and im.size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)
    assert np.asarray(im).max() > 200
    sink = ShardSink(str(tmp_path), formats=("parquet",))
    sink.write_shard("s0", make_images(3), make_rows(3), FILE_META)
    sink.write_shard("s1", make_images(3, seed=1), make_rows(3, start=3), FILE_META)
    im = Image.open(io.BytesIO(contact_sheet_png(str(tmp_path), n=6, tile_px=32)))
    assert im.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)
    png_only = tmp_path / "pngonly"
    ShardSink(str(png_only), formats=("png",)).write_shard("s0", make_images(2), make_rows(2), FILE_META)
    assert contact_sheet_png(str(png_only), n=2).startswith(b"\x89PNG")


def test_inspect_command(tmp_path, capsys):
    from drrfarm.sinks.commands import add_commands

    url = str(tmp_path / "ds")
    sink = ShardSink(url, formats=("parquet", "png"))
    sink.write_shard("s0", make_images(2), make_rows(2), FILE_META)
    sink.write_shard("s1", make_images(2), make_rows(2, start=2), FILE_META)
    parser = argparse.ArgumentParser(prog="drrfarm")
    add_commands(parser.add_subparsers(dest="command"))
    sheet = tmp_path / "sheet.png"
    args = parser.parse_args(["inspect", url, "--contact-sheet", str(sheet), "--n", "3", "--verify"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "4 in 2 shard(s)" in out and FILE_META["spec_sha256"] in out and "run123" in out
    assert "image_scale:double" in out and "verify       OK" in out
    assert sheet.read_bytes().startswith(b"\x89PNG")
    args = parser.parse_args(["inspect", url, "--json"])
    assert args.handler(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["images"] == 4 and doc["mlflow_run_id"] == "run123" and doc["formats"] == ["parquet", "png"]
    args = parser.parse_args(["inspect", str(tmp_path / "empty")])
    with pytest.raises(StorageError, match="no committed shards"):
        args.handler(args)


def test_zstd_delta_codec_round_trips_every_value() -> None:
    """Extremes and wrap-around (row differences modulo 2^16) decode bit for bit; a corrupt cell names its row."""
    from drrfarm.sinks.parquet import decode_image, encode_image, encode_parquet, read_shard

    rng = np.random.default_rng(7)
    images = [rng.integers(0, 65536, (h, w), dtype=np.uint16) for h, w in ((1, 1), (3, 5), (17, 2), (64, 48))]
    images.append(np.tile(np.array([[0], [65535]], np.uint16), (8, 9)))
    for im in images:
        np.testing.assert_array_equal(decode_image(encode_image(im), *im.shape), im)
    shard = np.stack([rng.integers(0, 65536, (12, 10), dtype=np.uint16) for _ in range(3)])
    rows = [{"image_index": i, "height": 12, "width": 10, "image_dtype": "uint16"} for i in range(3)]
    back, read_rows, meta = read_shard(encode_parquet(shard, rows, {}))
    np.testing.assert_array_equal(back, shard)
    assert meta["drrfarm.image_encoding"] == "zstd-delta" and {r["image_codec"] for r in read_rows} == {"zstd-delta"}
    back, read_rows, meta = read_shard(encode_parquet(shard, rows, {}, image_codec="delta-planes"))
    np.testing.assert_array_equal(back, shard)
    assert meta["drrfarm.image_encoding"] == "delta-planes"
    assert {r["image_codec"] for r in read_rows} == {"delta-planes"}
    with pytest.raises(StorageError, match="uint16 only"):
        encode_parquet(shard.astype(np.float32), rows, {}, image_codec="delta-planes")
    raw, raw_rows, _ = read_shard(encode_parquet(shard, rows, {}, image_codec="raw"))
    np.testing.assert_array_equal(raw, shard)
    assert {r["image_codec"] for r in raw_rows} == {"raw"}
    for codec in ("zstd-delta", "delta-planes"):
        table = pq.read_table(pa.BufferReader(bytes(encode_parquet(shard, rows, {}, image_codec=codec))))
        cells = table.column("image").to_pylist()
        cells[1] = cells[1][:-7]
        broken = table.set_column(table.schema.get_field_index("image"), "image", pa.array(cells, pa.large_binary()))
        with pytest.raises(StorageError, match="row 1"):
            decode_images(broken)


def test_shards_without_a_codec_column_still_decode() -> None:
    """Shards written before per-image codecs (no image_codec column) are raw little-endian bytes."""
    from drrfarm.sinks.parquet import encode_parquet

    shard = np.arange(2 * 6 * 4, dtype=np.uint16).reshape(2, 6, 4)
    rows = [{"image_index": i, "height": 6, "width": 4, "image_dtype": "uint16"} for i in range(2)]
    table = pq.read_table(pa.BufferReader(bytes(encode_parquet(shard, rows, {}, image_codec="raw"))))
    old = table.drop_columns(["image_codec"])
    np.testing.assert_array_equal(decode_images(old), shard)


def test_images_given_as_delta_planes_store_the_same_bytes(tmp_path) -> None:
    """A GPU worker hands the sink the delta transform (DeltaPlanes) instead of pixels: the Parquet file is
    byte for byte the one made from the images; outputs that need pixels (PNG, raw codec) get them back."""
    from concurrent.futures import ThreadPoolExecutor

    from drrfarm.sinks.parquet import DeltaPlanes, delta_planes, encode_parquet

    rng = np.random.default_rng(3)
    shard = rng.integers(0, 65536, (5, 12, 10), dtype=np.uint16)
    shard[2] = 7  # flat rows: differences of zero
    planes = DeltaPlanes(np.stack([delta_planes(im) for im in shard]), 12, 10)
    assert planes.shape == shard.shape and len(planes) == 5
    np.testing.assert_array_equal(planes.images(), shard)
    rows = [{"image_index": i} for i in range(5)]
    with ThreadPoolExecutor(3) as pool:
        assert bytes(encode_parquet(planes, rows, {}, executor=pool)) == bytes(encode_parquet(shard, rows, {}))
    assert bytes(encode_parquet(planes, rows, {}, image_codec="raw")) == \
        bytes(encode_parquet(shard, rows, {}, image_codec="raw"))
    for formats in (("parquet",), ("parquet", "png")):
        sink = ShardSink(str(tmp_path / "-".join(formats)), formats=formats)
        a, entry_a = sink.prepare("s1", planes, [dict(r) for r in rows], {}, image_scale=1e-3)
        b, entry_b = sink.prepare("s1", shard, [dict(r) for r in rows], {}, image_scale=1e-3)
        assert {k: bytes(v) for k, v in a.items()} == {k: bytes(v) for k, v in b.items()}
        assert entry_a.sha256 == entry_b.sha256
    with pytest.raises(StorageError, match="delta planes"):
        DeltaPlanes(np.zeros((2, 100), np.uint8), 12, 10)
    with pytest.raises(StorageError, match="delta planes"):
        DeltaPlanes(np.zeros((2, 240), np.uint16), 12, 10)
    for codec in ("zstd-delta", "delta-planes"):  # the GPU's transform and the CPU's make the same file
        assert bytes(encode_parquet(planes, rows, {}, image_codec=codec)) == \
            bytes(encode_parquet(shard, rows, {}, image_codec=codec))
