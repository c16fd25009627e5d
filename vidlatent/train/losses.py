"""Losses of the VAE objective: reconstruction (L1 + SSIM), KL, and an optional patch discriminator.

Letters: b batch, c channels, t frames, h height, w width. Videos are (b, 3, t, h, w) in [-1, 1].
No pretrained perceptual network is needed; ``perceptual`` takes any callable loaded from a local file.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import metrics

__all__ = ["ssim", "edge_weights", "PatchDiscriminator", "hinge_d_loss", "vae_loss"]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """The loss's SSIM: ``metrics.ssim`` of two videos (b, c, t, h, w) in [-1, 1] mapped to [0, 1], with a
    ``window`` that shrinks to fit small frames, all frames at once (differentiable). 1 means identical."""
    x, y = a.add(1).mul(0.5), b.add(1).mul(0.5)
    return metrics.ssim(x, y, window=window, sigma=sigma, fit_window=True, frames_per_step=None)


_CBCR = torch.tensor([[-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])  # RGB -> BT.601 Cb, Cr


def edge_weights(video: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-pixel loss weights ``1 + strength * edge`` (b, 1, t, h, w), ``edge`` being the largest absolute
    difference to a horizontal or vertical neighbour over the channels: small objects and outlines, a few
    percent of the pixels, then weigh as much as flat areas, so they are learnt early."""
    gx = (video[..., :, 1:] - video[..., :, :-1]).abs().amax(1, keepdim=True)
    gy = (video[..., 1:, :] - video[..., :-1, :]).abs().amax(1, keepdim=True)
    edge = torch.zeros_like(video[:, :1])
    edge[..., :, 1:] = gx
    edge[..., :, :-1] = torch.maximum(edge[..., :, :-1], gx)
    edge[..., 1:, :] = torch.maximum(edge[..., 1:, :], gy)
    edge[..., :-1, :] = torch.maximum(edge[..., :-1, :], gy)
    return 1.0 + strength * edge


class PatchDiscriminator(nn.Module):
    """A small 3D patch discriminator: strided (1,4,4) convolutions, one logit per space-time patch.

    Frames are judged in groups by (3,4,4) kernels so motion matters too; it is causal-agnostic (it only ever
    sees decoded clips during training).
    """

    def __init__(self, channels: int = 32, layers: int = 3, in_channels: int = 3):
        super().__init__()
        mods: list[nn.Module] = []
        cin = in_channels
        for i in range(layers):
            cout = channels * 2**i
            mods += [nn.Conv3d(cin, cout, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1))]
            if i > 0:
                mods.append(nn.GroupNorm(min(32, cout // 4), cout))
            mods.append(nn.LeakyReLU(0.2, inplace=True))
            cin = cout
        mods.append(nn.Conv3d(cin, 1, (3, 3, 3), padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: real logits pushed above 1, fake ones below -1."""
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def vae_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    l1_weight: float = 1.0,
    mse_weight: float = 0.0,
    ssim_weight: float = 0.2,
    kl_weight: float = 1e-6,
    perceptual=None,
    perceptual_weight: float = 0.0,
    edge_weight: float = 0.0,
    chroma_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The VAE's training loss without the adversarial term, and its parts (floats) for logging.

    ``recon``/``target``: (b, 3, t, h, w) in [-1, 1]; ``mean``/``logvar``: the posterior moments. KL is the
    per-element mean of KL(q || N(0, 1)). ``perceptual(recon, target) -> scalar`` is optional.
    ``edge_weight`` > 0 weighs the L1 and MSE terms per pixel by ``edge_weights(target, edge_weight)``.
    ``chroma_weight`` adds the MSE of the two BT.601 colour-difference channels (Cb, Cr): colour is a small
    share of the variance of mostly grey footage and is otherwise learnt late.
    """
    parts: dict[str, torch.Tensor] = {}
    total = recon.new_zeros(())
    weight = edge_weights(target, edge_weight) if edge_weight else None

    def pixel_mean(x: torch.Tensor) -> torch.Tensor:  # edge-weighted where asked
        return (x * weight).mean() if weight is not None else x.mean()

    err = recon - target
    if l1_weight:
        parts["l1"] = pixel_mean(err.abs())
        total = total + l1_weight * parts["l1"]
    if mse_weight:
        parts["mse"] = pixel_mean(err.square())
        total = total + mse_weight * parts["mse"]
    if chroma_weight:
        diff = torch.einsum("kc,bc...->bk...", _CBCR.to(err), err)
        parts["chroma"] = pixel_mean(diff.square())
        total = total + chroma_weight * parts["chroma"]
    if ssim_weight:
        parts["ssim"] = 1.0 - ssim(recon, target)
        total = total + ssim_weight * parts["ssim"]
    parts["kl"] = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    if kl_weight:
        total = total + kl_weight * parts["kl"]
    if perceptual is not None and perceptual_weight:
        parts["perceptual"] = perceptual(recon, target)
        total = total + perceptual_weight * parts["perceptual"]
    with torch.no_grad():
        parts["psnr"] = 10 * torch.log10(4.0 / F.mse_loss(recon.clamp(-1, 1), target).clamp_min(1e-10))
    return total, {k: float(v.detach()) for k, v in parts.items()}
