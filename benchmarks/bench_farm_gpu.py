"""The GPU farm end to end: what ``drrfarm sweep`` writes per second on one GPU, beside the renderer alone.

For each sweep spec, in one run on the GPU host:

1. **in-process rate**: the same images (the spec's first ``--inprocess-images``, shard by shard: same
   cameras, spectra, photons and seeds) through ``CudaBackend.render_async(..., dtype=<stored dtype>)``
   into two reused buffer pairs, waited for, the copy to page-locked host memory included -- what the
   renderer can give, with nothing encoded or written;
2. **same bytes**: the first shard rendered as float32 and quantised by the CPU quantiser
   (:func:`drrfarm.sinks.writer.quantize`) against what the GPU stores (must be identical);
3. **the sweep**: :func:`drrfarm.farm.driver.run_sweep` on a local Ray (one GPU actor), tracking off,
   writing to ``--output``; every second the GPU's utilisation and memory (``nvidia-smi``), the host's
   used memory (``MemTotal - MemAvailable``) and the images committed are sampled.

Reported per spec: the sweep's images/s (first shard dispatched to last shard committed) and its wall
time, the ratio to the in-process rate, the share of one-second samples with the GPU busy (≥ 50 %
utilisation) in the steady part (10 %-90 % of the images committed), GPU and host memory growth between
25 % and 100 % of the images, and the mean time per shard in render (GPU kernels), copy (to host),
encode and write, from the actor's own clocks.

    python benchmarks/bench_farm_gpu.py spec1.yaml [spec2.yaml ...] --output /tmp/sweeps --json out.json
    python benchmarks/bench_farm_gpu.py e2e-1024.yaml --images 20000     # the memory run: more poses

``--images N`` scales the spec's C-arm grid (``beta_deg.num``) to N images. A benchmark, not a test:
``benchmarks/device/run_farm_gpu.sh`` runs it on the GPU host; results in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs"))
from train_pose import steady_window  # noqa: E402 - the training job's 10-90 % window (stdlib-only import)


def _host_used_bytes() -> int:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def _gpu_sample() -> tuple[float, float]:
    """(utilisation %, memory used MiB) of GPU 0 from nvidia-smi (NaN when it cannot answer)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True, timeout=5).stdout.strip()
        u, m = out.split(",")
        return float(u), float(m)
    except Exception:  # noqa: BLE001 - a sample lost is a sample lost
        return float("nan"), float("nan")


class Monitor:
    """Samples GPU utilisation/memory, host memory and committed images every ``interval_s`` seconds."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.images = 0
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.time()
        while not self._stop.is_set():
            util, mem = _gpu_sample()
            self.samples.append({"t": time.time() - t0, "gpu_util": util, "gpu_mem_mib": mem,
                                 "host_used_gib": _host_used_bytes() / 2**30, "images": float(self.images)})
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def scaled_spec(path: Path, images: int | None, out_dir: Path, inflight: int | None = None) -> Path:
    """The spec, with its C-arm beta grid scaled so that the sweep has ``images`` images, and
    ``farm.inflight_per_actor`` set to ``inflight`` (an execution setting: the images are the same)."""
    import yaml

    if not images and not inflight:
        return path
    d = yaml.safe_load(path.read_text())
    name = d.get("name", path.stem)
    if images:
        per_pose = len(d["spectra"]["presets"]) * len(d["detector"].get("photons", [None]))
        alpha = d["poses"]["carm"]["alpha_deg"]["num"]
        d["poses"]["carm"]["beta_deg"]["num"] = max(1, images // (per_pose * alpha))
        name += f"-{images}"
    if inflight:
        d.setdefault("farm", {})["inflight_per_actor"] = inflight
        name += f"-inflight{inflight}"
    d["name"] = name
    p = out_dir / f"{d['name']}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def inprocess(spec: Any, n_images: int) -> dict[str, Any]:
    """Rate of the spec's first ``n_images`` through ``render_async`` alone, and the same-bytes check."""
    from drrfarm.farm.compile import camera_for, load_material_volume, physics_for
    from drrfarm.farm.plan import make_plan
    from drrfarm.farm.worker import RenderWorker
    from drrfarm.physics import UINT16_SCALE
    from drrfarm.render.cuda import CudaBackend
    from drrfarm.sinks.writer import quantize

    plan = make_plan(spec)
    backend = CudaBackend()
    worker = RenderWorker(spec, backend="cpu", warm_up=False)  # only for its spectra
    vol_index = plan.shards[0].volume_index
    _, mv, wfp = load_material_volume(spec.volumes[vol_index])
    handle = backend.prepare(mv, wfp)
    dtype = spec.output.image_dtype
    shards = []
    for s in plan.shards:
        if s.volume_index != vol_index:
            continue
        task = plan.task(s.index)
        shards.append((task, [camera_for(spec, p) for p in task.poses], worker.spectrum(task.spectrum_index),
                       physics_for(spec, spec.detector.photons[task.photons_index])))
        if sum(len(t[0].poses) for t in shards) >= n_images:
            break
    ring = backend.image_ring(2)
    shape = (len(shards[0][1]), spec.image.height, spec.image.width)

    def run(items: list[Any]) -> float:
        pending: list[Any] = []
        t0 = time.perf_counter()
        for task, cams, spectrum, phys in items:
            if len(pending) == 2:
                job, slot = pending.pop(0)
                job.wait()
                ring.release(slot)
            slot = ring.acquire(shape, dtype)
            out, host = slot.views(len(cams))
            pending.append((backend.render_async(handle, cams, spectrum, phys, list(task.seeds), dtype=dtype,
                                                 out=out, host_out=host), slot))
        for job, slot in pending:
            job.wait()
            ring.release(slot)
        return time.perf_counter() - t0

    run(shards[:4])  # warm up: layouts, tables, buffers
    seconds = run(shards)
    n = sum(len(t[0].poses) for t in shards)
    task, cams, spectrum, phys = shards[0]
    same: dict[str, Any] = {}
    if dtype == "uint16":
        f32 = backend.render_async(handle, cams, spectrum, phys, list(task.seeds), dtype="float32").wait()
        u16 = backend.render_async(handle, cams, spectrum, phys, list(task.seeds), dtype="uint16").wait()
        q, _ = quantize(f32, np.full(len(cams), UINT16_SCALE[spec.detector.output]))
        same = {"pixels": int(q.size), "differing": int(np.count_nonzero(q != u16)),
                "max_abs_diff": int(np.max(np.abs(q.astype(np.int64) - u16.astype(np.int64))))}
    ring.close()
    backend.close()
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "dtype": dtype, "same_bytes": same,
            "first_shard": task.shard_id}


def stored_equals_gpu(url: str, shard_id: str, spec: Any) -> bool | None:
    """The sweep's stored images of one shard equal a fresh in-process GPU render of it."""
    from drrfarm.farm.plan import make_plan
    from drrfarm.farm.worker import RenderWorker
    from drrfarm.sinks import read_shard
    from drrfarm.sinks.parquet import DeltaPlanes

    if spec.output.image_dtype != "uint16" or "parquet" not in spec.output.formats:
        return None
    plan = make_plan(spec)
    path = Path(url) / "parquet" / f"{shard_id}.parquet"
    stored, _, _ = read_shard(path.read_bytes())
    worker = RenderWorker(spec, backend="cuda", warm_up=False)
    shard = worker._render(plan.task(plan.shard(shard_id).index))
    try:
        images = shard.images.images() if isinstance(shard.images, DeltaPlanes) else shard.images
        return bool(np.array_equal(stored, images))
    finally:
        shard.done()
        worker.close()


def sweep(spec_path: Path, out: Path) -> dict[str, Any]:
    from drrfarm.farm.driver import run_sweep

    shutil.rmtree(out, ignore_errors=True)
    mon = Monitor()
    events: list[dict[str, Any]] = []

    def callback(event: str, data: dict[str, Any]) -> None:
        if event == "shard_done":
            mon.images += int(data.get("images", 0))
            events.append({"t": time.perf_counter(), "time": time.time(), "images": int(data.get("images", 0)),
                           **{k: data.get(k) for k in ("render_s", "copy_s", "encode_s", "write_s", "seconds",
                                                       "timings", "bytes", "started", "shard_index")}})

    with mon:
        summary = run_sweep(str(spec_path), output=str(out), tracking=False, progress=False, callback=callback)
    s = summary.to_dict()
    total = max(1, summary.images_rendered)
    samples = mon.samples
    steady = [x for x in samples if 0.1 * total <= x["images"] <= 0.9 * total]
    busy = [x for x in steady if x["gpu_util"] == x["gpu_util"]]
    q25 = next((x for x in samples if x["images"] >= 0.25 * total), samples[0] if samples else None)
    growth = {}
    if q25 is not None and samples:
        last = samples[-1]
        growth = {"gpu_gib": (max(x["gpu_mem_mib"] for x in samples if x["t"] >= q25["t"]) - q25["gpu_mem_mib"]) / 1024,
                  "host_gib": max(x["host_used_gib"] for x in samples if x["t"] >= q25["t"]) - q25["host_used_gib"],
                  "gpu_mem_mib_at_25": q25["gpu_mem_mib"], "gpu_mem_mib_end": last["gpu_mem_mib"],
                  "host_gib_at_25": q25["host_used_gib"], "host_gib_end": last["host_used_gib"]}
    return {
        "steady_images_per_s": steady_rate(events), "shard_timings": mean_timings(events), "shards": events,
        "summary": {k: s[k] for k in ("images_rendered", "shards_rendered", "images_per_s", "render_seconds", "seconds",
                                      "complete", "retries", "failures", "actor_errors", "shard_seconds",
                                      "bytes_written", "inflight_per_actor", "encode_threads", "status")},
        "gpu_busy_fraction": (sum(1 for x in busy if x["gpu_util"] >= 50) / len(busy)) if busy else None,
        "gpu_util_mean_steady": float(np.mean([x["gpu_util"] for x in busy])) if busy else None,
        "steady_samples": len(busy), "memory_growth_25_to_100": growth, "samples": samples,
        "first_shard": sorted(summary.rendered_shards)[0] if summary.rendered_shards else None,
        "bytes_per_image": summary.bytes_written / total,
    }


def steady_rate(events: list[dict[str, Any]]) -> float | None:
    """Images/s between the commits of 10 % and 90 % of the images (no pipeline fill or drain)."""
    marks, done = [], 0
    for e in events:
        done += e["images"]
        marks.append((e["t"], done))
    window = steady_window(marks)
    return window[2] / (window[1] - window[0]) if window is not None else None


def mean_timings(events: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each of the actor's per-shard clocks (``timings``: set-up, waits for a buffer and the GPU, ...)."""
    keys = sorted({k for e in events for k in (e.get("timings") or {})})
    return {k: float(np.mean([(e.get("timings") or {}).get(k, 0.0) for e in events])) for k in keys}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("specs", nargs="+", type=Path)
    ap.add_argument("--output", type=Path, default=Path("/tmp/drrfarm-bench-sweeps"))
    ap.add_argument("--images", type=int, default=None, help="scale the C-arm grid to this many images")
    ap.add_argument("--inprocess-images", type=int, default=2048)
    ap.add_argument("--inflight", type=int, default=None, help="set farm.inflight_per_actor (shards per actor)")
    ap.add_argument("--keep", action="store_true", help="keep the sweeps' output")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from drrfarm.farm.spec import load_spec

    args.output.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "gpu": _gpu_name(), "cpus": os.cpu_count(),
                               "specs": {}}
    for path in args.specs:
        path = scaled_spec(path, args.images, args.output, args.inflight)
        spec = load_spec(path)
        name = spec.name or path.stem
        out = args.output / name
        print(f"== {name}: {spec.image.height}x{spec.image.width} {spec.output.formats} {spec.output.image_dtype}",
              flush=True)
        r: dict[str, Any] = {"in_process": inprocess(spec, args.inprocess_images)}
        print(f"   in-process {r['in_process']['images_per_s']:.0f} images/s; same bytes "
              f"{r['in_process']['same_bytes']}", flush=True)
        r["sweep"] = sweep(path, out)
        sw = r["sweep"]
        r["ratio"] = sw["summary"]["images_per_s"] / r["in_process"]["images_per_s"]
        if sw["first_shard"]:
            r["stored_equals_gpu_render"] = stored_equals_gpu(str(out), sw["first_shard"], spec.with_output(str(out)))
        t = sw["summary"]["shard_seconds"]
        print(f"   sweep {sw['summary']['images_per_s']:.0f} images/s ({sw['summary']['images_rendered']} images, "
              f"{sw['summary']['seconds']:.1f} s wall), ratio {r['ratio']:.2f}, GPU busy "
              f"{sw['gpu_busy_fraction']}, mean util {sw['gpu_util_mean_steady']}, growth "
              f"{ {k: round(v, 3) for k, v in sw['memory_growth_25_to_100'].items()} }, per shard "
              f"{ {k: round(v, 4) for k, v in t.items()} }, {sw['bytes_per_image'] / 1e6:.2f} MB/image, "
              f"stored == GPU render: {r.get('stored_equals_gpu_render')}", flush=True)
        steady = sw["steady_images_per_s"]
        print(f"   steady (10-90 % of the images) {steady or float('nan'):.0f} images/s; actor clocks per shard "
              f"{ {k: round(v, 4) for k, v in sw['shard_timings'].items()} }", flush=True)
        results["specs"][name] = r
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    print("\n| spec | images | sweep images/s | in-process images/s | ratio | GPU busy (steady) | GPU / host growth "
          "25→100 % | per shard: render / copy / encode / write (s) | MB/image |")
    print("|---|---:|---:|---:|---:|---:|---|---|---:|")
    for name, r in results["specs"].items():
        sw, t = r["sweep"], r["sweep"]["summary"]["shard_seconds"]
        g = sw["memory_growth_25_to_100"]
        busy = sw["gpu_busy_fraction"]
        print(f"| {name} | {sw['summary']['images_rendered']} | {sw['summary']['images_per_s']:.0f} | "
              f"{r['in_process']['images_per_s']:.0f} | {r['ratio']:.2f} | "
              f"{'' if busy is None else f'{100 * busy:.0f} %'} | "
              f"{g.get('gpu_gib', float('nan')):+.2f} / {g.get('host_gib', float('nan')):+.2f} GiB | "
              f"{t.get('render_s', 0):.3f} / {t.get('copy_s', 0):.3f} / {t.get('encode_s', 0):.3f} / "
              f"{t.get('write_s', 0):.3f} | {sw['bytes_per_image'] / 1e6:.2f} |")
    return 0


def _gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    sys.exit(main())
