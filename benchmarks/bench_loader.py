"""Benchmark: loader throughput from local Parquet shards (batches/s, images/s, MB/s), not a test.

    python benchmarks/bench_loader.py [--sizes 256 1024] [--batch 32] [--epochs 3] [--cpus 2] [--markdown]

For each image size a dataset is written with ShardSink (uint16, zstd; synthetic DRR-like noisy line
integrals, ~1.05x compressible like real noisy DRRs) into a temporary folder, then read back by:

* ``ray uint16``  -- ``read_drrs(url, ["alpha_deg", "beta_deg"]).iter_torch_batches(batch_size)``
  on a private local Ray with ``--cpus`` CPUs (images as torch.uint16, the stored dtype);
* ``ray float32`` -- the same with ``float_line_integral=True`` (float32 line integrals);
* ``ray materialized`` -- ``read_drrs(...).materialize()`` once ("first epoch" = that read), then
  ``iter_torch_batches`` from the object store (what ``train_pose.py --materialize`` does);
* ``torch iterable`` -- ``DataLoader(DrrIterableDataset(url, ...), batch_size, num_workers=--cpus)``
  (no Ray);
* ``pyarrow decode`` -- one process reading each row group and decoding it with the sinks'
  ``decode_images`` (an upper bound for one core; no batching into tensors).

Every epoch reads every image once; the first epoch (Ray: includes planning and worker start-up) is
reported separately from the best of the following ones. MB/s counts decoded pixel bytes of the
returned dtype (MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from typing import Any

import numpy as np

#: images per dataset and per shard, by size (~128-256 MB of uint16 pixels each)
DEFAULT_COUNTS = {256: (1024, 128), 512: (512, 64), 1024: (128, 16)}


def synthetic(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size) float32 smooth body-like line integrals with Poisson noise of ~2e4 photons."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    body = np.sqrt(np.clip(1.0 - (u / 0.42) ** 2 - (v / 0.48) ** 2, 0, None)) * 4.0
    out = np.empty((n, size, size), np.float32)
    for i in range(n):
        li = 0.5 + body + 1.5 * np.exp(-((u - 0.05 * np.sin(i)) / 0.04) ** 2)
        counts = rng.poisson(2e4 * np.exp(-li)).astype(np.float32)
        out[i] = -np.log(np.maximum(counts, 0.5) / 2e4)
    return out


def write(url: str, size: int, n: int, per_shard: int) -> None:
    from drrfarm.sinks import ShardSink

    sink = ShardSink(url)
    for s in range(n // per_shard):
        imgs = synthetic(per_shard, size, seed=s)
        rows = [{"image_index": i, "seed": s * per_shard + i, "volume_id": f"vol{s % 4}", "alpha_deg": float(i),
                 "beta_deg": float(s), "image_scale": 16.0 / 65535, "output": "line_integral"}
                for i in range(per_shard)]
        sink.write_shard(f"bench-{size}-{s:04d}", imgs, rows, {"mlflow_run_id": "", "sweep_id": "bench"})


def run_epochs(make_iter: Any, epochs: int, item_bytes: int) -> dict[str, float]:
    """Time ``epochs`` passes; returns first-epoch and best-later-epoch rates."""
    times, batches, images = [], 0, 0
    for _ in range(epochs):
        t0 = time.perf_counter()
        batches = images = 0
        for batch in make_iter():
            images += len(batch["image"])
            batches += 1
        times.append(time.perf_counter() - t0)
    best = min(times[1:]) if len(times) > 1 else times[0]
    return {"batches": batches, "images": images, "first_s": times[0], "best_s": best,
            "batches_per_s": batches / best, "images_per_s": images / best,
            "mb_per_s": images * item_bytes / best / 1e6, "first_batches_per_s": batches / times[0]}


def pyarrow_decode(url: str) -> Any:
    import pyarrow.parquet as pq

    from drrfarm.data import open_dataset_store
    from drrfarm.sinks import decode_images, read_manifest

    store = open_dataset_store(url)
    keys = read_manifest(store).keys_of("parquet")

    def it():
        for key in keys:
            with store.open_read(key) as fh:
                pf = pq.ParquetFile(fh)
                for g in range(pf.num_row_groups):
                    yield {"image": decode_images(pf.read_row_group(g))}

    return it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--modes", nargs="+",
                   default=["ray-uint16", "ray-float32", "ray-materialized", "torch-iterable", "pyarrow-decode"])
    p.add_argument("--markdown", action="store_true", help="print a markdown table for benchmarks/RESULTS.md")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch
    from torch.utils.data import DataLoader

    from drrfarm.data import DrrIterableDataset, read_drrs

    torch.set_num_threads(1)
    results = []
    tmp = tempfile.mkdtemp(prefix="drrfarm-bench-loader-")
    ray_started = False
    try:
        for size in args.sizes:
            n, per = DEFAULT_COUNTS.get(size, (max(16, (128 << 20) // (2 * size * size)), 16))
            url = os.path.join(tmp, f"s{size}")
            t0 = time.perf_counter()
            write(url, size, n, per)
            disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(url) for f in fs)
            took = time.perf_counter() - t0
            print(f"# {size}x{size}: wrote {n} images ({disk / 1e6:.0f} MB on disk) in {took:.1f} s", flush=True)
            for mode in args.modes:
                if mode.startswith("ray") and not ray_started:
                    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
                             _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
                    ray.data.DataContext.get_current().enable_progress_bars = False
                    logging.getLogger("ray.data").setLevel(logging.WARNING)
                    ray_started = True
                if mode == "ray-uint16":
                    ds = read_drrs(url, ["alpha_deg", "beta_deg"])
                    r = run_epochs(lambda ds=ds: ds.iter_torch_batches(batch_size=args.batch), args.epochs,
                                   2 * size * size)
                elif mode == "ray-float32":
                    ds = read_drrs(url, ["alpha_deg", "beta_deg"], float_line_integral=True)
                    r = run_epochs(lambda ds=ds: ds.iter_torch_batches(batch_size=args.batch), args.epochs,
                                   4 * size * size)
                elif mode == "ray-materialized":
                    t0 = time.perf_counter()
                    ds = read_drrs(url, ["alpha_deg", "beta_deg"]).materialize()
                    took = time.perf_counter() - t0
                    r = run_epochs(lambda ds=ds: ds.iter_torch_batches(batch_size=args.batch), args.epochs,
                                   2 * size * size)
                    r["first_s"] = took  # the materialising read; epochs then come from the object store
                    del ds
                elif mode == "torch-iterable":
                    tds = DrrIterableDataset(url, ["alpha_deg", "beta_deg"])
                    r = run_epochs(lambda tds=tds: DataLoader(tds, batch_size=args.batch, num_workers=args.cpus,
                                                              persistent_workers=False), args.epochs, 2 * size * size)
                elif mode == "pyarrow-decode":
                    r = run_epochs(pyarrow_decode(url), args.epochs, 2 * size * size)
                    r["batches_per_s"] = float("nan")  # row groups, not batches of --batch
                else:
                    raise SystemExit(f"unknown mode {mode}")
                r.update(size=size, mode=mode, batch=args.batch)
                results.append(r)
                print(f"{size:>5} {mode:<15} batch {args.batch}: {r['batches_per_s']:7.2f} batches/s "
                      f"{r['images_per_s']:8.1f} img/s {r['mb_per_s']:7.1f} MB/s  "
                      f"(first epoch {r['first_s']:.2f} s, best {r['best_s']:.2f} s, {r['images']} images)",
                      flush=True)
    finally:
        if ray_started:
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, --cpus {args.cpus}, "
           f"ray {ray.__version__}, torch {torch.__version__}, load average at end {load[0]:.1f}")
    if args.markdown:
        print(f"\n### Loader throughput (bench_loader.py; {env})\n")
        print("| size | reader | batch | batches/s | images/s | MB/s | first epoch s |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            bps = "-" if r["mode"] == "pyarrow-decode" else f"{r['batches_per_s']:.2f}"
            print(f"| {r['size']}² | {r['mode']} | {r['batch']} | {bps} | {r['images_per_s']:.0f} | "
                  f"{r['mb_per_s']:.0f} | {r['first_s']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"env": env, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
