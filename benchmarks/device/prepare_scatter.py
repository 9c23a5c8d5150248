"""Prepare the scatter GPU tests and benchmark for a GPU host without xraydb/xraylib/SpekPy (run here first).

Writes ``.device/data/scatter_tables.npz`` (transport tables keyed as ``tests/scatter_cases.table_key``)
and copies the chest CT and the pycuda/nibabel wheels as ``prepare_data.py`` does (``.device/`` is git-ignored;
name it in ``carry`` and point ``DRRFARM_SCATTER_TABLES_NPZ`` at the tables).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_data import main as prepare_common  # noqa: E402
from scatter_cases import table_key, tables_for  # noqa: E402

from drrfarm.scatter.tables import save_tables  # noqa: E402

CASES = [
    ("90KV_AL40", ["air", "water", "cortical_bone"]),
    ("90KV_AL40", ["air", "soft_tissue", "bone"]),
    ("mono:60", ["water"]),
    ("tube:90:2.5", ["water"]),
]


def main() -> None:
    prepare_common()
    entries = {table_key(s, m): tables_for(s, m) for s, m in CASES}
    out = ROOT / ".device" / "data" / "scatter_tables.npz"
    save_tables(str(out), entries)
    print(f"{len(entries)} scatter tables -> {out}")


if __name__ == "__main__":
    main()
