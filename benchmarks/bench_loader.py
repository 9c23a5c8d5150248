"""Benchmark: loader throughput from drrfarm Parquet shards (images/s, first batch, scaling with cores), not a test.

    python benchmarks/bench_loader.py [--dataset URL ...] [--sizes 512 1024] [--cpus 2 16] [--batch 64]
        [--modes ...] [--scale-images 1024] [--s3] [--markdown] [--json out.json]

Datasets: ``--dataset`` reads existing ones (e.g. the output of ``drrfarm sweep`` on e2e-512.yaml and
e2e-1024.yaml); without it, sweep-like shards are written per ``--sizes`` (uint16 line integrals quantised
like the farm's, the sinks' default codec, shards of 64, half noisy with ~1e4 photons and half noise-free).

Readers (``--modes``), each over every image of the dataset, ``--epochs`` times:

* ``ray-uint16`` -- ``read_drrs(url, COLUMNS).iter_torch_batches(batch_size=B, prefetch_batches=P)`` on a
  private local Ray with ``--cpus`` CPUs (image: torch.uint16, the stored dtype);
* ``ray-float32`` -- the same with ``float_line_integral=True`` (float32 decoded in the read tasks);
* ``ray-gpu-float`` -- ``iter_torch_batches(device="cuda")`` of uint16 then ``to_float_line_integrals`` on the
  GPU (CUDA only): the uint16 and the scale cross PCIe, the multiply happens on the device;
* ``torch-uint16`` -- ``DrrIterableDataset(url, COLUMNS, batch_size=B, shuffle=True).loader(num_workers=N)``
  with N = ``--cpus`` (no Ray; pinned memory on a CUDA machine; batches handed over in reusable shared-memory
  slots);
* ``torch-uint16-fresh`` -- the same with ``reuse_shared_memory=False``: every batch in fresh shared memory;
* ``torch-gpu-float`` -- the same, then ``to_float_line_integrals(batch, "cuda")`` (CUDA only);
* ``pyarrow-decode`` -- one process, one core: every row group read and decoded with the sinks'
  ``decode_images`` (no batching; at most ``--scale-images`` images);
* with ``--s3`` (needs moto and s3fs): ``ray-uint16-s3`` and ``torch-uint16-s3`` read the dataset copied to a
  moto S3 server on 127.0.0.1 (a Python server sharing the cores: a lower bound for a real endpoint).

All modes run at the largest ``--cpus``; ``--scale-modes`` also at every smaller value, on the first shards
holding ``--scale-images`` images (Ray restarted with that many CPUs). Reported per run: the first batch
(seconds from the read call in the first epoch; the first Ray reader after each Ray start finds its workers
cold), the first epoch's and the best later epoch's (steady state) images/s, that epoch's rate from its
first batch on (Ray Data starts an execution per epoch), and MB/s of the returned pixels (MB = 10^6 bytes).
``COLUMNS``: the image, ``alpha_deg``, ``beta_deg`` and ``image_scale``.

On the 16-core GPU host: ``bash benchmarks/device/run_loader_gpu.sh`` (sweeps, this benchmark, training).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs"))
from train_pose import steady_window  # noqa: E402 - the training job's 10-90 % window (stdlib-only import)

COLUMNS = ["alpha_deg", "beta_deg", "image_scale"]
#: images written per size when no --dataset is given
DEFAULT_COUNTS = {256: 2048, 512: 1024, 1024: 256}
SCALE = 16.0 / 65535  # the farm's default quantisation step of line integrals


def synthetic(n: int, size: int, seed: int, photons: float | None = 2e4) -> np.ndarray:
    """(n, size, size) float32 smooth body-like line integrals, with Poisson noise of ``photons`` (None: none)."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    body = np.sqrt(np.clip(1.0 - (u / 0.42) ** 2 - (v / 0.48) ** 2, 0, None)) * 4.0
    out = np.empty((n, size, size), np.float32)
    for i in range(n):
        li = 0.5 + body + 1.5 * np.exp(-((u - 0.05 * np.sin(i + seed)) / 0.04) ** 2)
        if photons is None:
            out[i] = li
        else:
            counts = rng.poisson(photons * np.exp(-li)).astype(np.float32)
            out[i] = -np.log(np.maximum(counts, 0.5) / photons)
    return out


def write(url: str, size: int, n: int, per_shard: int = 64) -> None:
    """Sweep-like shards: uint16 line integrals, alternately noisy (1e4 photons) and noise-free shards."""
    from drrfarm.sinks import ShardSink

    sink = ShardSink(url)
    for s in range(-(-n // per_shard)):
        k = min(per_shard, n - s * per_shard)
        photons = 1e4 if s % 2 == 0 else None
        imgs = synthetic(k, size, seed=s, photons=photons)
        rows = [{"image_index": i, "seed": s * per_shard + i, "volume_id": "chest", "alpha_deg": float(i),
                 "beta_deg": float(s), "image_scale": SCALE, "output": "line_integral",
                 "photons": None if photons is None else int(photons)} for i in range(k)]
        sink.write_shard(f"bench-{size}-{s:05d}", imgs, rows, {"mlflow_run_id": "", "sweep_id": "bench"})


def describe(url: str) -> dict[str, Any]:
    """Rows, shards, image size, bytes on disk and image codecs of a dataset."""
    import pyarrow.parquet as pq

    from drrfarm.data import dataset_info, open_dataset_store
    from drrfarm.sinks import read_manifest

    info = dataset_info(url)
    store = open_dataset_store(url)
    manifest = read_manifest(store)
    entries = list(manifest.values())
    nbytes = sum(e.total_bytes for e in entries)
    codecs: set[str] = set()
    with store.open_read(entries[0].keys_of("parquet")[0]) as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        if "image_codec" in names:
            codecs.update(str(c) for c in pf.read_row_group(0, columns=["image_codec"]).column(0).to_pylist())
        else:
            codecs.add("raw")
        groups = pf.num_row_groups
    return {"url": info["url"], "rows": info["rows"], "shards": info["shards"], "height": max(info["height"]),
            "width": max(info["width"]), "image_dtype": info["image_dtype"], "disk_mb": nbytes / 1e6,
            "codecs": sorted(codecs), "row_groups_per_file": groups,
            "shard_ids": [e.shard_id for e in entries], "shard_rows": [e.rows for e in entries]}


def subset(desc: dict[str, Any], images: int | None) -> tuple[dict[str, Any] | None, int]:
    """A filter on the first shards holding ``images`` images (None: all) and how many images they hold."""
    if images is None or images >= desc["rows"]:
        return None, desc["rows"]
    ids, total = [], 0
    for sid, rows in zip(desc["shard_ids"], desc["shard_rows"], strict=True):
        if total >= images:
            break
        ids.append(sid)
        total += rows
    return {"shard_id": ids}, total


def mid_epoch_rate(marks: list[tuple[float, int]]) -> float:
    """Images/s between the batches that complete 10 % and 90 % of an epoch's images (the steady state inside an
    epoch, without the read's start-up and the pipeline's drain; the window ``jobs/train_pose.py`` reports);
    ``marks``: (seconds, images so far)."""
    window = steady_window(marks)
    return window[2] / (window[1] - window[0]) if window is not None else float("nan")


def timed_epochs(make_iter: Any, epochs: int, pixel_bytes: int, sync: Any = None) -> dict[str, Any]:
    """Runs ``epochs`` passes (``make_iter()`` is timed too: the read call); first batch, first epoch, best later,
    and the best 10-90 % rate inside an epoch."""
    times, firsts, after, mids, images = [], [], [], [], 0
    for _ in range(epochs):
        t0 = time.perf_counter()
        images, first, first_n = 0, None, 0
        marks: list[tuple[float, int]] = []
        for batch in make_iter():
            if first is None:
                first, first_n = time.perf_counter() - t0, len(batch)
            images += len(batch)
            marks.append((time.perf_counter() - t0, images))
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
        firsts.append(first if first is not None else float("nan"))
        rest = times[-1] - (first or 0.0)
        after.append((images - first_n) / rest if rest > 0 else float("nan"))
        mids.append(mid_epoch_rate(marks))
    steady = min(times[1:]) if len(times) > 1 else times[0]
    return {"images": images, "first_batch_s": firsts[0], "first_batch_later_s": min(firsts[1:] or firsts),
            "epoch1_s": times[0], "steady_s": steady, "epoch1_images_per_s": images / times[0],
            "images_per_s": images / steady, "after_first_images_per_s": max(after[1:] or after),
            "mid_epoch_images_per_s": float(np.nanmax(mids)) if np.isfinite(mids).any() else float("nan"),
            "mb_per_s": images * pixel_bytes / steady / 1e6}


def start_ray(cpus: int) -> Any:
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def start_s3() -> tuple[Any, str, dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 in a subprocess; (process, endpoint, storage_options)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import logging, time; logging.getLogger('werkzeug').setLevel(logging.ERROR); "
            "from moto.server import ThreadedMotoServer as S; "
            f"s = S(ip_address='127.0.0.1', port={port}, verbose=False); s.start(); time.sleep(1e9)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-west-2"}}
    import fsspec

    fs = fsspec.filesystem("s3", **opts)
    for attempt in range(100):
        try:
            fs.mkdir("bench-loader")
            break
        except Exception:  # noqa: BLE001 - the server is still starting
            if attempt == 99:
                raise
            time.sleep(0.1)
    return proc, endpoint, opts


def upload(local: str, url: str, opts: dict[str, Any]) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", **opts)
    fs.put(local.rstrip("/") + "/", url.removeprefix("s3://"), recursive=True)


def run_mode(mode: str, url: str, desc: dict[str, Any], cpus: int, args: argparse.Namespace, flt: Any,
             storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from drrfarm.data import DrrIterableDataset, read_drrs, to_float_line_integrals

    px = desc["height"] * desc["width"]
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda and "gpu" in mode else None
    base = mode.removesuffix("-s3")
    if base.startswith("ray"):
        fl = base == "ray-float32"
        kw = {"batch_size": args.batch, "prefetch_batches": args.prefetch}
        if base == "ray-gpu-float":
            kw["device"] = "cuda"

        def make() -> Any:
            ds = read_drrs(url, COLUMNS, filter=flt, float_line_integral=fl, storage_options=storage_options)
            it = ds.iter_torch_batches(**kw)
            if base == "ray-gpu-float":
                return (to_float_line_integrals(b) for b in it)
            return (b["image"] for b in it)

        return timed_epochs(make, args.epochs, 4 * px if base != "ray-uint16" else 2 * px, sync)
    if base.startswith("torch"):
        tds = DrrIterableDataset(url, COLUMNS, filter=flt, batch_size=args.batch, shuffle=True,
                                 storage_options=storage_options)
        loader = tds.loader(num_workers=cpus, pin_memory=cuda, reuse_shared_memory=not base.endswith("-fresh"))
        epoch = [0]

        def make_t() -> Any:
            tds.set_epoch(epoch[0])
            epoch[0] += 1
            if base == "torch-gpu-float":
                return (to_float_line_integrals(b, "cuda") for b in loader)
            return (b["image"] for b in loader)

        return timed_epochs(make_t, args.epochs, 4 * px if base == "torch-gpu-float" else 2 * px, sync)
    if base == "pyarrow-decode":
        import pyarrow.parquet as pq

        from drrfarm.data import open_dataset_store
        from drrfarm.sinks import decode_images, read_manifest

        store = open_dataset_store(url)
        want = set(flt["shard_id"]) if flt else None
        keys = [k for e in read_manifest(store).values() if want is None or e.shard_id in want
                for k in e.keys_of("parquet")]

        def make_p() -> Any:
            for key in keys:
                with store.open_read(key) as fh:
                    pf = pq.ParquetFile(fh)
                    for g in range(pf.num_row_groups):
                        yield decode_images(pf.read_row_group(g))

        return timed_epochs(make_p, args.epochs, 2 * px)
    raise SystemExit(f"unknown mode {mode}")


def fmt(x: float, digits: int = 0) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:,.{digits}f}"


def tables(results: list[dict[str, Any]], datasets: list[dict[str, Any]], env: str, args: argparse.Namespace) -> str:
    out = [f"### Loader throughput (bench_loader.py; {env})", ""]
    for d in datasets:
        out.append(f"* {d['label']}: {d['rows']:,} images {d['height']}x{d['width']} {'/'.join(d['image_dtype'])}, "
                   f"{d['shards']} shards ({d['row_groups_per_file']} row group(s) each), {d['disk_mb']:,.0f} MB on "
                   f"disk, codec {'/'.join(d['codecs'])}")
    out += ["", f"Batch {args.batch}, prefetch_batches {args.prefetch}; first batch: seconds from the read call in the "
            "first epoch (for the first Ray reader of each --cpus value, on a freshly started Ray: cold workers); "
            "steady: the best epoch after the first, read call included; after 1st batch: that epoch from its first "
            "batch on; 10-90 %: the best epoch between the batches that complete 10 % and 90 % of its images (the "
            "steady state inside an epoch).", "",
            "| size | reader | cpus | images | first batch s | first epoch img/s | steady img/s | after 1st batch "
            "img/s | 10-90 % img/s | MB/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    top = max(args.cpus)
    for r in results:
        if r["cpus"] != top:
            continue
        out.append(f"| {r['size']}² | {r['mode']} | {r['cpus']} | {r['images']:,} | {fmt(r['first_batch_s'], 2)} | "
                   f"{fmt(r['epoch1_images_per_s'])} | **{fmt(r['images_per_s'])}** | "
                   f"{fmt(r['after_first_images_per_s'])} | {fmt(r['mid_epoch_images_per_s'])} | "
                   f"{fmt(r['mb_per_s'])} |")
    if len(args.cpus) > 1:
        cp = sorted(set(args.cpus))
        out += ["", f"Scaling (steady images/s; at most {args.scale_images} images per run):", "",
                "| size | reader | " + " | ".join(f"{c} cpus" for c in cp) + " |",
                "|---|---|" + "---:|" * len(cp)]
        keys = sorted({(r["size"], r["mode"]) for r in results if r["mode"] in args.scale_modes})
        for size, mode in keys:
            cells = []
            for c in cp:
                rs = [r for r in results if r["size"] == size and r["mode"] == mode and r["cpus"] == c and r["scaled"]]
                rs = rs or [r for r in results if r["size"] == size and r["mode"] == mode and r["cpus"] == c]
                cells.append(fmt(rs[0]["images_per_s"]) if rs else "-")
            out.append(f"| {size}² | {mode} | " + " | ".join(cells) + " |")
    def local_twin(r: dict[str, Any]) -> list[dict[str, Any]]:
        return [q for q in results if q["mode"] == r["mode"].removesuffix("-s3") and q["size"] == r["size"]
                and q["cpus"] == r["cpus"] and q["dataset"] == r["dataset"]]

    s3 = [(r, local_twin(r)) for r in results if r["mode"].endswith("-s3")]
    if s3:
        out += ["", "S3 (a moto server on 127.0.0.1) against the local disk, same dataset and readers:", "",
                "| size | reader | cpus | S3 steady img/s | local steady img/s | S3 / local | S3 10-90 % "
                "| local 10-90 % |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r, local in s3:
            if local:
                q = local[0]
                out.append(f"| {r['size']}² | {r['mode'].removesuffix('-s3')} | {r['cpus']} | "
                           f"{fmt(r['images_per_s'])} | {fmt(q['images_per_s'])} | "
                           f"{r['images_per_s'] / q['images_per_s']:.2f} | "
                           f"{fmt(r['mid_epoch_images_per_s'])} | {fmt(q['mid_epoch_images_per_s'])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", nargs="+", default=None, help="existing dataset URL(s); default: write --sizes")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--images", type=int, default=None, help="images to write per size (default by size)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prefetch", type=int, default=4, help="iter_torch_batches(prefetch_batches=...)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cpus", type=int, nargs="+", default=[2])
    p.add_argument("--modes", nargs="+", default=["ray-uint16", "ray-float32", "ray-gpu-float", "torch-uint16",
                                                  "torch-gpu-float", "pyarrow-decode"])
    p.add_argument("--scale-modes", nargs="+", default=["ray-uint16", "torch-uint16"],
                   help="modes also run at the smaller --cpus values")
    p.add_argument("--scale-images", type=int, default=1024,
                   help="images per run at the smaller --cpus values and for pyarrow-decode")
    p.add_argument("--s3", action="store_true", help="also read from a moto S3 server on 127.0.0.1")
    p.add_argument("--markdown", action="store_true", help="print markdown tables for benchmarks/RESULTS.md")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.cpus = sorted(set(args.cpus))

    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
        os.environ.setdefault(k, v)
    import ray
    import torch

    cuda = torch.cuda.is_available()
    modes = [m for m in args.modes if "gpu" not in m or cuda]
    skipped = sorted(set(args.modes) - set(modes))
    if skipped:
        print(f"# skipped (no CUDA): {skipped}", flush=True)
    tmp = tempfile.mkdtemp(prefix="drrfarm-bench-loader-")
    results: list[dict[str, Any]] = []
    datasets: list[dict[str, Any]] = []
    s3proc = None
    t_start = time.perf_counter()
    try:
        urls = list(args.dataset or [])
        if not urls:
            for size in args.sizes:
                url = os.path.join(tmp, f"s{size}")
                n = args.images or DEFAULT_COUNTS.get(size, max(64, (256 << 20) // (2 * size * size)))
                t0 = time.perf_counter()
                write(url, size, n)
                print(f"# wrote {n} images {size}x{size} in {time.perf_counter() - t0:.1f} s", flush=True)
                urls.append(url)
        for url in urls:
            d = describe(url)
            d["label"] = url if args.dataset else f"synthetic {d['height']}²"
            datasets.append(d)
            print(f"# {d['label']}: {d['rows']} images {d['height']}x{d['width']}, {d['shards']} shards, "
                  f"{d['disk_mb']:.0f} MB, codecs {d['codecs']}", flush=True)
        s3_urls: dict[str, str] = {}
        s3_opts = None
        if args.s3:
            try:
                s3proc, _, s3_opts = start_s3()
                for i, d in enumerate(datasets):
                    s3_urls[d["url"]] = f"s3://bench-loader/d{i}"
                    upload(d["url"].removeprefix("file://"), s3_urls[d["url"]], s3_opts)
            except ImportError as exc:
                print(f"# --s3 skipped: {exc}", flush=True)
                s3_urls = {}
        for cpus in args.cpus:
            top = cpus == max(args.cpus)
            ray_started = False
            run_modes = modes if top else [m for m in modes if m in args.scale_modes]
            for d in datasets:
                for mode in run_modes + ([f"{m}-s3" for m in ("ray-uint16", "torch-uint16") if m in modes]
                                         if top and s3_urls else []):
                    if mode.startswith("ray") and not ray_started:
                        start_ray(cpus)
                        ray_started = True
                    limit = args.scale_images if (not top or mode == "pyarrow-decode") else None
                    flt, n = subset(d, limit)
                    url = s3_urls[d["url"]] if mode.endswith("-s3") else d["url"]
                    try:
                        r = run_mode(mode, url, d, cpus, args, flt, s3_opts if mode.endswith("-s3") else None)
                    except Exception as exc:  # noqa: BLE001 - one reader failing must not lose the others
                        print(f"{d['height']:>5} {mode:<16} cpus {cpus:>2}: FAILED {type(exc).__name__}: {exc}",
                              flush=True)
                        continue
                    r.update(size=d["height"], mode=mode, cpus=cpus, batch=args.batch, scaled=limit is not None,
                             dataset=d["label"])
                    results.append(r)
                    print(f"{d['height']:>5} {mode:<16} cpus {cpus:>2}: {r['images_per_s']:8.0f} img/s steady, "
                          f"{r['mid_epoch_images_per_s']:8.0f} 10-90 %, "
                          f"{r['epoch1_images_per_s']:8.0f} first epoch, first batch {r['first_batch_s']:.2f} s "
                          f"({r['images']} images, {r['mb_per_s']:.0f} MB/s)", flush=True)
            if ray_started:
                ray.shutdown()
    finally:
        if s3proc is not None:
            s3proc.kill()
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    gpu = torch.cuda.get_device_name(0) if cuda else "no GPU"
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, {gpu}, "
           f"ray {ray.__version__}, torch {torch.__version__}, load average at end {load[0]:.1f}, "
           f"{time.perf_counter() - t_start:.0f} s")
    md = tables(results, datasets, env, args)
    if args.markdown:
        print("\n" + md)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"env": env, "args": vars(args), "datasets": datasets, "results": results, "markdown": md}, fh,
                      indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
