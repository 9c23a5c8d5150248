"""Command line: argument parsing only; every command calls into the modules that own the work."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import drrfarm
from drrfarm.errors import DrrfarmError

#: Modules that register their own sub-commands with ``add_commands(subparsers)``.
COMMAND_MODULES = ("drrfarm.farm.commands", "drrfarm.sinks.commands")


def _add_render(sub: argparse._SubParsersAction) -> None:
    from drrfarm.drr import DEFAULT_PIXEL_MM, DEFAULT_SIZE_PX
    from drrfarm.physics import DETECTORS, METHODS, OUTPUTS

    p = sub.add_parser("render", help="render one DRR of a CT (NIfTI file or DICOM folder) to a 16-bit PNG")
    p.add_argument("ct", help="CT: .nii/.nii.gz, .nrrd, a DICOM series folder, or 'sample:chest_ct'")
    p.add_argument("-o", "--output-file", "--out", dest="out", required=True, help="output PNG path")
    p.add_argument("--alpha", type=float, default=0.0, help="orbital angle, degrees (LAO positive)")
    p.add_argument("--beta", type=float, default=0.0, help="angular (cranial/caudal) angle, degrees")
    p.add_argument("--gamma", type=float, default=0.0, help="roll about the principal ray, degrees")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--spectrum", default=None, help="preset: 60KV_AL35, 90KV_AL40 (default), 120KV_AL43")
    spec.add_argument("--kvp", type=float, default=None, help="tube voltage for a SpekPy spectrum")
    spec.add_argument("--mono-kev", type=float, default=None, help="monoenergetic beam energy, keV")
    p.add_argument("--al-mm", type=float, default=2.5, help="aluminium filtration with --kvp (mm)")
    p.add_argument("--cu-mm", type=float, default=0.0, help="copper filtration with --kvp (mm)")
    p.add_argument("--labels", default=None, help="label map on the CT's grid (NIfTI) for materials")
    p.add_argument("--label-table", default=None, help="CSV with columns label,material")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE_PX, help="detector size in pixels (square)")
    p.add_argument("--pixel-mm", type=float, default=DEFAULT_PIXEL_MM, help="detector pixel size, mm")
    p.add_argument("--sdd-mm", type=float, default=1020.0, help="source-to-detector distance, mm")
    p.add_argument("--sid-mm", type=float, default=530.0, help="source-to-isocentre distance, mm")
    p.add_argument("--orientation", default="HFS", help="patient placement: HFS, FFS, HFP, FFP")
    p.add_argument("--output", dest="transform", default="line_integral", choices=OUTPUTS,
                   help="output transform (default: line_integral = log(I0/I))")
    p.add_argument("--detector", default="ideal", choices=DETECTORS)
    p.add_argument("--method", default="trilinear", choices=METHODS)
    p.add_argument("--step-voxels", type=float, default=0.5, help="march step in smallest-voxel units")
    p.add_argument("--solid-angle", action="store_true", help="apply the inverse-square/obliquity fall-off")
    p.add_argument("--photons", type=float, default=None, help="photons per pixel (adds quantum noise)")
    p.add_argument("--electronic-noise", type=float, default=0.0, help="Gaussian noise, photon-equivalents")
    p.add_argument("--scatter", default="none", choices=("none", "fast", "monte_carlo"),
                   help="add X-ray scatter (docs/scatter.md)")
    p.add_argument("--scatter-photons", type=int, default=None, help="Monte Carlo histories for --scatter")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--npy", action="store_true", help="also write the float32 image as .npy")
    p.set_defaults(handler=_run_render)


def _run_render(args: argparse.Namespace) -> int:
    from drrfarm.drr import DrrRequest, output_paths, render_drr, write_drr
    from drrfarm.physics import Physics

    if args.kvp is not None:
        spectrum: str | dict = {"kvp": args.kvp, "al_mm": args.al_mm, "cu_mm": args.cu_mm}
    elif args.mono_kev is not None:
        spectrum = f"mono:{args.mono_kev}"
    else:
        spectrum = args.spectrum or "90KV_AL40"
    physics = Physics(detector=args.detector, output=args.transform, photons=args.photons,
                      electronic_noise=args.electronic_noise, solid_angle=args.solid_angle,
                      step_voxels=args.step_voxels, method=args.method, scatter=args.scatter,
                      scatter_photons=args.scatter_photons)
    req = DrrRequest(ct=args.ct, alpha_deg=args.alpha, beta_deg=args.beta, gamma_deg=args.gamma,
                     spectrum=spectrum, labels=args.labels, label_table=args.label_table, size_px=args.size,
                     pixel_mm=args.pixel_mm, sdd_mm=args.sdd_mm, sid_mm=args.sid_mm,
                     orientation=args.orientation, backend=args.backend, seed=args.seed, physics=physics)
    output_paths(args.out, npy=args.npy)
    image, sidecar = render_drr(req)
    for path in write_drr(image, sidecar, args.out, npy=args.npy):
        print(path)
    return 0


def _add_spectrum(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spectrum", help="print a tube spectrum's mean energy and first HVL")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--kvp", type=float, help="tube voltage (40-150 kV)")
    group.add_argument("--preset", help="60KV_AL35, 90KV_AL40 or 120KV_AL43")
    p.add_argument("--al-mm", type=float, default=2.5)
    p.add_argument("--cu-mm", type=float, default=0.0)
    p.add_argument("--anode-angle", type=float, default=12.0, help="anode angle, degrees")
    p.set_defaults(handler=_run_spectrum)


def _run_spectrum(args: argparse.Namespace) -> int:
    from drrfarm.spectrum import describe, preset, tube_spectrum

    if args.preset:
        spectrum = preset(args.preset)
    else:
        spectrum = tube_spectrum(args.kvp, al_mm=args.al_mm, cu_mm=args.cu_mm, anode_angle_deg=args.anode_angle)
    print(describe(spectrum))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drrfarm", description=drrfarm.__doc__)
    parser.add_argument("--version", action="version", version=f"drrfarm {drrfarm.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_render(sub)
    _add_spectrum(sub)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except DrrfarmError as exc:
        print(f"drrfarm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"drrfarm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
