"""Guards that keep bad numbers from passing silently: option ranges, and NaN/inf in weights and tensors.

A leaf module (imports only torch). ``check_option`` range-checks the numbers every job takes (guidance,
shift, strength, fps, ...) with one table, ``OPTION_RANGES``; ``check_weights_finite`` scans a model's
weights; ``check_finite`` stops a computation whose result went non-finite, with ``NonFiniteError`` naming
where and the likely cause (``sampling_cause`` works the cause out for the sampling loops).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

# name: (low, high, low inclusive, high inclusive, integer); None = unbounded on that side
OPTION_RANGES: dict[str, tuple] = {
    "guidance": (0.0, 100.0, True, True, False),  # classifier-free guidance scale; 1 = off
    "source_guidance": (0.0, 100.0, True, True, False),
    "guidance_2": (0.0, 100.0, True, True, False),  # the low-noise expert's (Wan 2.2 A14B)
    "control_scale": (0.0, 100.0, True, True, False),  # a control branch's hint weight (VACE)
    "control_guidance": (0.0, 100.0, True, True, False),  # the control job's default guidance
    "shift": (0.0, 1000.0, False, True, False),  # sigma shift of a schedule
    "strength": (0.0, 1.0, True, True, False),
    "fps": (0.0, 1000.0, False, True, False),
    "steps": (1, 10_000, True, True, True),
    "refine": (0, 100, True, True, True),
    "stagger": (0.0, 1.0, True, False, False),  # a morph's spread of switch times (staggered_slerp)
    "batch_size": (1, 1_000_000, True, True, True),
}


class NonFiniteError(ValueError):
    """NaN or inf where numbers must be finite (options, weights, latents, frames); says where and why."""


def _range_text(low, high, low_in: bool, high_in: bool) -> str:
    if low is not None and high is not None:
        return f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
    if low is not None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"{'<=' if high_in else '<'} {high}"


def check_number(
    name: str,
    value,
    low=None,
    high=None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
):
    """``value`` if it is a finite number (an integer with ``integer``) within [low, high] (open ends as told);
    ValueError naming ``name``, the value and the accepted range otherwise. Bools are not numbers here."""
    what = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:  # numpy scalars, 0-dim tensors
            value = value.item() if hasattr(value, "item") else value
        except Exception:
            pass
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{name} must be {what}; got {value!r}")
    if not math.isfinite(value):
        raise NonFiniteError(f"{name} must be {what}; got {value}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        raise ValueError(
            f"{name} must be in {_range_text(low, high, low_inclusive, high_inclusive)}; got {value}"
        )
    return value


def check_option(name: str, value):
    """Range-check a job option by its name in ``OPTION_RANGES`` (None passes: "use the default")."""
    if value is None:
        return None
    low, high, low_in, high_in, integer = OPTION_RANGES[name]
    return check_number(name, value, low, high, low_inclusive=low_in, high_inclusive=high_in, integer=integer)


def option_type(name: str):
    """An argparse ``type=`` that parses and range-checks option ``name`` (a bad value is argparse's error)."""
    import argparse

    integer = OPTION_RANGES[name][4]

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(  # noqa: B904 (argparse shows only this message)
                f"expected {'an integer' if integer else 'a number'}, got {text!r}"
            )
        try:
            return check_option(name, value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{name} ")) from None

    parse.__name__ = name
    return parse


# ------------------------------------------------------------------------------------------------ tensors


def all_finite(x: torch.Tensor) -> bool:
    """True when every value of ``x`` is finite (integer tensors always are). One read and one device sync:
    a sum is NaN/inf when any term is (a sum that overflows is confirmed element by element)."""
    if not x.is_floating_point() or bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf; one device sync for all of them."""
    items = [(n, t) for n, t in named if t.is_floating_point() and t.numel() and t.device.type != "meta"]
    if not items:
        return []
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for n, t in items:
        by_device.setdefault(t.device, []).append((n, t))
    bad = []
    for group in by_device.values():
        # a sum is NaN/inf when any term is, and costs one read (isfinite().all() writes a mask too: ~50x
        # slower on a CPU); a sum that overflows (fp16) is confirmed element-wise before it is reported
        sums = torch.stack([t.sum() for _, t in group])  # promoted to the widest dtype
        flags = (~torch.isfinite(sums)).cpu().tolist()
        bad += [n for (n, t), f in zip(group, flags) if f and not bool(torch.isfinite(t).all())]
    return bad


def _listed(names: list[str], shown: int = 3) -> str:
    more = f", ... ({len(names)} tensors)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_weights_finite(model: torch.nn.Module, what: str) -> None:
    """NonFiniteError when any weight or buffer of ``model`` holds NaN/inf (``what`` names the model's source)."""
    bad = nonfinite_names(model.state_dict().items())
    if bad:
        raise NonFiniteError(f"{what} has NaN/inf weights ({_listed(bad)}): the model files are damaged")


def check_finite(x: torch.Tensor, what: str, cause: str | Callable[[], str] | None = None) -> torch.Tensor:
    """``x`` when all finite; else NonFiniteError "``what`` went NaN/inf: cause" (``cause`` may be a function,
    called only then)."""
    if not all_finite(x):
        cause = cause() if callable(cause) else cause
        raise NonFiniteError(f"{what} went NaN/inf" + (f": {cause}" if cause else ""))
    return x


def model_cause(name: str, model: torch.nn.Module) -> str:
    """The likely cause of a non-finite result of ``model``: damaged weights (named), else float16 overflow,
    else the numbers it was given. Meant for the error path only (it scans every weight)."""
    bad = nonfinite_names(model.state_dict().items())
    if bad:
        return f"the {name} has NaN/inf weights ({_listed(bad)}): the model files are damaged"
    if next(model.parameters()).dtype == torch.float16:
        return f"float16 overflow in the {name}: run it in bfloat16 or float32"
    return f"the {name}'s input is out of range, or its weights overflow"


def sampling_cause(model, context: torch.Tensor | None = None, guidance: float | None = None) -> str:
    """Why a sampling loop's latents went non-finite: bad weights, bad text tokens, fp16 overflow, options."""
    if isinstance(model, torch.nn.Module):
        bad = nonfinite_names(model.state_dict().items())
        if bad:
            return f"the denoiser has NaN/inf weights ({_listed(bad)}): the model files are damaged"
    if context is not None and not all_finite(context):
        return "the text tokens are NaN/inf: the text encoder's weights are damaged?"
    if guidance is not None and not math.isfinite(guidance):
        return f"guidance is {guidance}"
    if isinstance(model, torch.nn.Module) and next(model.parameters()).dtype == torch.float16:
        return "float16 overflow: run the denoiser in bfloat16 or float32"
    extra = f" (guidance {guidance:g})" if guidance is not None else ""
    return f"likely bad options{extra}: too large a guidance or shift, or weights that overflow"


def check_step(x: torch.Tensor, step: int, steps: int, sigma, model, context=None, guidance=None) -> None:
    """Stop a sampling loop whose latents went NaN/inf at ``step``, naming the step and the likely cause.

    Costs one sum over the latents and one device sync per step (``scripts/bench_checks.py``: 9 us against a
    46-85 ms step of the default model on a CPU)."""
    if not all_finite(x):
        raise NonFiniteError(
            f"the latents went NaN/inf at step {step + 1} of {steps} (sigma {float(sigma):.3f}): "
            + sampling_cause(model, context, guidance)
        )
