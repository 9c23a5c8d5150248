"""Render benchmark (issue 13 §7): the CUDA backend on the sample chest CT, and nanodrr in the same run.

Geometry: source 510 mm from the volume centre, SDD 1020 mm, detectors 200² (2.0 mm), 512² (0.776 mm),
1024² (0.388 mm), and 1536² (0.194 mm) with SID 530 mm (DeepDRR's C-arm default); AP and a 30° oblique
(alpha = 30°). Modes:

* ``mono``: one material (total density), monoenergetic 60 keV, no noise, line-integral output, float16;
* ``realistic``: three materials (air / soft tissue / bone), 90 kVp SpekPy spectrum rebinned to 20 bins,
  Poisson noise (10⁴ photons per open-field pixel), line-integral output, uint16.

Both use Joseph slice stepping (≤ 1e-3 from the converged march, see tests/test_cuda.py). ``images/s`` is
wall-clock with two streams and double buffers, including the copy of every batch into pinned host
memory; ``kernel images/s`` times one launch with CUDA events (median). ``G samples/s`` counts the
texture samples of the images rendered per wall second. nanodrr 0.1.7 (fused Triton kernel, 500
samples per ray, float32, images left on the GPU) renders the same CT and cameras; ``ratio`` = ours
(wall, with the copy to host) / nanodrr.

Usage (on the GPU host): ``python benchmarks/bench_render.py --json out.json --md out.md [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "device"))

from tables import load_tables  # noqa: E402

from drrfarm.geometry import CArm, world_from_patient_default  # noqa: E402
from drrfarm.physics import Physics  # noqa: E402
from drrfarm.volume import MaterialVolume, load_volume, segment_by_thresholds  # noqa: E402

SIZES = {  # name: (pixels, pixel_mm, sid_mm)
    "200": (200, 2.0, 510.0),
    "512": (512, 0.776, 510.0),
    "1024": (1024, 0.388, 510.0),
    "1536": (1536, 0.194, 530.0),
}
POSES = {"AP": 0.0, "oblique30": 30.0}
SDD_MM = 1020.0
PHOTONS = 1e4


def cameras(size: str, pose: str, batch: int) -> list:
    n, pixel_mm, sid = SIZES[size]
    carm = CArm(sdd_mm=SDD_MM, sid_mm=sid, height=n, width=n, pixel_mm=pixel_mm)
    return [carm.camera(alpha_deg=POSES[pose])] * batch


def wall_rate(backend, handle, cams, tables, physics, dtype: str, min_time: float) -> tuple[float, int, float]:
    """Images/s, wall clock, two streams and double buffers, every batch copied to pinned memory."""
    B, H, W = len(cams), cams[0].height, cams[0].width
    dev = [backend.allocate((B, H, W), dtype) for _ in range(2)]
    pin = [backend.pinned((B, H, W), dtype) for _ in range(2)]
    streams = [backend.new_stream() for _ in range(2)]
    seeds = list(range(B))
    jobs: list = [None, None]
    for k in range(2):  # warm-up (also builds layouts)
        backend.render_async(handle, cams, tables, physics, seeds, dtype=dtype, out=dev[k], host_out=pin[k],
                             stream=streams[k]).wait()
    n = 0
    t0 = time.perf_counter()
    while True:
        k = n % 2
        if jobs[k] is not None:
            jobs[k].wait()
        jobs[k] = backend.render_async(handle, cams, tables, physics, seeds, dtype=dtype, out=dev[k],
                                       host_out=pin[k], stream=streams[k])
        n += 1
        if n >= 4 and time.perf_counter() - t0 >= min_time:
            break
    for j in jobs:
        j.wait()
    elapsed = time.perf_counter() - t0
    free, total = backend.memory_info()  # while this configuration's buffers are alive: its peak
    del dev, pin, jobs
    return n * B / elapsed, n, (total - free) / 2**20


def kernel_rate(backend, handle, cams, tables, physics, dtype: str, reps: int = 5) -> float:
    """Images/s from CUDA events around single launches (median), images left on the GPU."""
    import pycuda.driver as drv

    B, H, W = len(cams), cams[0].height, cams[0].width
    out = backend.allocate((B, H, W), dtype)
    stream = backend.stream()
    seeds = list(range(B))
    times = []
    with backend._gpu.context():
        for _ in range(reps + 1):
            start, end = drv.Event(), drv.Event()
            start.record(stream)
            backend.render_async(handle, cams, tables, physics, seeds, dtype=dtype, out=out, to_host=False,
                                 stream=stream)
            end.record(stream)
            end.synchronize()
            times.append(end.time_since(start) / 1e3)
    return B / statistics.median(times[1:])


def nanodrr_setup(volume, world_from_ijk):
    import torch
    from nanodrr.data import Subject

    img = torch.from_numpy(np.ascontiguousarray(volume.hu)).permute(2, 1, 0)[None, None].contiguous().cuda()
    v2w = torch.tensor(world_from_ijk, dtype=torch.float64)
    subject = Subject(img, torch.zeros_like(img), v2w.float(), v2w.inverse().float(),
                      Subject._make_voxel_to_grid(img.shape), torch.zeros(3), max_label=0).cuda()
    return subject


def nanodrr_rate(subject, cams, min_time: float) -> tuple[float, object]:
    import torch
    from nanodrr.drr import render

    B, H, W = len(cams), cams[0].height, cams[0].width
    k = np.stack([c.K for c in cams]).copy()
    k[:, 0, 2] += 0.5  # nanodrr puts pixel centres at half-integers
    k[:, 1, 2] += 0.5
    rt = np.zeros((B, 4, 4))
    for i, c in enumerate(cams):
        rt[i, :3, :3] = c.R.T
        rt[i, :3, 3] = c.source_world_mm
        rt[i, 3, 3] = 1.0
    k_inv = torch.tensor(np.linalg.inv(k), dtype=torch.float32, device="cuda")
    rt_inv = torch.tensor(rt, dtype=torch.float32, device="cuda")
    sdd = torch.tensor([c.sdd_mm for c in cams], dtype=torch.float32, device="cuda")
    with torch.no_grad():
        for _ in range(2):
            img = render(subject, k_inv, rt_inv, sdd, H, W, n_samples=500, backend="triton")
        torch.cuda.synchronize()
        n = 0
        t0 = time.perf_counter()
        while True:
            img = render(subject, k_inv, rt_inv, sdd, H, W, n_samples=500, backend="triton")
            n += 1
            if n >= 3:
                torch.cuda.synchronize()
                if time.perf_counter() - t0 >= min_time:
                    break
        elapsed = time.perf_counter() - t0
    return n * B / elapsed, img


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--sizes", default="200,512,1024,1536")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--poses", default="AP,oblique30")
    ap.add_argument("--modes", default="mono,realistic")
    ap.add_argument("--min-time", type=float, default=0.4)
    ap.add_argument("--no-nanodrr", action="store_true")
    ap.add_argument("--variants", action="store_true", help="A/B kernel build and block-shape variants")
    ap.add_argument("--variants-only", action="store_true")
    ap.add_argument("--tune", action="store_true", help="pick kernel build options first (reported)")
    ap.add_argument("--fused", type=int, default=0, help="1: one fused kernel, 0: the split pipeline (default)")
    ap.add_argument("--method", default="joseph")
    args = ap.parse_args(argv)

    import pycuda.driver as drv

    from drrfarm.render.cuda import CudaBackend
    from drrfarm.render.cuda_plan import count_samples
    from drrfarm.samples.downloads import chest_ct

    volume = load_volume(chest_ct())
    mv3 = segment_by_thresholds(volume)
    mv1 = MaterialVolume(["soft_tissue"], mv3.densities_g_cm3.sum(axis=0, keepdims=True), mv3.patient_from_ijk,
                         mv3.volume_sha256, {"method": "total density"})
    wfp = world_from_patient_default(volume.centre_patient_mm())
    tables = {"mono": load_tables("mono:60", mv1.material_names, "ideal"),
              "realistic": load_tables("90KV_AL40@20", mv3.material_names, "ideal")}
    physics = {"mono": Physics(method=args.method, output="line_integral"),
               "realistic": Physics(method=args.method, output="line_integral", photons=PHOTONS)}
    dtypes = {"mono": "float16", "realistic": "uint16"}
    defines: dict[str, int] = {}
    tuning = []
    if args.tune:  # pick the slice-loop unroll / register cap per texel width (1024² AP, batch 16)
        cams = cameras("1024", "AP", 16)
        for mode, candidates in (
            ("mono", [{}, {"DRR_UNROLL": 8}, {"DRR_UNROLL": 8, "DRR_MARCH_MIN_BLOCKS_C1": 6}]),
            ("realistic", [{}, {"DRR_UNROLL_C4": 8, "DRR_MARCH_MIN_BLOCKS_C4": 4},
                           {"DRR_UNROLL_C4": 8, "DRR_MARCH_MIN_BLOCKS_C4": 3},
                           {"DRR_UNROLL_C4": 2, "DRR_MARCH_MIN_BLOCKS_C4": 8}]),
        ):
            best = (0.0, {})
            for cand in candidates:
                be = CudaBackend(device=0, defines=cand, fused=bool(args.fused))
                h = be.prepare(mv1 if mode == "mono" else mv3, wfp)
                rate = kernel_rate(be, h, cams, tables[mode], physics[mode], dtypes[mode])
                tuning.append({"mode": mode, "defines": cand, "kernel_images_per_s": rate})
                print(json.dumps(tuning[-1]), flush=True)
                be.close()
                del be, h
                best = max(best, (rate, cand), key=lambda x: x[0])
            defines.update(best[1])
    import gc

    gc.collect()
    backend = CudaBackend(device=0, fused=bool(args.fused), defines=defines)
    free0, total = backend.memory_info()
    handles = {"mono": backend.prepare(mv1, wfp), "realistic": backend.prepare(mv3, wfp)}
    header = {
        "device": backend.device_name, "arch": backend._gpu.arch, "driver": drv.get_driver_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": "uncommitted working tree",
        "python": platform.python_version(), "kernel_build": backend.kernel_source, "method": args.method,
        "fused": bool(args.fused), "defines": defines,
        "gpu_used_at_start_mb": (total - free0) / 2**20, "ct_shape": list(volume.shape), "gpu_total_mb": total / 2**20,
    }
    print(json.dumps(header), flush=True)
    rows = []
    sizes = args.sizes.split(",")
    if args.variants_only:
        sizes = []
    batches = [int(b) for b in args.batches.split(",")]
    for size in sizes:
        for pose in args.poses.split(","):
            samples_per_image = {m: count_samples(handles[m], cameras(size, pose, 1)[0], physics[m])
                                 for m in ("mono", "realistic")}
            for mode in args.modes.split(","):
                for batch in batches:
                    cams = cameras(size, pose, batch)
                    rate, n, used_mb = wall_rate(backend, handles[mode], cams, tables[mode], physics[mode],
                                                 dtypes[mode], args.min_time)
                    krate = kernel_rate(backend, handles[mode], cams, tables[mode], physics[mode], dtypes[mode])
                    row = {"size": size, "pose": pose, "mode": mode, "batch": batch, "images_per_s": rate,
                           "kernel_images_per_s": krate, "gsamples_per_s": rate * samples_per_image[mode] / 1e9,
                           "samples_per_image": samples_per_image[mode], "gpu_used_mb": used_mb,
                           "resident_mb": backend.cache_stats()["bytes_resident"] / 2**20, "launches": n}
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    variants = []
    if args.variants:
        cams = cameras("1024", "AP", 16)

        def measure(be: CudaBackend, tag: dict) -> None:
            for mode in ("mono", "realistic"):
                h = be.prepare(mv1 if mode == "mono" else mv3, wfp)
                krate = kernel_rate(be, h, cams, tables[mode], physics[mode], dtypes[mode])
                v = {**tag, "mode": mode, "kernel_images_per_s": krate,
                     "gsamples_per_s": krate * count_samples(h, cams[0], physics[mode]) / 1e9}
                variants.append(v)
                print(json.dumps(v), flush=True)

        for defines, fused in (({}, True), ({"DRR_MIN_BLOCKS": 8}, True), ({}, False), ({"DRR_UNROLL": 8}, False),
                               ({"DRR_UNROLL": 2}, False), ({"DRR_MARCH_MIN_BLOCKS_C4": 5}, False),
                               ({"DRR_MARCH_MIN_BLOCKS_C4": 8}, False), ({"DRR_MARCH_MIN_BLOCKS_C1": 6}, False)):
            be = CudaBackend(device=0, defines=defines, fused=fused)
            measure(be, {"defines": defines, "fused": fused, "block": [16, 16]})
            be.close()
        for block in ((32, 8), (8, 8), (32, 4), (64, 2)):
            be = CudaBackend(device=0, fused=False, block=block)
            measure(be, {"fused": False, "block": list(block)})
            be.close()
        be = CudaBackend(device=0, exact_interpolation=True, fused=False)
        measure(be, {"exact_interpolation": True, "fused": False})
        be.close()
        tri = CudaBackend(device=0, fused=False)
        for step in (1.0, 0.5):
            ph = Physics(method="trilinear", step_voxels=step, output="line_integral")
            h = tri.prepare(mv1, wfp)
            krate = kernel_rate(tri, h, cams, tables["mono"], ph, "float16")
            v = {"method": "trilinear", "step_voxels": step, "mode": "mono", "kernel_images_per_s": krate,
                 "gsamples_per_s": krate * count_samples(h, cams[0], ph) / 1e9}
            variants.append(v)
            print(json.dumps(v), flush=True)
        tri.close()
        if args.variants_only:
            print(json.dumps({"variants": variants}))
            return 0

    nano = []
    if not args.no_nanodrr:
        try:
            import torch

            subject = nanodrr_setup(volume, wfp @ volume.patient_from_ijk)
            for size in sizes:
                for pose in args.poses.split(","):
                    ours1 = backend.line_integrals(handles["mono"], cameras(size, pose, 1),
                                                   physics["mono"])[0, 0]
                    for batch in batches:
                        cams = cameras(size, pose, batch)
                        torch.cuda.reset_peak_memory_stats()
                        rate, img = nanodrr_rate(subject, cams, args.min_time)
                        corr = float(np.corrcoef(img[0, 0].float().cpu().numpy().ravel(), ours1.ravel())[0, 1])
                        r = {"size": size, "pose": pose, "batch": batch, "nanodrr_images_per_s": rate,
                             "nanodrr_peak_mb": torch.cuda.max_memory_allocated() / 2**20, "corr_with_ours": corr}
                        nano.append(r)
                        print(json.dumps(r), flush=True)
                        del img
        except Exception as exc:  # noqa: BLE001 - report, keep our numbers
            print(f"nanodrr failed: {type(exc).__name__}: {exc}", flush=True)

    result = {"header": header, "rows": rows, "nanodrr": nano, "variants": variants, "tuning": tuning}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    md = to_markdown(result)
    if args.md:
        args.md.write_text(md)
    print(md)
    return 0


def to_markdown(result: dict) -> str:
    h = result["header"]
    nano = {(r["size"], r["pose"], r["batch"]): r["nanodrr_images_per_s"] for r in result["nanodrr"]}
    lines = [
        f"### {h['date']} — {h['device']} ({h['arch']}, driver {h['driver']}), commit: {h['commit']}",
        "",
        f"Chest CT {h['ct_shape']}, method {h['method']}, {'fused kernel' if h['fused'] else 'split pipeline'}, "
        f"kernel defines {h['defines'] or 'default'} (from {h['kernel_build']}). images/s: wall clock "
        "incl. copy to pinned host memory; kernel: CUDA events, one launch; ratio: ours (wall) / nanodrr "
        "(500 samples/ray, float32 left on the GPU).",
        "",
        "| size | pose | mode | batch | images/s | kernel images/s | G samples/s | GPU used MB | nanodrr images/s"
        " | ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        n = nano.get((r["size"], r["pose"], r["batch"])) if r["mode"] == "mono" else \
            nano.get((r["size"], r["pose"], r["batch"]))
        ratio = f"{r['images_per_s'] / n:.2f}" if n else "—"
        lines.append(
            f"| {r['size']}² | {r['pose']} | {r['mode']} | {r['batch']} | {r['images_per_s']:,.0f} | "
            f"{r['kernel_images_per_s']:,.0f} | {r['gsamples_per_s']:,.0f} | {r['gpu_used_mb']:,.0f} | "
            f"{n:,.0f} | {ratio} |" if n else
            f"| {r['size']}² | {r['pose']} | {r['mode']} | {r['batch']} | {r['images_per_s']:,.0f} | "
            f"{r['kernel_images_per_s']:,.0f} | {r['gsamples_per_s']:,.0f} | {r['gpu_used_mb']:,.0f} | — | — |"
        )
    if result["variants"]:
        lines += ["", "Variants (1024² AP, batch 16, kernel images/s):", ""]
        for v in result["variants"]:
            lines.append(f"- {json.dumps({k: v[k] for k in v if k != 'kernel_images_per_s'})}: "
                         f"{v['kernel_images_per_s']:,.0f}")
    if result["nanodrr"]:
        corr = min(r["corr_with_ours"] for r in result["nanodrr"])
        lines += ["", f"nanodrr vs ours (mono line integrals, first image): min correlation {corr:.4f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
