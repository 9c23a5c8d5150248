"""Render into training without storage: the images/s a training loop receives from ``stream_drrs``.

For a sweep spec, on a local Ray (127.0.0.1; the GPU host: one CUDA render actor per GPU), each epoch is one
pass of a training loop's input side over :func:`drrfarm.farm.stream.stream_drrs`: ``iter_torch_batches``
(the stored uint16 images and their scales, ``--device cuda``: onto the GPU) and
:func:`drrfarm.data.to_float_line_integrals` (the float32 line integrals made on the GPU), the GPU
synchronised at the end of the epoch. With ``--train`` the loop also trains ``jobs/train_pose.py``'s CNN on the
batches (resize to ``--image-size``, forward, backward, Adam) on the same GPU the renderer uses.

Reported per spec: images/s of the first epoch (wall: the render actors start, their backend and the CT are
loaded, the task processes start) and of the best later epoch (every epoch renders again, on the same actors
with the CT resident), the rate after each epoch's first batch, the first batch's latency, and the GPU's mean
utilisation (``nvidia-smi``, 1 s samples) over the epochs after the first.

    python benchmarks/bench_stream.py /tmp/specs/e2e-512.yaml --images 2048 --json out.json
    python benchmarks/bench_stream.py spec.yaml --backend cpu --device cpu --images 64     # a CPU machine

``--images N`` scales the spec's C-arm grid (``beta_deg.num``) to about N images (a copy of the spec; the
stream's images are then those of that scaled sweep). A benchmark, not a test: ``benchmarks/device/`` runs
it on the GPU host (see the header of ``run_farm_gpu.sh`` for the environment); results in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_farm_gpu (Monitor), bench_loader (start_ray)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # drrfarm, jobs/

from bench_loader import start_ray  # noqa: E402 - after the path above


def scaled_spec(path: Path, images: int | None) -> Any:
    """The spec (a :class:`~drrfarm.farm.spec.SweepSpec`, same base directory), its C-arm ``beta_deg`` grid scaled
    so that the sweep has about ``images`` images."""
    import yaml

    from drrfarm.farm.spec import load_spec, parse_spec

    spec = load_spec(path)
    if not images:
        return spec
    d = yaml.safe_load(path.read_text())
    per_pose = len(spec.volumes) * len(spec.spectra.items) * len(spec.detector.photons)
    alpha = d["poses"]["carm"]["alpha_deg"]
    alphas = alpha["num"] if isinstance(alpha, dict) and "num" in alpha else \
        len(spec.poses.carm.axis("alpha_deg").values)
    d["poses"]["carm"]["beta_deg"] = {"range": list(d["poses"]["carm"]["beta_deg"]["range"]),
                                      "num": max(1, images // (per_pose * alphas))}
    d["name"] = f"{d.get('name') or path.stem}-{images}"
    return parse_spec(d, source=str(path), base_dir=path.resolve().parent)


def trainer(device: Any, image_size: int, width: int) -> Any:
    """One Adam step of jobs/train_pose.py's CNN per batch (the same model, preprocessing and targets)."""
    import importlib.util

    import torch

    path = Path(__file__).resolve().parents[1] / "jobs" / "train_pose.py"
    spec = importlib.util.spec_from_file_location("train_pose_bench", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)  # type: ignore[union-attr]
    model = job.build_model(width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    norm = {"centre": [0.0, 0.0], "half_range": [45.0, 45.0]}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def step(images: Any, batch: dict[str, Any]) -> None:
        x = job.preprocess(images, image_size)
        y = job.targets({k: v.to(device) for k, v in batch.items() if k in job.TARGETS}, norm)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from bench_farm_gpu import Monitor, _gpu_name

    from drrfarm.data import to_float_line_integrals
    from drrfarm.farm.stream import stream_drrs, stream_info

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    info = stream_info(spec)
    step = trainer(device, args.image_size, args.width) if args.train else None
    columns = ["image_index", "image_scale", "alpha_deg", "beta_deg"]
    epochs: list[dict[str, float]] = []
    util: list[float] = []
    ds = stream_drrs(spec, columns, actors=args.actors, backend=args.backend, gpus_per_actor=args.gpus_per_actor,
                     inflight_per_actor=args.inflight)
    with Monitor(1.0) as mon:
        for epoch in range(args.epochs):
            t0 = time.perf_counter()
            s0 = len(mon.samples)
            n, first, first_n = 0, None, 0
            for batch in ds.iter_torch_batches(batch_size=args.batch, prefetch_batches=args.prefetch,
                                               device=str(device) if device.type == "cuda" else "auto"):
                images = to_float_line_integrals(batch, device)
                if step is not None:
                    step(images, batch)
                n += len(images)
                mon.images += len(images)
                if first is None:
                    first, first_n = time.perf_counter() - t0, len(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            rest = wall - (first or 0.0)
            epochs.append({"images": n, "wall_s": wall, "images_per_s": n / wall, "first_batch_s": first or 0.0,
                           "after_first_images_per_s": (n - first_n) / rest if rest > 0 else float("nan")})
            if epoch > 0:
                util += [s["gpu_util"] for s in mon.samples[s0:] if s["gpu_util"] == s["gpu_util"]]
            print(f"  epoch {epoch}: {n} images in {wall:.2f} s = {n / wall:,.0f} images/s "
                  f"(first batch {first or 0:.2f} s; after it {epochs[-1]['after_first_images_per_s']:,.0f}/s)",
                  file=sys.stderr)
    later = epochs[1:] or epochs
    best = max(later, key=lambda e: e["images_per_s"])
    import ray

    res = ray.cluster_resources()
    return {"spec": spec.name or Path(spec.source).stem, "images": info["rows"], "shards": info["shards"],
            "size": f"{spec.image.height}x{spec.image.width}", "image_dtype": spec.output.image_dtype,
            "backend": args.backend or spec.backend, "device": str(device), "train": bool(args.train),
            "batch": args.batch, "prefetch": args.prefetch, "actors": args.actors, "inflight": args.inflight,
            "gpus_per_actor": args.gpus_per_actor, "cluster_cpus": res.get("CPU", 0), "cluster_gpus": res.get("GPU", 0),
            "gpu_name": _gpu_name() if device.type == "cuda" else None, "epochs": epochs,
            "first_epoch_images_per_s": epochs[0]["images_per_s"], "images_per_s": best["images_per_s"],
            "after_first_images_per_s": max(e["after_first_images_per_s"] for e in later),
            "first_batch_s": epochs[0]["first_batch_s"], "first_batch_later_s": min(e["first_batch_s"] for e in later),
            "gpu_util_mean": sum(util) / len(util) if util else float("nan")}


def row(r: dict[str, Any]) -> str:
    util = "-" if r["gpu_util_mean"] != r["gpu_util_mean"] else f"{r['gpu_util_mean']:.0f} %"
    loop = "train_pose CNN step" if r["train"] else "to_float_line_integrals"
    return (f"| {r['spec']} | {r['size']} | {r['images']:,} | {loop} on {r['device']} | "
            f"**{r['images_per_s']:,.0f}** | {r['after_first_images_per_s']:,.0f} | "
            f"{r['first_epoch_images_per_s']:,.0f} | {r['first_batch_s']:.1f} / {r['first_batch_later_s']:.1f} | "
            f"{util} |")


HEADER = ("| spec | size | images/epoch | loop | images/s (best later epoch) | after its first batch | first epoch "
          "| first batch (s): first / later epochs | GPU util |\n|---|---|---:|---|---:|---:|---:|---|---:|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("specs", nargs="+", type=Path)
    ap.add_argument("--images", type=int, default=None, help="scale the C-arm grid to about this many images")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=4, help="iter_torch_batches(prefetch_batches=...)")
    ap.add_argument("--actors", type=int, default=None, help="render actors (default: one per GPU)")
    ap.add_argument("--gpus-per-actor", type=float, default=1.0)
    ap.add_argument("--inflight", type=int, default=None, help="shards in flight per actor")
    ap.add_argument("--backend", default=None, help="override the spec's backend (auto | cpu | cuda)")
    ap.add_argument("--device", default="auto", help="where the loop puts the batches (auto | cuda | cpu)")
    ap.add_argument("--cpus", type=int, default=None, help="Ray's CPUs (default: the machine's)")
    ap.add_argument("--train", action="store_true", help="also train jobs/train_pose.py's CNN on every batch")
    ap.add_argument("--image-size", type=int, default=256, help="--train: images resized to this size")
    ap.add_argument("--width", type=int, default=64, help="--train: channels of the first conv layer")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    start_ray(args.cpus)
    results = []
    for path in args.specs:
        spec = scaled_spec(path, args.images)
        print(f"{path.name}: streaming {spec.name or path.stem} ({spec.sweep_id})", file=sys.stderr)
        results.append(run(spec, args))
    print(HEADER)
    for r in results:
        print(row(r))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
