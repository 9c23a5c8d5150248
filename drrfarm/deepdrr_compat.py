"""DeepDRR 1.2.2 compatibility: DeepDRR's own tabulated spectra and μ/ρ tables.

For reproducing datasets made with DeepDRR 1.2.2. drrfarm's defaults stay physics-first (SpekPy
spectra, xraydb μ/ρ); this module holds DeepDRR's numbers under a separate name, ``deepdrr:<preset>``:

* :func:`spectrum_bins` — the spectra ``deepdrr:60KV_AL35``, ``deepdrr:90KV_AL40`` and
  ``deepdrr:120KV_AL43`` (0.5 keV bins from 15 keV, from MC-GPU's spectrum files), accepted wherever a
  spectrum preset is (:func:`drrfarm.spectrum.get_spectrum`, sweep specs, ``drrfarm render --spectrum``);
* :func:`mass_attenuation_cm2_g` — DeepDRR's μ/ρ for its three threshold materials (NIST tables,
  log-log interpolation), for comparison only: it differs from drrfarm's xraydb values by 0.4 % of the
  line integral on the sample chest CT, so rendering keeps xraydb (``docs/deepdrr.md``).

The tables are stored in ``drrfarm/tables/deepdrr_1_2_2.json``, copied from DeepDRR's repository
(https://github.com/arcadelab/deepdrr, tag v1.2.2, files ``deepdrr/projector/spectral_data.py`` and
``deepdrr/material/material_decompositions/``); only the numbers are kept.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from drrfarm.errors import MaterialError, SpectrumError

__all__ = [
    "PREFIX",
    "SPECTRUM_NAMES",
    "is_deepdrr_name",
    "mass_attenuation_cm2_g",
    "spectrum_bins",
    "spectrum_table",
]

PREFIX = "deepdrr:"
SPECTRUM_NAMES = ("60KV_AL35", "90KV_AL40", "120KV_AL43")  # DeepDRR 1.2.2's spectrum names
TABLES_PATH = Path(__file__).with_name("tables") / "deepdrr_1_2_2.json"

# DeepDRR's material names (and its alias "soft tissue") -> the name of its table
_MATERIAL_TABLES = {"air": "air", "soft tissue": "tissue_soft", "tissue_soft": "tissue_soft", "bone": "bone"}
_EDGE_NUDGE = 1e-9  # DeepDRR lowers the first of two equal (absorption-edge) energies by this fraction


@functools.lru_cache(maxsize=1)
def _tables() -> dict[str, Any]:
    with TABLES_PATH.open(encoding="utf-8") as f:
        return json.load(f)


def is_deepdrr_name(name: object) -> bool:
    """True for a ``deepdrr:<name>`` spectrum name (prefix case-insensitive)."""
    return isinstance(name, str) and name.strip().lower().startswith(PREFIX)


def _bare_name(name: str) -> str:
    text = name.strip()
    if is_deepdrr_name(text):
        text = text[len(PREFIX):]
    key = text.strip().upper()
    if key not in SPECTRUM_NAMES:
        choices = ", ".join(PREFIX + n for n in SPECTRUM_NAMES)
        raise SpectrumError(f"unknown DeepDRR spectrum {name!r}; DeepDRR 1.2.2's spectra: {choices}")
    return key


def spectrum_table(name: str) -> tuple[np.ndarray, np.ndarray]:
    """DeepDRR's table as stored: (B,) bin energies in keV and (B,) photon counts (the last one is negative).

    ``name``: ``"90KV_AL40"`` or ``"deepdrr:90KV_AL40"`` (any case). DeepDRR normalises the counts as they
    are (``pdf = counts / Σ counts``), so its open-field intensity, the mean energy, is
    ``Σ E counts / Σ counts``.
    """
    entry = _tables()["spectra"][_bare_name(name)]
    return np.asarray(entry["energy_ev"], dtype=np.float64) / 1e3, np.asarray(entry["photons"], dtype=np.float64)


def spectrum_bins(name: str) -> dict[str, Any]:
    """DeepDRR 1.2.2's spectrum as the bins of a drrfarm spectrum (what ``drrfarm.spectrum.preset`` builds for
    ``deepdrr:<NAME>``): ``energies_kev``, ``weights``, ``kvp``, ``al_mm`` and ``name``.

    The bins are DeepDRR's (0.5 keV from 15 keV to the kVp). The kVp bin carries a small negative count in
    DeepDRR's tables (about 1e-5 of the photons); it is dropped, which moves the mean energy by < 0.001 keV.
    """
    key = _bare_name(name)
    energies, counts = spectrum_table(key)
    keep = counts > 0
    entry = _tables()["spectra"][key]
    return {"energies_kev": energies[keep], "weights": counts[keep], "kvp": float(entry["kvp"]),
            "al_mm": float(entry["al_mm"]), "name": PREFIX + key}


def mass_attenuation_cm2_g(material: str, energies_kev: np.ndarray | Iterable[float] | float) -> np.ndarray:
    """DeepDRR's μ/ρ (cm²/g) of ``air``, ``soft tissue`` or ``bone`` at ``energies_kev`` (any shape).

    As DeepDRR 1.2.2 computes it: linear interpolation of log10(μ/ρ) in log10(E) between the rows of
    NIST's table (the first of two equal edge energies lowered by 1e-9 of itself). For comparison with
    :func:`drrfarm.materials.mass_attenuation_cm2_g`; rendering does not use it.
    """
    table = _MATERIAL_TABLES.get(material.strip().lower()) if isinstance(material, str) else None
    if table is None:
        raise MaterialError(f"DeepDRR μ/ρ table: unknown material {material!r}; stored: air, soft tissue, bone")
    entry = _tables()["mass_attenuation"][table]
    e_mev = np.asarray(entry["energy_mev"], dtype=np.float64)
    repeated = np.nonzero(e_mev[1:] == e_mev[:-1])[0]
    e_mev[repeated] *= 1.0 - _EDGE_NUDGE
    mu = np.asarray(entry["mu_over_rho_cm2_g"], dtype=np.float64)
    e = np.asarray(energies_kev, dtype=np.float64)
    if not (np.all(np.isfinite(e)) and np.all(e > 0)):
        raise MaterialError("DeepDRR μ/ρ table: energies_kev must be finite and > 0")
    return 10.0 ** np.interp(np.log10(e / 1e3), np.log10(e_mev), np.log10(mu))
