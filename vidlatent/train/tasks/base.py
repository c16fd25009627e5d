"""What the training loop asks of a task, and the values they pass each other.

A task (``denoiser``, ``vae``, ...) builds the models it trains and their data, hands the loop one
micro-batch at a time (``Batch``), computes that micro-batch's loss (``Loss``) through the forward the loop
gives it (the models wrapped for DDP), and samples, evaluates and exports. The loop (``train.loop``) owns
everything else: the optimizer, LR schedule, accumulation, EMA, metrics, checkpoints and ranks.

Letters: b batch, c channels, t frames, h height, w width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ...config.train import TrainConfig
from ...diffusion.flow import sample_sigmas, shift_sigmas
from ..distributed import Dist

__all__ = ["Batch", "Draws", "Loss", "Position", "Task", "draw_sigmas", "drop_captions"]

# word draws per caption for ``caption_word_dropout``: a fixed width, so every rank draws the same global
# tensor whatever its own captions' lengths (words past it are always kept)
WORD_DRAWS = 64


@dataclass
class Position:
    """Where the data stands: the next batch to read is batch ``batch_index`` of epoch ``epoch``."""

    epoch: int = 0
    batch_index: int = 0


@dataclass
class Draws:
    """Random draws for one micro-batch: drawn for the whole global batch of ``n`` clips from the run's
    shared generator and sliced to this rank's ``rows`` (``sliced``), so each clip gets what one process
    would draw for it; or (``own``) drawn for this rank's clips alone from the batch's own generator."""

    generator: torch.Generator
    rows: list[int]
    n: int
    sliced: bool = False
    own: bool = False

    def __call__(self, fn: Callable, shape=()) -> torch.Tensor:
        """``fn(size, generator=...)``: one value per clip (``shape=()``), or a tensor of ``shape``."""
        if self.own:
            return fn(tuple(shape) if len(shape) else len(self.rows), generator=self.generator)
        full = fn((self.n, *tuple(shape)[1:]) if len(shape) else self.n, generator=self.generator)
        return full[self.rows] if self.sliced else full


def draw_sigmas(cfg: TrainConfig, draws: Draws) -> torch.Tensor:
    """A training step's noise levels: ``timestep_sampling``'s draws (one per clip of the global batch), then
    ``shift``, then mapped linearly into ``sigma_range`` when it is set (no further draws, so runs without it keep
    theirs)."""
    sigma = draws(lambda n, generator: sample_sigmas(
        n, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, generator=generator
    ))  # fmt: skip
    sigma = shift_sigmas(sigma, cfg.shift) if cfg.shift != 1.0 else sigma
    if cfg.sigma_range is not None:
        lo, hi = cfg.sigma_range
        sigma = lo + (hi - lo) * sigma
    return sigma


def drop_captions(captions: list[str], draws: Draws, dropout: float, word_dropout: float = 0.0) -> list[str]:
    """The captions a training step conditions on: each replaced by "" with probability ``dropout`` (for
    classifier-free guidance) and, with ``word_dropout`` > 0, each word of a kept caption (split at whitespace;
    words past the ``WORD_DRAWS``-th always stay) left out with that probability, so each word's effect is learnt
    apart from the others'; a caption that would lose every word stays whole. The word draws are only made when
    ``word_dropout`` > 0, so runs without it keep their draws."""
    drop = (draws(torch.rand) < dropout).tolist()
    out = ["" if d else c for c, d in zip(captions, drop)]
    if word_dropout <= 0:
        return out
    keep = (draws(torch.rand, (len(out), WORD_DRAWS)) >= word_dropout).tolist()
    for i, (caption, row) in enumerate(zip(out, keep)):
        words = caption.split()
        kept = [w for j, w in enumerate(words) if j >= WORD_DRAWS or row[j]]
        out[i] = " ".join(kept) if kept else caption
    return out


@dataclass
class Batch:
    """This rank's share of one global batch: clips ``x`` (b c t h w: latents or pixels), their captions,
    and where its random draws come from."""

    x: torch.Tensor
    captions: list[str]
    draws: Draws

    @property
    def n(self) -> int:
        """The global batch size (all ranks together)."""
        return self.draws.n


@dataclass
class Loss:
    """One micro-batch's loss: ``value`` is this rank's part of the global batch's mean (what is backpropagated),
    ``parts`` its named components (metrics), ``tokens`` and ``flops`` the global batch's (model FLOPs,
    forward and backward), ``output`` what ``after_step`` needs of it (the VAE: its reconstruction)."""

    value: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    flops: float = 0.0
    output: torch.Tensor | None = None


class Task(ABC):
    """One kind of training. ``models`` are the trained models by name (their parameters are checkpointed as
    ``<name>.<parameter>``); ``sparse`` names those a batch need not use all of (token embeddings): kept
    whole on every rank under FSDP, searched for unused parameters under DDP. ``count_flops``: the loop
    counts the models' FLOPs with torch's counter (once per clip shape) instead of taking ``Loss.flops``.
    ``find_unused``: some batches leave parameters unused (the VAE's temporal layers on one-frame clips): DDP
    searches for them."""

    name: ClassVar[str]
    sparse: ClassVar[tuple[str, ...]] = ()
    count_flops: ClassVar[bool] = False
    find_unused: bool = False
    models: dict[str, torch.nn.Module]

    @staticmethod
    def check(cfg: TrainConfig) -> None:
        """Raise ``ValueError`` for settings this task cannot train with (e.g. another task's options)."""
        return None

    @abstractmethod
    def __init__(self, cfg: TrainConfig, device: torch.device, dist: Dist):
        """Build the data and the models (seeded by ``cfg.seed``, leaving the global RNG as it was)."""

    @abstractmethod
    def next_batch(self, position: Position, generator: torch.Generator) -> Batch:
        """This rank's share of the batch at ``position``, which it advances; ``generator`` is the run's."""

    @abstractmethod
    def forward(self, *args):
        """The trained models' forward, as ``loss`` calls it through the loop's (DDP-wrapped) module."""

    @abstractmethod
    def loss(self, batch: Batch, forward: Callable, step: int) -> Loss:
        """The micro-batch's loss at optimizer step ``step`` (0-based), calling ``forward`` for the models."""

    def after_step(self, batch: Batch, loss: Loss, step: int) -> dict[str, float]:
        """Work after the optimizer step on the last micro-batch (the VAE's discriminator); metrics."""
        return {}

    def extra_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """What a checkpoint keeps beyond the trained weights: extra safetensors files and ``state.pt`` entries."""
        return {}, {}

    def check_extra_state(self, folder: Path, state: dict) -> None:
        """Called before anything of a checkpoint is loaded (``folder``: the checkpoint, ``state``: its
        state.pt): raise ``ValueError`` for one that does not fit the task's models."""
        return None

    def load_extra_state(self, folder: Path, state: dict) -> None:
        """Restore what ``extra_state`` saved (``folder``: the checkpoint, ``state``: its state.pt), after the
        trained weights and the optimizer state."""
        return None

    @abstractmethod
    def unsharded(self, name: str) -> torch.nn.Module:
        """A fresh, unsharded model like ``models[name]`` (FSDP gathers its weights into it for export)."""

    @abstractmethod
    def export(self, folder: Path, models: dict[str, torch.nn.Module]) -> None:
        """Write the trained ``models`` (unsharded, EMA weights where kept) under ``folder``."""

    @abstractmethod
    def sample(self, seed: int) -> torch.Tensor | None:
        """A video (c t h w in [-1, 1]) showing what the models do now, or None; draws from no training RNG."""

    @abstractmethod
    def evaluate(self, *args, **kwargs) -> float:
        """A deterministic score of the models now (the denoiser: flow loss at fixed noise; the VAE: PSNR)."""
