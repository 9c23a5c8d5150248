"""X-ray scatter: a Monte Carlo reference and a fast estimate, in the analytic renderer's units.

``scatter: none | fast | monte_carlo`` (:class:`drrfarm.physics.Physics`) selects what a render adds
to the primary image:

* ``monte_carlo``: photon transport through the material volume (:mod:`drrfarm.scatter.reference`
  on the CPU, ``scatter/scatter.cu`` on a GPU, the same histories from the same seeds);
* ``fast``: the same photon transport on a coarsened volume with few histories, its scatter scored by
  forced detection (:mod:`drrfarm.scatter.forced`: every collision adds its expected contribution to
  every bin of a coarse grid; :mod:`drrfarm.scatter.fast` holds the coarsening).

Either gives, per image, the scatter **signal** (τ units: detector signal relative to the open
field) and scatter **counts** (q units: detected photons relative to the open field), tallied on a
coarse grid and interpolated to the detector. :func:`drrfarm.physics.finish_image` adds them to the
primary before the noise, so the Poisson draw is on primary + scatter counts.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from drrfarm.physics import SCATTER_MODES
from drrfarm.scatter.fast import coarsen_volume, coarsening_factors, upsample_bilinear
from drrfarm.scatter.forced import simulate_forced
from drrfarm.scatter.reference import ScatterTally, ScatterVolume, default_tally_shape, simulate
from drrfarm.scatter.tables import TransportTables, transport_tables

__all__ = [
    "SCATTER_MODES",
    "ScatterEstimator",
    "ScatterImage",
    "ScatterTally",
    "ScatterVolume",
    "default_photons",
    "photons_for",
    "simulate",
    "transport_tables",
]

#: Histories per image when ``scatter_photons`` is not given, per mode and engine.
DEFAULT_PHOTONS = {("monte_carlo", "cuda"): 50_000_000, ("monte_carlo", "cpu"): 2_000_000,
                   ("fast", "cuda"): 10_000, ("fast", "cpu"): 5_000}
FAST_VOXEL_MM = 8.0  # the fast estimate's coarse voxels, and its transmission step (scatter is smooth)
FAST_MAX_BINS = 8  # the fast estimate's grid: its value at each bin's centre, interpolated to the detector
#: The fast estimate absorbs photons below this energy where they are: in tissue they hardly reach the detector
#: (0.15 % of the chest CT's scatter comes from collisions below it; docs/scatter.md), and following them
#: through ~1 mm Woodcock steps would set the kernel's time.
FAST_CUTOFF_KEV = 25.0


def default_photons(mode: str, engine: str) -> int:
    return DEFAULT_PHOTONS[(mode, engine)]


def photons_for(physics: Any, engine: str) -> int:
    """Histories per image of ``physics.scatter`` on ``engine`` (``cpu`` / ``cuda``): the given count or
    the mode's default."""
    return int(physics.scatter_photons or default_photons(physics.scatter, engine))


@dataclass
class ScatterImage:
    """One image's scatter: ``signal_tally`` / ``counts_tally`` (H_t, W_t) in τ / q units (for ``fast``
    forced detection's values at the bins' centres) and their bilinear interpolation to the detector,
    ``signal`` / ``counts`` (H, W); the raw tally, the mode, histories and seconds spent (its cost)."""

    signal_tally: np.ndarray
    counts_tally: np.ndarray
    height: int
    width: int
    tally: ScatterTally
    mode: str
    photons: int
    seconds: float

    @functools.cached_property
    def signal(self) -> np.ndarray:
        return upsample_bilinear(self.signal_tally, self.height, self.width)

    @functools.cached_property
    def counts(self) -> np.ndarray:
        return upsample_bilinear(self.counts_tally, self.height, self.width)


class ScatterEstimator:
    """Scatter for a backend: ``engine='cpu'`` (NumPy reference) or ``'cuda'`` (the kernel).

    Keeps each volume's Monte Carlo form (and its coarsened twin for ``fast``) resident by key;
    ``seconds`` adds up what every estimate cost.
    """

    def __init__(self, engine: str = "cpu", device: int = 0) -> None:
        if engine not in ("cpu", "cuda"):
            raise ValueError(f"engine: 'cpu' or 'cuda', got {engine!r}")
        self.engine = engine
        self.seconds = 0.0
        self._volumes: dict[tuple[str, bool], ScatterVolume] = {}
        self._gpu: Any = None
        if engine == "cuda":  # imports pycuda
            from drrfarm.scatter.cuda import CudaScatter

            self._gpu = CudaScatter(device)

    def volume(self, key: str, make: Any, coarse: bool = False) -> ScatterVolume:
        """The Monte Carlo volume of ``key`` (``make()`` builds the full-resolution one once), or its
        twin coarsened to ``FAST_VOXEL_MM`` voxels for the fast estimate."""
        full = self._volumes.get((key, False))
        if full is None:
            full = self._volumes[(key, False)] = make()
        if not coarse:
            return full
        twin = self._volumes.get((key, True))
        if twin is None:
            twin = self._volumes[(key, True)] = coarsen_volume(full, coarsening_factors(full, FAST_VOXEL_MM))
        return twin

    def tallies(self, key: str, volume: ScatterVolume, tables: TransportTables, cameras: Sequence[Any],
                photons: int, seeds: Sequence[int], tally_shape: tuple[int, int], solid_angle: bool,
                forced_step_mm: float | None = None, cutoff_kev: float = 0.0) -> list[ScatterTally]:
        """Monte Carlo tallies of ``cameras``; ``forced_step_mm``: scatter by forced detection, photons below
        ``cutoff_kev`` absorbed where they are."""
        if self._gpu is not None:
            res = self._gpu.resident(key, volume)
            return self._gpu.simulate(res, tables, cameras, photons, seeds, tally_shape=tally_shape,
                                      solid_angle=solid_angle, forced_step_mm=forced_step_mm, cutoff_kev=cutoff_kev)
        if forced_step_mm:
            return [simulate_forced(volume, tables, cam, photons, seed, step_mm=forced_step_mm,
                                    tally_shape=tally_shape, solid_angle=solid_angle, cutoff_kev=cutoff_kev)
                    for cam, seed in zip(cameras, seeds, strict=True)]
        return [simulate(volume, tables, cam, photons, seed, tally_shape=tally_shape, solid_angle=solid_angle)
                for cam, seed in zip(cameras, seeds, strict=True)]

    def estimate(self, key: str, make_volume: Any, cameras: Sequence[Any], spectrum: Any, physics: Any,
                 seeds: Sequence[int], tables: TransportTables | None = None) -> list[ScatterImage]:
        """Scatter images for ``cameras`` with ``physics.scatter`` = ``fast`` or ``monte_carlo``.

        ``tables``: precomputed :func:`transport_tables` of ``spectrum`` (else computed here).
        """
        mode = physics.scatter
        if mode not in ("fast", "monte_carlo"):
            raise ValueError(f"scatter: estimate() needs 'fast' or 'monte_carlo', got {mode!r}")
        t0 = time.perf_counter()
        photons = photons_for(physics, self.engine)
        fast = mode == "fast"
        vol = self.volume(key, make_volume, coarse=fast)
        if tables is None:
            tables = transport_tables(spectrum, vol.material_names, physics)
        H, W = int(cameras[0].height), int(cameras[0].width)
        shape = default_tally_shape(H, W, FAST_MAX_BINS if fast else physics.scatter_bins)
        vkey = f"{key}/{'coarse' if fast else 'full'}"
        tallies = self.tallies(vkey, vol, tables, cameras, photons, seeds, shape, physics.solid_angle,
                               FAST_VOXEL_MM if fast else None, FAST_CUTOFF_KEV if fast else 0.0)
        out = [ScatterImage(t.scatter_signal, t.scatter_counts, int(cam.height), int(cam.width), t, mode, photons,
                            0.0) for cam, t in zip(cameras, tallies, strict=True)]
        elapsed = time.perf_counter() - t0
        self.seconds += elapsed
        for s in out:
            s.seconds = elapsed / len(out)
        return out
