"""Interpolation for morph videos, and a measure of how smoothly a video changes from frame to frame.

Letters: n interpolation weights (output frames), b batch, c channels, t frames, h height, w width.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from einops import rearrange

EASINGS = ("linear", "cosine", "smoothstep")


def ease(t: torch.Tensor, easing: str = "linear") -> torch.Tensor:
    """Map weights in [0, 1] through an easing curve that keeps 0 and 1 fixed and is monotone.

    ``linear``: unchanged (equal steps). ``cosine``: ``(1 - cos(pi t)) / 2``. ``smoothstep``: ``3t^2 - 2t^3``.
    Both eased curves start and stop slowly (the morph lingers on A and B); their middle step is pi/2 and
    3/2 times the mean step.
    """
    if easing == "linear":
        return t
    if easing == "cosine":
        return (1 - torch.cos(math.pi * t)) / 2
    if easing == "smoothstep":
        return t * t * (3 - 2 * t)
    raise ValueError(f"unknown easing {easing!r}; accepted: {', '.join(EASINGS)}")


def morph_weights(frames: int, easing: str = "linear") -> torch.Tensor:
    """``frames`` interpolation weights from exactly 0 to exactly 1 (float64), through ``ease``."""
    if frames < 2:
        raise ValueError(f"a morph needs at least 2 frames; got {frames}")
    return ease(torch.linspace(0, 1, frames, dtype=torch.float64), easing)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Straight-line interpolation: ``(n, *a.shape)`` for weights ``t`` (n,)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device).reshape(-1, *([1] * a.ndim))
    return ((1 - t) * a.double() + t * b.double()).to(a.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of two tensors taken as single vectors: ``(n, *a.shape)`` for weights ``t`` (n,).

    The direction moves along the great circle from ``a/|a|`` to ``b/|b|`` at constant angular speed, and the
    norm moves linearly from ``|a|`` to ``|b|``. So a path between two Gaussian noises stays on the shell where
    Gaussian noise lives (a straight line dips inside it: its midpoint of two independent unit-variance noises
    has norm ~ |a| / sqrt(2), a point no sampler has seen), and between two latents it keeps their energy.
    ``t = 0`` and ``t = 1`` return ``a`` and ``b`` exactly; nearly parallel vectors fall back to a straight
    line between the directions. Computed in float64, returned in ``a``'s dtype.
    """
    t = _frame_weights(t, a)
    return _spherical(a, b, t, t, eps)


def _frame_weights(t, a: torch.Tensor) -> torch.Tensor:
    """Weights ``t`` (n,) as float64 (n, 1, ..., 1), ready to broadcast against ``(n, *a.shape)``."""
    return torch.as_tensor(t, dtype=torch.float64, device=a.device).reshape(-1, *([1] * a.ndim))


def _spherical(
    a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, m: torch.Tensor, eps: float
) -> torch.Tensor:
    """The slerp path of ``slerp`` and ``staggered_slerp``: each element at its own weight ``m`` (broadcastable
    to ``(n, *a.shape)``) along slerp's formula at the whole tensors' angle, each frame's direction made unit
    and scaled to ``lerp(|a|, |b|, t)``; ``t`` (n, 1, ..., 1) the frames' weights, whose 0 and 1 give ``a``
    and ``b`` exactly."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs tensors of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    va, vb = a.double(), b.double()
    na, nb = va.norm(), vb.norm()
    if na == 0 or nb == 0:
        return lerp(a, b, t.reshape(-1))
    ua, ub = va / na, vb / nb
    theta = torch.arccos((ua * ub).sum().clamp(-1, 1))
    if theta < eps:
        direction = torch.lerp(ua, ub, m)
    else:
        direction = (torch.sin((1 - m) * theta) * ua + torch.sin(m * theta) * ub) / torch.sin(theta)
    direction = direction / direction.reshape(len(t), -1).norm(dim=1).clamp_min(eps).reshape(t.shape)
    out = direction * torch.lerp(na, nb, t)
    return torch.where(t == 0, va, torch.where(t == 1, vb, out)).to(a.dtype)


def content_order(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """An order of the positions of two latents (c, t, h, w) by which of them holds content there: a map
    (t, h, w) with values spread evenly over [-1, 1], lowest where only ``b`` has something (an object on
    its background), highest where only ``a`` has, in between where both or neither.

    A latent's *presence* at a position is the distance of its channel vector there from the latent's
    per-channel median over all positions (its most typical value: the background, for a still of objects
    on a plain or textured ground). Positions are ranked by ``(presence_a - presence_b) / (presence_a +
    presence_b)`` and the ranks mapped linearly onto [-1, 1], so the map always spans the whole range
    however faint either image's content is. ``staggered_slerp`` orders a morph by it. A textured ground (a
    checkerboard, stripes) is as far from the median as an object is, so on one the order cannot tell the
    object from the ground (docs/pipelines.md: what that costs on the default model's morphs).
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"content_order needs two latents (c, t, h, w) of one shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )

    def presence(z: torch.Tensor) -> torch.Tensor:
        z = z.double()
        typical = z.flatten(1).median(dim=1).values.reshape(-1, 1, 1, 1)
        return (z - typical).norm(dim=0)  # (t, h, w)

    pa, pb = presence(a), presence(b)
    share = ((pa - pb) / (pa + pb + eps)).flatten()
    rank = share.argsort(stable=True).argsort().double()
    return (2 * rank / max(1, share.numel() - 1) - 1).reshape(pa.shape)


def staggered_slerp(
    a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, order: torch.Tensor, stagger: float, eps: float = 1e-6
) -> torch.Tensor:
    """``slerp`` in which each position moves from ``a`` to ``b`` at its own time: ``(n, *a.shape)``.

    ``order`` (broadcastable to ``a``, values in [-1, 1]) says when: a position of order ``o`` makes its
    whole way from ``a`` to ``b`` while ``t`` runs through a window of width ``1 - stagger`` centred on
    ``0.5 + o * stagger / 2`` (linearly within it), so order -1 moves first and order 1 last, and every
    window lies inside [0, 1]. With ``content_order(a, b)`` as the order, what only ``b`` holds comes in
    before what only ``a`` holds goes: a morph between two stills of one object each passes through frames
    that hold both, at full strength, where a plain slerp passes through one in which both are faded half
    way (two complementary colours in one place blend to grey). Per element the interpolation is slerp's
    formula at the whole tensors' angle with the element's own weight; each frame is then scaled to the norm
    slerp gives it (linear from ``|a|`` to ``|b|``). ``stagger`` in [0, 1): 0 is ``slerp`` itself;
    ``t = 0`` and ``t = 1`` return ``a`` and ``b`` exactly. Computed in float64, returned in ``a``'s dtype.
    """
    if not 0 <= stagger < 1:
        raise ValueError(f"stagger must be in [0, 1); got {stagger}")
    if stagger == 0:
        return slerp(a, b, t, eps)
    t = _frame_weights(t, a)
    centre = 0.5 + order.to(device=a.device, dtype=torch.float64).clamp(-1, 1) * stagger / 2
    m = ((t - centre) / (1 - stagger) + 0.5).clamp(0, 1)  # (n, *a.shape): each element's own weight
    return _spherical(a, b, t, m, eps)


def arc_length_weights(weights: torch.Tensor, path: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Weights at which a path reaches the fractions ``targets`` of its length (arc-length reparametrization).

    ``path`` (n, ...) holds the path's points at ``weights`` (n,), increasing from 0 to 1. The length is
    measured as the sum of Euclidean steps between consecutive points and inverted piecewise-linearly, so a
    path that moves unevenly in its parameter (a denoiser's response to interpolated prompts) gets points
    at even steps when sampled again at the returned weights (``targets = weights`` keeps the easing).
    """
    steps = (path[1:] - path[:-1]).flatten(1).double().norm(dim=1).cpu()
    length = torch.cat([steps.new_zeros(1), steps.cumsum(0)])
    if length[-1] <= 0:
        return targets
    length = length / length[-1]
    xp, fp = length.numpy(), torch.as_tensor(weights, dtype=torch.float64).cpu().numpy()
    out = np.interp(torch.as_tensor(targets, dtype=torch.float64).cpu().numpy(), xp, fp)
    return torch.from_numpy(out)


def smoothness(video: torch.Tensor) -> dict:
    """Frame-to-frame change of a video (b, c, t, h, w) or (c, t, h, w): is the motion even, or does it jump?

    ``steps`` is the mean absolute pixel change between consecutive frames (t - 1 values, averaged over the
    batch, channels and pixels). Returned as floats: ``mean``, ``median``, ``max`` of the steps, and
    ``jump = max / median``: about 1 for even change (pi/2 at most for a cosine ease), large when one cut or
    pop dominates. A still video has ``jump`` 1 by convention.
    """
    if video.ndim == 4:
        video = video[None]
    if video.ndim != 5 or video.shape[2] < 2:
        raise ValueError(f"smoothness needs a video (b, c, t, h, w) with t >= 2; got {tuple(video.shape)}")
    frames = rearrange(video.float(), "b c t h w -> t (b c h w)")
    steps = (frames[1:] - frames[:-1]).abs().mean(dim=1)
    median, top = steps.median().item(), steps.max().item()
    return {
        "steps": steps.tolist(),
        "mean": steps.mean().item(),
        "median": median,
        "max": top,
        "jump": top / median if median > 0 else (1.0 if top == 0 else math.inf),
    }
