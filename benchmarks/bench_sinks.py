"""Benchmark: Parquet vs PNG shard encoding throughput (images/s, MB/s), not a test.

    python benchmarks/bench_sinks.py [--sizes 512 1024] [--batch 32] [--repeat 3] [--threads 1 2]

MB/s counts raw uint16 pixel bytes in (2 bytes/pixel, MB = 10^6 bytes), so formats compare on the
same input. "ratio" is raw pixel bytes / encoded bytes. Images are synthetic DRR-like line-integral
fields quantised to uint16: "ideal" (noise-free, as with the ideal detector) and "noisy"
(Poisson-like noise of ~10^4 photons/pixel). The "sink" rows time ShardSink.write_shard to a local
temporary directory end to end (quantise, encode, sha256, fsync, rename, manifest commit).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from drrfarm.sinks.parquet import encode_parquet
from drrfarm.sinks.png import encode_png16
from drrfarm.sinks.writer import ShardSink, quantize


def synthetic_line_integrals(n: int, size: int, noisy: bool, seed: int = 0) -> np.ndarray:
    """(n, size, size) float32 smooth 'body' line integrals in g/cm2-like units, optionally noisy."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    out = np.empty((n, size, size), np.float32)
    for i in range(n):
        body = np.clip(1.0 - (u / 0.42) ** 2 - (v / 0.48) ** 2, 0, None) ** 0.5 * 30.0
        spine = 12.0 * np.exp(-((u - 0.02 * np.sin(i)) / 0.04) ** 2)
        ribs = 3.0 * (np.sin(v * 60 + i) > 0.6) * (body > 5)
        img = body + spine + ribs
        if noisy:
            counts = rng.poisson(1e4 * np.exp(-0.2 * img)).astype(np.float32)
            img = np.maximum(-np.log(np.maximum(counts, 1) / 1e4) / 0.2, 0.0)
        out[i] = img
    return out


def rows_for(n: int) -> list[dict]:
    return [
        {"image_index": i, "seed": i, "volume_id": "bench", "K": np.eye(3), "R": np.eye(3), "t": [0, 0, 530.0],
         "P": np.ones((3, 4)), "kvp": 90.0, "detector": "ideal", "output": "line_integral"}
        for i in range(n)
    ]


def timed(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_threads(fn, jobs: int, threads: int):
    if threads == 1:
        return [fn(j) for j in range(jobs)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, range(jobs)))


def compare_layouts(size: int, n: int, repeat: int, with_ray: bool) -> None:
    """Image column as raw bytes (large_binary, what drrfarm writes) vs fixed_shape_tensor<uint16>."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from drrfarm.sinks.parquet import decode_images

    f = synthetic_line_integrals(n, size, noisy=True)
    q, _ = quantize(f, np.array([float(x.max()) / 65535 for x in f]))
    tmp = tempfile.mkdtemp(prefix="bench-layout-")
    print(f"\n# image column layout, {n} x {size}^2 uint16 (noisy), best of {repeat}")
    print("| layout | codec | write images/s | file MiB | pyarrow->numpy->torch images/s | ray.data images/s |")
    print("|---|---|---|---|---|---|")
    try:
        import torch

        for layout, codec in [(lay, c) for c in ("none", "zstd") for lay in ("binary", "tensor")]:
            path = os.path.join(tmp, f"{layout}-{codec}.parquet")
            level = 3 if codec == "zstd" else None
            if layout == "binary":
                rows = [{"image_index": i, "image_scale": 1.0, "height": size, "width": size,
                         "image_dtype": "uint16"} for i in range(n)]

                def write(path=path, rows=rows, codec=codec, level=level):
                    with open(path, "wb") as fh:
                        fh.write(encode_parquet(q, rows, {}, compression=codec, compression_level=level))
            else:
                ttype = pa.fixed_shape_tensor(pa.uint16(), (size, size))
                storage = pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1)), size * size)
                table = pa.table({"image": pa.ExtensionArray.from_storage(ttype, storage),
                                  "image_index": pa.array(range(n))})

                def write(path=path, table=table, codec=codec, level=level):
                    pq.write_table(table, path, compression=codec, compression_level=level, use_dictionary=False,
                                   write_statistics=["image_index"],
                                   row_group_size=max(1, (64 << 20) // (size * size * 2)))

            wt, _ = timed(write, repeat)

            def read(path=path, layout=layout):
                table = pq.read_table(path)
                arr = decode_images(table) if layout == "binary" else table.column("image").combine_chunks(
                ).to_numpy_ndarray()
                return torch.from_numpy(arr.astype(np.float32))

            rt, x = timed(read, repeat)
            assert tuple(x.shape) == (n, size, size)
            ray_ips = float("nan")
            if with_ray:
                import ray

                from drrfarm.sinks.parquet import images_from_batch

                def ray_read(path=path, layout=layout):
                    count = 0
                    for b in ray.data.read_parquet(path).iter_batches(batch_size=32, batch_format="numpy"):
                        arr = images_from_batch(b) if layout == "binary" else b["image"]
                        count += len(torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32)))
                    return count

                ray_t, count = timed(ray_read, repeat)
                assert count == n
                ray_ips = n / ray_t
            mib = os.path.getsize(path) / 2**20
            print(f"| {layout} | {codec}{'-3' if level else ''} | {n / wt:.0f} | {mib:.1f} | {n / rt:.0f} "
                  f"| {ray_ips:.0f} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batch", type=int, default=32, help="images per shard")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layouts", type=int, default=0, metavar="N",
                    help="only compare image-column layouts with N images (of the first size)")
    ap.add_argument("--ray", action="store_true", help="with --layouts: also time ray.data.read_parquet")
    args = ap.parse_args()
    if args.layouts:
        if args.ray:
            import ray

            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        compare_layouts(args.sizes[0], args.layouts, args.repeat, args.ray)
        return

    print(f"# bench_sinks: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, batch {args.batch}, best of {args.repeat}")
    print("| size | images | codec | threads | images/s | MB/s (raw in) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for kind in ("ideal", "noisy"):
            f = synthetic_line_integrals(args.batch, size, noisy=kind == "noisy")
            scales = np.array([float(x.max()) / 65535 for x in f])
            q, _ = quantize(f, scales)
            rows = rows_for(args.batch)
            for r, s in zip(rows, scales, strict=True):
                r["image_scale"] = float(s)
            raw_bytes = q.nbytes
            codecs = {
                "parquet zstd-3": lambda q=q, rows=rows: len(encode_parquet(q, rows, {})),
                "parquet none": lambda q=q, rows=rows: len(
                    encode_parquet(q, rows, {}, compression="none", compression_level=None)),
                "png level 1": lambda q=q: sum(len(encode_png16(x, compress_level=1)) for x in q),
                "png level 6": lambda q=q: sum(len(encode_png16(x, compress_level=6)) for x in q),
            }
            for name, fn in codecs.items():
                for threads in args.threads:
                    jobs = max(threads, 2)

                    def work(fn=fn, threads=threads, jobs=jobs):
                        return sum(run_threads(lambda _j: fn(), jobs, threads))

                    dt, nbytes = timed(work, args.repeat)
                    ips = jobs * args.batch / dt
                    mbs = jobs * raw_bytes / dt / 1e6
                    ratio = jobs * raw_bytes / nbytes
                    print(f"| {size} | {kind} | {name} | {threads} | {ips:.1f} | {mbs:.0f} | {ratio:.2f} |",
                          flush=True)
            # end to end: ShardSink to a local temp dir (float32 in, uint16 out)
            for fmt in ("parquet", "png"):
                tmp = tempfile.mkdtemp(prefix="bench-sinks-")
                try:
                    sink = ShardSink(tmp, formats=(fmt,))
                    counter = iter(range(10**9))

                    def write(sink=sink, counter=counter, f=f, rows=rows):
                        sink.write_shard(f"s{next(counter):06d}", f, rows, {"spec_sha256": "x"})

                    dt, _ = timed(write, args.repeat)
                    print(f"| {size} | {kind} | sink {fmt} (local, end to end) | 1 | {args.batch / dt:.1f} "
                          f"| {raw_bytes / dt / 1e6:.0f} | - |", flush=True)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
