"""The Ray farm: sweep specs, deterministic plans, render actors and the resumable driver.

Import the submodules directly (``drrfarm.farm.spec``, ``.compile``, ``.plan``, ``.worker``, ``.driver``);
nothing here imports Ray (the driver and the actors import it when they start it).
"""

from __future__ import annotations

from drrfarm.farm.driver import run_sweep
from drrfarm.farm.plan import Plan, ShardPlan, ShardTask, image_seed, make_plan
from drrfarm.farm.spec import SweepSpec, load_spec, parse_spec

__all__ = ["Plan", "ShardPlan", "ShardTask", "SweepSpec", "image_seed", "load_spec", "make_plan", "parse_spec",
           "run_sweep"]
