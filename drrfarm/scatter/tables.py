"""Interaction tables of the scatter Monte Carlo, computed once on the CPU and handed to either engine.

Data sources:

* partial mass attenuation coefficients (photoelectric, incoherent/Compton, coherent/Rayleigh) of
  every element: **xraydb** ``mu_elam(..., kind=...)`` (Elam, Ravel & Sieber 2002), combined by the
  mixture rule with the compositions of :mod:`drrfarm.materials` — their sum is exactly the total
  coefficient the analytic renderer uses;
* atomic form factors F(x, Z) for Rayleigh scattering: **xraydb** ``f0`` (Waasmaier & Kirfel 1995);
* incoherent scattering functions S(x, Z) for Compton scattering: **xraylib** ``SF_Compt``
  (Hubbell et al. 1975, J. Phys. Chem. Ref. Data 4:471).

``x = sin(θ/2) / λ`` (Å⁻¹) is the momentum-transfer variable of both functions (θ the scattering
angle). Mixtures use the independent-atom approximation: per gram, ``n_i = w_i / A_i`` atoms of
element i, ``F²_mix = Σ n_i F_i²`` and ``S_mix = Σ n_i S_i``, normalised by ``Σ n_i Z_i``.

Energies lie on a uniform grid (``ENERGY_STEP_KEV``) from 1 keV to just above the spectrum's
highest bin; both engines interpolate linearly in energy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from drrfarm.errors import PhysicsError
from drrfarm.materials import material_info
from drrfarm.physics import detector_efficiency

HC_KEV_ANGSTROM = 12.398419843320026  # h c in keV Å (CODATA 2018)
ELECTRON_REST_ENERGY_KEV = 510.99895
ENERGY_MIN_KEV = 1.0
ENERGY_STEP_KEV = 0.25
X_STEP_PER_ANGSTROM = 0.01
INTERACTIONS = ("photoelectric", "compton", "rayleigh")


@dataclass(frozen=True)
class TransportTables:
    """Everything the transport needs besides the volume and the camera (all float64, CPU side).

    ``mu_cm2_g``: (M, 3, NE) partial μ/ρ (photoelectric, Compton, Rayleigh) at ``energy_grid_kev``;
    ``compton_s``: (M, NX) ``S_mix(x) / Z_mix`` at ``x = j * x_step``;
    ``rayleigh_cdf``: (M, NX) ``∫_0^{x_j²} F²_mix d(x²)`` (unnormalised);
    ``detector_eta``: (NE,) detector absorption probability;
    ``spectrum_kev`` / ``spectrum_cdf``: (B,) bin energies and cumulative probabilities;
    ``signal_per_photon``: True for energy-integrating detectors (signal ∝ E η), False for counting (∝ η);
    ``signal_norm`` / ``count_norm``: open-field signal ``S0 = Σ p_b e_b η_b`` and counts ``C0 = Σ p_b η_b``.
    """

    material_names: tuple[str, ...]
    energy_grid_kev: np.ndarray
    mu_cm2_g: np.ndarray
    x_step: float
    compton_s: np.ndarray
    rayleigh_cdf: np.ndarray
    detector_eta: np.ndarray
    spectrum_kev: np.ndarray
    spectrum_cdf: np.ndarray
    signal_per_photon: bool
    signal_norm: float
    count_norm: float

    @property
    def e0_kev(self) -> float:
        return float(self.energy_grid_kev[0])

    @property
    def de_kev(self) -> float:
        return ENERGY_STEP_KEV

    @property
    def n_energies(self) -> int:
        return int(self.energy_grid_kev.size)

    @property
    def n_x(self) -> int:
        return int(self.compton_s.shape[1])

    def signal_weight(self, energy_kev: np.ndarray) -> np.ndarray:
        """Detector signal of one photon of energy E, relative to the open field: ``e(E) η(E) / S0``."""
        eta = interp_grid(self.detector_eta, energy_kev, self)
        return (energy_kev * eta if self.signal_per_photon else eta) / self.signal_norm

    def count_weight(self, energy_kev: np.ndarray) -> np.ndarray:
        """Detected-photon weight of one photon, relative to the open field: ``η(E) / C0``."""
        return interp_grid(self.detector_eta, energy_kev, self) / self.count_norm

    def majorant_per_mm(self, volume: Any) -> np.ndarray:
        """(NE,) Woodcock majorant μ_max(E) in 1/mm: ``max over voxels of Σ_m ρ_m μ_m(E)`` at every grid
        energy (so also between them: both sides interpolate linearly), for a
        :class:`~drrfarm.scatter.reference.ScatterVolume`.

        One material per voxel: ``max_m ρ_max,m μ_m(E)``; mixed voxels (coarsened or partial-volume
        grids): the maximum over the distinct voxels, computed once per volume and table. Raised by
        one part in 10⁶ so round-off can never put a voxel above it.
        """
        import hashlib

        cache = volume.__dict__.setdefault("_majorants", {})
        key = hashlib.sha1(np.ascontiguousarray(self.mu_cm2_g).tobytes()).hexdigest()
        if key in cache:
            return cache[key]
        mu_total = self.mu_cm2_g.sum(axis=1) / 10.0  # (M, NE) 1/mm per g/cm³
        if volume.single_material_voxels:
            mu = (np.asarray(volume.max_density_g_cm3, dtype=np.float64)[:, None] * mu_total).max(axis=0)
        else:
            rows = volume.distinct_density_rows()  # (V, M)
            mu = np.zeros(mu_total.shape[1])
            for s in range(0, rows.shape[0], 1 << 16):
                mu = np.maximum(mu, (rows[s : s + (1 << 16)] @ mu_total).max(axis=0))
        cache[key] = np.maximum(mu * (1.0 + 1e-6), 1e-12)
        return cache[key]


def interp_grid(table: np.ndarray, energy_kev: np.ndarray, tables: TransportTables) -> np.ndarray:
    """Linear interpolation of ``table[..., NE]`` at energies (N,) on the uniform grid → (..., N)."""
    f = (np.asarray(energy_kev, dtype=np.float64) - tables.e0_kev) / ENERGY_STEP_KEV
    f = np.clip(f, 0.0, tables.n_energies - 1.000001)
    i0 = f.astype(np.int64)
    w = f - i0
    return table[..., i0] * (1.0 - w) + table[..., i0 + 1] * w


@functools.lru_cache(maxsize=256)
def _element_data(symbol: str) -> tuple[int, float]:
    import xraydb

    return int(xraydb.atomic_number(symbol)), float(xraydb.atomic_mass(symbol))


@functools.lru_cache(maxsize=64)
def _material_arrays(name: str, n_energies: int, n_x: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(3, NE) partial μ/ρ, (NX,) S/Z and (NX,) Rayleigh CDF of one material (cached; callers copy)."""
    import xraydb
    import xraylib

    e_ev = (ENERGY_MIN_KEV + ENERGY_STEP_KEV * np.arange(n_energies)) * 1e3
    x = X_STEP_PER_ANGSTROM * np.arange(n_x)
    mu = np.zeros((3, n_energies))
    s_mix = np.zeros(n_x)
    f2_mix = np.zeros(n_x)
    z_mix = 0.0
    for symbol, w in material_info(name).mass_fractions:
        Z, A = _element_data(symbol)
        for k, kind in enumerate(("photo", "incoh", "coh")):
            mu[k] += w * np.asarray(xraydb.mu_elam(symbol, e_ev, kind=kind), dtype=np.float64)
        n = w / A
        z_mix += n * Z
        s_mix += n * np.array([xraylib.SF_Compt(Z, float(xi)) if xi > 0 else 0.0 for xi in x])
        f = np.clip(np.asarray(xraydb.f0(symbol, x), dtype=np.float64).reshape(-1), 0.0, None)
        f2_mix += n * f * f
    s_over_z = np.clip(s_mix / z_mix, 0.0, 1.0)
    s_grid = x * x
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (f2_mix[1:] + f2_mix[:-1]) * np.diff(s_grid))])
    return mu, s_over_z, cdf


def transport_tables(spectrum: Any, material_names: list[str], physics: Any) -> TransportTables:
    """Tables for ``spectrum`` (a :class:`drrfarm.spectrum.Spectrum`), materials and detector model."""
    energies = np.asarray(spectrum.energies_kev, dtype=np.float64)
    probs = np.asarray(spectrum.weights, dtype=np.float64)
    if energies.size == 0 or not np.all(probs >= 0) or probs.sum() <= 0:
        raise PhysicsError("spectrum: needs at least one bin with positive weight for the scatter Monte Carlo")
    probs = probs / probs.sum()
    e_max = float(energies.max())
    n_energies = int(np.ceil((e_max - ENERGY_MIN_KEV) / ENERGY_STEP_KEV)) + 3
    grid = ENERGY_MIN_KEV + ENERGY_STEP_KEV * np.arange(n_energies)
    n_x = int(np.ceil(grid[-1] / HC_KEV_ANGSTROM / X_STEP_PER_ANGSTROM)) + 3
    mu, s, cdf = zip(*(_material_arrays(str(n), n_energies, n_x) for n in material_names), strict=True)
    eta_grid = detector_efficiency(grid, physics)
    eta_bins = detector_efficiency(energies, physics)
    integrating = physics.detector != "photon_counting"
    weights = energies * eta_bins if integrating else eta_bins
    return TransportTables(
        material_names=tuple(str(n) for n in material_names),
        energy_grid_kev=grid,
        mu_cm2_g=np.stack(mu).copy(),
        x_step=X_STEP_PER_ANGSTROM,
        compton_s=np.stack(s).copy(),
        rayleigh_cdf=np.stack(cdf).copy(),
        detector_eta=np.asarray(eta_grid, dtype=np.float64),
        spectrum_kev=energies.copy(),
        spectrum_cdf=np.cumsum(probs),
        signal_per_photon=integrating,
        signal_norm=float((probs * weights).sum()),
        count_norm=float((probs * eta_bins).sum()),
    )


_ARRAY_FIELDS = ("energy_grid_kev", "mu_cm2_g", "compton_s", "rayleigh_cdf", "detector_eta", "spectrum_kev",
                 "spectrum_cdf")


def save_tables(path: str, entries: dict[str, TransportTables]) -> None:
    """Write ``{key: tables}`` to one compressed ``.npz`` (for workers without xraydb/xraylib/SpekPy)."""
    out: dict[str, np.ndarray] = {}
    for key, t in entries.items():
        for f in _ARRAY_FIELDS:
            out[f"{key}|{f}"] = getattr(t, f)
        out[f"{key}|scalars"] = np.array([t.x_step, t.signal_norm, t.count_norm, float(t.signal_per_photon)])
        out[f"{key}|materials"] = np.array(t.material_names)
    np.savez_compressed(path, **out)


def load_tables(path: str, key: str) -> TransportTables:
    """The tables saved under ``key`` by :func:`save_tables`; PhysicsError naming the file if absent."""
    with np.load(path) as z:
        if f"{key}|scalars" not in z.files:
            raise PhysicsError(f"{path}: no scatter tables under {key!r}")
        arrays = {f: z[f"{key}|{f}"] for f in _ARRAY_FIELDS}
        x_step, signal_norm, count_norm, per_photon = (float(v) for v in z[f"{key}|scalars"])
        names = tuple(str(n) for n in z[f"{key}|materials"])
    return TransportTables(material_names=names, x_step=x_step, signal_norm=signal_norm, count_norm=count_norm,
                           signal_per_photon=bool(per_photon), **arrays)
