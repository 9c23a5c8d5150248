"""Philox4x32-10 (Salmon et al., SC'11) vectorised in NumPy: the Monte Carlo's counter-based RNG.

The CUDA kernels compute the same function (``gpu/kernels/shared.cuh``, used by ``scatter/scatter.cu``),
so a photon's random numbers depend only on ``(seed, photon index, draw counter)`` and the CPU
reference and the GPU replay the same photon histories. Uniforms are ``(word + 0.5) * 2**-32``: in
the open interval (0, 1).
"""

from __future__ import annotations

import numpy as np

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_LO = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
INV_2_32 = 2.3283064365386963e-10

#: Third counter word of the scatter Monte Carlo's streams (the renderer's noise uses other values).
SCATTER_PURPOSE = 0x5CA77E12


def philox4x32_10(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray,
                  key0: int, key1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Four uint32 output words per counter; counters are uint32 arrays of one shape, the key is scalar."""
    x0, x1, x2, x3 = (np.asarray(c, dtype=np.uint64) for c in (c0, c1, c2, c3))
    k0, k1 = int(key0) & 0xFFFFFFFF, int(key1) & 0xFFFFFFFF
    for _ in range(10):
        p0 = _M0 * x0
        p1 = _M1 * x2
        x0, x1, x2, x3 = ((p1 >> _SHIFT) ^ x1 ^ np.uint64(k0), p1 & _LO,
                          (p0 >> _SHIFT) ^ x3 ^ np.uint64(k1), p0 & _LO)
        k0 = (k0 + _W0) & 0xFFFFFFFF
        k1 = (k1 + _W1) & 0xFFFFFFFF
    return x0, x1, x2, x3


def uniforms(photon: np.ndarray, draw: np.ndarray, image: int, seed: int) -> np.ndarray:
    """(4, N) float64 uniforms in (0, 1) for photons ``photon`` at their draw counters ``draw``.

    Counter = (photon, draw, SCATTER_PURPOSE, image); key = the 64-bit ``seed``.
    """
    photon = np.asarray(photon, dtype=np.uint64)
    draw = np.asarray(draw, dtype=np.uint64)
    purpose = np.full(photon.shape, SCATTER_PURPOSE, dtype=np.uint64)
    img = np.full(photon.shape, int(image) & 0xFFFFFFFF, dtype=np.uint64)
    words = philox4x32_10(photon, draw, purpose, img, int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF)
    return (np.stack(words).astype(np.float64) + 0.5) * INV_2_32
