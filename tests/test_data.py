"""drrfarm.data (Ray Data / PyTorch loaders, patient-level split) and drrfarm.augment, on CPU.

Datasets are written with the sinks' ShardSink directly (no farm): 3 volumes x 2 shards x 6 images.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from drrfarm.errors import StorageError
from drrfarm.sinks import ShardSink, open_store
from drrfarm.sinks.manifest import uncommit

H, W = 12, 20
SCALE = 16.0 / 65535
VOLUMES = ("vol-a", "vol-b", "vol-c")
ALL_VOLUMES = (*VOLUMES, "vol-z")  # vol-z: only in the uncommitted shard
FILE_META = {"spec_sha256": "ab" * 32, "mlflow_run_id": "datasetrun123", "sweep_id": "sw1"}


def _rows(vid: str, shard: int, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        k = 100 * ALL_VOLUMES.index(vid) + 10 * shard + i  # unique per image: the seed
        rows.append({
            "image_index": i, "seed": k, "volume_id": vid, "sweep_id": "sw1",
            "alpha_deg": float(k) / 7.0, "beta_deg": -float(k) / 11.0, "gamma_deg": 0.0,
            "kvp": (60.0, 120.0)[i % 2], "al_mm": 3.5, "spectrum_name": ("60KV_AL35", "120KV_AL43")[i % 2],
            "photons": None if i % 3 else 5000, "detector": "ideal", "output": "line_integral",
            "image_scale": SCALE, "pixel_mm": 0.5, "sdd_mm": 1020.0,
            "K": np.array([[100.0, 0, 9.5], [0, 100.0, 5.5], [0, 0, 1]]) + k,
            "R": np.eye(3), "t": [0.0, 0.0, 530.0 + k], "P": np.arange(12.0).reshape(3, 4) * k,
            "source_world_mm": [0.0, -530.0, float(k)],
            "isocentre_world_mm": None if k % 2 else [0.0, 0.0, 0.0],
        })
    return rows


def write_dataset(url: str, image_dtype: str = "uint16", per: int = 6) -> dict[int, tuple[np.ndarray, dict]]:
    """Writes the test dataset; returns {seed: (float image written, row)}; plus one uncommitted shard."""
    sink = ShardSink(url, image_dtype=image_dtype, rows_per_row_group=4)
    rng = np.random.default_rng(7)
    out = {}
    for vid in VOLUMES:
        for s in range(2):
            imgs = (rng.random((per, H, W)) * 9.0).astype(np.float32)
            rows = _rows(vid, s, per)
            sink.write_shard(f"{vid}-{s}", imgs, rows, FILE_META)
            out.update({r["seed"]: (imgs[i], r) for i, r in enumerate(rows)})
    # a shard whose files exist but whose manifest entry does not: never read
    sink.write_shard("zz-uncommitted", np.ones((2, H, W), np.float32), _rows("vol-z", 0, 2), FILE_META)
    uncommit(sink.store, "zz-uncommitted")
    return out


def quantised(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img.astype(np.float64) / SCALE), 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def uint16_ds(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("drrs") / "u16")
    return url, write_dataset(url)


# ---------------------------------------------------------------------------------------------------- Ray Data


def test_iter_torch_batches_bit_exact_and_aligned(ray_local, uint16_ds):
    import torch

    from drrfarm.data import read_drrs

    url, written = uint16_ds
    ds = read_drrs(url)
    seen = set()
    for batch in ds.iter_torch_batches(batch_size=5):
        img = batch["image"]
        assert img.dtype == torch.uint16 and img.ndim == 3 and tuple(img.shape[1:]) == (H, W)
        assert batch["K"].shape[1:] == (3, 3) and batch["P"].shape[1:] == (3, 4) and batch["t"].shape[1:] == (3,)
        assert "volume_id" not in batch  # strings only on request (torch cannot hold them)
        for j, seed in enumerate(batch["seed"].tolist()):
            src, row = written[seed]
            assert np.array_equal(img[j].numpy(), quantised(src))  # bit-exact
            assert batch["alpha_deg"][j].item() == row["alpha_deg"]
            assert batch["beta_deg"][j].item() == row["beta_deg"]
            assert batch["kvp"][j].item() == row["kvp"]
            assert batch["image_index"][j].item() == row["image_index"]
            np.testing.assert_array_equal(batch["P"][j].numpy(), np.asarray(row["P"]))
            np.testing.assert_array_equal(batch["K"][j].numpy(), np.asarray(row["K"]))
            if row["photons"] is None:
                assert np.isnan(batch["photons"][j].item())
            else:
                assert batch["photons"][j].item() == row["photons"]
            if row["isocentre_world_mm"] is None:
                assert torch.isnan(batch["isocentre_world_mm"][j]).all()
            seen.add(seed)
    assert seen == set(written)  # every committed image once; the uncommitted shard is invisible


def test_float_line_integral_within_quantisation(ray_local, uint16_ds):
    import torch

    from drrfarm.data import read_drrs

    url, written = uint16_ds
    ds = read_drrs(url, columns=["seed"], float_line_integral=True)
    n = 0
    for batch in ds.iter_torch_batches(batch_size=8):
        assert batch["image"].dtype == torch.float32
        for j, seed in enumerate(batch["seed"].tolist()):
            err = np.abs(batch["image"][j].numpy() - written[seed][0])
            assert err.max() <= SCALE / 2 + 1e-6
            n += 1
    assert n == len(written)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_float_storage_dtypes(ray_local, tmp_path, dtype):
    import torch

    from drrfarm.data import read_drrs

    url = str(tmp_path / dtype)
    written = write_dataset(url, image_dtype=dtype, per=3)
    got = 0
    for batch in read_drrs(url, columns=["seed"]).iter_torch_batches(batch_size=4):
        assert batch["image"].dtype == getattr(torch, dtype)
        for j, seed in enumerate(batch["seed"].tolist()):
            want = written[seed][0].astype(dtype)  # exactly the stored values
            assert np.array_equal(batch["image"][j].numpy(), want)
            got += 1
    assert got == len(written)
    one = read_drrs(url, columns=["seed"], float_line_integral=True).take(1)[0]
    assert one["image"].dtype == np.float32


def test_filters_push_down_and_prune(ray_local, uint16_ds):
    import pyarrow.compute as pc
    from ray.data.expressions import col

    from drrfarm.data import read_drrs

    url, written = uint16_ds
    want = {s for s, (_, r) in written.items() if r["volume_id"] == "vol-b" and r["kvp"] == 120.0}
    rows = read_drrs(url, ["seed", "volume_id", "kvp"], filter={"volume_id": "vol-b", "kvp": [120]}).take_all()
    assert {r["seed"] for r in rows} == want and {r["volume_id"] for r in rows} == {"vol-b"}
    by_ray = read_drrs(url, ["seed"], filter=col("seed") >= 200).take_all()
    assert {r["seed"] for r in by_ray} == {s for s in written if s >= 200}
    by_arrow = read_drrs(url, ["seed"], filter=pc.field("alpha_deg") < 10.0).take_all()
    assert {r["seed"] for r in by_arrow} == {s for s, (_, r) in written.items() if r["alpha_deg"] < 10.0}
    with pytest.raises(StorageError, match="unknown column 'kv'"):
        read_drrs(url, filter={"kv": [1]})
    with pytest.raises(StorageError, match="no committed shard holds"):
        read_drrs(url, filter={"volume_id": ["nobody"]})
    with pytest.raises(StorageError, match="unknown"):
        read_drrs(url, columns=["seed", "nope"])


def test_all_columns_with_strings(ray_local, uint16_ds):
    from drrfarm.data import read_drrs

    url, written = uint16_ds
    batch = next(iter(read_drrs(url, columns="all").iter_batches(batch_size=4, batch_format="numpy")))
    for j, seed in enumerate(batch["seed"]):
        row = written[int(seed)][1]
        assert batch["volume_id"][j] == row["volume_id"] and batch["spectrum_name"][j] == row["spectrum_name"]
        assert batch["image_dtype"][j] == "uint16" and batch["image_scale"][j] == SCALE


def test_not_a_dataset(tmp_path):
    from drrfarm.data import read_drrs

    with pytest.raises(StorageError, match="no committed shards"):
        read_drrs(str(tmp_path))


def test_dataset_info_has_provenance_run(uint16_ds):
    from drrfarm.data import dataset_info

    url, written = uint16_ds
    info = dataset_info(url)
    assert info["mlflow_run_id"] == "datasetrun123" and info["rows"] == len(written) and info["shards"] == 6
    assert info["volume_ids"] == list(VOLUMES) and info["height"] == [H]


# ------------------------------------------------------------------------------------------ patient-level split


def test_volume_split_rules():
    from drrfarm.data import volume_split

    ids = [f"p{i:03d}" for i in range(20)]
    tr, va = volume_split(ids, 0.25, seed=3)
    assert len(va) == 5 and not set(tr) & set(va) and sorted(tr + va) == ids
    assert volume_split(list(reversed(ids)), 0.25, seed=3) == (tr, va)  # order independent, deterministic
    assert volume_split(ids, 0.25, seed=4) != (tr, va)
    # two volumes: always one on each side, however small or large the fraction
    assert [len(s) for s in volume_split(["a", "b"], 0.01, 0)] == [1, 1]
    assert [len(s) for s in volume_split(["a", "b"], 0.99, 0)] == [1, 1]
    assert volume_split(["only"], 0.5, 0) == (["only"], [])
    with pytest.raises(ValueError):
        volume_split(ids, 1.0, 0)


def test_split_by_volume_no_leak(ray_local, uint16_ds):
    from drrfarm.data import dataset_volume_ids, read_drrs, split_by_volume, volume_split

    url, written = uint16_ds
    train, val = split_by_volume(url, val_fraction=0.34, seed=0, columns=["seed", "volume_id"])
    tr = train.take_all()
    va = val.take_all()
    tr_vols, va_vols = {r["volume_id"] for r in tr}, {r["volume_id"] for r in va}
    assert tr_vols and va_vols and not tr_vols & va_vols
    assert sorted(r["seed"] for r in tr + va) == sorted(written)  # every image on exactly one side
    for r in tr + va:
        assert written[r["seed"]][1]["volume_id"] == r["volume_id"]
    assert sorted(va_vols) == volume_split(dataset_volume_ids(url), 0.34, 0)[1]  # deterministic rule
    # from a dataset that carries volume_id: the same volumes on each side
    _, v2 = split_by_volume(read_drrs(url, columns=["volume_id"]), 0.34, seed=0)
    assert {r["volume_id"] for r in v2.take_all()} == va_vols
    with pytest.raises(StorageError, match="volume_id"):
        split_by_volume(read_drrs(url, columns=["seed"]), 0.3)


def test_streaming_split_for_ray_train(ray_local, uint16_ds):
    """Ray Train shards datasets with streaming_split(equal=True): each worker sees distinct rows."""
    from drrfarm.data import read_drrs

    url, written = uint16_ds
    its = read_drrs(url, columns=["seed"]).streaming_split(2, equal=True)
    got: list[list[int]] = [[], []]

    def consume(k: int) -> None:
        for b in its[k].iter_torch_batches(batch_size=4):
            assert b["image"].shape[1:] == (H, W)
            got[k].extend(b["seed"].tolist())

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(got[0]) == len(got[1]) == len(written) // 2
    assert not set(got[0]) & set(got[1]) and set(got[0]) | set(got[1]) == set(written)


def test_read_from_s3_with_storage_options(ray_local, s3_server):
    """An s3:// dataset on the local moto server; Ray workers get endpoint and keys via storage_options."""
    import os

    from drrfarm.data import read_drrs

    url = f"{s3_server.url}/runs/data"
    written = write_dataset(url, per=2)
    opts = {"key": os.environ["AWS_ACCESS_KEY_ID"], "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "region_name": "us-east-1"}}
    n = 0
    for batch in read_drrs(url, columns=["seed"], storage_options=opts).iter_torch_batches(batch_size=4):
        for j, seed in enumerate(batch["seed"].tolist()):
            assert np.array_equal(batch["image"][j].numpy(), quantised(written[seed][0]))
            n += 1
    assert n == len(written)


def test_torch_loader_workers_read_s3(s3_server):
    """DataLoader workers forked from a process that already used s3fs open their own filesystem."""
    import os

    from drrfarm.data import DrrIterableDataset

    url = f"{s3_server.url}/runs/torch"
    written = write_dataset(url, per=2)
    opts = {"key": os.environ["AWS_ACCESS_KEY_ID"], "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "region_name": "us-east-1"}}
    ds = DrrIterableDataset(url, ["seed"], storage_options=opts, batch_size=3)
    assert len(next(iter(ds))["seed"]) == 3  # the parent reads first (its s3fs session exists before the fork)
    seen = []
    for batch in ds.loader(num_workers=2, pin_memory=False):
        for j, s in enumerate(batch["seed"].tolist()):
            assert np.array_equal(batch["image"][j].numpy(), quantised(written[s][0]))
            seen.append(s)
    assert sorted(seen) == sorted(written)


# ---------------------------------------------------------------------------------------------- plain PyTorch


def test_torch_map_dataset(uint16_ds):
    import torch
    from torch.utils.data import DataLoader

    from drrfarm.data import DrrTorchDataset, read_metadata

    url, written = uint16_ds
    ds = DrrTorchDataset(url)
    assert len(ds) == len(written)
    item = ds[3]
    src, row = written[int(item["seed"])]
    assert item["image"].dtype == torch.uint16 and torch.equal(item["image"], torch.from_numpy(quantised(src)))
    assert item["volume_id"] == row["volume_id"] and item["P"].shape == (3, 4)
    loader = DataLoader(ds, batch_size=4, sampler=ds.sampler(shuffle=True, seed=1))
    seeds = []
    for b in loader:
        assert b["image"].shape[1:] == (H, W) and isinstance(b["volume_id"], list)
        for j, s in enumerate(b["seed"].tolist()):
            assert torch.equal(b["image"][j], torch.from_numpy(quantised(written[s][0])))
            assert b["volume_id"][j] == written[s][1]["volume_id"]
            assert b["alpha_deg"][j].item() == written[s][1]["alpha_deg"]
        seeds += b["seed"].tolist()
    assert sorted(seeds) == sorted(written)
    # filters, volume selection, float values, metadata only
    sub = DrrTorchDataset(url, ["seed"], filter={"kvp": [60]}, volume_ids=["vol-c"], float_line_integral=True)
    want = {s for s, (_, r) in written.items() if r["kvp"] == 60 and r["volume_id"] == "vol-c"}
    assert {int(sub[i]["seed"]) for i in range(len(sub))} == want
    assert sub[0]["image"].dtype == torch.float32
    assert np.abs(sub[0]["image"].numpy() - written[int(sub[0]["seed"])][0]).max() <= SCALE / 2 + 1e-6
    meta = read_metadata(url, ["seed", "volume_id"], volume_ids=["vol-a"])
    assert set(meta["volume_id"]) == {"vol-a"} and len(meta["seed"]) == 12


def test_torch_iterable_dataset_splits_workers_and_ranks(uint16_ds):
    from torch.utils.data import DataLoader

    from drrfarm.data import DrrIterableDataset

    url, written = uint16_ds
    ds = DrrIterableDataset(url, ["seed"], shuffle=True, seed=2)
    seeds = [s for b in DataLoader(ds, batch_size=3, num_workers=2) for s in b["seed"].tolist()]
    assert sorted(seeds) == sorted(written)  # two workers, each row once
    parts = [[int(r["seed"]) for r in DrrIterableDataset(url, ["seed"], rank=k, world_size=3)] for k in range(3)]
    assert sorted(sum(parts, [])) == sorted(written) and all(parts)
    epoch0 = [int(r["seed"]) for r in ds]
    assert [int(r["seed"]) for r in ds] == epoch0  # same seed and epoch: same order
    ds.set_epoch(1)
    assert sorted(int(r["seed"]) for r in ds) == sorted(epoch0)


def test_torch_dataset_other_fsspec_backend():
    """memory:// (any fsspec backend): the torch datasets need no Ray and no local files."""
    from drrfarm.data import DrrTorchDataset

    url = "memory://drrfarm-test-data/run"
    written = write_dataset(url, per=2)
    ds = DrrTorchDataset(url, ["seed"])
    assert len(ds) == len(written)
    for i in range(len(ds)):
        item = ds[i]
        assert np.array_equal(item["image"].numpy(), quantised(written[int(item["seed"])][0]))
    open_store(url, probe=False).fs.rm("/drrfarm-test-data", recursive=True)


# --------------------------------------------------------------------------------------- fast decode paths


def _old_undo(planes: np.ndarray, h: int, w: int) -> np.ndarray:
    """The row-by-row inverse of the delta transform that the blocked scan replaced (the reference)."""
    n = h * w
    d = np.empty(n, np.uint16)
    pairs = d.view(np.uint8).reshape(-1, 2)
    pairs[:, 1] = planes[:n]
    pairs[:, 0] = planes[n : 2 * n]
    image = d.reshape(h, w)
    for i in range(1, h):
        np.add(image[i], image[i - 1], out=image[i])
    return image


def _test_images(rng: np.random.Generator, h: int, w: int) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = 30000 + 20000 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
    return {
        "random": rng.integers(0, 65536, (h, w), dtype=np.uint16),  # every difference wraps somewhere
        "noisy": np.clip(smooth + rng.normal(0, 300, (h, w)), 0, 65535).astype(np.uint16),
        "noise-free": smooth.astype(np.uint16),
        "flat-0": np.zeros((h, w), np.uint16),
        "flat-max": np.full((h, w), 65535, np.uint16),
        "wrap": np.where((yy + xx) % 2, 65535, 0).astype(np.uint16),  # +-1 modulo 2^16 on every row
    }


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (2, 3), (3, 5), (17, 4), (31, 33), (64, 7), (257, 19), (512, 6)])
def test_undo_delta_planes_bit_exact(shape):
    from drrfarm.sinks.parquet import decode_image, delta_planes, encode_image, undo_delta_planes, undo_row_deltas

    h, w = shape
    for name, img in _test_images(np.random.default_rng(h * 1000 + w), h, w).items():
        planes = delta_planes(img)
        np.testing.assert_array_equal(_old_undo(planes, h, w), img, err_msg=name)
        np.testing.assert_array_equal(undo_delta_planes(planes, h, w), img, err_msg=name)
        out = np.full((h, w), 7, np.uint16)
        assert undo_delta_planes(planes, h, w, out) is out and np.array_equal(out, img)
        out[:] = 0
        assert decode_image(encode_image(img), h, w, out) is out and np.array_equal(out, img), name
        d = img.astype(np.int64)
        d[1:] -= img[:-1].astype(np.int64)
        np.testing.assert_array_equal(undo_row_deltas((d % 65536).astype(np.uint16)), img, err_msg=name)
    with pytest.raises(StorageError, match="C-contiguous"):
        undo_delta_planes(delta_planes(img), h, w, np.empty((h, w + 1), np.uint16))


def test_zstd_delta_cell_of_the_wrong_size_is_refused():
    from drrfarm.sinks.parquet import decode_image, encode_image

    cell = encode_image(np.arange(12, dtype=np.uint16).reshape(3, 4))
    with pytest.raises(StorageError, match="holds 24 bytes, not 40"):
        decode_image(cell, 4, 5)


def test_binary_cells_are_zero_copy_slices():
    import pyarrow as pa

    from drrfarm.sinks.parquet import binary_cells

    arr = pa.array([b"ab", None, b"", b"cde"], type=pa.large_binary())
    cells = binary_cells(pa.chunked_array([arr.slice(1), pa.array([b"z"], type=pa.large_binary())]))
    assert cells[0] is None and [bytes(c) for c in cells[1:]] == [b"", b"cde", b"z"]
    data = arr.buffers()[2]
    assert binary_cells(arr)[3].address == data.address + 2  # a view of the column's data buffer


def _mixed_codec_table(rng: np.random.Generator, h: int, w: int) -> tuple[list[np.ndarray], object]:
    """One table of shards in every codec: zstd-delta, delta-planes, raw, and an old raw shard without the
    ``image_codec`` column; noisy, flat and wrapping images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from drrfarm.sinks.parquet import encode_parquet

    images, tables = [], []
    for k, codec in enumerate(("zstd-delta", "delta-planes", "raw", None)):
        imgs = np.stack(list(_test_images(rng, h, w).values()))
        rows = [{"image_index": i, "seed": 100 * k + i, "height": h, "width": w, "image_dtype": "uint16",
                 "image_scale": SCALE * (1 + k)} for i in range(len(imgs))]
        buf = encode_parquet(imgs, rows, {}, image_codec=codec or "raw", rows_per_row_group=4)
        tab = pq.read_table(pa.BufferReader(bytes(buf)))
        if codec is None:
            tab = tab.drop_columns(["image_codec"])
        images.extend(imgs)
        tables.append(tab)
    return images, pa.concat_tables(tables, promote_options="permissive")


def test_decode_images_mixed_codecs_bit_exact():
    from drrfarm.data import decode_images_any_shape
    from drrfarm.sinks.parquet import decode_images, dequantize

    images, table = _mixed_codec_table(np.random.default_rng(3), 40, 24)
    assert set(table.column("image_codec").to_pylist()) == {"zstd-delta", "delta-planes", "raw", None}
    np.testing.assert_array_equal(decode_images(table), np.stack(images))
    scale = np.asarray(table.column("image_scale").to_numpy())
    f = decode_images_any_shape(table, float_line_integral=True)
    np.testing.assert_array_equal(f, dequantize(np.stack(images), scale))


def test_to_float_line_integrals_matches_cpu_dequantize():
    import torch

    from drrfarm.data import to_float_line_integrals
    from drrfarm.sinks.parquet import dequantize

    rng = np.random.default_rng(0)
    img = rng.integers(0, 65536, (3, 8, 5), dtype=np.uint16)
    img[0, 0, 0], img[1, 0, 0] = 65535, 32768  # the int16 view's negative range
    scale = np.array([SCALE, 3.5e-4, np.nan])
    want = dequantize(img, np.where(np.isfinite(scale), scale, 1.0))
    for batch in ({"image": torch.from_numpy(img), "image_scale": torch.from_numpy(scale)},
                  {"image": img, "image_scale": scale}):
        got = to_float_line_integrals(batch, "cpu")
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        np.testing.assert_array_equal(got.numpy(), want)  # bit for bit
    f16 = (img % 60000).astype(np.float16)
    np.testing.assert_array_equal(
        to_float_line_integrals({"image": torch.from_numpy(f16), "image_scale": np.ones(3)}).numpy(),
        f16.astype(np.float32))
    parts = to_float_line_integrals({"image": [img[0], img[1, :4]], "image_scale": scale[:2]})
    np.testing.assert_array_equal(parts[1].numpy(), want[1, :4])
    with pytest.raises(StorageError, match="image_scale"):
        to_float_line_integrals({"image": img})


@pytest.fixture(scope="module")
def mixed_ds(tmp_path_factory):
    """A dataset whose shards use every codec (delta-planes: the sinks' default, raw, zstd-delta, and an old raw
    shard without the image_codec column)."""
    import functools

    import pyarrow.parquet as pq

    import drrfarm.sinks.parquet as parquet

    url = str(tmp_path_factory.mktemp("mixed") / "ds")
    rng = np.random.default_rng(11)
    written: dict[int, np.ndarray] = {}
    codecs = ("delta-planes", "raw", "zstd-delta", "old-raw")
    for k, codec in enumerate(codecs):
        imgs = np.stack(list(_test_images(rng, 36, 20).values()) * 2)  # 12 rows: 3 row groups of 4
        rows = [{"image_index": i, "seed": 1000 * k + i, "volume_id": f"v{k}", "alpha_deg": float(i),
                 "beta_deg": float(k), "image_scale": SCALE, "kvp": (60.0, 120.0)[i % 2]} for i in range(len(imgs))]
        original = parquet.encode_parquet  # the sink's codec, chosen per shard
        parquet.encode_parquet = functools.partial(original, image_codec="raw" if "raw" in codec else codec)
        try:
            sink = ShardSink(url, rows_per_row_group=4)
            sink.write_shard(f"s-{codec}", imgs.astype(np.float32) * SCALE, rows, FILE_META)
        finally:
            parquet.encode_parquet = original
        if codec == "old-raw":  # files written before the image_codec column existed
            path = sink.store.path(f"parquet/s-{codec}.parquet")
            tab = pq.read_table(path).drop_columns(["image_codec"])
            pq.write_table(tab, path, row_group_size=4)
        written.update({1000 * k + i: im for i, im in enumerate(imgs)})
    return url, written


def test_mixed_codecs_through_every_reader(ray_local, mixed_ds):
    import torch

    from drrfarm.data import DrrIterableDataset, DrrTorchDataset, read_drrs, to_float_line_integrals

    url, written = mixed_ds
    for ds in (read_drrs(url, ["seed", "image_scale"]), read_drrs(url, ["seed", "image_scale"], override_num_blocks=2)):
        seen = []
        for batch in ds.iter_torch_batches(batch_size=5):
            assert batch["image"].dtype == torch.uint16
            f = to_float_line_integrals(batch)
            for j, s in enumerate(batch["seed"].tolist()):
                assert np.array_equal(batch["image"][j].numpy(), written[s])
                assert np.array_equal(f[j].numpy(), written[s].astype(np.float32) * np.float32(SCALE))
                seen.append(s)
        assert sorted(seen) == sorted(written)
    floats = read_drrs(url, ["seed"], float_line_integral=True).take_all()
    for r in floats:
        assert np.array_equal(r["image"], written[r["seed"]].astype(np.float32) * np.float32(SCALE))
    tds = DrrTorchDataset(url, ["seed"])
    for i in range(len(tds)):
        assert np.array_equal(tds[i]["image"].numpy(), written[int(tds[i]["seed"])])
    seen = []
    for batch in DrrIterableDataset(url, ["seed"], batch_size=5):
        for j, s in enumerate(batch["seed"].tolist()):
            assert np.array_equal(batch["image"][j].numpy(), written[s])
            seen.append(s)
    assert sorted(seen) == sorted(written)


def test_torch_loader_persistent_workers_follow_set_epoch(uint16_ds):
    """loader() keeps its workers between epochs: set_epoch still reaches them (a new shuffle each epoch, the
    order a fresh loader gives for that epoch)."""
    from drrfarm.data import DrrIterableDataset

    url, written = uint16_ds
    ds = DrrIterableDataset(url, ["seed"], batch_size=4, shuffle=True, seed=5)
    kept = ds.loader(num_workers=2, pin_memory=False)  # persistent_workers=True
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        orders.append([s for b in kept for s in b["seed"].tolist()])
        fresh = ds.loader(num_workers=2, pin_memory=False, persistent_workers=False)
        assert [s for b in fresh for s in b["seed"].tolist()] == orders[-1]
    assert all(sorted(o) == sorted(written) for o in orders)
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert ds.epoch == 2


def test_torch_loader_slots_give_the_plain_loaders_batches(uint16_ds):
    """loader() hands batches over in reusable shared-memory slots: the same batches, in the same order, as
    through fresh shared memory, over epochs (slots reused, each worker's slot count bounded), after an epoch cut
    short (the dropped batches free their slots), and with a consumer slower than the workers (back-pressure)."""
    import time

    import torch

    from drrfarm.data import DrrIterableDataset

    url, written = uint16_ds
    ds = DrrIterableDataset(url, ["seed"], batch_size=4, shuffle=True, seed=7)
    slots = ds.loader(num_workers=2, pin_memory=False, prefetch_factor=2, timeout=60)
    plain = ds.loader(num_workers=2, pin_memory=False, prefetch_factor=2, reuse_shared_memory=False)
    ring = slots.dataset._ring
    assert ring is not None and ring.slots == 3 and plain.dataset._ring is None
    for epoch in range(3):
        ds.set_epoch(epoch)
        if epoch == 1:  # cut short: the rest of the epoch is dropped unread
            next(iter(slots))
            continue
        got = [(b["seed"].tolist(), b["image"].clone()) for b in slots]
        want = [(b["seed"].tolist(), b["image"]) for b in plain]
        assert [g[0] for g in got] == [w[0] for w in want] and sorted(sum((g[0] for g in got), [])) == sorted(written)
        assert all(torch.equal(g[1], w[1]) for g, w in zip(got, want, strict=True))
        for seeds, images in got:
            for j, s in enumerate(seeds):
                assert torch.equal(images[j], torch.from_numpy(quantised(written[s][0])))
    assert 0 < len(ring._mapped) <= 2 * 3 < len(got)  # the buffers were reused
    assert (ring.state.numpy() == 0).all()  # every slot copied out and free
    slow = ds.loader(num_workers=2, pin_memory=False, prefetch_factor=1, timeout=60)  # 2 slots per worker
    seen = []
    for b in slow:
        time.sleep(0.05)
        seen += b["seed"].tolist()
    assert sorted(seen) == sorted(written)
    transformed = DrrIterableDataset(url, ["seed"], batch_size=4, transform=lambda b: b).loader(num_workers=1)
    assert transformed.dataset._ring is None  # a transform in the worker sees plain tensors


@pytest.mark.gpu
def test_torch_loader_slots_pinned(uint16_ds):
    """With pin_memory the pin thread copies each batch out of its slot into page-locked memory."""
    import torch

    from drrfarm.data import DrrIterableDataset

    url, written = uint16_ds
    ds = DrrIterableDataset(url, ["seed"], batch_size=4, float_line_integral=True)
    seen = []
    for b in ds.loader(num_workers=2, pin_memory=True, timeout=60):
        assert isinstance(b["image"], torch.Tensor) and b["image"].is_pinned()
        for j, s in enumerate(b["seed"].tolist()):
            assert np.abs(b["image"][j].numpy() - written[s][0]).max() <= SCALE / 2 + 1e-6
            seen.append(s)
    assert sorted(seen) == sorted(written)


def test_slot_ring_reuses_grows_and_frees_slots():
    import pickle

    import torch

    from drrfarm.data.batch_slots import SlotRing, materialize_batch

    class Loader:  # stands in for the DataLoader that keeps a ring known while it lives
        pass

    ring = SlotRing(workers=2, slots=2)
    slot, buf, new = ring.acquire(1, 100)
    assert (slot, new, buf.numel()) == (0, True, 100) and ring.state.numpy().tolist() == [[0, 0], [1, 0]]
    buf[:8].view(torch.uint16).copy_(torch.arange(4, dtype=torch.int32).to(torch.uint16))
    tok = ring.token(1, slot, (1, 2, 2), torch.uint16, new)
    with pytest.raises(RuntimeError, match="process that owns"):
        tok.materialize()  # a worker-side token: not readable
    owner = Loader()
    ring.register(owner)
    arrived = pickle.loads(pickle.dumps(tok))
    batch = materialize_batch({"image": arrived, "seed": [3]})
    assert batch["image"].tolist() == [[[0, 1], [2, 3]]] and ring.state.numpy()[1].tolist() == [0, 0]
    again = ring.acquire(1, 64)  # the free slot 0 again, big enough: no new buffer
    assert again[0] == 0 and again[2] is False and again[1].data_ptr() == buf.data_ptr()
    bigger = ring.acquire(1, 400)  # slot 0 taken: slot 1, a new buffer
    assert bigger[0] == 1 and bigger[2] is True and ring.allocations == 2
    dropped = pickle.loads(pickle.dumps(ring.token(1, 1, (1, 10, 10), torch.uint16, bigger[2])))
    assert ring.state.numpy()[1, 1] == 1
    del dropped  # dropped unread: its slot is free again
    assert ring.state.numpy()[1, 1] == 0
    stale = ring.token(1, 0, (1, 2, 2), torch.uint16, False)
    ring._mapped[(1, 0)] = ("other", buf)
    with pytest.raises(RuntimeError, match="never received"):
        pickle.loads(pickle.dumps(stale)).materialize()
    ring.reset(1)
    assert ring.state.numpy().tolist() == [[0, 0], [0, 0]]
    del owner  # the loader gone: tokens of its ring can no longer be read here
    with pytest.raises(RuntimeError, match="process that owns"):
        pickle.loads(pickle.dumps(ring.token(1, 0, (1, 2, 2), torch.uint16, True))).materialize()


def test_torch_iterable_batches_workers_and_floats(uint16_ds):
    import torch

    from drrfarm.data import DrrIterableDataset

    url, written = uint16_ds
    ds = DrrIterableDataset(url, ["seed", "alpha_deg", "volume_id", "P"], batch_size=5, shuffle=True, seed=3)
    loader = ds.loader(num_workers=2, pin_memory=False)
    sizes, seeds = [], []
    for batch in loader:
        assert batch["image"].dtype == torch.uint16 and batch["image"].shape[1:] == (H, W)
        assert isinstance(batch["volume_id"], list) and batch["P"].shape[1:] == (3, 4)
        sizes.append(len(batch["seed"]))
        for j, s in enumerate(batch["seed"].tolist()):
            src, row = written[s]
            assert torch.equal(batch["image"][j], torch.from_numpy(quantised(src)))
            assert batch["alpha_deg"][j].item() == row["alpha_deg"] and batch["volume_id"][j] == row["volume_id"]
            seeds.append(s)
    assert sorted(seeds) == sorted(written)  # every row once over two workers
    assert sum(n < 5 for n in sizes) <= 2 and max(sizes) == 5  # only each worker's last batch is short
    ds.set_epoch(1)
    assert sorted(s for b in loader for s in b["seed"].tolist()) == sorted(written)
    # one process, float line integrals, drop_last, more workers than row groups (row groups split in parts)
    flt = DrrIterableDataset(url, ["seed"], float_line_integral=True, batch_size=4, drop_last=True)
    got = [b for b in flt]
    assert all(len(b["seed"]) == 4 for b in got) and len(got) == len(written) // 4
    for b in got:
        assert b["image"].dtype == torch.float32
        for j, s in enumerate(b["seed"].tolist()):
            assert np.abs(b["image"][j].numpy() - written[s][0]).max() <= SCALE / 2 + 1e-6
    many = DrrIterableDataset(url, ["seed"], batch_size=2, rank=0, world_size=1)
    parts = [[int(s) for b in DrrIterableDataset(url, ["seed"], batch_size=2, rank=k, world_size=40) for s in b["seed"]]
             for k in range(40)]
    assert sorted(sum(parts, [])) == sorted(written) and sum(bool(p) for p in parts) > len(many.index.groups)


def test_read_tasks_follow_files_row_groups_and_cpus(uint16_ds):
    from drrfarm.data import open_dataset_store, plan_read_tasks
    from drrfarm.data.dataset import committed_manifest

    url, written = uint16_ds
    store = open_dataset_store(url)
    entries = list(committed_manifest(store).values())  # 6 shards of 6 rows, row groups of 4 + 2
    per_file = plan_read_tasks(store, entries, cpus=2)  # 6 files >= 2 x 2 CPUs: a task per file
    assert len(per_file) == 6 and all(len(t) == 1 and t[0].row_groups is None for t in per_file)
    per_group = plan_read_tasks(store, entries, cpus=16)  # fewer files than 2 x 16 CPUs: a task per row group
    assert len(per_group) == 12 and sorted(t[0].rows for t in per_group) == [2] * 6 + [4] * 6
    assert {(t[0].path, t[0].row_groups) for t in per_group} == {(e.path, (g,)) for e in
                                                                 (t[0] for t in per_file) for g in (0, 1)}
    merged = plan_read_tasks(store, entries, tasks=4)  # asked for 4: consecutive files merged
    assert len(merged) == 3 and sum(len(t) for t in merged) == 6
    assert sum(u.rows for t in plan_read_tasks(store, entries, tasks=100) for u in t) == len(written)


def test_filters_pushed_into_the_read_tasks(ray_local, uint16_ds):
    from ray.data.expressions import col

    from drrfarm.data import read_drrs

    url, written = uint16_ds
    ds = read_drrs(url, ["seed"]).filter(expr=col("kvp") == 60.0)  # kvp not among the columns: pushed down
    assert sorted(r["seed"] for r in ds.take_all()) == sorted(s for s, (_, r) in written.items() if r["kvp"] == 60)
    by_str = read_drrs(url, ["seed"], filter="seed < 110").take_all()
    assert sorted(r["seed"] for r in by_str) == sorted(s for s in written if s < 110)
    shard = read_drrs(url, ["seed"], filter={"shard_id": ["vol-b-1"]}).take_all()
    assert sorted(r["seed"] for r in shard) == sorted(s for s, (_, r) in written.items()
                                                      if r["volume_id"] == "vol-b" and s % 100 >= 10)
    empty = read_drrs(url, ["seed"], filter={"kvp": [99.0]})
    assert empty.count() == 0 and list(empty.iter_torch_batches(batch_size=4)) == []


# ------------------------------------------------------------------------------------------------ augmentations


def test_window_level():
    import torch

    from drrfarm.augment import random_window_level, window_level

    x = torch.linspace(0, 4, 9).reshape(1, 3, 3).repeat(2, 1, 1)
    y = window_level(x, level=torch.tensor([2.0, 1.0]), width=2.0)
    assert torch.allclose(y[0].flatten(), ((x[0].flatten() - 1.0) / 2).clamp(0, 1))
    assert torch.allclose(y[1].flatten(), (x[1].flatten() / 2).clamp(0, 1))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(random_window_level(x, (1, 3), (1, 4), generator=g1),
                       random_window_level(x, (1, 3), (1, 4), generator=g2))
    with pytest.raises(ValueError):
        window_level(x, 1.0, 0.0)


@pytest.mark.parametrize("source_photons", [None, 50_000.0])
def test_poisson_renoise_statistics(source_photons):
    """Mean transmission preserved; variance of the counts = N tau (Poisson), also after thinning."""
    import torch

    from drrfarm.augment import poisson_renoise

    g = torch.Generator().manual_seed(0)
    L = torch.tensor([0.5, 2.0]).reshape(2, 1, 1).expand(2, 128, 128).contiguous()
    if source_photons is not None:
        L = poisson_renoise(L, source_photons, generator=g)  # a noisy "stored" image at N0
    N = torch.tensor([1000.0, 4000.0])
    out = poisson_renoise(L, N, source_photons=source_photons, generator=g)
    assert out.shape == L.shape and out.dtype == torch.float32
    for b, (l_true, n) in enumerate(zip((0.5, 2.0), N.tolist(), strict=True)):
        counts = torch.exp(-out[b].double()) * n
        expected = n * np.exp(-l_true)
        m = counts.mean().item()
        v = counts.var().item()
        assert abs(m - expected) < 4 * np.sqrt(expected / counts.numel())  # mean preserved
        # variance of Poisson: equals the mean; sample variance std ~ sqrt(2/n) relative
        assert abs(v / expected - 1) < 5 * np.sqrt(2 / counts.numel()) + 0.01
    # seeded
    a = poisson_renoise(L, N, source_photons=source_photons, generator=torch.Generator().manual_seed(1))
    b = poisson_renoise(L, N, source_photons=source_photons, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    if source_photons is not None:
        with pytest.raises(ValueError, match="exceed"):
            poisson_renoise(L, 2 * source_photons, source_photons=source_photons)


def test_detector_blur_preserves_sum_and_width():
    import torch

    from drrfarm.augment import detector_blur

    x = torch.zeros(3, 41, 41, dtype=torch.float64)
    x[:, 20, 20] = 5.0
    sig = torch.tensor([0.0, 1.0, 2.5])
    y = detector_blur(x, sig, padding="zeros")
    assert torch.allclose(y.sum(dim=(1, 2)), x.sum(dim=(1, 2)), rtol=1e-12)
    assert torch.equal(y[0], x[0])  # sigma 0: unchanged
    grid = torch.arange(41, dtype=torch.float64) - 20
    for b in (1, 2):
        p = y[b] / y[b].sum()
        var_u = (p.sum(0) * grid**2).sum().item()
        var_v = (p.sum(1) * grid**2).sum().item()
        s2 = sig[b].item() ** 2  # a sampled Gaussian truncated at 4 sigma: variance within 1 %
        assert abs(var_u / s2 - 1) < 0.01 and abs(var_v / s2 - 1) < 0.01
    flat = torch.full((2, 16, 16), 3.0)
    assert torch.allclose(detector_blur(flat, 1.5), flat)  # reflect: constant stays constant
    rand = torch.rand(2, 16, 16, dtype=torch.float64)
    assert torch.allclose(detector_blur(rand, 1.2, padding="circular").sum((1, 2)), rand.sum((1, 2)))
    li = torch.full((1, 16, 16), 1.0)
    assert torch.allclose(detector_blur(li, 1.0, line_integral=True), li, atol=1e-6)


def test_xray_augment_seeded_and_shapes():
    import torch

    from drrfarm.augment import XrayAugment

    x = torch.rand(4, 32, 32) * 3
    kw = {"blur_sigma_px": (0.0, 1.0), "photons": (500, 5000), "window": ((0.5, 2.0), (1.0, 3.0))}
    a, b = XrayAugment(seed=9, **kw), XrayAugment(seed=9, **kw)
    ya, yb = a(x), b(x)
    assert ya.shape == x.shape and torch.equal(ya, yb) and ya.min() >= 0 and ya.max() <= 1
    src = torch.tensor([float("nan"), 1000.0, 1000.0, float("nan")])
    y = XrayAugment(photons=(2000, 3000), seed=1)(x, src)  # capped at the source's 1000 photons: no error
    assert torch.isfinite(y).all()
