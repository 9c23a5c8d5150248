"""CLI sub-commands of the farm: ``drrfarm sweep``, ``drrfarm plan``, ``drrfarm demo``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from drrfarm.farm.demo import run_demo
from drrfarm.farm.driver import run_sweep
from drrfarm.farm.plan import make_plan
from drrfarm.farm.spec import load_spec
from drrfarm.render import BACKENDS


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``sweep``, ``plan`` and ``demo`` on the drrfarm CLI."""
    p = subparsers.add_parser("sweep", help="render a sweep spec (YAML) on Ray; resumes an interrupted sweep")
    p.add_argument("spec", help="sweep spec YAML (see jobs/specs/example.yaml)")
    p.add_argument("--address", default=None,
                   help="Ray cluster: 'auto' (running cluster on this machine) or 'ray://host:10001'; "
                        "default: start a local Ray on 127.0.0.1")
    p.add_argument("--output", default=None, help="output URL (local path, file://, s3://...); overrides the spec")
    p.add_argument("--no-tracking", action="store_true", help="do not log an MLflow run")
    p.add_argument("--actors", type=int, default=None, help="number of render actors (default: one per GPU, "
                                                            "else one per farm.cpus_per_actor CPUs)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="override the spec's backend")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--forward-credentials", action="store_true",
                   help="hand this shell's AWS keys to the render actors through Ray's runtime env (visible in "
                        "the dashboard); default: actors use their own environment or instance/pod role")
    p.set_defaults(handler=_run_sweep)

    p = subparsers.add_parser("plan", help="print what a sweep spec would render (counts, shards, bytes)")
    p.add_argument("spec", help="sweep spec YAML")
    p.add_argument("--output", default=None, help="output URL override (does not change the plan)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(handler=_run_plan)

    p = subparsers.add_parser("demo", help="render a small sweep of the sample chest CT (Parquet + PNG + MLflow)")
    p.add_argument("--output", default="./drrfarm-demo", help="output folder (default ./drrfarm-demo)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.add_argument("--actors", type=int, default=None, help="number of render actors")
    p.add_argument("--no-tracking", action="store_true", help="do not log an MLflow run")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(handler=_run_demo)


def sigterm_as_interrupt() -> None:
    """Turn SIGTERM (``ray job stop``, a scheduler's kill) into KeyboardInterrupt, so the driver still
    stops its actors and closes the provenance run (as KILLED)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def _run_sweep(args: argparse.Namespace) -> int:
    sigterm_as_interrupt()

    summary = run_sweep(args.spec, address=args.address, output=args.output, tracking=not args.no_tracking,
                        num_actors=args.actors, progress=not args.quiet, backend=args.backend,
                        forward_credentials=args.forward_credentials)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2, default=str))
    return 0 if summary.complete else 1


def _run_plan(args: argparse.Namespace) -> int:
    plan = make_plan(load_spec(args.spec, output=args.output))
    if args.json:
        print(json.dumps({"sweep_id": plan.sweep_id, "spec_sha256": plan.spec_sha256,
                          "output": plan.spec.output.url, **plan.counts()}, indent=2))
    else:
        print(plan.describe())
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    sigterm_as_interrupt()

    summary = run_demo(output=args.output, address=args.address, tracking=not args.no_tracking,
                       num_actors=args.actors, progress=not args.quiet)
    if not args.quiet:
        print(f"demo dataset: {summary.output_url}", file=sys.stderr)
        if summary.run_id and summary.tracking_uri:
            print(f"MLflow run {summary.run_id}; browse it with: mlflow ui --backend-store-uri "
                  f"{summary.tracking_uri}", file=sys.stderr)
    return 0 if summary.complete else 1
