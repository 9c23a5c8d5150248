"""Reading Parquet shards from an object store in few requests (drrfarm.data.parquet_io): the requests Ray Data's
read tasks and the torch dataset make on a real S3 server (moto on 127.0.0.1, counted server side), the rows
they return against the same dataset read from the local disk, and ParquetShard on fsspec's memory filesystem.
"""

from __future__ import annotations

import collections
import io
import os
import re

import numpy as np
import pytest
from test_data import H, W, quantised, write_dataset

from drrfarm.errors import StorageError

COLUMNS = ["seed", "alpha_deg", "kvp", "photons", "P"]


def _opts() -> dict:
    return {"key": os.environ["AWS_ACCESS_KEY_ID"], "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "region_name": "us-east-1"}}


def _parquet_requests(requests: list) -> dict[str, list[tuple[str, str | None]]]:
    """(method, Range) of the requests for each .parquet object, by file name."""
    out: dict[str, list[tuple[str, str | None]]] = collections.defaultdict(list)
    for method, path, rng in requests:
        name = path.split("?", 1)[0].rsplit("/", 1)[-1]
        if name.endswith(".parquet"):
            out[name].append((method, rng))
    return out


def _range_bytes(rng: str | None, size: int) -> int:
    if rng is None:
        return size
    a, b = re.fullmatch(r"bytes=(\d*)-(\d*)", rng).groups()
    return (int(b) if b else size - 1) - (int(a) if a else size - int(b)) + 1


def _rows_by_seed(batches) -> dict[int, tuple]:
    out = {}
    for b in batches:
        for j, seed in enumerate(np.asarray(b["seed"]).tolist()):
            out[seed] = (np.asarray(b["image"][j]).copy(),
                         *(np.asarray(b[c][j]).tolist() for c in COLUMNS))
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and a
    for seed in a:
        assert np.array_equal(a[seed][0], b[seed][0])
        assert repr(a[seed][1:]) == repr(b[seed][1:])  # NaN == NaN here


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("drrs") / "u16")
    return url, write_dataset(url)


def _sizes(local_url: str) -> dict[str, int]:
    root = os.path.join(local_url, "parquet")
    return {n: os.path.getsize(os.path.join(root, n)) for n in os.listdir(root) if n.endswith(".parquet")}


def test_ray_read_one_get_per_file(ray_local, s3_server, local_ds):
    """A read task fetches its whole file with one GET (no HEAD, no footer request), and the rows are those read
    from the local copy of the same dataset."""
    from drrfarm.data import read_drrs

    local_url, written = local_ds
    url = f"{s3_server.url}/runs/one"
    assert write_dataset(url).keys() == written.keys()
    ds = read_drrs(url, COLUMNS, storage_options=_opts())  # plans one task per file (6 files, 2 CPUs)
    s3_server.requests(clear=True)
    got = _rows_by_seed(ds.iter_batches(batch_size=5, batch_format="numpy"))
    per_file = _parquet_requests(s3_server.requests())
    sizes = _sizes(local_url)
    committed = {n for n in sizes if not n.startswith("zz-")}
    assert set(per_file) == committed
    for name, reqs in per_file.items():
        assert [m for m, _ in reqs] == ["GET"], (name, reqs)
        assert _range_bytes(reqs[0][1], sizes[name]) == sizes[name]
    _assert_same(got, _rows_by_seed(read_drrs(local_url, COLUMNS).iter_batches(batch_size=5, batch_format="numpy")))
    for seed, (img, *_) in got.items():
        assert np.array_equal(img, quantised(written[seed][0]))


def test_ray_read_row_groups_one_get_each(ray_local, s3_server, local_ds):
    """Tasks of one row group each (files fewer than the tasks asked for): the plan reads each footer once (one
    GET), a task fetches its row group's bytes with one GET, and no byte of a file is fetched twice."""
    from drrfarm.data import read_drrs

    local_url, _ = local_ds
    url = f"{s3_server.url}/runs/groups"
    write_dataset(url)
    s3_server.requests(clear=True)
    ds = read_drrs(url, COLUMNS, storage_options=_opts(), override_num_blocks=12)  # 6 files x 2 row groups
    planned = _parquet_requests(s3_server.requests(clear=True))
    got = _rows_by_seed(ds.iter_batches(batch_size=5, batch_format="numpy"))
    read = _parquet_requests(s3_server.requests())
    sizes = _sizes(local_url)
    for name in (n for n in sizes if not n.startswith("zz-")):
        # the plan: one footer GET per file (the driver's schema read adds a HEAD and a GET for the first file)
        assert [m for m, _ in planned[name]].count("GET") <= 2, planned[name]
        assert [m for m, _ in read[name]] == ["GET", "GET"], (name, read[name])  # one per row group
        assert sum(_range_bytes(r, sizes[name]) for _, r in read[name]) < sizes[name]  # the footer is not read again
    _assert_same(got, _rows_by_seed(read_drrs(local_url, COLUMNS).iter_batches(batch_size=5, batch_format="numpy")))


def test_torch_dataset_one_get_per_row_group(s3_server, local_ds):
    """The torch dataset fetches a row group with one GET (the index holds each file's metadata), in the main
    process and in DataLoader workers, and serves the rows of the local copy."""
    from drrfarm.data import DrrIterableDataset

    local_url, written = local_ds
    url = f"{s3_server.url}/runs/torch"
    write_dataset(url)
    ds = DrrIterableDataset(url, COLUMNS, storage_options=_opts(), batch_size=4)
    groups = collections.Counter(ds.index.paths[g.file].rsplit("/", 1)[-1] for g in ds.index.groups)
    s3_server.requests(clear=True)
    got = _rows_by_seed(ds)
    read = _parquet_requests(s3_server.requests(clear=True))
    assert {n: [m for m, _ in r] for n, r in read.items()} == {n: ["GET"] * k for n, k in groups.items()}
    want = _rows_by_seed(DrrIterableDataset(local_url, COLUMNS, batch_size=4))
    _assert_same(got, want)
    got_workers = _rows_by_seed(ds.loader(num_workers=2, pin_memory=False))
    read = _parquet_requests(s3_server.requests())
    assert {n: [m for m, _ in r] for n, r in read.items()} == {n: ["GET"] * k for n, k in groups.items()}
    _assert_same(got_workers, want)
    assert all(v[0].shape == (H, W) for v in got.values()) and set(got) == set(written)


def test_ray_read_names_a_missing_file(ray_local, s3_server):
    from drrfarm.data import read_drrs

    url = f"{s3_server.url}/runs/gone"
    write_dataset(url)
    ds = read_drrs(url, ["seed"], storage_options=_opts())
    import fsspec

    fs = fsspec.filesystem("s3", **_opts())
    victim = sorted(p for p in fs.find(url) if p.endswith(".parquet") and "/zz-" not in p)[-1]
    fs.rm(victim)
    with pytest.raises(Exception, match=re.escape(victim.rsplit("/", 1)[-1])):
        ds.materialize()


# ------------------------------------------------------------------------------------- ParquetShard, no server


def _counting_memory():
    """fsspec's memory filesystem, counting the fetches ParquetShard makes (``calls``)."""
    from fsspec.implementations.memory import MemoryFileSystem

    class Counting(MemoryFileSystem):
        cachable = False

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls: list[tuple] = []

        def cat_file(self, path, start=None, end=None, **kw):
            self.calls.append(("cat_file", start, end))
            return super().cat_file(path, start=start, end=end, **kw)

        def cat_ranges(self, paths, starts, ends, **kw):
            self.calls.append(("cat_ranges", tuple(starts), tuple(ends)))
            return [MemoryFileSystem.cat_file(self, p, start=s, end=e)
                    for p, s, e in zip(paths, starts, ends, strict=True)]

    return Counting()


@pytest.fixture
def memory_shard():
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    table = pa.table({"image": [rng.bytes(3000) for _ in range(10)], "seed": list(range(10)),
                      "P": [[float(i)] * 12 for i in range(10)], "note": [str(i) * 50 for i in range(10)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=4, use_dictionary=["note"])
    fs = _counting_memory()
    fs.pipe_file("/d/a.parquet", buf.getvalue())
    yield fs, pafs.PyFileSystem(pafs.FSSpecHandler(fs)), table, len(buf.getvalue())
    fs.rm("/d", recursive=True)  # the memory filesystem's store is shared by all its instances


def _same_groups(pf, table, columns):
    for g, start in enumerate((0, 4, 8)):
        want = table.slice(start, 4).select(columns)
        assert pf.read_row_group(g, columns).equals(want)


def test_parquet_shard_whole_file_one_fetch(memory_shard):
    from drrfarm.data.parquet_io import ParquetShard

    fs, afs, table, size = memory_shard
    with ParquetShard(afs, "/d/a.parquet", size=size) as pf:
        _same_groups(pf, table, ["image", "P"])
        assert pf.read(["seed"]).equals(table.select(["seed"]))
    assert fs.calls == [("cat_file", 0, None)]


def test_parquet_shard_row_groups_footer_then_one_fetch_each(memory_shard, monkeypatch):
    import drrfarm.data.parquet_io as pio

    fs, afs, table, size = memory_shard
    with pio.ParquetShard(afs, "/d/a.parquet", size=size, whole=False) as pf:
        meta = pf.metadata
        _same_groups(pf, table, ["image", "seed"])
    assert [c[0] for c in fs.calls] == ["cat_ranges"] * 4  # the footer, then one per row group
    assert all(len(c[1]) == 1 for c in fs.calls)  # image and seed: one merged range each
    fs.calls.clear()
    with pio.ParquetShard(afs, "/d/a.parquet", size=size, metadata=meta, whole=False) as pf:
        _same_groups(pf, table, ["P", "note"])
    assert [c[0] for c in fs.calls] == ["cat_ranges"] * 3  # metadata at hand: no footer request
    fs.calls.clear()
    monkeypatch.setattr(pio, "FOOTER_SAMPLE_BYTES", 16)  # a footer larger than the sample: a second request
    monkeypatch.setattr(pio, "MERGE_GAP_BYTES", 0)
    with pio.ParquetShard(afs, "/d/a.parquet", whole=False) as pf:  # size unknown: asked for
        _same_groups(pf, table, ["image", "note"])
    assert [c[0] for c in fs.calls] == ["cat_ranges"] * 5
    assert [len(c[1]) for c in fs.calls[2:]] == [2, 2, 2]  # image and note apart: two ranges in one call


def test_parquet_shard_errors_name_the_file(memory_shard):
    from drrfarm.data.parquet_io import ParquetShard

    fs, afs, table, size = memory_shard
    fs.pipe_file("/d/bad.parquet", b"not parquet at all")
    for kw in ({"size": 18}, {"size": 18, "whole": False}):
        with pytest.raises(StorageError, match=r"memory://+d/bad\.parquet.*not a"):
            ParquetShard(afs, "/d/bad.parquet", **kw)
    with pytest.raises(StorageError, match=r"memory://+d/a\.parquet"):  # shorter than the manifest says
        ParquetShard(afs, "/d/a.parquet", size=size + 100, whole=False)
    with pytest.raises(StorageError, match=r"memory://+d/missing\.parquet"):
        ParquetShard(afs, "/d/missing.parquet", size=100)
