"""The fast scatter estimate's error against MC-GPU as a function of its histories (chest CT, AP), on the CPU.

    python benchmarks/mcgpu/fast_histories.py --inputs /tmp/mcgpu/inputs

``--inputs``: the cases written by ``make_inputs.py``; ``--images``: the ``mcgpu_images.npz`` of a GPU run of
``run_device.sh`` (default: the H200 run of 2026-12-03 in ``results/``; MC-GPU's chest scatter image, in drrfarm's
units, is the reference). The CPU engine replays the
GPU's histories exactly, so the errors hold for the GPU; its kernel time is ~20 ns per history on an H200
(``benchmarks/RESULTS.md``). For each history count and seed the tally (16² and 32² bins) is low-passed with four
widths (100 to 6,400 detected photons per kernel) and compared over the 64² detector.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = Path(__file__).resolve().parent / "results"

import compare  # noqa: E402

from drrfarm import scatter  # noqa: E402
from drrfarm.scatter import fast  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=RESULTS / "2026-12-03-h200-images.npz")
    ap.add_argument("--stage", type=Path, default=Path(".device/mcgpu"), help="MC-GPU staging folder (tables.npz)")
    ap.add_argument("--histories", type=float, nargs="+", default=[2e4, 5e4, 1e5, 2e5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[31, 32, 33])
    args = ap.parse_args(argv)
    ref = np.load(args.images)["chest_mcgpu_scatter"].astype(np.float64)
    case = compare.load_case(args.inputs / "chest")
    tables = compare.tables_for(args.stage, case["names"], "ideal")
    vol, cam = case["volume"], case["camera"]
    coarse = fast.coarsen_volume(vol, fast.coarsening_factors(vol, scatter.FAST_VOXEL_MM))
    errors: dict[tuple[int, int, int], list[float]] = {}
    for n in map(int, args.histories):
        for seed in args.seeds:
            t0 = time.perf_counter()
            for bins in (16, 32):
                t = scatter.simulate(coarse, tables, cam, n, seed, tally_shape=(bins, bins), solid_angle=True)
                for per_kernel in (100, 400, 1600, 6400):
                    sigma = scatter.lowpass_sigma_bins(t.scatter_counts * (n / t.scatter_counts.size), per_kernel)
                    img = fast.upsample_bilinear(fast.gaussian_lowpass(t.scatter_signal, sigma), cam.height, cam.width)
                    errors.setdefault((n, bins, per_kernel), []).append(float(np.mean(np.abs(img - ref) / ref)))
            print(f"# {n} histories, seed {seed}: {time.perf_counter() - t0:.1f} s", flush=True)
    print("| histories | tally | photons per kernel | mean error against MC-GPU |\n|---:|---:|---:|---:|")
    for (n, bins, per_kernel), v in sorted(errors.items()):
        print(f"| {n:,} | {bins}² | {per_kernel} | {100 * np.mean(v):.2f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
