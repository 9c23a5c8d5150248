"""Prepare what the GPU host needs and cannot make itself (run here, on a CPU machine, before `run`).

* ``.device/data/tables.npz``: detector tables (μ/ρ from xraydb, spectra from SpekPy) for the chest CT's
  materials, the test phantoms' materials and the benchmark's mono volume;
* ``.device/cache/lidc-idri-0001/``: the sample chest CT, as :func:`drrfarm.samples.downloads.chest_ct` caches it
  (point ``DRRFARM_CACHE`` at ``.device/cache`` on the host);
* ``.device/wheels/``: pycuda and its pure-Python dependencies, nibabel, nanodrr, roma.

``.device/`` is git-ignored; name it in ``carry``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import compute_tables, save_tables, table_key  # noqa: E402

WHEELHOUSE = Path("/work/shared/wheels/cuda13-cp312")
WHEELS = ("pycuda-", "pytools-", "mako-", "platformdirs-", "siphash24-", "nibabel-")

MATERIAL_SETS = [
    ["air", "soft_tissue", "bone"],  # segment_by_thresholds defaults (chest CT)
    ["soft_tissue"],  # the benchmark's one-material (monoenergetic) volume
    ["water"],  # sphere phantom
    ["water", "bone"],  # two-material phantom
    ["water", "bone", "lung", "air", "aluminium"],  # inserts phantom (two textures)
    ["water", "bone", "titanium", "steel"],  # tests/test_cuda_meshes.py: the phantom with screws and a K-wire
    ["air", "soft_tissue", "bone", "titanium"],  # benchmarks/bench_meshes.py: the chest CT with one screw
    ["air", "soft_tissue", "bone", "titanium", "steel"],  # ... and with screws and K-wires
]
SPECTRA = ["90KV_AL40", "60KV_AL35", "mono:60", "90KV_AL40@20"]
DETECTORS = ["ideal", "photon_counting", "csi"]


def main() -> None:
    from drrfarm.samples.downloads import chest_ct
    from drrfarm.samples.phantoms import inserts_phantom, sphere_phantom

    assert sphere_phantom().material_names == ["water"]
    assert inserts_phantom().material_names == MATERIAL_SETS[4], inserts_phantom().material_names
    dev = ROOT / ".device"
    (dev / "data").mkdir(parents=True, exist_ok=True)
    entries = {}
    for names in MATERIAL_SETS:
        for spec in SPECTRA:
            for det in DETECTORS:
                entries[table_key(spec, names, det)] = compute_tables(spec, names, det)
    save_tables(dev / "data" / "tables.npz", entries)
    print(f"{len(entries)} tables -> {dev / 'data' / 'tables.npz'}")

    src = chest_ct().parent
    dst = dev / "cache" / src.name
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
    print(f"chest CT -> {dst}")

    (dev / "wheels").mkdir(exist_ok=True)
    for whl in WHEELHOUSE.glob("*.whl"):
        if whl.name.startswith(WHEELS) and not (dev / "wheels" / whl.name).exists():
            shutil.copy2(whl, dev / "wheels" / whl.name)
    total = sum(p.stat().st_size for p in dev.rglob("*") if p.is_file())
    print(f".device holds {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
