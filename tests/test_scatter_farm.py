"""Scatter in the product: the ``scatter`` spec section, the CPU backend, the render worker's columns
and cost, and ``drrfarm render --scatter``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_farm import base_spec, write_phantom, write_spec, write_two_phantoms

from drrfarm.errors import SpecError
from drrfarm.farm.plan import make_plan
from drrfarm.farm.spec import load_spec


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_two_phantoms(tmp_path_factory.mktemp("scatter_phantoms"))


def test_scatter_section_is_validated_and_hashed(phantoms: Path, tmp_path: Path) -> None:
    plain = load_spec(write_spec(tmp_path / "a.yaml", base_spec(phantoms, tmp_path / "o")))
    fast = load_spec(write_spec(tmp_path / "b.yaml", base_spec(phantoms, tmp_path / "o", scatter="fast")))
    mc = load_spec(write_spec(tmp_path / "c.yaml", base_spec(phantoms, tmp_path / "o",
                                                            scatter={"mode": "monte_carlo", "photons": 5000})))
    assert plain.scatter is None and fast.scatter.mode == "fast" and mc.scatter.photons == 5000
    assert len({plain.sha256, fast.sha256, mc.sha256}) == 3
    assert "scatter" not in plain.content_dict()  # older specs keep their hash
    for bad, where in (({"mode": "kernels"}, "scatter.mode"), ({"mode": "fast", "photons": 0}, "scatter.photons"),
                       ({"mode": "fast", "grid": 3}, "scatter"), ({"mode": "fast", "bins": 2000}, "scatter.bins")):
        path = write_spec(tmp_path / "bad.yaml", base_spec(phantoms, tmp_path / "o", scatter=bad))
        with pytest.raises(SpecError, match=where.replace(".", r"\.")) as err:
            load_spec(path)
        assert "bad.yaml" in str(err.value)


def test_worker_adds_scatter_and_reports_its_cost(phantoms: Path, tmp_path: Path) -> None:
    from drrfarm.farm.worker import RenderWorker
    from drrfarm.sinks import dequantize, read_shard

    common = {"detector": {"model": "ideal", "output": "transmission"}, "spectra": {"mono_kev": [60]}}
    got = {}
    for mode in ("none", "fast"):
        out = tmp_path / mode
        spec = load_spec(write_spec(tmp_path / f"{mode}.yaml", base_spec(
            phantoms, out, scatter={"mode": mode, "photons": 2_000}, **common)))
        task = make_plan(spec).task(0)
        w = RenderWorker(spec, run_id="r", backend="cpu")
        stats = w.render_shard(task)
        w.close()
        images, rows, _ = read_shard((out / f"parquet/{task.shard_id}.parquet").read_bytes())
        got[mode] = (dequantize(images, np.array([r["image_scale"] for r in rows])), rows, stats)
    (plain, rows0, stats0), (fast, rows1, stats1) = got["none"], got["fast"]
    assert rows0[0]["scatter"] == "none" and rows0[0]["scatter_seconds"] is None and stats0["scatter_s"] == 0
    assert rows1[0]["scatter"] == "fast" and rows1[0]["scatter_photons"] == 2_000
    assert rows1[0]["scatter_seconds"] > 0 and stats1["scatter_s"] == pytest.approx(
        sum(r["scatter_seconds"] for r in rows1))
    # scatter only adds signal (transmission), most where the phantom is
    diff = fast - plain
    assert diff.min() > -1e-4 and diff.mean() > 1e-4


def test_cpu_backend_with_scatter_matches_primary_plus_the_estimate() -> None:
    from drrfarm.geometry import CArm
    from drrfarm.physics import Physics
    from drrfarm.render import get_backend
    from drrfarm.samples.phantoms import sphere_phantom
    from drrfarm.spectrum import get_spectrum

    be = get_backend("cpu")
    h = be.prepare(sphere_phantom().material_volume())
    cams = [CArm(height=48, width=48, pixel_mm=5.0).camera(a, 0.0) for a in (0.0, 40.0)]
    spec = get_spectrum("mono:60")
    base = Physics(output="transmission")
    with_scatter = Physics(output="transmission", scatter="monte_carlo", scatter_photons=30_000, scatter_bins=8)
    primary = be.render(h, cams, spec, base, [1, 2])
    total = be.render(h, cams, spec, with_scatter, [1, 2])
    parts = be.scatter(h, cams, spec, with_scatter, [1, 2])
    np.testing.assert_allclose(total, primary + np.stack([p.signal for p in parts]), rtol=1e-5, atol=1e-6)
    assert be.scatter_seconds > 0
    again = be.render(h, cams, spec, with_scatter, [1, 2])
    np.testing.assert_array_equal(again, total)  # seeded


def test_render_cli_writes_scatter_into_the_sidecar(tmp_path: Path) -> None:
    import json

    from drrfarm.cli import main

    ct = write_phantom(tmp_path / "p.nii.gz")
    out = tmp_path / "img.png"
    assert main(["render", str(ct), "--size", "32", "--pixel-mm", "8", "--mono-kev", "60", "--scatter", "fast",
                 "--scatter-photons", "5000", "-o", str(out)]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["physics"]["scatter"] == "fast" and side["physics"]["scatter_photons"] == 5000
