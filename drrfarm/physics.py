"""What a render computes after the line integrals: detector models, noise, fall-off, outputs.

This module is the description both backends implement. The NumPy functions here are the
reference (the CUDA kernels reproduce them); the tables they need (spectrum weights, μ/ρ at the
spectrum's bins, detector efficiency) are computed once on the CPU and handed to either backend.

Definitions, for material line integrals ``A_m`` (g/cm²) of one ray and spectrum bins
``(E_b, p_b)`` with ``Σ p_b = 1``:

* bin transmission ``T_b = exp(-Σ_m (μ/ρ)_m(E_b) A_m)``;
* detected photon fraction ``q = Σ_b p_b η_b T_b / Σ_b p_b η_b``;
* detector signal ``S = Σ_b w_b T_b`` with the detector weights ``w_b``:

  - ``ideal``: energy-integrating, every photon absorbed: ``w_b = E_b p_b`` (DeepDRR-compatible,
    open field ``S0`` = the spectrum's mean energy in keV);
  - ``photon_counting``: ``w_b = p_b`` (open field 1);
  - ``csi``: energy-integrating CsI scintillator of finite thickness, photons absorbed with
    probability ``η_b = 1 - exp(-(μ/ρ)_CsI(E_b) ρ_CsI d)``: ``w_b = E_b p_b η_b``;

* transmission ``τ = S / S0`` (relative to the open field at the principal point);
* optional solid-angle fall-off: both ``τ`` and ``q`` times ``g = cos³θ`` of the pixel's ray;
* optional scatter (:mod:`drrfarm.scatter`): ``τ += τ_s`` and ``q += q_s``, the scatter signal and
  counts in the same units, before the noise;
* noise for ``N`` photons per pixel (open field): detected counts ``n ~ Poisson(N q)``, plus
  Gaussian electronic noise of ``σ_e`` photon-equivalents; ``τ' = (n τ / q + σ_e ξ) / N``
  (each detected photon carries the mean energy ``τ/q`` of the pixel's detected spectrum;
  for the photon counter ``τ = q``, so ``τ' = n / N`` exactly);
* outputs: ``intensity = τ' S0``, ``transmission = τ'``,
  ``line_integral = log(I0 / I) = -ln max(τ', τ_min)`` with ``τ_min = 0.5 / N``
  (``1e-12`` without noise), and DeepDRR-style ``neglog`` (see :func:`deepdrr_neglog`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from drrfarm.errors import PhysicsError
from drrfarm.materials import mass_attenuation_cm2_g, material_table

DETECTORS = ("ideal", "photon_counting", "csi")
OUTPUTS = ("line_integral", "transmission", "intensity", "neglog")
METHODS = ("trilinear", "joseph")
SCATTER_MODES = ("none", "fast", "monte_carlo")
MAX_STEP_VOXELS = 4.0  # the longest march step, in units of the smallest voxel spacing
MAX_SCATTER_PHOTONS = 2**32 - 1  # Monte Carlo histories per image (a 32-bit count)
MAX_SCATTER_BINS = 1024  # longest side of the scatter tally grid

CSI_DENSITY_G_CM3 = 4.51
NOISELESS_TAU_MIN = 1e-12

#: uint16 storage: stored value = round(x / scale), clipped to [0, 65535].
UINT16_SCALE = {
    "line_integral": 16.0 / 65535.0,  # line integrals up to 16 (transmission down to 1e-7)
    "transmission": 1.0 / 65535.0,
    "neglog": 1.0 / 65535.0,
    "intensity": 160.0 / 65535.0,  # keV per emitted photon, above any 150 kVp mean energy
}


@dataclass(frozen=True)
class Physics:
    """Physics options of a render (everything except geometry and spectrum).

    ``detector``: ``ideal`` (energy-integrating), ``photon_counting`` or ``csi`` (CsI of
    ``csi_thickness_mm`` mm); ``output``: ``line_integral`` (log(I0/I)), ``transmission`` (I/I0),
    ``intensity`` (keV per emitted photon) or ``neglog``; ``photons``: mean photons per pixel in the
    open field (None: noiseless); ``electronic_noise``: Gaussian std in photon-equivalents per pixel;
    ``solid_angle``: the cos³θ fall-off; ``step_voxels``: march step in units of the smallest voxel
    spacing (mm); ``method``: ``trilinear`` or ``joseph``; ``scatter``: ``none``, ``fast`` or
    ``monte_carlo`` with ``scatter_photons`` histories per image on a grid of ``scatter_bins`` pixels.
    """

    detector: str = "ideal"
    output: str = "line_integral"
    photons: float | None = None  # mean photons per pixel in the open field; None = noiseless
    electronic_noise: float = 0.0  # std of additive Gaussian noise, photon-equivalents per pixel
    csi_thickness_mm: float = 0.6
    solid_angle: bool = False  # apply the cos³θ inverse-square/obliquity fall-off
    step_voxels: float = 0.5  # trilinear march step, in units of the smallest voxel spacing
    method: str = "trilinear"  # "trilinear" (uniform march) or "joseph" (slice stepping)
    scatter: str = "none"  # "none", "fast" (few histories, forced detection) or "monte_carlo" (drrfarm.scatter)
    scatter_photons: int | None = None  # Monte Carlo histories per image; None: the mode's default
    scatter_bins: int = 64  # longest side of the scatter tally grid (monte_carlo; fast uses 8)

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise PhysicsError(f"detector: unknown model {self.detector!r}; choose one of {DETECTORS}")
        if self.output not in OUTPUTS:
            raise PhysicsError(f"output: unknown transform {self.output!r}; choose one of {OUTPUTS}")
        if self.method not in METHODS:
            raise PhysicsError(f"method: unknown sampling method {self.method!r}; choose one of {METHODS}")
        if self.photons is not None and not (np.isfinite(self.photons) and self.photons > 0):
            raise PhysicsError(f"photons: must be a positive number or None, got {self.photons!r}")
        if not (np.isfinite(self.electronic_noise) and self.electronic_noise >= 0):
            raise PhysicsError(f"electronic_noise: must be >= 0, got {self.electronic_noise!r}")
        if not (np.isfinite(self.csi_thickness_mm) and self.csi_thickness_mm > 0):
            raise PhysicsError(f"csi_thickness_mm: must be > 0, got {self.csi_thickness_mm!r}")
        if not (np.isfinite(self.step_voxels) and 0 < self.step_voxels <= MAX_STEP_VOXELS):
            raise PhysicsError(f"step_voxels: must be in (0, {MAX_STEP_VOXELS:g}], got {self.step_voxels!r}")
        if self.scatter not in SCATTER_MODES:
            raise PhysicsError(f"scatter: unknown mode {self.scatter!r}; choose one of {SCATTER_MODES}")
        if self.scatter_photons is not None and not (
            isinstance(self.scatter_photons, (int, np.integer)) and 0 < self.scatter_photons <= MAX_SCATTER_PHOTONS
        ):
            raise PhysicsError(f"scatter_photons: must be an integer in [1, 2**32), got {self.scatter_photons!r}")
        if not (isinstance(self.scatter_bins, (int, np.integer)) and 1 <= self.scatter_bins <= MAX_SCATTER_BINS):
            raise PhysicsError(
                f"scatter_bins: must be an integer in [1, {MAX_SCATTER_BINS}], got {self.scatter_bins!r}"
            )

    @property
    def noisy(self) -> bool:
        return self.photons is not None

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-friendly dict (field name -> value)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Physics:
        """Inverse of :meth:`to_dict`; missing keys take the defaults, unknown keys raise PhysicsError."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PhysicsError(f"physics: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class DetectorTables:
    """Per-bin tables a backend needs for the polyenergetic step (all float64, CPU side).

    ``mu_cm2_g``: (B, M) μ/ρ of each material at each bin; ``signal_weights``: (B,) ``w_b / S0``
    (so the open-field transmission is 1); ``count_weights``: (B,) ``p_b η_b / Σ p_b η_b``;
    ``open_field_signal``: ``S0``.
    """

    mu_cm2_g: np.ndarray
    signal_weights: np.ndarray
    count_weights: np.ndarray
    open_field_signal: float


def detector_efficiency(energies_kev: np.ndarray, physics: Physics) -> np.ndarray:
    """Fraction of photons the detector absorbs at each energy: (B,) in (0, 1]."""
    energies_kev = np.asarray(energies_kev, dtype=np.float64)
    if physics.detector != "csi":
        return np.ones_like(energies_kev)
    mu_cm = mass_attenuation_cm2_g("CsI", energies_kev) * CSI_DENSITY_G_CM3
    return 1.0 - np.exp(-mu_cm * physics.csi_thickness_mm / 10.0)


def detector_tables(spectrum: Any, material_names: list[str], physics: Physics) -> DetectorTables:
    """Build the per-bin tables for ``spectrum`` (a :class:`drrfarm.spectrum.Spectrum`)."""
    energies = np.asarray(spectrum.energies_kev, dtype=np.float64)
    probs = np.asarray(spectrum.weights, dtype=np.float64)
    eta = detector_efficiency(energies, physics)
    weights = probs * eta if physics.detector == "photon_counting" else energies * probs * eta
    open_field = float(weights.sum())
    counts = probs * eta
    return DetectorTables(
        mu_cm2_g=material_table(list(material_names), energies),
        signal_weights=weights / open_field,
        count_weights=counts / counts.sum(),
        open_field_signal=open_field,
    )


def transmissions(line_integrals_g_cm2: np.ndarray, tables: DetectorTables) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless signal and photon transmission from material line integrals.

    ``line_integrals_g_cm2``: (M, ...) → ``(tau, q)``, each (...) float64:
    ``tau = Σ_b w_b T_b / S0`` and ``q = Σ_b p_b η_b T_b / Σ p_b η_b``.
    """
    A = np.asarray(line_integrals_g_cm2, dtype=np.float64)
    exponent = np.tensordot(tables.mu_cm2_g, A, axes=([1], [0]))  # (B, ...)
    T = np.exp(-exponent)
    tau = np.tensordot(tables.signal_weights, T, axes=([0], [0]))
    q = np.tensordot(tables.count_weights, T, axes=([0], [0]))
    return tau, q


def solid_angle_falloff(camera: Any) -> np.ndarray:
    """cos³θ of each pixel's ray relative to the principal ray: (H, W) float64."""
    K = camera.K
    v, u = np.mgrid[0 : camera.height, 0 : camera.width].astype(np.float64)
    x = (u - K[0, 2]) / K[0, 0]
    y = (v - K[1, 2]) / K[1, 1]
    return (1.0 + x * x + y * y) ** -1.5


def apply_noise(tau: np.ndarray, q: np.ndarray, physics: Physics, seed: int) -> np.ndarray:
    """Quantum (Poisson) and electronic (Gaussian) noise on a transmission image (see module doc).

    The random stream is NumPy's Philox keyed by ``seed``: the same seed gives the same image.
    """
    if physics.photons is None:
        return tau
    rng = np.random.Generator(np.random.Philox(key=int(seed) & (2**64 - 1)))
    n_photons = float(physics.photons)
    q_safe = np.maximum(q, 1e-30)
    counts = rng.poisson(n_photons * q_safe).astype(np.float64)
    signal = counts * (tau / q_safe)
    if physics.electronic_noise > 0:
        signal = signal + physics.electronic_noise * rng.standard_normal(tau.shape)
    return signal / n_photons


def deepdrr_neglog(intensity: np.ndarray, epsilon: float = 0.01) -> np.ndarray:
    """DeepDRR's ``neglog``: ``-log(I + min(I) + ε)`` min-max rescaled to [0, 1] per image.

    Kept for compatibility (the minimum is *added*, as DeepDRR does); it is relative, not the
    physical line integral. A constant image maps to 0. ``intensity``: (H, W).
    """
    x = -np.log(intensity + intensity.min() + epsilon)
    lo, hi = x.min(), x.max()
    if hi - lo <= 0:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def output_transform(tau: np.ndarray, tables: DetectorTables, physics: Physics) -> np.ndarray:
    """Map a (possibly noisy) transmission image (H, W) to the requested output, float32."""
    if physics.output == "transmission":
        out = tau
    elif physics.output == "intensity":
        out = tau * tables.open_field_signal
    elif physics.output == "line_integral":
        tau_min = 0.5 / physics.photons if physics.photons else NOISELESS_TAU_MIN
        out = -np.log(np.maximum(tau, tau_min))
    else:
        out = deepdrr_neglog(np.maximum(tau, 0.0) * tables.open_field_signal)
    return out.astype(np.float32)


def finish_image(
    line_integrals_g_cm2: np.ndarray, tables: DetectorTables, physics: Physics, camera: Any, seed: int,
    scatter: Any = None,
) -> np.ndarray:
    """From material line integrals (M, H, W) to the output image (H, W) float32.

    ``scatter``: a :class:`drrfarm.scatter.ScatterImage` (or anything with ``signal`` and ``counts``,
    (H, W) in τ and q units, fall-off included) added to the primary before the noise, so the
    Poisson draw is on primary + scatter counts.
    """
    tau, q = transmissions(line_integrals_g_cm2, tables)
    if physics.solid_angle:
        g = solid_angle_falloff(camera)
        tau, q = tau * g, q * g
    if scatter is not None:
        tau, q = tau + scatter.signal, q + scatter.counts
    tau = apply_noise(tau, q, physics, seed)
    return output_transform(tau, tables, physics)


def quantize_uint16(images: np.ndarray, output: str) -> tuple[np.ndarray, float]:
    """Quantise float images for storage: ``value = round(x / scale)`` clipped to uint16.

    Returns ``(uint16 images, scale)``; ``images * scale`` recovers the float within ``scale / 2``.
    """
    if output not in UINT16_SCALE:
        raise PhysicsError(f"output: no uint16 scale for {output!r}")
    scale = UINT16_SCALE[output]
    q = np.rint(np.asarray(images, dtype=np.float64) / scale)
    return np.clip(q, 0, 65535).astype(np.uint16), scale
