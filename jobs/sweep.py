"""Ray Jobs entrypoint: render a sweep spec on the cluster this job runs on.

    ray job submit --address http://<head>:8265 --working-dir . -- \
        python jobs/sweep.py jobs/specs/demo.yaml --output s3://bucket/datasets/demo

Connects with ``address="auto"`` (the job's cluster). The working directory is uploaded by Ray, so
relative output paths would land in Ray's temporary copy of it: give ``--output`` an absolute path
on shared storage or an object-store URL. Exit status: 0 complete, 1 incomplete, 2 bad spec/setup.
"""

from __future__ import annotations

import argparse
import json
import sys

from drrfarm.errors import DrrfarmError
from drrfarm.farm.commands import sigterm_as_interrupt
from drrfarm.farm.driver import run_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="sweep spec YAML (path relative to the working directory)")
    parser.add_argument("--output", default=None, help="output URL (overrides the spec's output.url)")
    parser.add_argument("--address", default="auto", help="Ray address (default: auto, the job's cluster)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log an MLflow run")
    parser.add_argument("--actors", type=int, default=None, help="number of render actors")
    parser.add_argument("--summary-json", default=None, help="also write the summary as JSON to this local file")
    parser.add_argument("--forward-credentials", action="store_true",
                        help="hand the job's AWS keys to the render actors through Ray's runtime env (visible in the "
                             "dashboard); default: actors use their own environment or instance/pod role")
    args = parser.parse_args(argv)

    sigterm_as_interrupt()  # `ray job stop` sends SIGTERM: still stop the actors and close the MLflow run

    try:
        summary = run_sweep(args.spec, address=args.address, output=args.output, tracking=not args.no_tracking,
                            num_actors=args.actors, progress=True, forward_credentials=args.forward_credentials)
    except DrrfarmError as exc:
        print(f"jobs/sweep.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jobs/sweep.py: interrupted", file=sys.stderr)
        return 130
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as fh:
            json.dump(summary.to_dict(), fh, indent=2, default=str)
    print(json.dumps({"sweep_id": summary.sweep_id, "complete": summary.complete,
                      "images_rendered": summary.images_rendered, "shards_rendered": summary.shards_rendered,
                      "output": summary.output_url}))
    return 0 if summary.complete else 1


if __name__ == "__main__":
    sys.exit(main())
