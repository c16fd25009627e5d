"""vidlatent.metrics: PSNR and SSIM against values computed by hand, and the one SSIM serving both the reports
and the VAE loss.

Shapes: b batch, c channels, t frames, h height, w width.
"""

from __future__ import annotations

import math

import pytest
import torch

from vidlatent.metrics import gaussian_window, psnr, ssim
from vidlatent.train.losses import ssim as loss_ssim


def test_psnr_known_values():
    x = torch.rand(3, 4, 8, 8)
    assert psnr(x, x) == math.inf
    # a constant offset d everywhere: MSE = d^2, so PSNR = 10 log10(range^2 / d^2) = 20 log10(range / d)
    assert psnr(torch.zeros(3, 8, 8), torch.full((3, 8, 8), 0.125)) == pytest.approx(
        20 * math.log10(8), rel=1e-12
    )
    assert psnr(torch.zeros(2, 5), torch.full((2, 5), 0.5), data_range=2.0) == pytest.approx(
        20 * math.log10(4), rel=1e-12
    )
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 9))


def test_gaussian_window_is_normalized_and_symmetric():
    g = gaussian_window(11, 1.5)
    assert g.dtype == torch.float64 and g.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert torch.equal(g, g.flip(0)) and g.argmax().item() == 5


def test_ssim_known_values():
    x = torch.rand(3, 2, 16, 16, dtype=torch.float64)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    # flat images: only the luminance term is left, (2 a b + c1) / (a^2 + b^2 + c1)
    a, b, c1 = 0.2, 0.6, 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(
        torch.full((3, 12, 12), a, dtype=torch.float64), torch.full((3, 12, 12), b, dtype=torch.float64)
    )
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # the same with data_range 2: c1 = (0.01 * 2)^2
    c1 = 0.02**2
    flat = [torch.full((3, 12, 12), v, dtype=torch.float64) for v in (2 * a, 2 * b)]
    got = ssim(*flat, data_range=2.0)
    assert got.item() == pytest.approx((8 * a * b + c1) / (4 * a * a + 4 * b * b + c1), rel=1e-12)


def test_ssim_layouts_and_chunks_agree():
    x, y = (
        torch.rand(2, 3, 10, 16, 16, dtype=torch.float64),
        torch.rand(2, 3, 10, 16, 16, dtype=torch.float64),
    )
    whole = ssim(x, y, frames_per_step=None)
    assert ssim(x, y, frames_per_step=3).item() == pytest.approx(whole.item(), rel=1e-12)
    per_clip = (ssim(x[0], y[0]) + ssim(x[1], y[1])) / 2  # (c t h w): clips of equal size weigh the same
    assert per_clip.item() == pytest.approx(whole.item(), rel=1e-12)
    assert ssim(x[0, :, 0], y[0, :, 0]).item() == pytest.approx(
        ssim(x[0, :, :1], y[0, :, :1]).item(), rel=1e-15
    )


def test_ssim_window_too_big_raises_unless_fitted():
    x = torch.rand(3, 1, 8, 8)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x, x)
    assert ssim(x, x, fit_window=True).item() == pytest.approx(1.0, abs=1e-5)


def test_ssim_is_differentiable_and_keeps_the_dtype():
    x = torch.rand(1, 3, 2, 16, 16, requires_grad=True)
    y = torch.rand(1, 3, 2, 16, 16)
    s = ssim(x, y)
    assert s.dtype == torch.float32 and s.dim() == 0
    (grad,) = torch.autograd.grad(s, x)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_loss_ssim_is_metrics_ssim_on_unit_range():
    a, b = torch.rand(2, 3, 5, 6, 6) * 2 - 1, torch.rand(2, 3, 5, 6, 6) * 2 - 1
    expected = ssim((a + 1) / 2, (b + 1) / 2, window=6, fit_window=True, frames_per_step=None)
    assert torch.equal(loss_ssim(a, b), expected)
    assert loss_ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
