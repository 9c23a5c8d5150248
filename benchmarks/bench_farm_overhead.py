"""Farm overhead: images/s of a sweep on 2 CPU render actors vs a bare backend loop on 2 processes.

Both sides render exactly the same images (same plan, cameras, spectrum, physics and seeds), one
thread per worker, volume loading included:

* bare: 2 plain processes, each loads + segments + prepares the volume, then calls
  ``backend.render`` shard by shard over its half of the shards (no Ray, no encoding, no writing);
* farm: ``run_sweep`` on a local Ray with 2 actors (1 CPU each), Parquet output to a temporary
  folder, tracking off. Its rate uses the time from the first shard dispatched to the last shard
  committed (Ray start-up and actor creation excluded; the sweep's wall time is reported too).

The two alternate ``--repeat`` times and the best rate of each side is compared (a shared machine's
noise only ever slows a run down).

    python benchmarks/bench_farm_overhead.py                      # synthetic 128^3 phantom, 128^2 images
    python benchmarks/bench_farm_overhead.py --ct sample:chest_ct --images 48

Overhead = 1 - farm_rate / bare_rate (the farm should stay within 10%).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_phantom(path: Path, n: int = 128, spacing_mm: float = 2.0) -> Path:
    import nibabel as nib

    hu = np.full((n, n, n), -1000, np.int16)
    z, y, x = np.mgrid[0:n, 0:n, 0:n] - (n - 1) / 2
    hu[(x / (0.40 * n)) ** 2 + (y / (0.30 * n)) ** 2 <= 1] = 40
    hu[((x - 0.1 * n) / (0.05 * n)) ** 2 + (y / (0.05 * n)) ** 2 <= 1] = 1000
    affine = np.diag([spacing_mm] * 3 + [1.0])
    affine[:3, 3] = -spacing_mm * (n - 1) / 2
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    return path


def write_spec(path: Path, ct: str, images: int, size: int, pixel_mm: float, shard_size: int) -> Path:
    import yaml

    spec = {
        "seed": 1,
        "volumes": [{"id": "ct", "path": ct}],
        "poses": {"carm": {"alpha_deg": {"range": [-40, 40], "num": images}}},
        "spectra": {"presets": ["90KV_AL40"]},
        "detector": {"model": "ideal", "output": "line_integral"},
        "image": {"size": size, "pixel_mm": pixel_mm},
        "output": {"url": str(path.parent / "out"), "formats": ["parquet"], "shard_size": shard_size},
        "tracking": {"enabled": False},
        "backend": "cpu",
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def _bare_worker(args: tuple[str, list[int], Any]) -> tuple[int, float]:
    spec_path, shard_indices, barrier = args
    from drrfarm.farm.compile import camera_for, load_material_volume, physics_for, spectrum_request
    from drrfarm.farm.plan import make_plan
    from drrfarm.farm.spec import load_spec
    from drrfarm.render import get_backend
    from drrfarm.spectrum import get_spectrum

    spec = load_spec(spec_path)
    plan = make_plan(spec)
    backend = get_backend("cpu", threads=1)
    spectrum = get_spectrum(spectrum_request(spec.spectra.items[0], spec.spectra.n_bins))  # cached, untimed
    barrier.wait()
    t0 = time.perf_counter()
    _, mv, wfp = load_material_volume(spec.volumes[0])
    handle = backend.prepare(mv, wfp)
    physics = physics_for(spec, spec.detector.photons[0])
    n = 0
    for i in shard_indices:
        task = plan.task(i)
        cams = [camera_for(spec, p) for p in task.poses]
        images = backend.render(handle, cams, spectrum, physics, list(task.seeds))
        n += len(images)
    return n, time.perf_counter() - t0


def bare(spec_path: Path, workers: int = 2) -> dict[str, float]:
    from drrfarm.farm.plan import make_plan
    from drrfarm.farm.spec import load_spec

    n_shards = make_plan(load_spec(spec_path)).n_shards
    parts = [list(range(w, n_shards, workers)) for w in range(workers)]
    # one thread per worker, as Ray gives a 1-CPU actor (OMP_NUM_THREADS=1): set before the children
    # start, so NumPy's BLAS and torch read it at import
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(workers)
        with ctx.Pool(workers) as pool:
            results = pool.map(_bare_worker, [(str(spec_path), p, barrier) for p in parts])
    images = sum(n for n, _ in results)
    seconds = max(s for _, s in results)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def farm(spec_path: Path, output: str, actors: int = 2) -> dict[str, float]:
    from drrfarm.farm.driver import run_sweep

    t0 = time.perf_counter()
    s = run_sweep(spec_path, output=output, num_actors=actors, tracking=False, progress=False)
    wall = time.perf_counter() - t0
    assert s.complete, s.format()
    return {"images": s.images_rendered, "seconds": s.render_seconds, "images_per_s": s.images_per_s,
            "wall_seconds": wall}


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    out = dict(max(runs, key=lambda r: r["images_per_s"]))
    out["all_images_per_s"] = [round(r["images_per_s"], 4) for r in runs]  # type: ignore[assignment]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ct", default=None, help="CT path or sample:chest_ct (default: a synthetic 128^3 phantom)")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--pixel-mm", type=float, default=None, help="default: 5.5 (chest) or 2.5 (phantom)")
    p.add_argument("--shard-size", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3, help="alternate bare/farm this many times; best of each")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="bench-farm-") as tmp:
        tmp_path = Path(tmp)
        ct = args.ct or str(make_phantom(tmp_path / "phantom.nii.gz"))
        pixel = args.pixel_mm or (5.5 if args.ct else 2.5)
        spec_path = write_spec(tmp_path / "spec.yaml", ct, args.images, args.size, pixel, args.shard_size)
        from drrfarm.farm.driver import connect_ray

        started = connect_ray(None)  # one local Ray for every farm run (start-up is not what is measured)
        bare_runs, farm_runs = [], []
        try:
            for k in range(max(1, args.repeat)):
                bare_runs.append(bare(spec_path))
                farm_runs.append(farm(spec_path, str(tmp_path / f"out{k}")))
        finally:
            if started:
                import ray

                ray.shutdown()
        b, f = best(bare_runs), best(farm_runs)
    overhead = 1.0 - f["images_per_s"] / b["images_per_s"]
    result = {"ct": args.ct or "phantom 128^3 @ 2 mm", "images": args.images, "size": args.size,
              "shard_size": args.shard_size, "repeat": args.repeat, "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "bare": b, "farm": f, "overhead": overhead}
    print(f"images: {args.images} of {args.size}x{args.size} px; shards of {args.shard_size}; 2 workers, 1 thread each;"
          f" best of {args.repeat}")
    print(f"bare backend loop (2 processes): {b['images_per_s']:.3f} images/s ({b['seconds']:.1f} s)  "
          f"runs: {b['all_images_per_s']}")
    print(f"farm (2 CPU actors, Parquet)   : {f['images_per_s']:.3f} images/s ({f['seconds']:.1f} s rendering, "
          f"{f['wall_seconds']:.1f} s wall)  runs: {f['all_images_per_s']}")
    print(f"load average after the runs: {', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(f"overhead: {100 * overhead:.1f}%  ({'within' if overhead <= 0.10 else 'OVER'} the 10% target)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
