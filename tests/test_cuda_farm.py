"""The CUDA backend inside the farm (``pytest -m gpu``): buffers released on other threads are freed
(flat GPU and host memory, no pycuda clean-up warnings), the image ring reuses its buffers, and the render
worker's GPU path stores exactly what the CPU quantiser makes of the float render.

On a GPU host without xraydb/SpekPy the detector tables come from the recorded answers that
``benchmarks/device/run_farm_gpu.sh`` replays."""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

from drrfarm.render import cuda_available

needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs pycuda and an NVIDIA GPU")
pytestmark = [pytest.mark.gpu, needs_gpu]

SPECTRA = ["90KV_AL40", "120KV_AL43"]  # the end-to-end specs' spectra (their tables are recorded)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _gpu_used_bytes(backend: Any) -> int:
    free, total = backend.memory_info()
    return int(total - free)


def _phantom_ct(path: Path, n: int = 48, spacing_mm: float = 3.0) -> Path:
    hu = np.full((n, n, n), -1000, np.int16)
    c = n // 2
    hu[c - 14 : c + 14, c - 10 : c + 10, c - 16 : c + 16] = 40
    hu[c - 3 : c + 3, c - 3 : c + 3, c - 14 : c + 14] = 900
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = -spacing_mm * (n - 1) / 2
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    return path


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from drrfarm.geometry import CArm, world_from_patient_default
    from drrfarm.physics import Physics
    from drrfarm.render.cuda import CudaBackend
    from drrfarm.spectrum import get_spectrum
    from drrfarm.volume import load_volume, segment_by_thresholds

    d = tmp_path_factory.mktemp("ct")
    vol = load_volume(str(_phantom_ct(d / "ct.nii")))
    mv = segment_by_thresholds(vol)
    backend = CudaBackend()
    handle = backend.prepare(mv, world_from_patient_default(vol.centre_patient_mm()))
    arm = CArm(height=256, width=256, pixel_mm=1.2)
    cams = [arm.camera(alpha_deg=a) for a in np.linspace(-30, 30, 8)]
    return {"dir": d, "backend": backend, "handle": handle, "cams": cams, "spectrum": get_spectrum("90KV_AL40"),
            "physics": Physics(method="joseph", photons=1e4)}


def test_renders_released_on_other_threads_leave_memory_flat(setting) -> None:
    """Farm actors render on Ray's threads and drop results on writer threads: memory must stay flat and
    pycuda must never fail to free a buffer ("... could not be cleaned up")."""
    b, h, cams, s, phys = (setting[k] for k in ("backend", "handle", "cams", "spectrum", "physics"))
    seeds = list(range(len(cams)))
    per_call = len(cams) * 256 * 256 * 4

    def render_on_a_thread() -> np.ndarray:
        return b.render(h, cams, s, phys, seeds)

    def async_job() -> Any:  # fresh device + pinned buffers per call, dropped on another thread
        job = b.render_async(h, cams, s, phys, seeds, dtype="uint16")
        job.wait()
        return job

    with ThreadPoolExecutor(4) as pool, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):  # warm up: kernels, scratch, ring
            pool.submit(render_on_a_thread).result()
            pool.submit(lambda job: None, async_job()).result()
        gpu0, rss0 = _gpu_used_bytes(b), _rss_bytes()
        n = 150
        for _ in range(n):
            img = pool.submit(render_on_a_thread).result()
            job = async_job()
            pool.submit(lambda j: j.host.sum(), job).result()
            del job
            pool.submit(lambda x: x.sum(), img).result()
            del img
        gpu1, rss1 = _gpu_used_bytes(b), _rss_bytes()
    leaks = [str(w.message) for w in caught if "cleaned up" in str(w.message)]
    assert not leaks, leaks[:3]
    # a leak of one result per call would be n x per_call (> 300 MB here); allow allocator noise
    assert gpu1 - gpu0 < 32 << 20, (gpu0, gpu1, n * per_call)
    assert rss1 - rss0 < 96 << 20, (rss0, rss1, n * per_call)


def test_waiting_for_a_render_sleeps_instead_of_spinning_a_core(setting) -> None:
    """A farm actor has many threads waiting for renders while its encoders need every core: a thread in
    ``RenderJob.wait`` must sleep (CUDA's default for one context on a many-core host is to spin)."""
    import time

    from drrfarm.geometry import CArm

    b, h, s, phys = (setting[k] for k in ("backend", "handle", "spectrum", "physics"))
    arm = CArm(height=1024, width=1024, pixel_mm=0.3)
    cams = [arm.camera(alpha_deg=a) for a in np.linspace(-30, 30, 8)]
    seeds = list(range(len(cams)))
    ring = b.image_ring(1)
    slot = ring.acquire((len(cams), 1024, 1024), np.uint16)
    out, host = slot.views(len(cams))  # reused buffers: queueing a job costs microseconds, not an allocation

    def job() -> Any:
        return b.render_async(h, cams, s, phys, seeds, dtype="uint16", out=out, host_out=host)

    warm = job()
    warm.wait()
    gpu_s = sum(warm.gpu_seconds().values())
    jobs = [job() for _ in range(max(2, int(0.5 / max(gpu_s, 1e-4))))]  # ~0.5 s of GPU work queued
    wall, cpu = time.perf_counter(), time.thread_time()
    jobs[-1].wait()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    for j in jobs:
        j.wait()
    ring.release(slot)
    ring.close()
    assert wall > 0.05, (wall, gpu_s, len(jobs))  # the GPU was still busy when the wait began
    assert cpu < 0.3 * wall, (cpu, wall)


def test_delta_planes_on_the_gpu_are_the_codecs_transform_of_the_images(setting) -> None:
    """``host_layout="delta_planes"``: the host copy is the delta transform of the very images the same
    launch leaves in ``out`` (row differences modulo 2^16 included), and encodes to the same Parquet bytes."""
    from drrfarm.sinks.parquet import DeltaPlanes, delta_planes, encode_parquet

    b, h, cams, s, phys = (setting[k] for k in ("backend", "handle", "cams", "spectrum", "physics"))
    seeds = list(range(len(cams)))
    job = b.render_async(h, cams, s, phys, seeds, dtype="uint16", host_layout="delta_planes")
    job.wait()
    ref = b.render_async(h, cams, s, phys, seeds, dtype="uint16")
    ref.wait()
    np.testing.assert_array_equal(job.images.to_numpy(), ref.host)  # ``out`` keeps the images
    assert job.host.shape == (len(cams), 2 * 256 * 256) and job.host.dtype == np.uint8
    assert len(np.unique(ref.host)) > 100  # noisy images: row differences wrap around
    np.testing.assert_array_equal(job.host, np.stack([delta_planes(im) for im in ref.host]))
    rows = [{"image_index": i} for i in range(len(cams))]
    assert bytes(encode_parquet(DeltaPlanes(job.host, 256, 256), rows, {})) == bytes(encode_parquet(ref.host, rows, {}))
    with pytest.raises(Exception, match="delta_planes"):
        b.render_async(h, cams, s, phys, seeds, dtype="float32", host_layout="delta_planes")


def test_image_ring_reuses_its_buffers_and_blocks_when_full(setting) -> None:
    b = setting["backend"]
    ring = b.image_ring(2)
    a1 = ring.acquire((4, 64, 64), np.uint16)
    a2 = ring.acquire((4, 64, 64), np.uint16)
    ptrs = {a1.device.ptr, a2.device.ptr}
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(ring.acquire((3, 64, 64), np.uint16)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # both slots out: the third acquire waits
    ring.release(a1)
    t.join(5)
    assert got and got[0].device.ptr in ptrs  # the released slot, reused (3 images fit in a 4-image slot)
    out, host = got[0].views(3)
    assert out.shape == (3, 64, 64) and host.shape == (3, 64, 64) and out.ptr == got[0].device.ptr
    ring.release(got[0])
    ring.release(a2)
    ring.close()


@pytest.mark.parametrize("output", ["line_integral", "transmission"])
@pytest.mark.parametrize("photons", [1e4, None])
def test_uint16_on_the_gpu_is_the_cpu_quantiser_of_the_float_render(setting, output: str, photons: Any) -> None:
    from drrfarm.physics import UINT16_SCALE, Physics
    from drrfarm.sinks.writer import quantize

    b, h, cams, s = (setting[k] for k in ("backend", "handle", "cams", "spectrum"))
    phys = Physics(method="joseph", photons=photons, output=output)
    seeds = [11 * i + 3 for i in range(len(cams))]
    f32 = b.render_async(h, cams, s, phys, seeds, dtype="float32").wait()
    u16 = b.render_async(h, cams, s, phys, seeds, dtype="uint16").wait()
    q, _ = quantize(f32, np.full(len(cams), UINT16_SCALE[output]))
    np.testing.assert_array_equal(u16, q)


def _spec(d: Path, out: Path, fmt: list[str], dtype: str) -> Path:
    spec = {"seed": 3, "volumes": [{"id": "ph", "path": str(d / "ct.nii")}],
            "poses": {"carm": {"alpha_deg": {"range": [-30, 30], "num": 5}, "beta_deg": [0, 10]}},
            "spectra": {"presets": SPECTRA}, "detector": {"model": "ideal", "output": "line_integral",
                                                          "photons": [10000, None]},
            "image": {"size": 192, "pixel_mm": 1.5}, "physics": {"method": "joseph"}, "backend": "cuda",
            "output": {"url": str(out), "formats": fmt, "shard_size": 4, "image_dtype": dtype},
            "tracking": {"enabled": False}}
    p = d / f"spec-{out.name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


@pytest.mark.parametrize(("dtype", "fmt"), [("uint16", ["parquet"]), ("uint16", ["parquet", "png"]),
                                          ("float16", ["parquet"])])
def test_worker_gpu_path_stores_the_cpu_quantisation_of_the_float_render(setting, tmp_path: Path, dtype: str,
                                                                         fmt: list[str]) -> None:
    """Shards written by the worker's GPU path (quantised on the GPU into reused buffers -- for uint16 Parquet
    alone in the codec's delta transform, made on the GPU -- encoded on other threads) hold the bytes the CPU
    makes of the float render with the same seeds; PNG == Parquet."""
    from drrfarm.farm.plan import make_plan
    from drrfarm.farm.spec import load_spec
    from drrfarm.farm.worker import RenderWorker
    from drrfarm.physics import UINT16_SCALE
    from drrfarm.sinks import decode_png16, read_manifest, read_shard
    from drrfarm.sinks.writer import quantize

    out = tmp_path / f"out-{dtype}-{len(fmt)}"
    spec = load_spec(_spec(setting["dir"], out, fmt, dtype))
    plan = make_plan(spec)
    worker = RenderWorker(spec, backend="cuda", concurrency=3, encode_threads=4)
    with ThreadPoolExecutor(3) as pool:  # shards concurrently, as a threaded actor runs them
        stats = list(pool.map(worker.render_shard, [plan.task(s.index) for s in plan.shards]))
    assert all(st["render_s"] > 0 and st["encode_s"] > 0 for st in stats)
    manifest = read_manifest(str(out))
    assert len(manifest) == plan.n_shards
    for shard in plan.shards:
        images, rows, _ = read_shard((out / "parquet" / f"{shard.shard_id}.parquet").read_bytes())
        ref, _, _ = worker.render_images(plan.task(shard.index))
        if dtype == "uint16":
            q, _ = quantize(ref, np.full(len(ref), UINT16_SCALE["line_integral"]))
            np.testing.assert_array_equal(images, q)
            for im, r in zip(images, rows, strict=True):
                if "png" not in fmt:
                    break
                png = out / "png" / "ph" / shard.shard_id / f"{int(r['image_index']):08d}.png"
                np.testing.assert_array_equal(decode_png16(png.read_bytes()), im)
        else:
            np.testing.assert_array_equal(images, ref.astype(np.float16))
    worker.close()


def test_actor_start_builds_the_layouts_its_shards_use(setting, tmp_path: Path) -> None:
    """``RenderWorker.start`` with a sample of the sweep's poses builds the volume layouts before the first
    shard: rendering every shard afterwards builds none (a layout built mid-sweep holds up the GPU queue)."""
    from drrfarm.farm.plan import WARM_POSES, make_plan
    from drrfarm.farm.spec import load_spec
    from drrfarm.farm.worker import RenderWorker

    spec_path = _spec(setting["dir"], tmp_path / "warm", ["parquet"], "uint16")
    d = yaml.safe_load(spec_path.read_text())
    d["poses"]["carm"]["beta_deg"] = [0, 60, 120]  # views along more than one volume axis
    spec_path.write_text(yaml.safe_dump(d))
    spec = load_spec(spec_path)
    plan = make_plan(spec)
    worker = RenderWorker(spec, backend="cuda", concurrency=2, encode_threads=2)
    try:
        worker.start([0], plan.sample_poses(WARM_POSES))
        vol = worker.volume(0)[0]
        built = set(vol.layouts)
        assert len(built) >= 2
        for shard in plan.shards:
            worker.render_shard(plan.task(shard.index))
        assert set(vol.layouts) == built
    finally:
        worker.close()
