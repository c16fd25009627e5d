"""The one sampling loop: diffusers' flow-matching schedulers, batched classifier-free guidance, per-step hooks.

Letters: b batch, c channels, t h w latent frames/height/width, m text tokens, d text width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from tqdm.auto import tqdm

from .flow import add_noise

Hook = Callable[[int, float, torch.Tensor], torch.Tensor]
_FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
SAMPLERS = {
    "euler": lambda shift: FlowMatchEulerDiscreteScheduler(shift=shift),
    "unipc": lambda shift: UniPCMultistepScheduler(flow_shift=shift, **_FLOW),
    "dpm": lambda shift: DPMSolverMultistepScheduler(flow_shift=shift, **_FLOW),
}


def make_scheduler(sampler: str, shift: float = 1.0):
    """A fresh diffusers scheduler for a sampler name (``euler``, ``unipc``, ``dpm``) and a sigma shift."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler](shift)


@torch.no_grad()
def denoise(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor | Sequence[int],
    context: torch.Tensor,
    context_mask: torch.Tensor | None = None,
    *,
    negative: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    guidance: float = 1.0,
    sampler: str = "unipc",
    steps: int = 30,
    shift: float = 1.0,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    hook: Hook | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Integrate ``model(x, sigma, context, context_mask) -> velocity`` from noise to data; returns fp32 latents.

    noise: starting noise (b, c, t, h, w), or its shape, drawn from ``generator`` (the same seed, the same
        result). context/context_mask: the text tokens. negative/negative_mask: the unconditional tokens; with
        ``guidance != 1`` both halves run as one batch, ``v = v_neg + guidance * (v_cond - v_neg)``.
    sampler: ``euler``, ``unipc`` or ``dpm`` (diffusers schedulers on flow sigmas); shift: their sigma shift.
    init, strength: SDEdit — start from ``init`` latents noised to the schedule's sigma after skipping the
        first ``(1 - strength)`` of the steps.
    hook(step, sigma, latents) -> latents: called before every model call and once more at the end with
        sigma 0 (step == number of steps run); pipelines use it to paste known regions or frames.
    """
    if not isinstance(noise, torch.Tensor):
        noise = torch.randn(
            tuple(noise), generator=generator, device=generator.device if generator else "cpu"
        )
    noise = noise.to(device=context.device, dtype=torch.float32)
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1]; got {strength}")
    if init is None and strength != 1:
        raise ValueError("strength < 1 (SDEdit) needs init latents to start from")
    scheduler = make_scheduler(sampler, shift)
    scheduler.set_timesteps(steps, device=noise.device)
    start = steps - max(1, round(steps * strength)) if init is not None else 0
    scheduler.set_begin_index(start)
    sigmas = scheduler.sigmas.float()
    x = noise if init is None else add_noise(init.float(), noise, sigmas[start].expand(noise.shape[0]))

    guided = negative is not None and guidance != 1.0
    if guided:
        context, context_mask = _stack_contexts(context, context_mask, negative, negative_mask)
    dtype = next(model.parameters()).dtype if isinstance(model, torch.nn.Module) else torch.float32
    step_kwargs = {"generator": generator} if sampler in ("euler", "dpm") else {}
    for i in tqdm(range(start, len(scheduler.timesteps)), disable=not progress, desc=f"{sampler} sampling"):
        x = hook(i, float(sigmas[i]), x) if hook is not None else x
        x_in = torch.cat([x, x]) if guided else x
        sigma = sigmas[i].expand(x_in.shape[0]).to(x.device)
        v = model(x_in.to(dtype), sigma, context, context_mask).float()
        if guided:
            v_cond, v_neg = v.chunk(2)
            v = torch.lerp(v_neg, v_cond, guidance)
        x = scheduler.step(v, scheduler.timesteps[i], x, **step_kwargs, return_dict=False)[0]
    return hook(len(scheduler.timesteps), 0.0, x) if hook is not None else x


def _stack_contexts(context, mask, negative, negative_mask):
    """One (2b, m, d) batch of [cond; uncond] tokens; the shorter side is zero-padded and masked out."""
    m = max(context.shape[1], negative.shape[1])
    if negative.shape[0] != context.shape[0]:
        negative = negative.expand(context.shape[0], -1, -1)
        negative_mask = None if negative_mask is None else negative_mask.expand(context.shape[0], -1)
    if mask is None and negative_mask is None and context.shape[1] == negative.shape[1]:
        return torch.cat([context, negative]), None
    parts, masks = [], []
    for tokens, keep in ((context, mask), (negative, negative_mask)):
        if keep is None:
            keep = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        pad = m - tokens.shape[1]
        parts.append(F.pad(tokens, (0, 0, 0, pad)))
        masks.append(F.pad(keep.bool(), (0, pad), value=False))
    return torch.cat(parts), torch.cat(masks)
