"""Precomputed detector tables (μ/ρ, spectrum weights) for GPU hosts without xraydb/SpekPy.

``prepare_data.py`` writes them on a machine that has both; the GPU tests and the benchmark read
them with :func:`load_tables` when computing them fails. Keys: ``"<spectrum>|<m1,m2,..>|<detector>"``
where spectrum is a :func:`drrfarm.spectrum.get_spectrum` string, optionally suffixed ``@<bins>``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from drrfarm.physics import DetectorTables, Physics, detector_tables


def table_key(spectrum: str, names: list[str], detector: str) -> str:
    return f"{spectrum}|{','.join(names)}|{detector}"


def compute_tables(spectrum: str, names: list[str], detector: str) -> DetectorTables:
    from drrfarm.spectrum import get_spectrum

    spec, _, bins = spectrum.partition("@")
    s = get_spectrum(spec)
    if bins:
        s = s.rebinned(int(bins))
    return detector_tables(s, names, Physics(detector=detector))


def save_tables(path: Path, entries: dict[str, DetectorTables]) -> None:
    arrays = {}
    for key, t in entries.items():
        arrays[key + "|mu"] = t.mu_cm2_g
        arrays[key + "|sig"] = t.signal_weights
        arrays[key + "|cnt"] = t.count_weights
        arrays[key + "|s0"] = np.array([t.open_field_signal])
    np.savez_compressed(path, **arrays)


_LOADED: dict[str, DetectorTables] | None = None


def load_tables(spectrum: str, names: list[str], detector: str) -> DetectorTables:
    """Tables computed here if xraydb/SpekPy work, else from ``$DRRFARM_TABLES_NPZ``."""
    global _LOADED
    try:
        return compute_tables(spectrum, names, detector)
    except Exception:  # noqa: BLE001 - missing xraydb/spekpy on a GPU host
        path = os.environ.get("DRRFARM_TABLES_NPZ")
        if not path:
            raise
    if _LOADED is None:
        with np.load(path) as z:
            keys = {k.rsplit("|", 1)[0] for k in z.files}
            _LOADED = {
                k: DetectorTables(z[k + "|mu"], z[k + "|sig"], z[k + "|cnt"], float(z[k + "|s0"][0])) for k in keys
            }
    key = table_key(spectrum, names, detector)
    if key not in _LOADED:
        raise KeyError(f"{key} not in {path}; add it to benchmarks/device/prepare_data.py")
    return _LOADED[key]
