"""Command line: argument parsing only; every command calls into the modules that own the work."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import drrfarm
from drrfarm.drr import DEFAULT_PIXEL_MM, DEFAULT_SIZE_PX, DrrRequest, render_drr
from drrfarm.errors import DrrfarmError
from drrfarm.farm.spec_scene import POSE_FRAMES, parse_tools
from drrfarm.geometry import CARM_SDD_MM, CARM_SID_MM, ORIENTATIONS
from drrfarm.meshes import BUILTIN_TOOLS, MESH_SUFFIXES
from drrfarm.meshes import MODES as TOOL_MODES
from drrfarm.physics import DETECTORS, METHODS, OUTPUTS, SCATTER_MODES, Physics
from drrfarm.render import BACKENDS
from drrfarm.sinks.drr_file import output_paths, write_drr
from drrfarm.spectrum import KVP_RANGE, describe, preset, tube_spectrum

#: Modules that register their own sub-commands with ``add_commands(subparsers)``.
COMMAND_MODULES = ("drrfarm.farm.commands", "drrfarm.sinks.commands")


def _choice(choices: Sequence[str]) -> Any:
    """An argparse ``type`` taking one of ``choices`` spelt with hyphens (the CLI's convention) or with
    the underscores of the Python API and the sweep spec: ``line-integral`` and ``line_integral`` alike."""
    shown = ", ".join(c.replace("_", "-") for c in choices)

    def parse(text: str) -> str:
        key = text.strip().lower().replace("-", "_")
        if key not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {shown})")
        return key

    return parse


def _metavar(choices: Sequence[str]) -> str:
    return "{" + ",".join(c.replace("_", "-") for c in choices) + "}"


class _ToolAction(argparse.Action):
    """``--tool MESH``: starts a tool, an item of the sweep spec's ``tools:`` list (``{mesh: MESH}``, or
    the whole item as an inline YAML mapping); the ``--tool-*`` options after it set its keys."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        text = str(values).strip()
        if text.startswith("{"):
            import yaml

            try:
                item = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise argparse.ArgumentError(self, f"not a YAML mapping: {' '.join(str(exc).split())}") from None
            if not isinstance(item, dict):
                raise argparse.ArgumentError(self, f"expected a mapping like {{mesh: kwire, pose: ...}}, got {text!r}")
        else:
            item = {"mesh": text}
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), item])


class _ToolKey(argparse.Action):
    """A ``--tool-*`` option: sets one key (``key``: a path in the ``tools:`` item) of the last ``--tool``."""

    def __init__(self, option_strings: Sequence[str], dest: str, key: tuple[str, ...] = (), **kwargs: Any) -> None:
        self.key = key
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        tools = getattr(namespace, self.dest, None)
        if not tools:
            raise argparse.ArgumentError(self, "give --tool first (the options after a --tool set that tool)")
        target = tools[-1]
        for k in self.key[:-1]:
            if not isinstance(target.get(k, {}), dict):
                raise argparse.ArgumentError(self, f"the tool's {k!r} is not a mapping")
            target = target.setdefault(k, {})
        if self.key == ("size",):
            name, sep, number = str(values).partition("=")
            try:
                value: Any = {name.strip(): float(number)}
            except ValueError:
                value = None
            if not sep or not name.strip() or value is None:
                raise argparse.ArgumentError(self, f"expected KEY=NUMBER (e.g. diameter_mm=2), got {values!r}")
            target.setdefault("size", {}).update(value)
        else:
            target[self.key[-1]] = list(values) if isinstance(values, list) else values


def _named(items: list[Any]) -> list[Any]:
    """``--tool`` items with a ``name`` each where none was given: the built-in's name or the mesh file's
    stem (as a spec tool name: letters, digits, '_', '.', '-'), numbered when several share it."""
    import re

    taken = {item["name"] for item in items if isinstance(item, dict) and isinstance(item.get("name"), str)}
    out = []
    for item in items:
        if isinstance(item, dict) and "name" not in item and isinstance(item.get("mesh"), str):
            base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(item["mesh"]).stem.split(".")[0] or "tool")[:60]
            base = base if base[:1].isalpha() else f"tool_{base}"[:60]
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}_{n}"
            taken.add(name)
            item = {**item, "name": name}
        out.append(item)
    return out


def _add_tool_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "tools in the CT",
        "Each --tool adds one tool, an item of the sweep spec's tools: list (jobs/specs/example.yaml); "
        "the --tool-* options after it set that item's keys (named in brackets). Positions are in the CT's RAS mm "
        "(--tool-frame patient, the default) or the C-arm's world mm. Random draws need the inline form.")
    g.add_argument("--tool", dest="tools", action=_ToolAction, metavar="MESH", default=None,
                   help=f"a built-in tool ({', '.join(BUILTIN_TOOLS)}), a watertight mesh file "
                        f"({', '.join(MESH_SUFFIXES)}; needs --tool-material), or a whole tools: item as inline "
                        "YAML, e.g. '{mesh: kwire, pose: {tip_mm: [0, 0, 0], base_mm: [0, -100, 0], advance_mm: "
                        "{uniform: [-20, 0]}}}'")
    keys: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
        ("--tool-tip", ("pose", "tip_mm"), {"nargs": 3, "type": float, "metavar": ("X", "Y", "Z"),
                                            "help": "trajectory target, mm [pose.tip_mm]"}),
        ("--tool-base", ("pose", "base_mm"), {"nargs": 3, "type": float, "metavar": ("X", "Y", "Z"),
                                              "help": "trajectory entry side, mm [pose.base_mm]"}),
        ("--tool-advance", ("pose", "advance_mm"), {"type": float, "metavar": "MM",
                                                   "help": "push the tool past the tip (+) or pull it back (-), mm "
                                                           "[pose.advance_mm]"}),
        ("--tool-twist", ("pose", "twist_deg"), {"type": float, "metavar": "DEG",
                                                "help": "roll about the trajectory, degrees [pose.twist_deg]"}),
        ("--tool-pose", ("pose", "world_from_mesh"), {"nargs": 16, "type": float, "metavar": "T",
                                                      "help": "a fixed rigid 4x4 pose, 16 numbers row by row, mm "
                                                              "[pose.world_from_mesh]"}),
        ("--tool-frame", ("pose", "frame"), {"choices": POSE_FRAMES, "help": "frame of the pose [pose.frame]"}),
        ("--tool-material", ("material",), {"metavar": "NAME",
                                           "help": "e.g. steel, titanium, ti6al4v, cobalt_chrome [material]"}),
        ("--tool-density", ("density_g_cm3",), {"type": float, "metavar": "G_CM3",
                                               "help": "density, g/cm3 (default: the material's) [density_g_cm3]"}),
        ("--tool-mode", ("mode",), {"choices": TOOL_MODES,
                                   "help": "add to the CT, or replace the CT inside the tool [mode]"}),
        ("--tool-size", ("size",), {"metavar": "KEY=MM",
                                   "help": "a built-in's size, repeatable: diameter_mm=2, length_mm=120, ... [size]"}),
        ("--tool-scale", ("scale_to_mm",), {"type": float, "metavar": "S",
                                           "help": "mesh file units to mm (1000 for metres) [scale_to_mm]"}),
        ("--tool-model-tip", ("model_tip_mm",), {"nargs": 3, "type": float, "metavar": ("X", "Y", "Z"),
                                                "help": "a mesh file's tip in its own frame, mm [model_tip_mm]"}),
        ("--tool-model-base", ("model_base_mm",), {"nargs": 3, "type": float, "metavar": ("X", "Y", "Z"),
                                                  "help": "a mesh file's base in its own frame, mm [model_base_mm]"}),
        ("--tool-name", ("name",), {"metavar": "NAME", "help": "name recorded in the sidecar [name]"}),
    ]
    for flag, key, kwargs in keys:
        g.add_argument(flag, dest="tools", action=_ToolKey, key=key, **kwargs)


def _add_render(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render one DRR of a CT (NIfTI file or DICOM folder) to a 16-bit PNG")
    p.add_argument("ct", help="CT: .nii/.nii.gz, .nrrd, a DICOM series folder, or 'sample:chest_ct'")
    p.add_argument("-o", "--output-file", "--out", dest="out", required=True, help="output PNG path")
    p.add_argument("--alpha", type=float, default=0.0, help="orbital angle, degrees (LAO positive)")
    p.add_argument("--beta", type=float, default=0.0, help="angular (cranial/caudal) angle, degrees")
    p.add_argument("--gamma", type=float, default=0.0, help="roll about the principal ray, degrees")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--spectrum", default=None,
                      help="preset: 60KV_AL35, 90KV_AL40 (default), 120KV_AL43 (SpekPy), or DeepDRR 1.2.2's "
                           "tables deepdrr:60KV_AL35, deepdrr:90KV_AL40, deepdrr:120KV_AL43")
    spec.add_argument("--kvp", type=float, default=None, help="tube voltage for a SpekPy spectrum")
    spec.add_argument("--mono-kev", type=float, default=None, help="monoenergetic beam energy, keV")
    p.add_argument("--al-mm", type=float, default=2.5, help="aluminium filtration with --kvp (mm)")
    p.add_argument("--cu-mm", type=float, default=0.0, help="copper filtration with --kvp (mm)")
    p.add_argument("--labels", default=None, help="label map on the CT's grid (NIfTI) for materials")
    p.add_argument("--label-table", default=None, help="CSV with columns label,material")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE_PX, help="detector size in pixels (square)")
    p.add_argument("--pixel-mm", type=float, default=DEFAULT_PIXEL_MM, help="detector pixel size, mm")
    p.add_argument("--sdd-mm", type=float, default=CARM_SDD_MM, help="source-to-detector distance, mm")
    p.add_argument("--sid-mm", type=float, default=CARM_SID_MM, help="source-to-isocentre distance, mm")
    p.add_argument("--orientation", default="HFS", help=f"patient placement: {', '.join(ORIENTATIONS)}")
    p.add_argument("--output", dest="transform", default="line_integral", type=_choice(OUTPUTS),
                   metavar=_metavar(OUTPUTS), help="output transform (default: line-integral = log(I0/I))")
    p.add_argument("--detector", default="ideal", type=_choice(DETECTORS), metavar=_metavar(DETECTORS))
    p.add_argument("--method", default="trilinear", choices=METHODS)
    p.add_argument("--step-voxels", type=float, default=0.5, help="march step in smallest-voxel units")
    p.add_argument("--solid-angle", action="store_true", help="apply the inverse-square/obliquity fall-off")
    p.add_argument("--photons", type=float, default=None, help="photons per pixel (adds quantum noise)")
    p.add_argument("--electronic-noise", type=float, default=0.0, help="Gaussian noise, photon-equivalents")
    p.add_argument("--scatter", default="none", type=_choice(SCATTER_MODES), metavar=_metavar(SCATTER_MODES),
                   help="add X-ray scatter (docs/scatter.md)")
    p.add_argument("--scatter-photons", type=int, default=None, help="Monte Carlo histories for --scatter")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--npy", action="store_true", help="also write the float32 image as .npy")
    _add_tool_options(p)
    p.set_defaults(handler=_run_render)


def _run_render(args: argparse.Namespace) -> int:
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
    tools: tuple = ()
    if args.tools:
        tools = parse_tools(_named(args.tools), source="--tool")
    req = DrrRequest(ct=args.ct, alpha_deg=args.alpha, beta_deg=args.beta, gamma_deg=args.gamma,
                     spectrum=spectrum, labels=args.labels, label_table=args.label_table, size_px=args.size,
                     pixel_mm=args.pixel_mm, sdd_mm=args.sdd_mm, sid_mm=args.sid_mm,
                     orientation=args.orientation, backend=args.backend, seed=args.seed, physics=physics,
                     tools=tools)
    output_paths(args.out, npy=args.npy)
    image, sidecar = render_drr(req)
    for path in write_drr(image, sidecar, args.out, npy=args.npy):
        print(path)
    return 0


def _add_spectrum(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spectrum", help="print a tube spectrum's mean energy and first HVL")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--kvp", type=float, help=f"tube voltage ({KVP_RANGE[0]:g}-{KVP_RANGE[1]:g} kV)")
    group.add_argument("--preset", help="60KV_AL35, 90KV_AL40 or 120KV_AL43 (SpekPy); deepdrr:<name> for DeepDRR's")
    p.add_argument("--al-mm", type=float, default=2.5)
    p.add_argument("--cu-mm", type=float, default=0.0)
    p.add_argument("--anode-angle", type=float, default=12.0, help="anode angle, degrees")
    p.set_defaults(handler=_run_spectrum)


def _run_spectrum(args: argparse.Namespace) -> int:
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
