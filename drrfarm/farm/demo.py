"""``drrfarm demo``: a small sweep of the sample chest CT (a few dozen 128² images, two spectra).

The spec below is also shipped as ``jobs/specs/demo.yaml`` (same content; a test keeps them equal).
It renders 30 images (5 alpha x 3 beta poses x 2 spectra) to Parquet and PNG with a local MLflow
store under the output folder; about a minute or two on 2 CPU cores once the CT is cached.
"""

from __future__ import annotations

import os
from pathlib import Path

from drrfarm.farm.driver import SweepSummary, run_sweep

DEMO_OUTPUT = "./drrfarm-demo"

#: detector: 128 px x 5.5 mm = 704 mm, i.e. ~366 mm at the isocentre (magnification 1020/530): the whole chest
DEMO_SPEC_YAML = """\
# drrfarm demo sweep: the LIDC-IDRI-0001 chest CT (drrfarm.samples.downloads.chest_ct) over a small C-arm grid
name: demo
seed: 2024
volumes:
  - id: chest
    path: sample:chest_ct
    materials:
      thresholds_hu: [[-800, air], [350, soft_tissue]]
      above: bone
    placement: {orientation: HFS, offset_mm: [0, 0, 0]}
poses:
  carm:
    alpha_deg: {range: [-30, 30], num: 5}
    beta_deg: [-20, 0, 20]
    sdd_mm: 1020
    sid_mm: 530
spectra:
  presets: [60KV_AL35, 120KV_AL43]
detector:
  model: ideal
  output: line_integral
image:
  size: 128
  pixel_mm: 5.5
physics:
  step_voxels: 0.5
  method: trilinear
backend: auto
output:
  url: ./drrfarm-demo
  formats: [parquet, png]
  shard_size: 5
  image_dtype: uint16
tracking:
  enabled: true
  experiment: drrfarm-demo
"""


def write_demo_spec(output: str | os.PathLike[str]) -> Path:
    """Write the demo spec into the output folder (``<output>/demo.yaml``) and return its path."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.yaml"
    if not path.exists() or path.read_text(encoding="utf-8") != DEMO_SPEC_YAML:
        path.write_text(DEMO_SPEC_YAML, encoding="utf-8")
    return path


def run_demo(output: str = DEMO_OUTPUT, address: str | None = None, tracking: bool = True,
             num_actors: int | None = None, progress: bool = True) -> SweepSummary:
    """Render the demo sweep to ``output`` (local folder); returns the :class:`SweepSummary`."""
    if "://" in output and not output.startswith("file://"):
        spec_dir = Path(".drrfarm-demo-spec")
    else:
        spec_dir = Path(output.removeprefix("file://"))
    spec_path = write_demo_spec(spec_dir)
    return run_sweep(spec_path, address=address, output=output, tracking=tracking, num_actors=num_actors,
                     progress=progress)
