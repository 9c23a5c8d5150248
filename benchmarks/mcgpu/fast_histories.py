"""The fast scatter estimate (forced detection) against MC-GPU on the chest CT (AP): its error and kernel time as
functions of its histories, its grid and its coarse voxels.

    python benchmarks/mcgpu/fast_histories.py --inputs /tmp/mcgpu/inputs                    # CPU reference
    python benchmarks/mcgpu/fast_histories.py --inputs /tmp/mcgpu/inputs --backend cuda      # GPU host

``--inputs``: the cases written by ``make_inputs.py``; ``--images``: the ``mcgpu_images.npz`` of a GPU run of
``run_device.sh`` (default: the H200 run of 2026-12-03 in ``results/``; MC-GPU's chest scatter image, in drrfarm's
units, is the reference). For every configuration (coarse voxel size, which is also the transmission step; grid
bins; histories) and seed the estimate is interpolated to the 64² detector and compared pixel by pixel: mean
relative error, bias of the mean, and on the GPU the kernel time per image (both kernels, CUDA events). The GPU
replays the CPU's histories, so both engines give the same errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = Path(__file__).resolve().parent / "results"

import compare  # noqa: E402

from drrfarm.scatter import fast, forced  # noqa: E402


def evaluate(gpu, res, coarse, tables, cam, ref: np.ndarray, mm: float, bins: int, cut: float, n: int,
             seeds: list[int]) -> dict:
    """One configuration over ``seeds``: error and bias against ``ref`` (MC-GPU), time per image."""
    errs, biases, secs, events, parts = [], [], [], [], []
    for seed in seeds:
        t0 = time.perf_counter()
        if gpu is not None:
            t = gpu.simulate(res, tables, [cam], n, [seed], tally_shape=(bins, bins), solid_angle=True,
                             forced_step_mm=mm, cutoff_kev=cut)[0]
            secs.append(t.seconds)
            parts.append(gpu.last_kernel_seconds)
        else:
            t = forced.simulate_forced(coarse, tables, cam, n, seed, step_mm=mm, tally_shape=(bins, bins),
                                       solid_angle=True, cutoff_kev=cut)
            secs.append(time.perf_counter() - t0)
        img = fast.upsample_bilinear(t.scatter_signal, cam.height, cam.width)
        errs.append(float(np.mean(np.abs(img - ref) / ref)))
        biases.append(float(img.mean() / ref.mean() - 1.0))
        events.append(t.interactions.get("forced_events", 0) / n)
    row = {"backend": "cuda" if gpu is not None else "cpu", "voxel_mm": mm, "coarse_shape": list(coarse.shape),
           "bins": bins, "cutoff_kev": cut, "histories": n, "seeds": list(seeds),
           "mean_rel_error": float(np.mean(errs)), "worst_rel_error": float(np.max(errs)),
           "mean_bias": float(np.mean(biases)), "seconds_per_image": float(np.median(secs)),
           "collisions_per_history": float(np.mean(events))}
    for k in parts[0] if parts else ():
        row[f"{k}_seconds"] = float(np.median([q[k] for q in parts]))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=RESULTS / "2026-12-03-h200-images.npz")
    ap.add_argument("--stage", type=Path, default=Path(".device/mcgpu"), help="MC-GPU staging folder (tables.npz)")
    ap.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--histories", type=float, nargs="+", default=[5e3, 1e4, 2e4])
    ap.add_argument("--bins", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--voxel-mm", type=float, nargs="+", default=[8.0])
    ap.add_argument("--cutoff-kev", type=float, nargs="+", default=[0.0, 25.0],
                    help="photons below it absorbed where they are (0: none)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[31, 32, 33, 34])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    ref = np.load(args.images)["chest_mcgpu_scatter"].astype(np.float64)
    case = compare.load_case(args.inputs / "chest")
    tables = compare.tables_for(args.stage, case["names"], "ideal")
    vol, cam = case["volume"], case["camera"]
    gpu = None
    if args.backend == "cuda":
        from drrfarm.scatter.cuda import CudaScatter

        gpu = CudaScatter()
    rows = []
    for mm in args.voxel_mm:
        coarse = fast.coarsen_volume(vol, fast.coarsening_factors(vol, mm))
        res = gpu.resident(f"chest/{mm}", coarse) if gpu is not None else None
        if gpu is not None:  # warm-up: module, tables, first launch
            gpu.simulate(res, tables, [cam], 1000, [1], tally_shape=(8, 8), solid_angle=True, forced_step_mm=mm)
        for bins in args.bins:
            for cut in args.cutoff_kev:
                for n in map(int, args.histories):
                    rows.append(evaluate(gpu, res, coarse, tables, cam, ref, mm, bins, cut, n, args.seeds))
                    print(json.dumps(rows[-1]), flush=True)
    print("| voxels | grid | cut-off keV | histories | error against MC-GPU (mean of seeds) | worst | bias | "
          f"{'kernel' if gpu is not None else 'CPU'} ms per image | transport + forced ms |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        split = (f"{1e3 * r['transport_seconds']:.3f} + {1e3 * r['forced_seconds']:.3f}" if "forced_seconds" in r
                 else "")
        print(f"| {r['voxel_mm']:g} mm | {r['bins']}² | {r['cutoff_kev']:g} | {r['histories']:,} | "
              f"{100 * r['mean_rel_error']:.2f} % | "
              f"{100 * r['worst_rel_error']:.2f} % | {100 * r['mean_bias']:+.2f} % | "
              f"{1e3 * r['seconds_per_image']:.3f} | {split} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
