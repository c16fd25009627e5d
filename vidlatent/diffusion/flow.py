"""Flow matching (rectified flow), as pure functions.

Convention everywhere: ``x_sigma = (1 - sigma) * x0 + sigma * noise`` for sigma in [0, 1] (1 is pure noise),
and the network predicts the velocity ``d x_sigma / d sigma = noise - x0``.

Letters: b batch; ``sigma`` is always one noise level per sample, shape (b,).
"""

from __future__ import annotations

import math

import torch

TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(b,) -> (b, 1, 1, ...) to broadcast against ``like``."""
    sigma = torch.as_tensor(sigma, device=like.device)
    if sigma.ndim != 1 or sigma.shape[0] != like.shape[0]:
        raise ValueError(f"sigma must have shape ({like.shape[0]},); got {tuple(sigma.shape)}")
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noisy sample ``(1 - sigma) * x0 + sigma * noise``, sigma (b,) broadcast over the other dims."""
    s = _per_sample(sigma, x0).to(x0.dtype)
    return torch.lerp(x0, noise, s)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training target ``noise - x0`` (constant along each straight path)."""
    return noise - x0


def sample_sigmas(
    batch: int,
    method: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training noise levels (b,) in (0, 1).

    ``"uniform"``: U(0, 1). ``"logit_normal"``: ``sigmoid(N(mean, std^2))`` (SD3's choice, which puts more
    samples at mid noise levels; mean > 0 leans towards noise). Draws on ``generator``'s device, then moves.
    """
    gen_device = generator.device if generator is not None else "cpu"
    if method == "uniform":
        sigma = torch.rand(batch, generator=generator, device=gen_device)
    elif method == "logit_normal":
        sigma = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=gen_device))
    else:
        raise ValueError(f"unknown timestep sampling {method!r}; accepted: {', '.join(TIMESTEP_SAMPLING)}")
    return sigma.to(device) if device is not None else sigma


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * s / (1 + (shift - 1) * s)``: shift > 1 spends more of a schedule at high noise.

    Keeps 0 and 1 fixed and is monotone. It is the same as the time shift used with ``mu``:
    ``shift = exp(mu)`` (flux, SD3, diffusers' ``use_dynamic_shifting``).
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive; got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def shift_for_tokens(
    num_tokens: int,
    base_tokens: int = 256,
    max_tokens: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent shift: ``exp(mu)`` with ``mu`` linear in the transformer's token count.

    ``mu`` runs through ``(base_tokens, base_shift)`` and ``(max_tokens, max_shift)`` and continues linearly
    outside them, as in flux and SD3 (whose defaults these are). Larger latents keep more signal at a given
    sigma, so they need more time at high noise. Tokens are counted after patching:
    ``t * (h / 2) * (w / 2)`` for Wan's (1, 2, 2) patches. Wan 2.1 itself samples with a fixed shift (5 by
    default; 81 frames at 480p are 32,760 tokens); anchors through ``(32760, log(5))`` reproduce it there.
    """
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    mu = base_shift + slope * (num_tokens - base_tokens)
    return math.exp(mu)


def flow_loss(
    pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error, averaged per sample then over the batch; ``weighting`` (b,) scales each sample.

    Computed in fp32 whatever the prediction's dtype.
    """
    per_sample = (pred.float() - target.float()).square().flatten(1).mean(dim=1)
    if weighting is not None:
        if weighting.shape != per_sample.shape:
            raise ValueError(
                f"weighting must have shape {tuple(per_sample.shape)}; got {tuple(weighting.shape)}"
            )
        per_sample = per_sample * weighting.float()
    return per_sample.mean()
