"""Step caching (training-free): skip most of the denoiser on steps where its input has changed little.

First-block residual caching (as FBCache): at every call the denoiser runs its first block, and compares
that block's residual (its output minus its input) with the one it had at the last step it ran in full:
``change = mean|r - r_ref| / mean|r_ref|``, per sample. Under ``threshold`` the other blocks are not run and
the residual they added at that last full step is added again; otherwise they run and both references are
renewed. A skipped step leaves the references as they were, so small changes add up until a full step runs.

Why this and not TeaCache's modulated-input distance: the signal is the model's own first block on this very
input (text, guidance branch, control hints, LoRAs included), so it needs no per-model polynomial fitted to
rescale it, and one threshold means the same on every model; the price is one block per skipped step (1/8
of the default model's blocks, 1/30 of Wan 2.1 1.3B's).

State: one ``CacheState`` per denoiser per sampling run, each sample of the batch on its own: with
classifier-free guidance the conditional and unconditional halves are separate rows, so each branch skips
when its own residual says so (the rows that run go through the blocks as a smaller batch). The second expert
of a two-expert model gets its own state.

Settings: ``StepCache(threshold, warmup)``; ``cache_settings`` reads a threshold number or a settings file
written by ``calibrate`` (``vidlatent calibrate-cache``): thresholds for named levels, with the denoiser's
fingerprint, so that a file made for another model is refused.

Letters: b batch, n video tokens, d model width.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import atomic_write

SETTINGS_KIND = "vidlatent step cache"
LEVELS = {"quality": 0.02, "balanced": 0.05, "fast": 0.1}  # level -> budget: mean relative latent error
DEFAULT_LEVEL = "balanced"
THRESHOLDS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4)  # what calibrate tries


@dataclass(frozen=True)
class StepCache:
    """Step caching settings: skip the blocks after the first when the first block's residual changed by less
    than ``threshold`` (relative) since the last full step; the first ``warmup`` calls always run in full
    (at least the first: there is nothing to compare with). ``threshold=0`` never skips."""

    threshold: float
    warmup: int = 1

    def __post_init__(self):
        if not (
            isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0
        ):
            raise ValueError(f"cache threshold must be a number >= 0 (0: never skip); got {self.threshold!r}")
        if not (isinstance(self.warmup, int) and self.warmup >= 1):
            raise ValueError(
                f"cache warmup must be a whole number >= 1 (full steps first); got {self.warmup!r}"
            )


class CacheState:
    """One denoiser's cache over one sampling run; passed to ``VideoDiT.forward(cache=...)``.

    Counts what it did: ``calls``; ``block_evals``, blocks run times samples they ran on; ``full_evals``, what
    running every block on every sample would have cost; ``skipped``, (call, sample) pairs that skipped."""

    def __init__(self, settings: StepCache):
        self.settings = settings
        self.reference: torch.Tensor | None = None  # (b n d) fp32: block 0's residual at the last full step
        self.rest: torch.Tensor | None = None  # (b n d) fp32: what the other blocks added then
        self.calls = self.block_evals = self.full_evals = self.skipped = 0

    def __call__(
        self, tokens: torch.Tensor, run_blocks: Callable[..., torch.Tensor], depth: int
    ) -> torch.Tensor:
        first = run_blocks(tokens, 0, 1)
        b = tokens.shape[0]
        self.calls += 1
        self.full_evals += b * depth
        residual = first.float() - tokens.float()
        fresh = self.reference is None or self.reference.shape != residual.shape
        if depth == 1 or fresh or self.calls <= self.settings.warmup:
            run = torch.ones(b, dtype=torch.bool, device=tokens.device)
        else:
            ref = self.reference
            change = (residual - ref).abs().flatten(1).mean(1) / ref.abs().flatten(1).mean(1).clamp_min(1e-12)
            run = ~(change < self.settings.threshold)
        ran = int(run.sum())
        self.block_evals += b + ran * (depth - 1)
        self.skipped += b - ran
        if ran == b:  # the plain computation, on the whole batch
            out = run_blocks(first, 1, depth)
            self.reference, self.rest = residual, out.float() - first.float()
            return out
        out = (first.float() + self.rest).to(first.dtype)
        if ran:
            rows = run.nonzero()[:, 0]
            out[rows] = run_blocks(first[rows], 1, depth, rows)
            self.reference[rows] = residual[rows]
            self.rest[rows] = out[rows].float() - first[rows].float()
        return out


class Cached(nn.Module):
    """``model`` (a ``VideoDiT`` or a wrapper that passes keywords on to one) called with ``cache=state``."""

    def __init__(self, model: nn.Module, state: CacheState):
        super().__init__()
        self.model, self.state = model, state

    def forward(self, *args, **kwargs):
        return self.model(*args, cache=self.state, **kwargs)


# ------------------------------------------------------------------------------------------ settings files


def fingerprint(dit: nn.Module) -> str:
    """A short hash of a denoiser: its config and the sizes of a few weights that no runtime choice changes
    (the patch embedding, the text embedder, the head; rounded, so a bf16 copy of a model matches its fp32)."""
    from ..config import config_to_dict

    cfg = config_to_dict(dit.config)
    cfg.pop("attention", None), cfg.pop("gradient_checkpointing", None)  # how it runs, not what it is
    parts = [json.dumps(cfg, sort_keys=True, default=str)]
    for name in ("patch_embed.weight", "text_embed.fc1.weight", "head.proj.weight"):
        t = dit.get_parameter(name).detach()
        parts.append(f"{name}:{tuple(t.shape)}:{float(t.float().norm()):.3g}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def write_settings(path: str | os.PathLike, dit: nn.Module, model: str, levels: dict, measured: list) -> Path:
    """Write a settings file (json, atomically): the model's name and fingerprint, ``levels`` (name ->
    threshold), the default level and the calibration table ``measured``."""
    data = {
        "kind": SETTINGS_KIND,
        "model": model,
        "fingerprint": fingerprint(dit),
        "levels": levels,
        "default": DEFAULT_LEVEL if DEFAULT_LEVEL in levels else next(iter(levels)),
        "measured": measured,
    }
    path = Path(path)
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def read_settings(path: str | os.PathLike, dit: nn.Module, level: str | None = None) -> StepCache:
    """The ``StepCache`` of a settings file's ``level`` (its default level when None), for ``dit``: ValueError
    in one line when the file is not a settings file, was made for another model, or has no such level."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read cache settings {path}: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != SETTINGS_KIND:
        raise ValueError(f"{path} is not a step cache settings file (vidlatent calibrate-cache writes them)")
    mine = fingerprint(dit)
    if data.get("fingerprint") != mine:
        raise ValueError(
            f"{path} holds cache settings for another model ({data.get('model')!r}, denoiser fingerprint "
            f"{data.get('fingerprint')}); this pipeline's denoiser is {mine}: run vidlatent calibrate-cache on it"
        )
    levels = data["levels"]
    level = data["default"] if level is None else level
    if level not in levels:
        raise ValueError(f"{path} has no cache level {level!r}; it has: {', '.join(levels)}")
    return StepCache(float(levels[level]))


def cache_settings(spec, dit: nn.Module) -> StepCache | None:
    """What ``cache=`` / ``--cache`` accept, as settings for ``dit``: None or "off" (no cache), a threshold
    (a number or its text), a ``StepCache``, or a settings file path, optionally ``PATH:LEVEL``."""
    if spec is None or isinstance(spec, StepCache):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"cache takes a threshold, a settings file or 'off'; got {spec!r}")
    if isinstance(spec, (int, float)):
        return StepCache(float(spec))
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec).strip()
        if text.lower() in ("off", "none"):
            return None
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is not None:
            return StepCache(value)
        path, level = text, None
        if not Path(text).is_file() and ":" in text:
            path, level = text.rsplit(":", 1)
        if not Path(path).is_file():
            raise ValueError(
                f"cache {text!r} is neither a threshold nor a settings file; accepted: a number >= 0 (0: never "
                "skip), a file written by vidlatent calibrate-cache (PATH or PATH:LEVEL), or off"
            )
        return read_settings(path, dit, level)
    raise ValueError(f"cache takes a threshold, a settings file or 'off'; got {type(spec).__name__}")


# ------------------------------------------------------------------------------------------- calibration


def block_evals(states: Sequence[CacheState]) -> tuple[int, int]:
    """(blocks run x samples, what every block on every sample would have been) over ``states``."""
    return sum(s.block_evals for s in states), sum(s.full_evals for s in states)


def calibrate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int] = (0,),
    thresholds: Sequence[float] = THRESHOLDS,
    levels: dict | None = None,
    **job,
) -> tuple[dict, list]:
    """Thresholds for named levels, from ``pipe.generate`` on ``prompts`` x ``seeds`` (latents only, ``job``:
    further generate options): for each threshold, the mean relative latent error against the uncached run
    ``||z - z_plain|| / ||z_plain||`` and the fraction of block evaluations run. A level (``levels``: name ->
    largest mean error allowed, default ``LEVELS``) gets the largest threshold whose error stays within its
    budget (the smallest tried when none does). Returns (levels -> threshold, the measured rows)."""
    levels = dict(LEVELS if levels is None else levels)
    kept = pipe.cache
    try:
        pipe.cache = None
        plain = [pipe.generate(list(prompts), seed=s, output_type="latent", **job) for s in seeds]
        rows = []
        for threshold in thresholds:
            pipe.cache = StepCache(float(threshold))
            errors, evals, full = [], 0, 0
            for s, ref in zip(seeds, plain):
                z = pipe.generate(list(prompts), seed=s, output_type="latent", **job)
                errors += [float((a - r).norm() / r.norm()) for a, r in zip(z, ref)]
                used, total = block_evals(pipe.cache_states)
                evals, full = evals + used, full + total
            rows.append({"threshold": float(threshold), "error": sum(errors) / len(errors),
                         "block_evals": evals / full})  # fmt: skip
    finally:
        pipe.cache = kept
    chosen = {}
    for name, budget in levels.items():
        fits = [r["threshold"] for r in rows if r["error"] <= budget]
        chosen[name] = max(fits) if fits else min(r["threshold"] for r in rows)
    return chosen, rows
