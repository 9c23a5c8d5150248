"""On-the-fly X-ray augmentations on batches of images: torch tensors (B, H, W), vectorised, seeded.

* :func:`window_level` / :func:`random_window_level`: display windowing to [0, 1].
* :func:`poisson_renoise`: quantum noise for a *lower* photon count, from stored line integrals.
* :func:`detector_blur`: Gaussian detector blur (separable convolution, per-image sigma).
* :class:`XrayAugment`: the three composed with per-image random parameters from one seeded generator.

Every random function takes ``generator`` (a ``torch.Generator`` on the tensor's device); the same
seed gives the same result. Per-image parameters are scalars or (B,) tensors/arrays. Integer inputs
(e.g. uint16 batches) are converted to float32 first -- pass float values (``read_drrs(...,
float_line_integral=True)``) for anything quantitative.

Poisson re-noising -- what it needs. A stored line integral ``L = log(I0 / I)`` gives the transmission
``tau = exp(-L)``; a detector with ``N`` photons per pixel in the open field (unattenuated beam, the
spec's ``detector.photons``) counts ``n ~ Poisson(N tau)`` and reports ``L' = -log(max(n, 0.5) / N)``
(the same floor as :mod:`drrfarm.physics`). ``N`` is the open-field photon count *you* choose for the
simulated dose; it is not in a noiseless image. If the stored image is already noisy (row column
``photons`` = ``N0``, not NaN), its counts are ``n0 = round(N0 tau)`` and the new counts are drawn by
binomial thinning ``n ~ Binomial(n0, N / N0)`` -- exactly Poisson(N tau) overall -- so ``N`` must not
exceed ``N0`` (noise cannot be removed). The count model is exact for the ``photon_counting``
detector; for energy-integrating detectors (``ideal``, ``csi``) it treats the signal as ``N``
equivalent quanta (the usual quantum-noise approximation; it ignores the Swank factor/energy weighting)
and it ignores the solid-angle fall-off unless that is part of the stored line integral.

Blur belongs on intensities: with ``line_integral=True`` :func:`detector_blur` blurs ``exp(-L)`` and
returns ``-log`` of it. Apply blur before re-noising (the detector blurs the signal, then counts), and
windowing last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: floor of the counts before the log (as drrfarm.physics: tau_min = 0.5 / N)
MIN_COUNTS = 0.5


def _float(x: torch.Tensor) -> torch.Tensor:
    import torch

    if x.ndim != 3:
        raise ValueError(f"expected a batch of images (B, H, W), got shape {tuple(x.shape)}")
    return x if x.is_floating_point() else x.to(torch.float32)


def _per_image(v: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    """A scalar or (B,) parameter as a (B, 1, 1) tensor of x's dtype/device."""
    import torch

    t = torch.as_tensor(v, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name}: expected a scalar or ({x.shape[0]},) values, got shape {tuple(t.shape)}")
    return t.reshape(-1, 1, 1)


def _uniform(lo: float, hi: float, n: int, generator: Any, device: Any) -> torch.Tensor:
    import torch

    if hi < lo:
        raise ValueError(f"range ({lo}, {hi}): high < low")
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return lo + (hi - lo) * u


def _log_uniform(lo: float, hi: float, n: int, generator: Any, device: Any) -> torch.Tensor:
    if not (lo > 0 and hi > 0):
        raise ValueError(f"range ({lo}, {hi}): must be positive for a log-uniform draw")
    return _uniform(math.log(lo), math.log(hi), n, generator, device).exp()


# -------------------------------------------------------------------------------------------------- window


def window_level(x: torch.Tensor, level: Any, width: Any) -> torch.Tensor:
    """``clamp((x - (level - width / 2)) / width, 0, 1)``: (B, H, W) -> (B, H, W) float in [0, 1].

    level, width: scalars or (B,) (same units as ``x``; width > 0).
    """
    import torch

    x = _float(x)
    lvl = _per_image(level, x, "level")
    wid = _per_image(width, x, "width")
    if torch.any(wid <= 0):
        raise ValueError("width must be > 0")
    return ((x - (lvl - wid / 2)) / wid).clamp_(0.0, 1.0)


def random_window_level(
    x: torch.Tensor,
    level_range: Sequence[float],
    width_range: Sequence[float],
    *,
    generator: Any = None,
) -> torch.Tensor:
    """:func:`window_level` with per-image level and width drawn uniformly from the ranges."""
    b = x.shape[0]
    level = _uniform(*map(float, level_range), b, generator, x.device)
    width = _uniform(*map(float, width_range), b, generator, x.device)
    return window_level(x, level, width)


# -------------------------------------------------------------------------------------------------- noise


def poisson_renoise(
    line_integral: torch.Tensor,
    photons: Any,
    *,
    source_photons: Any = None,
    electronic_noise: float = 0.0,
    generator: Any = None,
) -> torch.Tensor:
    """Line integrals re-noised for ``photons`` open-field photons per pixel (see the module doc).

    line_integral: (B, H, W) float ``log(I0/I)``. photons: target open-field count ``N``, scalar or (B,).
    source_photons: the stored images' count ``N0`` (the ``photons`` column), scalar or (B,); None or
    NaN: noiseless source (fresh Poisson draw). Rows with a finite ``N0`` are thinned binomially and
    need ``N <= N0``. electronic_noise: std of additive Gaussian noise in photon-equivalents.
    Returns (B, H, W) float line integrals (same dtype as the input, at least float32).
    """
    import torch

    L = _float(line_integral)
    work = torch.float64 if L.dtype == torch.float64 else torch.float32
    Lw = L.to(work)
    N = _per_image(photons, Lw, "photons")
    if torch.any(~torch.isfinite(N)) or torch.any(N <= 0):
        raise ValueError("photons must be finite and > 0")
    tau = torch.exp(-Lw)
    expected = N * tau
    counts = torch.empty_like(expected)
    if source_photons is None:
        noisy = torch.zeros(L.shape[0], dtype=torch.bool, device=L.device)
        N0 = torch.full_like(N, float("nan"))
    else:
        N0 = _per_image(source_photons, Lw, "source_photons")
        noisy = torch.isfinite(N0).reshape(-1)
    if torch.any(noisy):
        n0v, nv = N0[noisy], N[noisy]
        if torch.any(nv > n0v * (1 + 1e-9)):
            raise ValueError("photons must not exceed source_photons (noise cannot be removed)")
        n0_counts = torch.round(n0v * tau[noisy]).clamp_(min=0)
        p = (nv / n0v).clamp(0.0, 1.0).expand_as(n0_counts)
        counts[noisy] = torch.binomial(n0_counts.float(), p.float().contiguous(), generator=generator).to(work)
    if torch.any(~noisy):
        counts[~noisy] = torch.poisson(expected[~noisy], generator=generator)
    if electronic_noise:
        counts = counts + float(electronic_noise) * torch.randn(
            counts.shape, generator=generator, device=counts.device, dtype=counts.dtype
        )
    out = -torch.log(counts.clamp(min=MIN_COUNTS) / N)
    return out.to(L.dtype)


# -------------------------------------------------------------------------------------------------- blur


def gaussian_kernels(sigma_px: Any, radius: int, *, dtype: Any = None, device: Any = None) -> torch.Tensor:
    """(B, 2 * radius + 1) normalised 1D Gaussian kernels; sigma 0 gives a delta."""
    import torch

    s = torch.as_tensor(sigma_px, dtype=dtype or torch.float32, device=device).reshape(-1, 1)
    pos = torch.arange(-radius, radius + 1, dtype=s.dtype, device=device).reshape(1, -1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    k = torch.exp(-0.5 * (pos / safe) ** 2)
    delta = (pos == 0).to(s.dtype).expand_as(k)
    k = torch.where(s > 0, k, delta)
    return k / k.sum(dim=1, keepdim=True)


def detector_blur(
    x: torch.Tensor,
    sigma_px: Any,
    *,
    truncate: float = 4.0,
    padding: str = "reflect",
    line_integral: bool = False,
) -> torch.Tensor:
    """Gaussian blur of each image with its own ``sigma_px`` (scalar or (B,), pixels; 0 = none).

    Separable: one grouped 1D convolution along rows, one along columns, kernels of radius
    ``ceil(truncate * max sigma)`` normalised to sum 1. padding: ``"reflect"`` (edges continue; a
    constant image stays constant), ``"replicate"``, ``"circular"`` or ``"zeros"`` (the total of an
    image is preserved exactly when its content lies farther than the radius from the border, or
    with circular padding). line_integral: blur ``exp(-x)`` and return ``-log`` (blur acts on
    intensities; see the module doc).
    """
    import torch
    import torch.nn.functional as F

    x = _float(x)
    b, h, w = x.shape
    sig = torch.as_tensor(sigma_px, dtype=torch.float64).reshape(-1)
    if sig.numel() == 1:
        sig = sig.expand(b)
    if sig.shape != (b,) or torch.any(sig < 0) or torch.any(~torch.isfinite(sig)):
        raise ValueError(f"sigma_px: expected finite values >= 0, a scalar or ({b},)")
    radius = int(math.ceil(truncate * float(sig.max()))) if b else 0
    if radius == 0:
        return x.clone()
    mode = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}.get(padding)
    if mode is None:
        raise ValueError(f"padding {padding!r}: choose reflect, replicate, circular or zeros")
    if mode in ("reflect", "circular") and radius >= min(h, w):
        raise ValueError(f"blur radius {radius} px too large for {h}x{w} images with {padding} padding")
    k = gaussian_kernels(sig, radius, dtype=x.dtype, device=x.device)  # (B, K)
    y = torch.exp(-x) if line_integral else x
    y = y.unsqueeze(0)  # (1, B, H, W): one convolution group per image
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode=mode), k.reshape(b, 1, 1, -1), groups=b)  # along W
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode=mode), k.reshape(b, 1, -1, 1), groups=b)  # along H
    y = y.squeeze(0)
    if line_integral:
        y = -torch.log(y.clamp(min=torch.finfo(y.dtype).tiny))
    return y


# -------------------------------------------------------------------------------------------------- composed


class XrayAugment:
    """Blur -> Poisson re-noise -> window/level on (B, H, W) float line-integral batches, per-image
    random parameters from one seeded ``torch.Generator`` (a seed per worker gives reproducible runs).

    blur_sigma_px: (low, high) uniform sigma in pixels, or None. photons: (low, high) open-field photon
    count drawn log-uniformly, or None (no re-noising). window: ((level low, high), (width low, high))
    or None (output stays line integrals). p: probability that each step is applied to an image.
    Call with ``images`` and optionally ``source_photons`` (the batch's ``photons`` column: NaN =
    noiseless); the drawn photon count is capped at the source's.
    """

    def __init__(
        self,
        *,
        blur_sigma_px: Sequence[float] | None = None,
        photons: Sequence[float] | None = None,
        window: tuple[Sequence[float], Sequence[float]] | None = None,
        p: float = 1.0,
        seed: int = 0,
        device: Any = "cpu",
    ) -> None:
        import torch

        self.blur_sigma_px = tuple(map(float, blur_sigma_px)) if blur_sigma_px is not None else None
        self.photons = tuple(map(float, photons)) if photons is not None else None
        self.window = (tuple(map(float, window[0])), tuple(map(float, window[1]))) if window is not None else None
        self.p = float(p)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(seed))

    def _apply_mask(self, b: int, device: Any) -> torch.Tensor:
        import torch

        return torch.rand(b, generator=self.generator, device=device) < self.p

    def __call__(self, images: torch.Tensor, source_photons: Any = None) -> torch.Tensor:
        import torch

        x = _float(images)
        b = x.shape[0]
        if self.blur_sigma_px is not None:
            sig = _uniform(*self.blur_sigma_px, b, self.generator, x.device)
            sig = torch.where(self._apply_mask(b, x.device), sig, torch.zeros_like(sig))
            x = detector_blur(x, sig, line_integral=True)
        if self.photons is not None:
            n = _log_uniform(*self.photons, b, self.generator, x.device)
            src = None
            if source_photons is not None:
                src = torch.as_tensor(source_photons, dtype=torch.float64, device=x.device).reshape(-1)
                n = torch.where(torch.isfinite(src), torch.minimum(n, src), n)
            keep = ~self._apply_mask(b, x.device)
            noisy = poisson_renoise(x, n, source_photons=src, generator=self.generator)
            x = torch.where(keep.reshape(-1, 1, 1), x, noisy)
        if self.window is not None:
            x = random_window_level(x, self.window[0], self.window[1], generator=self.generator)
        return x


__all__ = [
    "MIN_COUNTS",
    "XrayAugment",
    "detector_blur",
    "gaussian_kernels",
    "poisson_renoise",
    "random_window_level",
    "window_level",
]
