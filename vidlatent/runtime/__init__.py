"""How a pipeline runs on the hardware it has, without changing what it computes: where weights live (``offload``),
how the denoiser's linear weights are stored (``weights_dtype``), which attention kernel runs (``attention``),
whether the denoiser's block is compiled (``compile``) and whether guidance's two halves run as one batch or one
after the other (``split_guidance``). ``configure`` applies them to a ``VideoPipeline``;
``VideoPipeline(..., offload=...)`` and ``VideoPipeline.from_pretrained(..., offload=...)`` call it.

Modules: ``offload.py`` (``Placement``: the one place that moves weights), ``fp8.py`` (float8 weight storage),
``kernels.py`` (attention choice and checks, regional compile).
"""

from __future__ import annotations

import warnings

import torch

from ..models.dit import Attention
from .cache import Cached, CacheState, StepCache, cache_settings
from .fp8 import Float8Linear, parameter_bytes, quantize
from .kernels import (
    check_attention,
    check_attention_name,
    compile_blocks,
    installed_packages,
    working_backends,
)
from .offload import OFFLOAD_MODES, Placement, pipeline_placement

WEIGHTS_DTYPES = (None, "fp8")

__all__ = [
    "OFFLOAD_MODES", "WEIGHTS_DTYPES", "CacheState", "Cached", "Float8Linear", "Placement", "StepCache",
    "accelerator", "cache_settings", "check_attention", "check_device", "check_runtime", "compile_blocks", "configure", "installed_packages", "load_device", "parameter_bytes",
    "pipeline_placement", "quantize", "working_backends",
]  # fmt: skip


def accelerator(device=None) -> torch.device | None:
    """The device offloaded weights run on: ``device`` when it is an accelerator, else CUDA when there is one
    and no device was named; None when there is none (CPU, or Apple's unified memory, where offload saves
    nothing)."""
    if device is not None:
        device = torch.device(device)
        return None if device.type in ("cpu", "mps", "meta") else device
    return torch.device("cuda") if torch.cuda.is_available() else None


def check_runtime(
    offload: str = "none", weights_dtype: str | None = None, attention: str | None = None
) -> None:
    """One clear line for an unknown ``offload``, ``weights_dtype`` or ``attention`` name (whether that backend runs
    on a device is for ``configure`` to say, with the model at hand)."""
    if attention is not None:
        check_attention_name(attention)
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload {offload!r}; accepted: {', '.join(OFFLOAD_MODES)}")
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(
            f"unknown weights_dtype {weights_dtype!r}; accepted: None (as loaded), 'fp8' (the denoiser's block "
            "linears as float8 e4m3 with a scale per output channel)"
        )


def check_device(device) -> None:
    """ValueError naming ``device`` when it is no device name or this torch cannot run on it (a CUDA device on a
    CPU-only build or with none visible), instead of an error from deep inside the first weight moved."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; accepted: cpu, cuda, cuda:N, mps") from err
    if kind == "cuda" and not torch.cuda.is_available():
        why = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"device {device!r}: this torch cannot use CUDA ({why}); use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: Apple's MPS is not available here; use --device cpu")


def load_device(offload: str, device=None):
    """Where a pipeline's weights are read to: the host when they will be offloaded, else ``device``
    (checked: ``check_device``)."""
    check_device(device)
    check_runtime(offload)
    return "cpu" if offload != "none" and accelerator(device) is not None else device


def configure(
    pipe,
    offload: str = "none",
    weights_dtype: str | None = None,
    compile: bool = False,
    attention: str | None = None,
    device=None,
    resident: int = 2,
    cache=None,
    split_guidance: bool = False,
) -> Placement | None:
    """Apply the runtime choices to ``pipe`` (in place) and return its ``Placement`` (None without offload).

    ``weights_dtype="fp8"``: ``fp8.quantize`` on the denoiser. ``attention``: checked on the device the denoiser
    will run on, then set on it (and on a control branch). ``compile``: ``compile_blocks``. ``offload``:
    ``"model"`` or ``"blocks"`` onto ``device`` (default: CUDA); where there is no accelerator a one-line
    warning says so and the pipeline runs as it is. ``resident``: blocks on the accelerator at once (blocks).
    ``cache``: step caching, ``pipe.cache`` (a threshold, a settings file, or None: see ``cache.cache_settings``).
    ``split_guidance``: ``pipe.split_guidance``, classifier-free guidance's two halves as two denoiser calls
    instead of one batch of both (as diffusers runs them): half the activations held at once (Wan 2.1 14B at
    81x720x1280: 8.2 against 16.3 GB, traced), a little slower on a GPU; not with a step cache.
    """
    check_runtime(offload, weights_dtype)
    step_cache = cache_settings(cache, pipe.dit)  # checked first: a bad setting leaves the pipeline as it was
    target = accelerator(device)
    if offload != "none" and target is None:
        where = (
            f"device {device}" if device is not None else "this machine (torch.cuda.is_available() is False)"
        )
        warnings.warn(f"offload={offload!r} needs an accelerator and {where} has none: running without offload",
                      stacklevel=3)  # fmt: skip
        offload = "none"
    dit, dit_2 = pipe.dit, getattr(pipe, "dit_2", None)
    if offload == "blocks" and dit_2 is not None:
        raise ValueError(
            "offload='blocks' streams one denoiser's blocks; this pipeline has two experts (Wan 2.2 A14B): use "
            "offload='model', or offload_experts() (one expert on the accelerator at a time)"
        )
    if attention is not None:  # checked before anything changes
        run_on = target if offload != "none" else next(dit.parameters()).device
        check_attention(attention, run_on, dit.patch_embed.weight.dtype, dit.head_dim)
    pipe.cache = step_cache
    if split_guidance and step_cache is not None:
        raise ValueError("split_guidance and a step cache do not run together: use one of them")
    pipe.split_guidance = bool(split_guidance)
    for model in (dit, dit_2) if weights_dtype == "fp8" else ():
        if model is not None:
            quantize(model)
    if attention is not None:
        for model in (dit, dit_2):
            if model is not None:
                model.set_attention(attention)
        for module in pipe.control_branch.modules() if pipe.control_branch is not None else ():
            if isinstance(module, Attention):
                module.backend = attention
    for model in (dit, dit_2) if compile else ():
        if model is not None:
            compile_blocks(model)
    if offload == "none":
        return None
    return pipeline_placement(pipe, offload, target, resident)
