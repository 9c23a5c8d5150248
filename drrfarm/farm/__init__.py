"""The Ray farm: sweep specs, deterministic plans, render actors and the resumable driver.

Import the submodules directly (``drrfarm.farm.spec``, ``.plan``, ``.worker``, ``.driver``); nothing
here imports Ray.
"""

from __future__ import annotations

from drrfarm.farm.plan import Plan, ShardPlan, ShardTask, image_seed, make_plan
from drrfarm.farm.spec import SweepSpec, load_spec, parse_spec

__all__ = ["Plan", "ShardPlan", "ShardTask", "SweepSpec", "image_seed", "load_spec", "make_plan", "parse_spec",
           "run_sweep"]


def run_sweep(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy re-export
    """See :func:`drrfarm.farm.driver.run_sweep` (imported lazily: it pulls in Ray)."""
    from drrfarm.farm.driver import run_sweep as _run

    return _run(*args, **kwargs)
