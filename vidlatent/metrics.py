"""Image and video quality: one PSNR, one SSIM. Both the reports (``vidlatent reconstruct``, evaluation scripts)
and the VAE's training loss use them.

Letters: b batch, c channels, t frames, h height, w width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = ["gaussian_window", "psnr", "ssim", "ssim_map"]

_LUMA = (0.299, 0.587, 0.114)  # BT.601


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all values: ``10 log10(data_range^2 / MSE)``; inf when equal.

    The squared error is averaged in float64, so long clips do not lose precision."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """A 1D gaussian window of ``size`` taps (float64), summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, c1: float, c2: float) -> torch.Tensor:
    """Per-window SSIM of single-channel images (n, 1, h, w) with the separable window ``g`` (1D, sums to
    1) and the stability constants ``c1``, ``c2`` ("valid" windows only); differentiable."""
    gh, gw = g.view(1, 1, -1, 1).to(x), g.view(1, 1, 1, -1).to(x)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, gh), gw)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    channels: str = "rgb",
    window: int = 11,
    sigma: float = 1.5,
    *,
    fit_window: bool = False,
    frames_per_step: int | None = 8,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of clips (b c t h w), (c t h w) or images (c h w) with values
    in [0, data_range], as a 0-dim tensor in the inputs' dtype; differentiable. 1 for equal inputs.

    The standard form: a ``window`` x ``window`` gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
    statistics over the windows that fit inside the frame ("valid", as the reference MATLAB code).
    ``channels="rgb"`` averages the per-channel SSIM (as torchmetrics / pytorch-msssim do); ``"luma"``
    uses BT.601 luma only. The result is the mean over every window of every channel, frame and clip.

    Frames smaller than the window raise ValueError, unless ``fit_window`` shrinks the window to fit.
    ``frames_per_step`` frames are measured at a time (bounds the working memory of long clips; None: all at
    once); it changes only the order of the summation, so the last bits.

    Reports pass float64 inputs (``reconstruct``); the VAE loss passes its float32 batch mapped to [0, 1]
    with ``window=7, fit_window=True, frames_per_step=None``.
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 3:
        a, b = a[:, None], b[:, None]
    if a.dim() == 4:
        a, b = a[None], b[None]
    if a.dim() != 5:
        raise ValueError(f"ssim takes (b, c, t, h, w), (c, t, h, w) or (c, h, w), got {tuple(a.shape)}")
    if channels not in ("rgb", "luma"):
        raise ValueError(f"channels must be 'rgb' or 'luma', got {channels!r}")
    if fit_window:
        window = min(window, *a.shape[-2:])
    elif min(a.shape[-2:]) < window:
        raise ValueError(
            f"ssim needs frames of at least {window}x{window} pixels, got {a.shape[-1]}x{a.shape[-2]}"
        )
    if channels == "luma":
        if a.shape[1] != 3:
            raise ValueError(f"luma needs 3 (RGB) channels, got {a.shape[1]}")
        w = torch.tensor(_LUMA, dtype=a.dtype, device=a.device).view(3, 1, 1, 1)
        a, b = (a * w).sum(1, keepdim=True), (b * w).sum(1, keepdim=True)
    g = gaussian_window(window, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    if frames_per_step is None:
        x, y = (rearrange(v, "b c t h w -> (b t c) 1 h w") for v in (a, b))
        return ssim_map(x, y, g, c1, c2).mean()
    total, count = 0.0, 0
    for i in range(0, a.shape[2], frames_per_step):
        x, y = (rearrange(v[:, :, i : i + frames_per_step], "b c t h w -> (b t c) 1 h w") for v in (a, b))
        smap = ssim_map(x, y, g, c1, c2)
        total = total + smap.sum()  # every frame has the same number of windows
        count += smap.numel()
    return total / count
