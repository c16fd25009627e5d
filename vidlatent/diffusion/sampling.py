"""The one sampling loop: diffusers' flow-matching schedulers, batched classifier-free guidance, per-step hooks.

Letters: b batch, c channels, t h w latent frames/height/width, m text tokens, d text width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import check_option, check_step
from .flow import add_noise

Hook = Callable[[int, float, torch.Tensor], torch.Tensor]
_FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
# sampler name -> (diffusers scheduler class, the name of its shift argument, the arguments it is made with);
# diffusers is imported on first use: it takes seconds, and importing vidlatent should not
SAMPLERS = {
    "euler": ("FlowMatchEulerDiscreteScheduler", "shift", {}),
    "unipc": ("UniPCMultistepScheduler", "flow_shift", _FLOW),
    "dpm": ("DPMSolverMultistepScheduler", "flow_shift", _FLOW),
}
# what the denoiser is given as its noise level: "continuous" sigma (the model computes 1000 * sigma), or the
# scheduler's own timesteps / 1000 ("scheduler": UniPC's are integers, 999, 937, ..., as Wan and diffusers give)
TIMESTEPS = ("continuous", "scheduler")
# the noise levels UniPC walks, before the shift: "scheduler", diffusers' own (linspace(1, 1/1000) in `steps` parts,
# as diffusers' WanPipeline samples), or "wan", those of Wan 2.1's own FlowUniPCMultistepScheduler
# (wan/utils/fm_solvers_unipc.py: linspace(float32(0.999), 0)), every level 1/1000 lower before the shift, so
# its whole-number timesteps differ by up to 4 at 50 steps (shift 5: ..., 241, 172, 92 against 244, 175, 96).
# With the same levels the two UniPC implementations step identically. Euler and DPM keep their own levels.
SIGMAS = ("scheduler", "wan")


@dataclass
class SecondExpert:
    """A low-noise expert for ``denoise`` (Wan 2.2 A14B): from the first step whose scheduler timestep is below
    ``boundary * num_train_timesteps`` on, ``model`` answers instead of the first one, at ``guidance`` (None:
    the loop's). As diffusers' ``WanPipeline`` (``boundary_ratio``) and Wan 2.2 compare: the first model runs
    while ``t >= boundary * 1000``. ``on_switch()``, when given, is called once, just before its first call
    (the pipeline moves the experts between devices there)."""

    model: Callable[..., torch.Tensor]
    boundary: float
    guidance: float | None = None
    on_switch: Callable[[], None] | None = None


def make_scheduler(sampler: str, shift: float = 1.0, config: Mapping[str, Any] | None = None):
    """A fresh diffusers scheduler for a sampler name (``euler``, ``unipc``, ``dpm``) and a sigma shift.

    ``config``: a diffusers scheduler config (a model folder's ``scheduler_config.json``); when it names this
    sampler's class, the scheduler is built from it (solver order, final sigmas, ...) with ``shift`` put in.
    """
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    name, shift_arg, kwargs = SAMPLERS[sampler]
    cls = getattr(diffusers, name)
    if config and config.get("_class_name") == name:
        return cls.from_config(dict(config), **{shift_arg: shift})
    return cls(**{shift_arg: shift}, **kwargs)


def wan_unipc_sigmas(steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The unshifted noise levels of Wan 2.1's UniPC sampler: from 1 - 1/num_train_timesteps (held in float32
    as Wan holds it) down to 0 in ``steps`` equal parts, 0 itself left out (the scheduler appends it)."""
    top = float(np.float32(1 - 1 / num_train_timesteps))
    return np.linspace(top, 0.0, steps + 1)[:-1]


def set_schedule(scheduler, sampler: str, steps: int, sigmas: str = "scheduler", device=None) -> None:
    """``scheduler.set_timesteps`` for ``steps`` steps on the noise levels ``sigmas`` names (``SIGMAS``)."""
    if sigmas not in SIGMAS:
        raise ValueError(f"unknown sigmas {sigmas!r}; accepted: {', '.join(SIGMAS)}")
    if sigmas == "wan" and sampler == "unipc":
        grid = wan_unipc_sigmas(steps, scheduler.config.num_train_timesteps)
        scheduler.set_timesteps(sigmas=grid, device=device)
    else:
        scheduler.set_timesteps(steps, device=device)


def first_step(steps: int, strength: float) -> int:
    """The step a run that re-runs ``strength`` of a ``steps``-step schedule starts at (at least the last step)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1]; got {strength}")
    return steps - max(1, round(steps * strength))


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
    timesteps: str = "continuous",
    scheduler_config: Mapping[str, Any] | None = None,
    sigmas: str = "scheduler",
    model_kwargs: Mapping[str, torch.Tensor] | None = None,
    second: SecondExpert | None = None,
    noised: bool = False,
    split_guidance: bool = False,
) -> torch.Tensor:
    """Integrate ``model(x, sigma, context, context_mask) -> velocity`` from noise to data; returns fp32 latents.

    noise: starting noise (b, c, t, h, w), or its shape, drawn from ``generator`` (the same seed, the same
        result). context/context_mask: the text tokens. negative/negative_mask: the unconditional tokens; with
        ``guidance != 1`` both halves run as one batch, ``v = v_neg + guidance * (v_cond - v_neg)``.
    sampler: ``euler``, ``unipc`` or ``dpm`` (diffusers schedulers on flow sigmas); shift: their sigma shift.
    init, strength: SDEdit — start from ``init`` latents noised to the schedule's sigma after skipping the
        first ``(1 - strength)`` of the steps. noised: ``noise`` already holds latents at that sigma (from
        ``invert(..., strength=strength)``); the run starts from them as they are, with no ``init``.
    hook(step, sigma, latents) -> latents: called before every model call and once more at the end with
        sigma 0 (step == number of steps run); pipelines use it to paste known regions or frames.
    timesteps: the noise level the model is given: ``"continuous"``, the schedule's sigma; ``"scheduler"``,
        the scheduler's own timestep / num_train_timesteps (in float64: UniPC's timesteps are whole numbers,
        which is what Wan models see in Wan's and diffusers' pipelines).
    scheduler_config: a diffusers scheduler config that builds the sampler's scheduler (``make_scheduler``).
    sigmas: the noise levels the sampler walks (``SIGMAS``): the scheduler's own, or Wan's own UniPC levels.
    model_kwargs: further per-sample tensors the model takes by keyword, the same at every step (an
        image-conditioned denoiser's ``image`` tokens and ``condition`` latents); both halves of guidance
        get them.
    second: a second denoiser for the low-noise steps (``SecondExpert``), with its own guidance.
    split_guidance: guidance's two halves one after the other instead of as one batch (``guided_velocity``).
    """
    if timesteps not in TIMESTEPS:
        raise ValueError(f"unknown timesteps {timesteps!r}; accepted: {', '.join(TIMESTEPS)}")
    if not isinstance(noise, torch.Tensor):
        noise = torch.randn(
            tuple(noise), generator=generator, device=generator.device if generator else "cpu"
        )
    noise = noise.to(device=context.device, dtype=torch.float32)
    check_option("guidance", guidance), check_option("shift", shift), check_option("steps", steps)
    start = first_step(steps, strength)
    if noised and init is not None:
        raise ValueError("noised=True starts from the given noised latents: give no init")
    if init is None and strength != 1 and not noised:
        raise ValueError("strength < 1 (SDEdit) needs init latents to start from (or noised=True)")
    scheduler = make_scheduler(sampler, shift, scheduler_config)
    set_schedule(scheduler, sampler, steps, sigmas, device=noise.device)
    scheduler.set_begin_index(start)
    schedule = scheduler.sigmas.float()  # the steps' sigmas, and a final 0
    levels = schedule
    if timesteps == "scheduler":
        levels = scheduler.timesteps.double() / scheduler.config.num_train_timesteps
        levels = levels.float() if noise.device.type == "mps" else levels  # mps has no float64
    x = noise if init is None else add_noise(init.float(), noise, schedule[start].expand(noise.shape[0]))

    velocity = guided_velocity(model, context, context_mask, negative, negative_mask, guidance, model_kwargs,
                               split_guidance)  # fmt: skip
    boundary = None if second is None else second.boundary * scheduler.config.num_train_timesteps
    step_kwargs = {"generator": generator} if sampler in ("euler", "dpm") else {}
    for i in tqdm(range(start, len(scheduler.timesteps)), disable=not progress, desc=f"{sampler} sampling"):
        x = hook(i, float(schedule[i]), x) if hook is not None else x
        if boundary is not None and scheduler.timesteps[i] < boundary:  # the low-noise expert from here on
            if second.on_switch is not None:
                second.on_switch()
            model, guidance = second.model, guidance if second.guidance is None else second.guidance
            velocity = guided_velocity(model, context, context_mask, negative, negative_mask, guidance,
                                       model_kwargs, split_guidance)  # fmt: skip
            boundary = None
        v = velocity(x, levels[i])
        x = scheduler.step(v, scheduler.timesteps[i], x, **step_kwargs, return_dict=False)[0]
        check_step(x, i, len(scheduler.timesteps), schedule[i], model, context, guidance)
    return hook(len(scheduler.timesteps), 0.0, x) if hook is not None else x


@torch.no_grad()
def flow_edit(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor | None,
    source: torch.Tensor,
    source_mask: torch.Tensor | None = None,
    *,
    negative: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    guidance: float = 1.0,
    source_guidance: float = 1.0,
    steps: int = 30,
    shift: float = 1.0,
    strength: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = True,
    source_model: Callable[..., torch.Tensor] | None = None,
    split_guidance: bool = False,
) -> torch.Tensor:
    """Edit latents ``x0`` from what ``source`` describes to what ``context`` describes, without inverting them
    (FlowEdit, Kulikov et al. 2024); returns fp32 latents.

    Walks the Euler sampler's sigma grid from where ``strength`` starts (as in ``denoise``) down to 0, moving
    the edit ``z`` (``x0`` at first) along the difference of two velocities: at each sigma, fresh noise ``n``
    noises the input to ``z_src = (1 - sigma) x0 + sigma n``, the edit is put at the same noise,
    ``z_tar = z + z_src - x0``, and ``z += (sigma_next - sigma) (v(z_tar | context) - v(z_src | source))``.
    What both prompts agree on cancels, so the input's layout and motion survive what a prompt changes; with
    the same prompt and guidance on both sides ``x0`` comes back unchanged. ``guidance``/``source_guidance``:
    classifier-free guidance of each side against ``negative`` (the paper uses less on the source side).
    The noise is drawn from ``generator`` (the same seed, the same edit). ``source_model``: the source side's
    model (default ``model``; a step cache keeps one state per side). ``split_guidance``: as in ``denoise``.
    """
    start = first_step(steps, strength)
    sigmas = sigma_schedule("euler", steps, shift).to(x0.device)
    target_v = guided_velocity(model, context, context_mask, negative, negative_mask, guidance,
                               split=split_guidance)  # fmt: skip
    source_v = guided_velocity(source_model or model, source, source_mask, negative, negative_mask,
                               source_guidance, split=split_guidance)  # fmt: skip
    x0 = x0.float()
    z = x0.clone()
    for i in tqdm(range(start, steps), disable=not progress, desc="flow edit"):
        sigma = sigmas[i]
        noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else "cpu")
        z_src = add_noise(x0, noise.to(x0.device), sigma.expand(x0.shape[0]))
        z_tar = z_src + (z - x0)  # exactly z_src while nothing has moved
        z = z + (sigmas[i + 1] - sigma) * (target_v(z_tar, sigma) - source_v(z_src, sigma))
        check_step(z, i, steps, sigma, model, context, guidance)
    return z


def sigma_schedule(sampler: str = "euler", steps: int = 30, shift: float = 1.0) -> torch.Tensor:
    """The ``steps + 1`` noise levels a sampler visits, from (about) 1 down to a final 0, as fp32."""
    scheduler = make_scheduler(sampler, shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float()


@torch.no_grad()
def invert(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor | None = None,
    *,
    negative: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    guidance: float = 1.0,
    steps: int = 30,
    shift: float = 1.0,
    refine: int = 0,
    strength: float = 1.0,
    progress: bool = True,
    split_guidance: bool = False,
) -> torch.Tensor:
    """Run the flow ODE backwards, data ``x0`` (sigma 0) to noise (sigma 1); returns fp32 "noise".

    The inverse of ``denoise(model, result, ..., sampler="euler", steps=steps, shift=shift)``: it walks the
    Euler sampler's own sigma grid upwards. Euler down from sigma_{i+1} to sigma_i reads the velocity at
    the upper point, ``x_i = x_{i+1} - (sigma_{i+1} - sigma_i) v(x_{i+1}, sigma_{i+1})``. With ``refine=0``
    the inverse step uses the velocity at the lower point instead (DDIM-style inversion, error O(1/steps)
    overall); each ``refine`` solves that implicit equation by one more fixed-point iteration
    ``x_{i+1} <- x_i + (sigma_{i+1} - sigma_i) v(x_{i+1}, sigma_{i+1})`` (one more model call per step),
    which makes the Euler sampler's round trip exact when the iteration converges.
    Guidance as in ``denoise`` (inverting with guidance > 1 is less stable; 1 is the usual choice), and so is
    ``split_guidance``.
    ``strength`` < 1 stops part way, at the noise level a ``denoise(..., strength=strength, noised=True)`` run
    starts from, and returns the latents there.
    """
    sigmas = sigma_schedule("euler", steps, shift).flip(0).to(x0.device)  # 0, ..., 1
    velocity = guided_velocity(model, context, context_mask, negative, negative_mask, guidance,
                               split=split_guidance)  # fmt: skip
    x = x0.float()
    for i in tqdm(range(steps - first_step(steps, strength)), disable=not progress, desc="inverting"):
        delta = sigmas[i + 1] - sigmas[i]
        nxt = x + delta * velocity(x, sigmas[i])
        for _ in range(refine):
            nxt = x + delta * velocity(nxt, sigmas[i + 1])
        x = nxt
        check_step(x, i, steps, sigmas[i + 1], model, context, guidance)
    return x


def guided_velocity(
    model: Callable[..., torch.Tensor],
    context: torch.Tensor,
    context_mask: torch.Tensor | None = None,
    negative: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    guidance: float = 1.0,
    model_kwargs: Mapping[str, torch.Tensor] | None = None,
    split: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``v(x, sigma)`` (sigma a 0-dim tensor): the model's fp32 velocity with classifier-free guidance.

    With ``negative`` and ``guidance != 1`` both halves run as one batch: ``v_neg + guidance (v_cond - v_neg)``;
    with ``split`` one after the other (diffusers' way: half the activations held at once, for a little speed
    on a GPU; the same result up to the kernels' rounding). ``model_kwargs`` (per-sample tensors, passed by
    keyword) are the same for both halves.
    """
    guided = negative is not None and guidance != 1.0
    kwargs = dict(model_kwargs or {})
    if guided:
        context, context_mask = _stack_contexts(context, context_mask, negative, negative_mask)
        kwargs = kwargs if split else {k: torch.cat([v, v]) for k, v in kwargs.items()}
    dtype = next(model.parameters()).dtype if isinstance(model, torch.nn.Module) else torch.float32

    def run(x, sigma, tokens, mask) -> torch.Tensor:
        return model(x.to(dtype), sigma.expand(x.shape[0]).to(x.device), tokens, mask, **kwargs).float()

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not guided:
            return run(x, sigma, context, context_mask)
        if split:  # [cond; uncond] tokens, each half with its mask
            tokens, masks = context.chunk(2), (None, None) if context_mask is None else context_mask.chunk(2)
            v_cond = run(x, sigma, tokens[0], masks[0])
            return torch.lerp(run(x, sigma, tokens[1], masks[1]), v_cond, guidance)
        v_cond, v_neg = run(torch.cat([x, x]), sigma, context, context_mask).chunk(2)
        return torch.lerp(v_neg, v_cond, guidance)

    return velocity


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
