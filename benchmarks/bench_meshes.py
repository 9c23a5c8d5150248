"""Mesh overhead benchmark (issue 10): 1, 10 and 100 tools on a 1024² realistic render of the sample chest CT.

Baseline: the CUDA backend's realistic render (air / soft tissue / bone, 90 kVp spectrum in 20 bins,
Poisson noise at 10⁴ photons per open-field pixel, Joseph stepping, uint16), 1024² at 0.388 mm,
SID 510 mm, SDD 1020 mm, AP and 30° oblique, batch 16, timed with CUDA events around one launch
(median; images left on the GPU), as ``benchmarks/bench_render.py`` does.

Meshes: ``n`` tools (alternately a titanium screw, 6.5 mm × 45 mm, replacing, and a steel K-wire,
1.6 mm × 150 mm, replacing), each on a random trajectory through the central 120 mm of the CT with
a random advance and twist (seeded). ``kernels/mesh.cu`` traces them for the same cameras and
batch, adding ``density × chord / 10`` into a (B, M, H, W) line-integral buffer and writing the
union of replacing intervals (kmax 4) — the work a render with meshes adds. ``overhead`` =
mesh-kernel time / baseline render time. (The CT march's interval test, one comparison per sample,
is not in this number: it is not wired into ``drr.cu`` yet. When ``CudaBackend.render`` accepts
``meshes=``, the end-to-end time is measured as well and reported as ``e2e_overhead``.)

Also reported: triangles per scene, the fraction of pixels any tool covers, and the CPU reference's
time for one 256² image with the same scene (``--cpu``), for scale.

Usage (GPU host): ``python benchmarks/bench_meshes.py --json out.json --md out.md [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "device"))

from drrfarm.geometry import CArm, world_from_patient_default  # noqa: E402
from drrfarm.meshes import kwire_mesh, screw_mesh  # noqa: E402
from drrfarm.physics import Physics  # noqa: E402

SIZE, PIXEL_MM, SID_MM, SDD_MM = 1024, 0.388, 510.0, 1020.0
POSES = {"AP": 0.0, "oblique30": 30.0}
PHOTONS = 1e4


def cameras(pose: str, batch: int, size: int = SIZE, pixel_mm: float = PIXEL_MM) -> list:
    carm = CArm(sdd_mm=SDD_MM, sid_mm=SID_MM, height=size, width=size, pixel_mm=pixel_mm)
    return [carm.camera(alpha_deg=POSES[pose])] * batch


def random_tools(n: int, seed: int = 0) -> list:
    """n tools on random trajectories through the central 120 mm cube (world, CT centred at the isocentre)."""
    rng = np.random.default_rng(seed)
    screw = screw_mesh(sections=32)
    wire = kwire_mesh(sections=16)
    tools = []
    for i in range(n):
        target = rng.uniform(-60.0, 60.0, 3)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        proto = screw if i % 2 == 0 else wire
        tool = proto.aligned(target, target - 50.0 * direction, advance_mm=float(rng.uniform(-20.0, 0.0)),
                             twist_deg=float(rng.uniform(0.0, 360.0)))
        tools.append(replace(tool, name=f"{proto.name}{i}"))
    return tools


def event_time(fn, stream, reps: int = 5) -> float:
    """Median seconds of ``fn()`` between CUDA events on ``stream`` (after one warm-up)."""
    import pycuda.driver as drv

    times = []
    for _ in range(reps + 1):
        a, b = drv.Event(), drv.Event()
        a.record(stream)
        fn()
        b.record(stream)
        b.synchronize()
        times.append(b.time_since(a) / 1e3)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--counts", default="1,10,100")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--poses", default="AP,oblique30")
    ap.add_argument("--cpu", action="store_true", help="also time the CPU reference on one 256² image")
    ap.add_argument("--quick", action="store_true", help="batch 4, AP only")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.poses = 4, "AP"

    from drrfarm.render.cuda import CudaBackend
    from drrfarm.render.mesh_cuda import MeshTracer
    from drrfarm.samples.downloads import chest_ct
    from drrfarm.volume import load_volume, segment_by_thresholds

    try:
        from tables import load_tables

        def tables_for(names: list[str]):
            return load_tables("90KV_AL40@20", names, "ideal")
    except ImportError:  # pragma: no cover - outside the device harness
        from drrfarm.physics import detector_tables
        from drrfarm.spectrum import get_spectrum

        def tables_for(names: list[str]):
            return detector_tables(get_spectrum("90KV_AL40").rebinned(20), names, Physics())

    volume = load_volume(chest_ct())
    mv = segment_by_thresholds(volume)
    wfp = world_from_patient_default(volume.centre_patient_mm())
    backend = CudaBackend(device=0)
    handle = backend.prepare(mv, wfp)
    physics = Physics(method="joseph", output="line_integral", photons=PHOTONS)
    tables = tables_for(mv.material_names)
    tracer = MeshTracer()
    has_meshes_kw = "meshes" in inspect.signature(backend.render_async).parameters
    header = {"device": backend.device_name, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": "uncommitted working tree", "size": SIZE, "batch": args.batch, "mesh_kernel": tracer.build,
              "backend_takes_meshes": has_meshes_kw}
    print(json.dumps(header), flush=True)
    ctx = {"backend": backend, "handle": handle, "tables": tables, "tables_for": tables_for, "physics": physics,
           "tracer": tracer,
           "mv": mv, "wfp": wfp, "e2e": has_meshes_kw, "cpu": args.cpu}
    rows = []
    for pose in args.poses.split(","):
        rows += measure_pose(ctx, pose, args.batch, [int(x) for x in args.counts.split(",")])
    result = {"header": header, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.md:
        args.md.write_text(to_markdown(result))
    return 0


def render_time(ctx: dict, cams: list, out, stream, meshes=None) -> float:
    """Median seconds of one render launch (images left on the GPU)."""
    from drrfarm.render import output_material_names

    backend = ctx["backend"]
    kw = {} if meshes is None else {"meshes": [meshes] * len(cams)}
    seeds = list(range(len(cams)))
    tables = ctx["tables"] if meshes is None else ctx["tables_for"](
        output_material_names(ctx["mv"].material_names, meshes))

    def launch() -> None:
        backend.render_async(ctx["handle"], cams, tables, ctx["physics"], seeds, dtype="uint16", out=out,
                             to_host=False, stream=stream, **kw)

    with backend._gpu.context():
        return event_time(launch, stream)


def measure_pose(ctx: dict, pose: str, batch: int, counts: list[int]) -> list[dict]:
    import pycuda.driver as drv

    from drrfarm.render.mesh_reference import pack_cameras, pack_poses, trace_meshes

    backend, tracer, mv = ctx["backend"], ctx["tracer"], ctx["mv"]
    cams = cameras(pose, batch)
    B, H, W = len(cams), SIZE, SIZE
    out = backend.allocate((B, H, W), "uint16")
    stream = backend.stream()
    base_s = render_time(ctx, cams, out, stream)
    rows = []
    for n in counts:
        tools = random_tools(n, seed=n)
        scene = tracer.upload(tools, mv.material_names)
        M = len(scene.material_names)
        with tracer.context():
            d_cams = drv.to_device(pack_cameras(cams))
            d_poses = drv.to_device(np.ascontiguousarray(pack_poses([tools] * B)))
            d_lint = drv.mem_alloc(4 * B * M * H * W)
            d_iv = drv.mem_alloc(16 * B * H * W * 4)  # double2 intervals, kmax 4
            d_n = drv.mem_alloc(4 * B * H * W)
            d_of = drv.to_device(np.zeros(2, np.uint32))
            p = tracer.params(scene, int(d_cams), int(d_poses), H, W, B, lint=int(d_lint), M=M,
                              intervals=int(d_iv), n_intervals=int(d_n), overflow=int(d_of), kmax=4)
            mstream = drv.Stream()
            mesh_s = event_time(lambda p=p, s=mstream: tracer.trace_device(p, s), mstream)
            overflow = drv.from_device(d_of, (2,), np.uint32).tolist()
        small = cameras(pose, 1, 256, PIXEL_MM * SIZE / 256)
        cover = float((trace_meshes(tools, small[0]).chords_mm > 0).any(axis=0).mean())
        row = {"pose": pose, "meshes": n, "triangles": int(sum(t.n_triangles for t in tools)),
               "render_ms_per_image": 1e3 * base_s / B, "mesh_ms_per_image": 1e3 * mesh_s / B,
               "overhead": mesh_s / base_s, "pixels_covered": cover, "overflow_rays": overflow,
               "scene_kib": scene.nbytes / 1024}
        if ctx["e2e"]:  # end to end, once the backend takes meshes
            row["e2e_overhead"] = render_time(ctx, cams, out, stream, meshes=tools) / base_s - 1.0
        if ctx["cpu"]:
            from drrfarm.render import get_backend
            from drrfarm.render.mesh_reference import cpu_line_integrals

            cpu = get_backend("cpu")
            hc = cpu.prepare(mv, ctx["wfp"])
            t0 = time.perf_counter()
            cpu.line_integrals(hc, small, ctx["physics"])
            t1 = time.perf_counter()
            cpu_line_integrals(hc, small, ctx["physics"], tools)
            t2 = time.perf_counter()
            row["cpu_256_s"] = t1 - t0
            row["cpu_256_with_meshes_s"] = t2 - t1
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def to_markdown(result: dict) -> str:
    h = result["header"]
    lines = [f"### Mesh overhead ({h['device']}, {h['date']}, {h['size']}², batch {h['batch']})", "",
             "| pose | meshes | triangles | render ms/img | mesh ms/img | overhead | pixels covered |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['pose']} | {r['meshes']} | {r['triangles']} | {r['render_ms_per_image']:.3f} | "
                     f"{r['mesh_ms_per_image']:.3f} | {100 * r['overhead']:.1f} % | "
                     f"{100 * r['pixels_covered']:.1f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
