"""Host side of ``scatter.cu`` (beside this module; pycuda): the scatter Monte Carlo on a GPU.

The tables come from :func:`drrfarm.scatter.tables.transport_tables` (CPU side), the volume from a
:class:`~drrfarm.scatter.reference.ScatterVolume`; results are the same :class:`ScatterTally` the CPU
reference returns. Uses the device's primary context (shared with the render backend and PyTorch).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pycuda.driver as drv

from drrfarm.errors import BackendError
from drrfarm.gpu.device import GpuDevice, blocking_event
from drrfarm.gpu.layouts import SCATTER_CAM_STRIDE, SCATTER_PARAMS_DTYPE
from drrfarm.scatter.forced import EVENT_FIELDS, angular_norms
from drrfarm.scatter.reference import ScatterTally, ScatterVolume, default_tally_shape
from drrfarm.scatter.tables import TransportTables

BLOCK = 256
MAX_PHOTONS_PER_IMAGE = (1 << 32) - 1  # the photon index is one 32-bit Philox counter word
EVENTS_PER_HISTORY = 8  # forced detection's first guess of collisions per history (a miss runs again with room)
MAX_FORCED_BINS = 1024  # scatter_forced runs one thread per tally bin
MAX_FORCED_MATERIALS = 8
FORCED_BLOCKS_PER_SM = 8


def pack_cameras(cameras: Sequence[Any]) -> np.ndarray:
    """(B, 32) float64 per camera: R (9), t (3), K rows 0-1 (6), sdd_mm, R^T K^-1 (9), source (3), 0."""
    out = np.zeros((len(cameras), SCATTER_CAM_STRIDE))
    for b, c in enumerate(cameras):
        out[b, 0:9] = np.asarray(c.R).reshape(-1)
        out[b, 9:12] = c.t
        out[b, 12:18] = np.asarray(c.K)[:2].reshape(-1)
        out[b, 18] = c.sdd_mm
        out[b, 19:28] = (np.asarray(c.R).T @ np.linalg.inv(np.asarray(c.K))).reshape(-1)
        out[b, 28:31] = c.source_world_mm
    return out


@dataclass
class GpuScatterVolume:
    """A volume resident for the Monte Carlo: densities (I, J, K, M) float32 on the device."""

    key: str
    volume: ScatterVolume
    buffer: Any
    nbytes: int


class CudaScatter:
    """Loads ``scatter.cu`` on one GPU, keeps volumes resident (LRU by bytes) and runs the Monte Carlo."""

    def __init__(self, device: int = 0, memory_budget_bytes: int | None = None) -> None:
        self.gpu = GpuDevice.get(device)
        self.module, self.build = self.gpu.module("scatter.cu")
        with self.gpu.context():
            self._kernel = self.module.get_function("scatter_mc")
            self._forced = self.module.get_function("scatter_forced")
            self.sm_count = int(self.gpu.device.get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT))
        self.memory_budget_bytes = memory_budget_bytes
        self._volumes: OrderedDict[str, GpuScatterVolume] = OrderedDict()
        self._lock = threading.Lock()
        self.last_kernel_seconds: dict[str, float] = {}  # the last launch's kernels: transport, forced

    def resident(self, key: str, volume: ScatterVolume) -> GpuScatterVolume:
        """Upload ``volume`` under ``key`` once (interleaved per voxel: one cache line per lookup)."""
        with self._lock:
            hit = self._volumes.get(key)
            if hit is not None:
                self._volumes.move_to_end(key)
                return hit
            dens = np.ascontiguousarray(np.moveaxis(np.asarray(volume.densities_g_cm3, dtype=np.float32), 0, -1))
            with self.gpu.context():
                buf = drv.mem_alloc(max(dens.nbytes, 16))
                drv.memcpy_htod(buf, dens)
            res = GpuScatterVolume(key, volume, buf, dens.nbytes)
            self._volumes[key] = res
            budget = self.memory_budget_bytes
            while (budget is not None and len(self._volumes) > 1
                   and sum(v.nbytes for v in self._volumes.values()) > budget):
                _, old = self._volumes.popitem(last=False)
                with self.gpu.context():
                    old.buffer.free()
            return res

    def simulate(self, resident: GpuScatterVolume, tables: TransportTables, cameras: Sequence[Any], photons: int,
                 seeds: Sequence[int], *, image_words: Sequence[int] | None = None,
                 tally_shape: tuple[int, int] | None = None, solid_angle: bool = False,
                 forced_step_mm: float | None = None, cutoff_kev: float = 0.0) -> list[ScatterTally]:
        """``photons`` histories per camera; one launch for the batch (cameras of one detector size).

        ``forced_step_mm``: score the scatter by forced detection (``scatter_forced``, the twin of
        :func:`drrfarm.scatter.forced.simulate_forced`) instead of the analog tally; ``cutoff_kev``: photons
        below it are absorbed where they are.
        """
        B = len(cameras)
        if B == 0:
            return []
        if len(seeds) != B:
            raise BackendError(f"seeds: need one seed per camera ({B}), got {len(seeds)}")
        photons = int(photons)
        if not 0 < photons <= MAX_PHOTONS_PER_IMAGE:
            raise BackendError(f"scatter photons: must be in [1, {MAX_PHOTONS_PER_IMAGE}], got {photons}")
        H, W = int(cameras[0].height), int(cameras[0].width)
        if any(int(c.height) != H or int(c.width) != W for c in cameras):
            raise BackendError("cameras: one scatter launch simulates images of one detector size")
        Ht, Wt = tally_shape or default_tally_shape(H, W)
        vol = resident.volume
        forced = bool(forced_step_mm)
        if forced and Ht * Wt > MAX_FORCED_BINS:
            raise BackendError(f"forced detection: at most {MAX_FORCED_BINS} tally bins, got {Ht}x{Wt}")
        if forced and len(vol.material_names) > MAX_FORCED_MATERIALS:
            raise BackendError(f"forced detection: at most {MAX_FORCED_MATERIALS} materials, "
                               f"got {len(vol.material_names)}")
        majorant = tables.majorant_per_mm(vol)
        words = list(image_words) if image_words is not None else [0] * B
        keys = np.zeros((B, 4), dtype=np.uint32)
        for b, (s, w) in enumerate(zip(seeds, words, strict=True)):
            keys[b] = (int(s) & 0xFFFFFFFF, (int(s) >> 32) & 0xFFFFFFFF, int(w) & 0xFFFFFFFF, 0)
        host = {
            "mu": tables.mu_cm2_g, "majorant": majorant, "compton_s": tables.compton_s,
            "rayleigh_cdf": tables.rayleigh_cdf, "eta": tables.detector_eta, "spec_kev": tables.spectrum_kev,
            "spec_cdf": tables.spectrum_cdf, "cams": pack_cameras(cameras),
        }
        if forced:
            host["forced_norms"] = angular_norms(tables)
        I, J, K = vol.shape
        with self.gpu.context():
            dev = {k: drv.to_device(np.ascontiguousarray(v, dtype=np.float64)) for k, v in host.items()}
            dev["keys"] = drv.to_device(keys)
            tally = drv.mem_alloc(4 * B * 4 * Ht * Wt)
            drv.memset_d32(tally, 0, B * 4 * Ht * Wt)
            energy = drv.to_device(np.zeros((B, 4)))
            inter = drv.to_device(np.zeros((B, 3), dtype=np.uint64))
            p = np.zeros((), dtype=SCATTER_PARAMS_DTYPE)
            p["dens"] = int(resident.buffer)
            for k, v in dev.items():
                p[k] = int(v)
            p["tally"], p["energy"], p["interactions"] = int(tally), int(energy), int(inter)
            p["ijk_from_world"] = vol.ijk_from_world[:3].reshape(-1)
            p["e0"], p["de"], p["x_step"] = tables.e0_kev, tables.de_kev, tables.x_step
            p["signal_norm"], p["count_norm"] = tables.signal_norm, tables.count_norm
            p["photons"] = photons
            p["I"], p["J"], p["K"], p["M"] = I, J, K, len(vol.material_names)
            p["NE"], p["NX"], p["NB"] = tables.n_energies, tables.n_x, tables.spectrum_kev.size
            p["H"], p["W"], p["Ht"], p["Wt"] = H, W, Ht, Wt
            p["solid_angle"], p["signal_per_photon"], p["n_img"] = int(solid_angle), int(tables.signal_per_photon), B
            p["cutoff_kev"] = float(cutoff_kev)
            blocks = max(1, min((photons + BLOCK - 1) // BLOCK, self.sm_count * 16))
            capacity = min(EVENTS_PER_HISTORY * photons + 1024, (1 << 31) - 1) if forced else 0
            events = counts = None
            recorded = np.zeros(B, dtype=np.uint64)  # collisions per image (forced detection)
            start, middle, end = drv.Event(), drv.Event(), blocking_event()
            while True:
                if forced:
                    events = drv.mem_alloc(8 * EVENT_FIELDS * B * capacity)
                    counts = drv.to_device(np.zeros(B, dtype=np.uint64))
                    p["forced"], p["event_capacity"], p["forced_step_mm"] = 1, capacity, float(forced_step_mm)
                    p["events"], p["event_counts"] = int(events), int(counts)
                start.record()
                self._kernel(p[()], block=(BLOCK, 1, 1), grid=(blocks, B, 1))
                middle.record()
                if forced:  # scores the recorded collisions (no more than the room) straight after
                    self._forced(p[()], block=(Ht * Wt, 1, 1), grid=(self.sm_count * FORCED_BLOCKS_PER_SM, B, 1))
                end.record()
                end.synchronize()
                if not forced:
                    break
                recorded = drv.from_device(counts, (B,), np.uint64)
                if int(recorded.max()) <= capacity:
                    break
                # more collisions than room: the same histories again (same seeds), with room for all
                capacity = int(recorded.max()) + 1024
                events.free()
                counts.free()
                drv.memset_d32(tally, 0, B * 4 * Ht * Wt)
                drv.memcpy_htod(energy, np.zeros((B, 4)))
                drv.memcpy_htod(inter, np.zeros((B, 3), dtype=np.uint64))
            seconds = end.time_since(start) / 1e3
            self.last_kernel_seconds = {"transport": middle.time_since(start) / 1e3,
                                        "forced": end.time_since(middle) / 1e3 if forced else 0.0}
            t = drv.from_device(tally, (B, 4, Ht, Wt), np.float32).astype(np.float64)
            e = drv.from_device(energy, (B, 4), np.float64)
            n = drv.from_device(inter, (B, 3), np.uint64)
            tally.free()
            if forced:
                events.free()
                counts.free()
        per_bin = photons / float(Ht * Wt)
        return [
            ScatterTally(
                scatter_signal=t[b, 0] / per_bin, scatter_counts=t[b, 1] / per_bin,
                primary_signal=t[b, 2] / per_bin, primary_counts=t[b, 3] / per_bin, photons=photons,
                energy_kev=dict(zip(("emitted", "deposited", "escaped", "detected"), map(float, e[b]), strict=True)),
                interactions={**dict(zip(("photoelectric", "compton", "rayleigh"), map(int, n[b]), strict=True)),
                              **({"forced_events": int(recorded[b])} if forced else {})},
                seconds=seconds / B,
            )
            for b in range(B)
        ]

    def cache_stats(self) -> dict[str, int]:
        return {"volumes": len(self._volumes), "bytes_resident": sum(v.nbytes for v in self._volumes.values())}
