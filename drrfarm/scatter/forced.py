"""Forced detection: the fast scatter estimate's scoring (the executable spec of ``scatter_forced`` in
``scatter/scatter.cu``).

In the analog Monte Carlo a scattered photon scores only if it happens to fly to the detector, so a chest
radiograph books well under one detected scatter photon per hundred histories. Forced detection (the
next-event or point-detector estimator) scores every real collision instead, with its expected
contribution to every tally bin: for a photon of energy E, direction d and weight g colliding at r,

    bin j += g · Σ_m Σ_k∈{Compton, Rayleigh} (ρ_m μ_m,k(E) / μ(r, E)) · p_m,k(θ_j, E) · ΔΩ_j · T_j(E'_k) · w(E'_k)

with θ_j the angle between d and the line to the bin's centre, ``p`` the angular density per steradian that
the transport samples (Klein–Nishina × S(x)/Z; F²(x) × (1 + cos²θ)/2; each normalised by its integral over
the sphere, :func:`angular_norms`), ``ΔΩ_j`` the bin's solid angle seen from r, ``T_j`` the transmission from
r to the bin at the scattered energy (Compton: E' = E / (1 + E/mc² (1 − cos θ_j)); Rayleigh: E) and ``w`` the
detector model's signal (or count) weight. The photon's history then goes on as in the analog transport
(its next collisions score too: every scatter order is counted), but its own arrival on the panel is not
booked as scatter. The estimate is unbiased for the scatter at the bin centres; its variance per history
is far lower, so a few thousand histories do what hundreds of thousands do in the analog tally.

Transmission: the line integrals of each material's density from r to the bin, sampled at the midpoints
of ``n = ⌈L / step⌉`` equal steps (nearest voxel, as the transport), then ``exp(−Σ_m μ_m(E') ∫ρ_m)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from drrfarm.scatter.reference import (
    ScatterTally,
    ScatterVolume,
    _interp_rows,
    box_interval,
    densities_at,
    partial_attenuation,
    simulate,
)
from drrfarm.scatter.tables import ELECTRON_REST_ENERGY_KEV, HC_KEV_ANGSTROM, TransportTables, interp_grid

#: Floats per recorded collision: position (3), direction (3), energy (keV), weight.
EVENT_FIELDS = 8
ANGULAR_NODES = 4001  # quadrature nodes over cos θ per energy (Simpson) for the angular normalisations
CHUNK_PAIRS = 1 << 16  # (collision, bin) pairs scored at once


def compton_shape(energy_kev: np.ndarray, cos_t: np.ndarray, s_over_z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Klein–Nishina × S(x)/Z shape ε²(ε + 1/ε − sin²θ) S, ε = E'/E) — the density the transport samples,
    unnormalised; ``s_over_z`` is S(x)/Z at the event's momentum transfer."""
    eps = 1.0 / (1.0 + energy_kev / ELECTRON_REST_ENERGY_KEV * (1.0 - cos_t))
    return eps * eps * (eps + 1.0 / eps - (1.0 - cos_t * cos_t)) * s_over_z, eps


def momentum_transfer(energy_kev: np.ndarray, cos_t: np.ndarray) -> np.ndarray:
    """x = sin(θ/2) / λ in 1/Å."""
    return energy_kev / HC_KEV_ANGSTROM * np.sqrt(np.maximum(0.5 * (1.0 - cos_t), 0.0))


def s_over_z_at(tables: TransportTables, material: int, x: np.ndarray) -> np.ndarray:
    """S(x)/Z of one material, linear between nodes (as the Compton sampler)."""
    return _interp_rows(tables.compton_s, material, x, tables.x_step)


def form_factor_sq_at(tables: TransportTables, material: int, x: np.ndarray) -> np.ndarray:
    """F²(x) of one material as the Rayleigh sampler sees it: the CDF's slope in x² (constant between nodes)."""
    j = np.clip(np.floor(x / tables.x_step).astype(np.int64), 0, tables.n_x - 2)
    s0 = (tables.x_step * j) ** 2
    s1 = (tables.x_step * (j + 1)) ** 2
    cdf = tables.rayleigh_cdf[material]
    return (cdf[j + 1] - cdf[j]) / (s1 - s0)


def angular_norms(tables: TransportTables) -> np.ndarray:
    """(2, M, NE): 2π ∫ shape d cos θ of the Compton and Rayleigh densities of every material at every grid
    energy (cached on the tables). Compton: Simpson's rule on ``ANGULAR_NODES`` nodes; Rayleigh: exact, since
    F² is constant between the nodes of x² and (1 + cos²θ)/2 a polynomial in x²."""
    cached = tables.__dict__.get("_forced_norms")
    if cached is not None:
        return cached
    c = np.linspace(-1.0, 1.0, ANGULAR_NODES)
    simpson = np.ones(ANGULAR_NODES)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    simpson *= (c[1] - c[0]) / 3.0 * 2.0 * np.pi
    E = tables.energy_grid_kev[:, None]
    M = tables.compton_s.shape[0]
    out = np.zeros((2, M, tables.n_energies))
    x = momentum_transfer(E, c[None, :])
    s_nodes = (tables.x_step * np.arange(tables.n_x)) ** 2
    s_max = (E / HC_KEV_ANGSTROM) ** 2  # (NE, 1): x² at θ = π
    # cos θ = 1 - 2 s / s_max; ∫ (1 + cos²θ)/2 d cos θ over [s_a, s_b] = [P(u_a) - P(u_b)] / 2, P(u) = u + u³/3
    u_a = 1.0 - 2.0 * np.minimum(s_nodes[None, :-1], s_max) / s_max
    u_b = 1.0 - 2.0 * np.minimum(s_nodes[None, 1:], s_max) / s_max
    pieces = 0.5 * ((u_a + u_a**3 / 3.0) - (u_b + u_b**3 / 3.0))  # (NE, NX - 1)
    for m in range(M):
        kn, _ = compton_shape(E, c[None, :], s_over_z_at(tables, m, x))
        out[0, m] = kn @ simpson
        f2 = np.diff(tables.rayleigh_cdf[m]) / np.diff(s_nodes)
        out[1, m] = 2.0 * np.pi * (pieces @ f2)
    tables.__dict__["_forced_norms"] = out  # a frozen dataclass: cached beside its fields
    return out


def bin_centres_world(camera: Any, tally_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """((Ht·Wt, 3) world positions of the tally bins' centres on the panel, (3,) the panel's normal
    (toward the detector, world), one bin's area in mm²)."""
    Ht, Wt = tally_shape
    H, W = int(camera.height), int(camera.width)
    K, R, t, sdd = np.asarray(camera.K), np.asarray(camera.R), np.asarray(camera.t), float(camera.sdd_mm)
    u = (np.arange(Wt) + 0.5) * (W / Wt) - 0.5
    v = (np.arange(Ht) + 0.5) * (H / Ht) - 0.5
    uu, vv = np.meshgrid(u, v)
    Y = (vv - K[1, 2]) * sdd / K[1, 1]
    X = ((uu - K[0, 2]) * sdd - K[0, 1] * Y) / K[0, 0]
    cam = np.stack([X.ravel(), Y.ravel(), np.full(X.size, sdd)], axis=1)
    area = sdd * sdd / (K[0, 0] * K[1, 1]) * (W / Wt) * (H / Ht)
    return (cam - t) @ R, R[2].copy(), float(area)


def path_integrals(volume: Any, start: np.ndarray, end: np.ndarray, step_mm: float) -> np.ndarray:
    """(N, M) ∫ρ_m dl (g/cm³ · mm) along segments ``start`` → ``end`` (world mm, (N, 3)) inside the volume:
    midpoints of ⌈L / step⌉ equal steps over the part inside the box, nearest voxel."""
    A = volume.ijk_from_world
    d = end - start
    length = np.linalg.norm(d, axis=1)
    dn = d / np.where(length > 0, length, 1.0)[:, None]
    p_ijk = start @ A[:3, :3].T + A[:3, 3]
    d_ijk = dn @ A[:3, :3].T
    t_in, t_out = box_interval(p_ijk, d_ijk, volume.shape)
    t0 = np.maximum(t_in, 0.0)
    t1 = np.minimum(t_out, length)
    span = np.where(t1 > t0, t1 - t0, 0.0)
    n = np.ceil(span / step_mm).astype(np.int64)
    h = np.where(n > 0, span / np.maximum(n, 1), 0.0)
    out = np.zeros((start.shape[0], volume.densities_g_cm3.shape[0]))
    for s in range(int(n.max()) if n.size else 0):
        act = np.nonzero(s < n)[0]
        tt = t0[act] + (s + 0.5) * h[act]
        out[act] += densities_at(volume, p_ijk[act] + tt[:, None] * d_ijk[act]) * h[act, None]
    return out


def score_events(volume: Any, tables: TransportTables, camera: Any, events: np.ndarray,
                 tally_shape: tuple[int, int], step_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(signal, counts) (Ht, Wt): the summed expected scatter of ``events`` ((N, EVENT_FIELDS) collisions)
    on the tally bins, unnormalised (the caller divides by the open-field photons per bin)."""
    Ht, Wt = tally_shape
    nb = Ht * Wt
    sig = np.zeros(nb)
    cnt = np.zeros(nb)
    if events.size == 0:
        return sig.reshape(tally_shape), cnt.reshape(tally_shape)
    norms = angular_norms(tables)
    bins, normal, area = bin_centres_world(camera, tally_shape)
    mu_total = tables.mu_cm2_g.sum(axis=1) / 10.0  # (M, NE) 1/mm per g/cm³
    A = volume.ijk_from_world
    M = volume.densities_g_cm3.shape[0]
    per = max(1, CHUNK_PAIRS // nb)
    for a in range(0, events.shape[0], per):
        ev = events[a : a + per]
        n = ev.shape[0]
        pos, d, e, g = ev[:, 0:3], ev[:, 3:6], ev[:, 6], ev[:, 7]
        parts = partial_attenuation(densities_at(volume, pos @ A[:3, :3].T + A[:3, 3]), e, tables)  # (n, M, 3)
        mu_local = parts.sum(axis=(1, 2))
        p_kind = parts[:, :, 1:] / np.where(mu_local > 0, mu_local, 1.0)[:, None, None]  # (n, M, 2)
        start = np.repeat(pos, nb, axis=0)
        end = np.tile(bins, (n, 1))
        v = end - start
        dist = np.linalg.norm(v, axis=1)
        vn = v / dist[:, None]
        d_omega = area * np.maximum(vn @ normal, 0.0) / (dist * dist)
        cos_t = np.clip(np.einsum("ij,ij->i", np.repeat(d, nb, axis=0), vn), -1.0, 1.0)
        ee = np.repeat(e, nb)
        x = momentum_transfer(ee, cos_t)
        lines = path_integrals(volume, start, end, step_mm)  # (n nb, M)
        _, eps = compton_shape(ee, cos_t, 1.0)
        e_c = ee * eps
        t_c = np.exp(-np.einsum("mi,im->i", interp_grid(mu_total, e_c, tables), lines))
        t_r = np.exp(-np.einsum("mi,im->i", interp_grid(mu_total, ee, tables), lines))
        pc = np.zeros(n * nb)
        pr = np.zeros(n * nb)
        for m in range(M):
            kn, _ = compton_shape(ee, cos_t, s_over_z_at(tables, m, x))
            pc += np.repeat(p_kind[:, m, 0], nb) * kn / interp_grid(norms[0, m], ee, tables)
            f2 = form_factor_sq_at(tables, m, x) * 0.5 * (1.0 + cos_t * cos_t)
            pr += np.repeat(p_kind[:, m, 1], nb) * f2 / interp_grid(norms[1, m], ee, tables)
        w = np.repeat(g, nb) * d_omega
        sc, sr = w * pc * t_c, w * pr * t_r
        sig += (sc * tables.signal_weight(e_c) + sr * tables.signal_weight(ee)).reshape(n, nb).sum(axis=0)
        cnt += (sc * tables.count_weight(e_c) + sr * tables.count_weight(ee)).reshape(n, nb).sum(axis=0)
    return sig.reshape(tally_shape), cnt.reshape(tally_shape)


def simulate_forced(volume: ScatterVolume, tables: TransportTables, camera: Any, photons: int, seed: int, *,
                    step_mm: float, image: int = 0, tally_shape: tuple[int, int] | None = None,
                    solid_angle: bool = False, cutoff_kev: float = 0.0) -> ScatterTally:
    """The CPU reference's histories with the scatter scored by forced detection (the primary tallies are
    the analog ones); same units as :func:`~drrfarm.scatter.reference.simulate`. ``cutoff_kev``: photons
    below it are absorbed where they are (emitted ones too, so the primary tallies then lack them)."""
    import time

    t0 = time.perf_counter()
    events: list[np.ndarray] = []
    tally = simulate(volume, tables, camera, photons, seed, image=image, tally_shape=tally_shape,
                     solid_angle=solid_angle, events=events, cutoff_kev=cutoff_kev)
    rows = np.concatenate(events) if events else np.zeros((0, EVENT_FIELDS))
    sig, cnt = score_events(volume, tables, camera, rows, tally.shape, step_mm)
    per_bin = int(photons) / float(sig.size)
    tally.scatter_signal = tally.scatter_signal + sig / per_bin
    tally.scatter_counts = tally.scatter_counts + cnt / per_bin
    tally.interactions["forced_events"] = int(rows.shape[0])
    tally.seconds = time.perf_counter() - t0
    return tally
