"""The scatter Monte Carlo on the CPU (NumPy, float64): the executable spec of ``scatter/scatter.cu``.

One photon's history, with ``u[0..3]`` the four uniforms of one Philox block (counter = photon,
draw; see :mod:`drrfarm.scatter.philox`):

1. **emission** (draw 0): energy bin from the spectrum's CDF (``u0``); a point uniform over the
   detector's area (``u1``, ``u2``: pixel coordinates in [-0.5, W-0.5) x [-0.5, H-0.5)); the
   direction from the source through it. Weight ``g = cos³θ`` with the solid-angle fall-off, else 1,
   so the open field gives 1 per detector area as in the analytic renderer.
2. **Woodcock (delta) tracking** (one draw per step) through the voxel grid (nearest voxel, box
   ``[-0.5, n-0.5]`` in index space, vacuum outside): free path ``-ln(u0) / μ_max(E)``; a real
   collision when ``u1 μ_max < μ(r, E)``; then material and interaction chosen by ``u2`` over the
   cumulative ``ρ_m μ_{m,k}(E)`` (m-major, k = photoelectric, Compton, Rayleigh); azimuth ``2π u3``.
3. **photoelectric**: absorbed, its energy deposited (fluorescence is not transported).
   **Compton**: Klein–Nishina by Butcher & Messel's mixture sampling, accepted with the incoherent
   scattering function ``S(x)/Z`` (one draw per trial: ``u0`` branch, ``u1`` ε, ``u2`` KN rejection,
   ``u3`` S rejection); ``E' = ε E``, ``E - E'`` deposited (no Doppler broadening, no binding energy).
   **Rayleigh**: ``x²`` drawn from ``F²(x)`` up to ``x_max = E / hc`` (``u0``), accepted with
   ``(1 + cos²θ)/2`` (``u1``).
4. **detection**: after leaving the volume the photon flies straight; where it crosses the detector
   plane inside the panel it adds ``g e(E) η(E) / S0`` to the signal tally and ``g η(E) / C0`` to the
   count tally of its bin — the primary tallies if it never interacted, else the scatter tallies.
   Photons below 1 keV are absorbed on the spot.

Tallies are normalised by the open-field photons per bin (``N / (H_t W_t)``), so they are in the
analytic renderer's units: transmission τ (signal) and photon transmission q (counts). Energy is
booked exactly: emitted = deposited + escaped (all weighted by ``g``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drrfarm.scatter.philox import uniforms
from drrfarm.scatter.tables import ELECTRON_REST_ENERGY_KEV, HC_KEV_ANGSTROM, TransportTables, interp_grid

MAX_TRIALS = 1000  # rejection-sampling trials before the last candidate is taken (never reached in practice)
DETECTOR_TOL_MM = 1e-3  # photons this far past the detector plane (round-off) still hit it


@dataclass
class ScatterVolume:
    """A volume as the Monte Carlo sees it: densities (M, I, J, K) g/cm³ (a view is fine), its
    ``world_from_ijk`` (4, 4) and the per-material maxima the Woodcock majorant needs."""

    densities_g_cm3: np.ndarray
    world_from_ijk: np.ndarray
    material_names: list[str]
    max_density_g_cm3: np.ndarray = field(init=False)
    single_material_voxels: bool = field(init=False)

    def __post_init__(self) -> None:
        d = self.densities_g_cm3
        if d.ndim != 4 or d.shape[0] != len(self.material_names):
            raise ValueError(f"densities_g_cm3: need (M={len(self.material_names)}, I, J, K), got {d.shape}")
        self.world_from_ijk = np.asarray(self.world_from_ijk, dtype=np.float64)
        self.max_density_g_cm3 = np.array([float(d[m].max()) for m in range(d.shape[0])])
        occupied = np.zeros(d.shape[1:], dtype=np.uint8)
        for m in range(d.shape[0]):
            occupied += d[m] > 0
        self.single_material_voxels = bool(occupied.max() <= 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.densities_g_cm3.shape[1:])  # type: ignore[return-value]

    def distinct_density_rows(self) -> np.ndarray:
        """(V, M) float64: the distinct non-empty density vectors of the voxels (cached)."""
        cached = getattr(self, "_distinct", None)
        if cached is None:
            d = np.asarray(self.densities_g_cm3, dtype=np.float32)
            rows = np.unique(d.reshape(d.shape[0], -1).T, axis=0).astype(np.float64)
            rows = rows[rows.sum(axis=1) > 0]
            cached = self._distinct = rows if rows.size else np.zeros((1, d.shape[0]))
        return cached

    @property
    def ijk_from_world(self) -> np.ndarray:
        return np.linalg.inv(self.world_from_ijk)


def densities_at(volume: ScatterVolume, ijk: np.ndarray) -> np.ndarray:
    """(N, M) float64 densities of the nearest voxels to index-space points ``ijk`` (N, 3), clamped to the grid."""
    idx = np.clip(np.floor(ijk + 0.5).astype(np.int64), 0, np.asarray(volume.shape) - 1)
    dens = volume.densities_g_cm3
    return np.stack([dens[m][idx[:, 0], idx[:, 1], idx[:, 2]] for m in range(dens.shape[0])],
                    axis=1).astype(np.float64)


def partial_attenuation(rho: np.ndarray, energy_kev: np.ndarray, tables: TransportTables) -> np.ndarray:
    """(N, M, 3) partial attenuation per mm (photoelectric, Compton, Rayleigh) of each material at densities
    ``rho`` (N, M) and energies (N,)."""
    return rho[:, :, None] * np.moveaxis(interp_grid(tables.mu_cm2_g, energy_kev, tables), -1, 0) / 10.0


@dataclass
class ScatterTally:
    """One image's Monte Carlo result on the tally grid (H_t, W_t), in the analytic renderer's units.

    ``scatter_signal`` / ``primary_signal``: detector signal relative to the open field (τ units);
    ``scatter_counts`` / ``primary_counts``: detected photons relative to the open field (q units);
    ``energy_kev``: emitted, deposited, escaped and detected (incident on the panel) energy, weighted;
    ``interactions``: numbers of photoelectric, Compton and Rayleigh events; ``seconds``: wall time.
    """

    scatter_signal: np.ndarray
    scatter_counts: np.ndarray
    primary_signal: np.ndarray
    primary_counts: np.ndarray
    photons: int
    energy_kev: dict[str, float]
    interactions: dict[str, int]
    seconds: float

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.scatter_signal.shape)  # type: ignore[return-value]

    def spr(self) -> np.ndarray:
        """Scatter-to-primary ratio of the detector signal per bin (inf where no primary)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.scatter_signal / self.primary_signal


def box_interval(p_ijk: np.ndarray, d_ijk: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit distances (mm) of rays ``p + t d`` (index space, (N, 3)) through ``[-0.5, n-0.5]³``."""
    n = np.asarray(shape, dtype=np.float64)
    t_in = np.full(p_ijk.shape[0], -np.inf)
    t_out = np.full(p_ijk.shape[0], np.inf)
    for a in range(3):
        d = d_ijk[:, a]
        p = p_ijk[:, a]
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (-0.5 - p) / d
            t2 = (n[a] - 0.5 - p) / d
        moving = d != 0.0
        inside = (p >= -0.5) & (p <= n[a] - 0.5)
        lo = np.where(moving, np.minimum(t1, t2), np.where(inside, -np.inf, np.inf))
        hi = np.where(moving, np.maximum(t1, t2), np.where(inside, np.inf, -np.inf))
        t_in = np.maximum(t_in, lo)
        t_out = np.minimum(t_out, hi)
    return t_in, t_out


def rotate(d: np.ndarray, cos_t: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Directions (N, 3) turned by polar angle θ (cos θ given) and azimuth φ about themselves."""
    sin_t = np.sqrt(np.maximum(0.0, 1.0 - cos_t * cos_t))
    cp, sp = np.cos(phi), np.sin(phi)
    u, v, w = d[:, 0], d[:, 1], d[:, 2]
    perp = np.sqrt(np.maximum(0.0, 1.0 - w * w))
    near_pole = perp < 1e-10
    safe = np.where(near_pole, 1.0, perp)
    out = np.empty_like(d)
    out[:, 0] = np.where(near_pole, sin_t * cp, u * cos_t + sin_t * (u * w * cp - v * sp) / safe)
    out[:, 1] = np.where(near_pole, sin_t * sp, v * cos_t + sin_t * (v * w * cp + u * sp) / safe)
    out[:, 2] = np.where(near_pole, np.where(w >= 0, cos_t, -cos_t), w * cos_t - sin_t * cp * perp)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _interp_rows(rows: np.ndarray, m: np.ndarray, x: np.ndarray, step: float) -> np.ndarray:
    """Linear interpolation of ``rows[m_i]`` (uniform grid of ``step``) at x_i."""
    f = np.clip(x / step, 0.0, rows.shape[1] - 1.000001)
    j = f.astype(np.int64)
    w = f - j
    return rows[m, j] * (1.0 - w) + rows[m, j + 1] * w


def _rejection(photon: np.ndarray, draw: np.ndarray, image: int, seed: int, trial: Any) -> None:
    """Rejection sampling, one Philox block per trial: ``trial(todo, u)`` stores its candidates for the
    photons ``todo`` (u: (4, len(todo))) and returns which are accepted; the rest try again, up to
    ``MAX_TRIALS`` (then the last candidate stands). ``draw`` advances in place."""
    todo = np.arange(photon.size)
    for _ in range(MAX_TRIALS):
        if todo.size == 0:
            break
        u = uniforms(photon[todo], draw[todo], image, seed)
        draw[todo] += 1
        todo = todo[~trial(todo, u)]


def sample_compton(energy_kev: np.ndarray, material: np.ndarray, photon: np.ndarray, draw: np.ndarray,
                   image: int, seed: int, tables: TransportTables) -> tuple[np.ndarray, np.ndarray]:
    """(cos θ, E'/E) of Compton events: Klein–Nishina × S(x)/Z by rejection. ``draw`` advances in place."""
    k = energy_kev / ELECTRON_REST_ENERGY_KEV
    eps0 = 1.0 / (1.0 + 2.0 * k)
    eps0_sq = eps0 * eps0
    a1 = -np.log(eps0)
    a2 = a1 + 0.5 * (1.0 - eps0_sq)
    cos_t = np.ones_like(energy_kev)
    ratio = np.ones_like(energy_kev)

    def trial(todo: np.ndarray, u: np.ndarray) -> np.ndarray:
        kk, e0sq = k[todo], eps0_sq[todo]
        first = u[0] * a2[todo] < a1[todo]
        eps = np.where(first, np.exp(-a1[todo] * u[1]), np.sqrt(e0sq + (1.0 - e0sq) * u[1]))
        one_minus_cos = (1.0 - eps) / (eps * kk)
        sin2 = one_minus_cos * (2.0 - one_minus_cos)
        kn = 1.0 - eps * sin2 / (1.0 + eps * eps)
        x = energy_kev[todo] / HC_KEV_ANGSTROM * np.sqrt(0.5 * one_minus_cos)
        s = _interp_rows(tables.compton_s, material[todo], x, tables.x_step)
        cos_t[todo] = 1.0 - one_minus_cos
        ratio[todo] = eps
        return (u[2] <= kn) & (u[3] <= s)

    _rejection(photon, draw, image, seed, trial)
    return cos_t, ratio


def sample_rayleigh(energy_kev: np.ndarray, material: np.ndarray, photon: np.ndarray, draw: np.ndarray,
                    image: int, seed: int, tables: TransportTables) -> np.ndarray:
    """cos θ of Rayleigh events: x² from F²(x) up to (E/hc)², accepted with (1+cos²θ)/2."""
    cdf = tables.rayleigh_cdf
    nx = cdf.shape[1]
    s_grid = (tables.x_step * np.arange(nx)) ** 2
    x_max_sq = (energy_kev / HC_KEV_ANGSTROM) ** 2
    a_max = _cdf_at(cdf, material, x_max_sq, s_grid, tables.x_step)
    cos_t = np.ones_like(energy_kev)

    def trial(todo: np.ndarray, u: np.ndarray) -> np.ndarray:
        target = u[0] * a_max[todo]
        mt = material[todo]
        j = np.empty(todo.size, dtype=np.int64)
        for m in np.unique(mt):
            sel = mt == m
            j[sel] = np.searchsorted(cdf[m], target[sel], side="right") - 1
        j = np.clip(j, 0, nx - 2)
        lo, hi = cdf[mt, j], cdf[mt, j + 1]
        span = hi - lo
        frac = np.where(span > 0, (target - lo) / np.where(span > 0, span, 1.0), 0.0)
        s = s_grid[j] + frac * (s_grid[j + 1] - s_grid[j])
        c = 1.0 - 2.0 * s / x_max_sq[todo]
        cos_t[todo] = c
        return 2.0 * u[1] <= 1.0 + c * c

    _rejection(photon, draw, image, seed, trial)
    return cos_t


def _cdf_at(cdf: np.ndarray, material: np.ndarray, s: np.ndarray, s_grid: np.ndarray, step: float) -> np.ndarray:
    """Rayleigh CDF of each material at x² = s (linear in s between grid nodes)."""
    f = np.clip(np.sqrt(s) / step, 0.0, cdf.shape[1] - 1.000001)
    j = f.astype(np.int64)
    w = np.clip((s - s_grid[j]) / (s_grid[j + 1] - s_grid[j]), 0.0, 1.0)
    return cdf[material, j] * (1.0 - w) + cdf[material, j + 1] * w


@dataclass
class _Tallies:
    shape: tuple[int, int]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("emitted", "deposited", "escaped", "detected"), 0.0))
    interactions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("photoelectric", "compton", "rayleigh"), 0))

    def __post_init__(self) -> None:
        for name in ("scatter_signal", "scatter_counts", "primary_signal", "primary_counts"):
            self.arrays[name] = np.zeros(self.shape)


def _detect(pos: np.ndarray, d: np.ndarray, energy: np.ndarray, weight: np.ndarray, scattered: np.ndarray,
            camera: Any, tables: TransportTables, tallies: _Tallies, book_scatter: bool = True) -> None:
    """Book photons leaving the volume (world position/direction (N, 3)) on the detector tallies
    (scattered ones only with ``book_scatter``: forced detection scores them at their collisions)."""
    tallies.energy["escaped"] += float(np.sum(weight * energy))
    R, t, K = camera.R, camera.t, camera.K
    c = pos @ R.T + t
    cd = d @ R.T
    sdd = camera.sdd_mm
    toward = cd[:, 2] > 0.0
    s = np.where(toward, (sdd - c[:, 2]) / np.where(toward, cd[:, 2], 1.0), -1.0)
    hit = toward & (s >= -DETECTOR_TOL_MM)  # a volume ending at the panel leaves a round-off behind it
    X = c[:, 0] + s * cd[:, 0]
    Y = c[:, 1] + s * cd[:, 1]
    u = (K[0, 0] * X + K[0, 1] * Y) / sdd + K[0, 2]
    v = (K[1, 1] * Y) / sdd + K[1, 2]
    H, W = camera.height, camera.width
    Ht, Wt = tallies.shape
    bu = np.floor((u + 0.5) * (Wt / W))
    bv = np.floor((v + 0.5) * (Ht / H))
    hit &= (bu >= 0) & (bu < Wt) & (bv >= 0) & (bv < Ht)
    hit &= (u >= -0.5) & (u < W - 0.5) & (v >= -0.5) & (v < H - 0.5)
    if not hit.any():
        return
    e, w, sc = energy[hit], weight[hit], scattered[hit]
    tallies.energy["detected"] += float(np.sum(w * e))
    flat = bv[hit].astype(np.int64) * Wt + bu[hit].astype(np.int64)
    sig = w * tables.signal_weight(e)
    cnt = w * tables.count_weight(e)
    for prefix, sel in (("scatter", sc), ("primary", ~sc)):
        if sel.any() and (book_scatter or prefix == "primary"):
            tallies.arrays[f"{prefix}_signal"].reshape(-1)[:] += np.bincount(flat[sel], sig[sel], Ht * Wt)
            tallies.arrays[f"{prefix}_counts"].reshape(-1)[:] += np.bincount(flat[sel], cnt[sel], Ht * Wt)


def _chunk(volume: ScatterVolume, tables: TransportTables, majorant: np.ndarray, camera: Any, first: int,
           count: int, seed: int, image: int, solid_angle: bool, tallies: _Tallies,
           events: list[np.ndarray] | None = None, cutoff_kev: float = 0.0) -> None:
    """Histories ``first`` .. ``first + count - 1``; with ``events`` (forced detection) every real collision
    is appended to it as (N, EVENT_FIELDS) rows and scattered photons reaching the panel are not booked.
    Photons below ``cutoff_kev`` (and always below the tables' first energy) are absorbed where they are."""
    book_scatter = events is None
    cold_kev = max(tables.e0_kev, float(cutoff_kev))
    photon = np.arange(first, first + count, dtype=np.uint64)
    draw = np.zeros(count, dtype=np.uint64)
    u = uniforms(photon, draw, image, seed)
    draw += 1
    b = np.minimum(np.searchsorted(tables.spectrum_cdf, u[0], side="right"), tables.spectrum_kev.size - 1)
    energy = tables.spectrum_kev[b].copy()
    px = -0.5 + camera.width * u[1]
    py = -0.5 + camera.height * u[2]
    M = camera.R.T @ np.linalg.inv(camera.K)
    d = np.stack([px * M[a, 0] + py * M[a, 1] + M[a, 2] for a in range(3)], axis=1)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    weight = (d @ camera.R[2]) ** 3 if solid_angle else np.ones(count)
    src = np.broadcast_to(camera.source_world_mm, (count, 3)).astype(np.float64)
    tallies.energy["emitted"] += float(np.sum(weight * energy))

    A = volume.ijk_from_world
    shape = volume.shape
    t_in, t_out = box_interval(src @ A[:3, :3].T + A[:3, 3], d @ A[:3, :3].T, shape)
    enters = t_out > np.maximum(t_in, 0.0)
    low = energy < cutoff_kev  # emitted below the cutoff: absorbed at once, not transported
    tallies.energy["deposited"] += float(np.sum(weight[low] * energy[low]))
    scattered = np.zeros(count, dtype=bool)
    missed = ~enters & ~low
    _detect(src[missed], d[missed], energy[missed], weight[missed], scattered[missed], camera, tables, tallies)

    act = np.nonzero(enters & ~low)[0]
    pos = src[act] + np.maximum(t_in[act], 0.0)[:, None] * d[act]
    dirs = d[act]
    remaining = t_out[act] - np.maximum(t_in[act], 0.0)
    ph, dr, en, wt = photon[act], draw[act], energy[act], weight[act]
    sc = np.zeros(act.size, dtype=bool)
    while ph.size:
        u = uniforms(ph, dr, image, seed)
        dr += 1
        mu_max = interp_grid(majorant, en, tables)
        step = -np.log(u[0]) / mu_max
        leaving = step >= remaining
        if leaving.any():
            out_pos = pos[leaving] + remaining[leaving, None] * dirs[leaving]
            _detect(out_pos, dirs[leaving], en[leaving], wt[leaving], sc[leaving], camera, tables, tallies,
                    book_scatter)
            keep = ~leaving
            pos, dirs, remaining, ph, dr, en, wt, sc, step, mu_max = (
                a[keep] for a in (pos, dirs, remaining, ph, dr, en, wt, sc, step, mu_max))
            u = u[:, keep]
        if not ph.size:
            break
        pos = pos + step[:, None] * dirs
        remaining = remaining - step
        rho = densities_at(volume, pos @ A[:3, :3].T + A[:3, 3])  # (N, M)
        parts = partial_attenuation(rho, en, tables)  # (N, M, 3)
        cum = np.cumsum(parts.reshape(ph.size, -1), axis=1)
        mu_local = cum[:, -1]
        real = u[1] * mu_max < mu_local
        if real.any():
            r = np.nonzero(real)[0]
            if events is not None:
                events.append(np.concatenate([pos[r], dirs[r], en[r, None], wt[r, None]], axis=1))
            choice = np.argmax(cum[r] > (u[2, r] * mu_local[r])[:, None], axis=1)
            material, kind = choice // 3, choice % 3
            dead = np.zeros(ph.size, dtype=bool)
            photo = r[kind == 0]
            tallies.interactions["photoelectric"] += int(photo.size)
            tallies.energy["deposited"] += float(np.sum(wt[photo] * en[photo]))
            dead[photo] = True
            for code, name in ((1, "compton"), (2, "rayleigh")):
                idx = r[kind == code]
                if not idx.size:
                    continue
                tallies.interactions[name] += int(idx.size)
                sub_draw = dr[idx].copy()
                if code == 1:
                    cos_t, ratio = sample_compton(en[idx], material[kind == code], ph[idx], sub_draw, image, seed,
                                                  tables)
                    new_e = en[idx] * ratio
                    tallies.energy["deposited"] += float(np.sum(wt[idx] * (en[idx] - new_e)))
                    en[idx] = new_e
                else:
                    cos_t = sample_rayleigh(en[idx], material[kind == code], ph[idx], sub_draw, image, seed, tables)
                dr[idx] = sub_draw
                dirs[idx] = rotate(dirs[idx], cos_t, 2.0 * np.pi * u[3, idx])
                sc[idx] = True
                p_ijk = pos[idx] @ A[:3, :3].T + A[:3, 3]
                _, exit_t = box_interval(p_ijk, dirs[idx] @ A[:3, :3].T, shape)
                remaining[idx] = np.maximum(exit_t, 0.0)
                cold = idx[en[idx] < cold_kev]
                tallies.energy["deposited"] += float(np.sum(wt[cold] * en[cold]))
                dead[cold] = True
            if dead.any():
                keep = ~dead
                pos, dirs, remaining, ph, dr, en, wt, sc = (
                    a[keep] for a in (pos, dirs, remaining, ph, dr, en, wt, sc))


def simulate(volume: ScatterVolume, tables: TransportTables, camera: Any, photons: int, seed: int, *,
             image: int = 0, tally_shape: tuple[int, int] | None = None, solid_angle: bool = False,
             chunk: int = 1 << 17, events: list[np.ndarray] | None = None, cutoff_kev: float = 0.0
             ) -> ScatterTally:
    """Monte Carlo of ``photons`` histories for one camera on the CPU (see the module docstring).

    ``events``: a list that receives every real collision (forced detection,
    :func:`drrfarm.scatter.forced.simulate_forced`); the scatter tallies then stay empty. ``cutoff_kev``:
    photons below it are absorbed where they are, from their emission on (the fast estimate's cut).
    """
    t0 = time.perf_counter()
    shape = tally_shape or default_tally_shape(camera.height, camera.width)
    tallies = _Tallies(shape)
    majorant = tables.majorant_per_mm(volume)
    photons = int(photons)
    for first in range(0, photons, chunk):
        _chunk(volume, tables, majorant, camera, first, min(chunk, photons - first), seed, image, solid_angle,
               tallies, events, cutoff_kev)
    per_bin = photons / float(shape[0] * shape[1])
    return ScatterTally(
        **{k: v / per_bin for k, v in tallies.arrays.items()}, photons=photons, energy_kev=dict(tallies.energy),
        interactions=dict(tallies.interactions), seconds=time.perf_counter() - t0,
    )


def default_tally_shape(height: int, width: int, max_bins: int = 64) -> tuple[int, int]:
    """Tally grid for a detector: the detector binned by the smallest integer factor that keeps both
    sides at most ``max_bins`` (scatter is low-frequency; coarse bins keep the noise down)."""
    f = max(1, int(np.ceil(max(height, width) / max_bins)))
    return max(1, int(np.ceil(height / f))), max(1, int(np.ceil(width / f)))
