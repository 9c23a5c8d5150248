"""drrfarm.farm.stream: a sweep spec streamed through Ray Data equals its stored sweep, image for image.

A small sweep (two 32³ NIfTI phantoms, 2 spectra, a noisy and a noiseless photon setting, 8 C-arm poses, 32²
images, shards of 3 -- the last shard of each run is short) is written by the farm (``run_sweep``) and read back
with :func:`drrfarm.data.read_drrs`; :func:`drrfarm.farm.stream.stream_drrs` renders the same spec on the fly.
Ray runs on 127.0.0.1 with 2 CPUs; the CPU backend (the GPU test at the end runs with ``pytest -m gpu``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_farm import base_spec, write_spec, write_two_phantoms

from drrfarm.errors import SpecError, StorageError

N_IMAGES = 2 * 2 * 2 * 8  # volumes x spectra x photon settings x poses


def spec_dict(tmp: Path, out: Path, **changes: Any) -> dict[str, Any]:
    return base_spec(tmp, out, **{"detector": {"model": "ideal", "output": "line_integral", "photons": [2000, None]},
                                  "output": {"url": str(out), "formats": ["parquet"], "shard_size": 3},
                                  **changes})


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_two_phantoms(tmp_path_factory.mktemp("phantoms"))


@pytest.fixture(scope="module")
def stored(ray_local: Any, phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(spec path, dataset URL) of the sweep written by the farm."""
    from drrfarm.farm.driver import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "out"
    spec_path = write_spec(tmp / "spec.yaml", spec_dict(phantoms, out))
    summary = run_sweep(spec_path, tracking=False, progress=False, num_actors=2, backend="cpu")
    assert summary.complete and summary.images_rendered == N_IMAGES
    return spec_path, str(out)


def by_index(ds: Any) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Every row of a dataset by image_index (asserting none appears twice), and the column names."""
    rows: dict[int, dict[str, Any]] = {}
    names: list[str] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        names = names or list(batch)
        assert list(batch) == names, "every block has the same columns"
        for k, idx in enumerate(batch["image_index"]):
            assert int(idx) not in rows, f"image {idx} twice"
            rows[int(idx)] = {name: batch[name][k] for name in batch}
    return rows, names


def assert_same_value(a: Any, b: Any, where: str) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    if a.dtype.kind == "f":
        np.testing.assert_array_equal(a, b, err_msg=where)  # NaN == NaN here
    else:
        assert np.array_equal(a, b), where


def assert_same_rows(got: dict[int, dict[str, Any]], want: dict[int, dict[str, Any]]) -> None:
    assert sorted(got) == sorted(want)
    for idx, row in want.items():
        for name, value in row.items():
            assert_same_value(got[idx][name], value, f"image {idx} column {name}")


# --------------------------------------------------------------------------------------------- with Ray


def test_stream_equals_the_stored_sweep_image_for_image(stored: tuple[Path, str]) -> None:
    from drrfarm.data import read_drrs
    from drrfarm.farm.stream import stream_drrs

    spec_path, url = stored
    files = sorted(p for p in Path(url).rglob("*"))
    want, want_names = by_index(read_drrs(url, columns="all"))
    got, got_names = by_index(stream_drrs(spec_path, columns="all", actors=2))
    assert sorted(p for p in Path(url).rglob("*")) == files  # the stream wrote nothing to the spec's output
    assert got_names == want_names and "image" in got_names and "volume_id" in got_names
    assert sorted(want) == list(range(N_IMAGES))
    assert_same_rows(got, want)
    some = got[N_IMAGES - 1]
    assert some["image"].dtype == np.uint16 and some["image"].shape == (32, 32) and some["image"].max() > 0
    assert some["image_codec"] == "zstd-delta" and some["image_dtype"] == "uint16"
    noisy = [r for r in got.values() if np.isfinite(r["photons"])]
    assert len(noisy) == N_IMAGES // 2 and len({r["seed"] for r in got.values()}) == N_IMAGES


def test_stream_float_line_integrals_and_default_columns(stored: tuple[Path, str]) -> None:
    from drrfarm.data import read_drrs
    from drrfarm.farm.stream import stream_drrs

    spec_path, url = stored
    want, want_names = by_index(read_drrs(url, float_line_integral=True))
    got, got_names = by_index(stream_drrs(spec_path, float_line_integral=True, actors=1))
    assert got_names == want_names and "volume_id" not in got_names  # numeric columns only by default
    assert_same_rows(got, want)
    assert got[0]["image"].dtype == np.float32


def test_stream_feeds_torch_batches_and_splits_by_volume(stored: tuple[Path, str]) -> None:
    torch = pytest.importorskip("torch")
    from drrfarm.data import read_metadata, to_float_line_integrals
    from drrfarm.farm.stream import stream_drrs, stream_info, stream_metadata

    spec_path, url = stored
    meta = stream_metadata(spec_path, volume_ids=["b"])
    stored_meta = read_metadata(url, list(meta), volume_ids=["b"])
    order = np.argsort(stored_meta["image_index"])
    for name, values in meta.items():
        assert_same_value(values, stored_meta[name][order], name)
    info = stream_info(spec_path, volume_ids=["b"])
    assert info["rows"] == N_IMAGES // 2 and info["volume_ids"] == ["b"] and info["height"] == [32]

    seen = []
    ds = stream_drrs(spec_path, ["image_index", "image_scale", "alpha_deg"], volume_ids=["b"])
    for batch in ds.iter_torch_batches(batch_size=5):
        assert batch["image"].dtype == torch.uint16 and batch["image"].shape[1:] == (32, 32)
        x = to_float_line_integrals(batch)
        assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())
        seen += batch["image_index"].tolist()
    assert sorted(seen) == meta["image_index"].tolist()


def test_stream_split_by_volume_matches_the_stored_split(stored: tuple[Path, str]) -> None:
    from drrfarm.data import split_by_volume
    from drrfarm.farm.stream import stream_split_by_volume

    spec_path, url = stored
    for got, want in zip(stream_split_by_volume(spec_path, 0.5, 3, ["image_index"], actors=1),
                         split_by_volume(url, 0.5, 3, columns=["image_index"]), strict=True):
        got_idx = sorted(int(i) for b in got.iter_batches(batch_size=None) for i in b["image_index"])
        want_idx = sorted(int(i) for b in want.iter_batches(batch_size=None) for i in b["image_index"])
        assert got_idx == want_idx and len(got_idx) == N_IMAGES // 2


def test_streamed_rows_without_ray_equal_a_stored_shard(stored: tuple[Path, str]) -> None:
    """StreamRenderer on its own (one shard, no Ray Data): the stored shard's pixels and rows."""
    from drrfarm.farm.plan import make_plan
    from drrfarm.farm.spec import load_spec
    from drrfarm.farm.stream import StreamRenderer
    from drrfarm.sinks import read_shard

    spec_path, url = stored
    spec = load_spec(spec_path)
    plan = make_plan(spec)
    shard = plan.shards[-1]  # the last, short shard
    r = StreamRenderer(spec, backend="cpu")
    try:
        out = r.rows(shard.index, "all")
    finally:
        r.close()
    images, rows, _ = read_shard((Path(url) / "parquet" / f"{shard.shard_id}.parquet").read_bytes())
    assert np.array_equal(out["image"], images) and out["image"].dtype == np.uint16
    assert out["image_index"].tolist() == [row["image_index"] for row in rows] == list(shard.image_indices)
    assert out["seed"].tolist() == [row["seed"] for row in rows]


# --------------------------------------------------------------------------------------------- bad input


def test_bad_specs_raise_the_spec_loader_errors(phantoms: Path, tmp_path: Path) -> None:
    from drrfarm.farm.stream import stream_drrs

    out = tmp_path / "out"
    with pytest.raises(SpecError, match=r"nope\.yaml: spec file not found"):
        stream_drrs(tmp_path / "nope.yaml")
    bad = write_spec(tmp_path / "bad.yaml", spec_dict(phantoms, out, image={"size": -4, "pixel_mm": 1.0}))
    with pytest.raises(SpecError, match=r"bad\.yaml: image\.size"):
        stream_drrs(bad)
    no_volume = spec_dict(phantoms, out, volumes=[{"path": str(tmp_path / "x.nii")}])
    missing = write_spec(tmp_path / "missing.yaml", no_volume)
    with pytest.raises(SpecError, match=r"volumes\[0\]\.path: file not found"):
        stream_drrs(missing)
    good = write_spec(tmp_path / "good.yaml", spec_dict(phantoms, out))
    with pytest.raises(SpecError, match=r"volume_ids: unknown \['c'\]"):
        stream_drrs(good, volume_ids=["c"])
    with pytest.raises(StorageError, match=r"columns: unknown \['kvpp'\]"):
        stream_drrs(good, ["kvpp"])
    with pytest.raises(SpecError, match="backend 'tpu'"):
        stream_drrs(good, backend="tpu")
    assert not out.exists()  # nothing written anywhere


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_stream_equals_the_gpu_sweep(phantoms: Path, tmp_path: Path) -> None:
    """On the CUDA backend (image ring, uint16 made on the GPU): the stream equals the stored CUDA sweep."""
    import ray

    from drrfarm.data import read_drrs
    from drrfarm.farm.driver import run_sweep
    from drrfarm.farm.stream import stream_drrs

    out = tmp_path / "out"
    # the spectra of the end-to-end specs: their tables are recorded for GPU hosts without SpekPy / xraydb
    spec_path = write_spec(tmp_path / "spec.yaml", spec_dict(phantoms, out, backend="cuda",
                                                             spectra={"presets": ["90KV_AL40", "120KV_AL43"]},
                                                             physics={"method": "joseph"},
                                                             image={"size": 64, "pixel_mm": 4.0}))
    ray.shutdown()
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        summary = run_sweep(spec_path, tracking=False, progress=False)
        assert summary.complete, summary.errors
        want, want_names = by_index(read_drrs(str(out), columns="all"))
        got, got_names = by_index(stream_drrs(spec_path, columns="all"))
    finally:
        ray.shutdown()
    assert got_names == want_names and len(want) == N_IMAGES
    assert_same_rows(got, want)
