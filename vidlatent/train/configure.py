"""``load_train_config``: a checked ``TrainConfig`` from a preset name, yaml files and ``key=value`` overrides.

The checks here are about values any run must get right; each task adds its own (``Task.check``: options
that belong to another task, data it cannot read).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import load_config
from ..config.train import TrainConfig
from ..diffusion.flow import TIMESTEP_SAMPLING
from . import distributed, optim
from .tasks import task_class

__all__ = ["SCHEDULES", "PRECISIONS", "load_train_config", "check_config"]

SCHEDULES = ("constant", "cosine")
PRECISIONS = ("no", "bf16")


def load_train_config(*files: str | os.PathLike, overrides=()) -> TrainConfig:
    """A ``TrainConfig`` from a preset name or yaml files and ``key=value`` overrides (merged in order)."""
    preset, paths = None, []
    for f in files:
        if not Path(f).exists() and "/" not in str(f) and not str(f).endswith((".yaml", ".yml")):
            preset = str(f)
        else:
            paths.append(f)
    cfg = load_config(TrainConfig, "train", preset, *paths, overrides=overrides)
    if cfg.mixed_precision == "False":  # YAML reads a bare ``mixed_precision=no`` as the boolean false
        cfg.mixed_precision = "no"
    check_config(cfg)
    return cfg


def _accepted(name: str, value: str, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")


def check_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first setting of ``cfg`` that no run can use."""
    if cfg.vae_train not in ("all", "decoder"):
        raise ValueError(f"unknown vae_train {cfg.vae_train!r}; accepted: all, decoder")
    task = task_class(cfg.task)
    if cfg.data == "???":
        raise ValueError("no training data: set data=<folder of latent files> or data=shapes")
    if cfg.num_workers < 0:
        raise ValueError(f"num_workers must be >= 0; got {cfg.num_workers}")
    if cfg.max_minutes < 0:
        raise ValueError(f"max_minutes must be >= 0 (0 = no time budget); got {cfg.max_minutes}")
    _accepted("parallel", cfg.parallel, distributed.PARALLEL)
    _accepted("schedule", cfg.schedule, SCHEDULES)
    _accepted("mixed_precision", cfg.mixed_precision, PRECISIONS)
    _accepted("timestep_sampling", cfg.timestep_sampling, TIMESTEP_SAMPLING)
    optim.check_optimizer(cfg.optimizer)
    if cfg.sample_every < 0 or cfg.sample_steps < 1:
        raise ValueError(
            f"need sample_every >= 0 and sample_steps >= 1; got {cfg.sample_every}, {cfg.sample_steps}"
        )
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1; got {getattr(cfg, name)}")
    if cfg.lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0 = no LoRA); got {cfg.lora_rank}")
    for name in ("first_frame_dropout", "image_fraction", "caption_dropout", "caption_word_dropout"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"{name} must be in [0, 1]; got {getattr(cfg, name)}")
    if not cfg.first_frame_weight > 0:
        raise ValueError(
            f"first_frame_weight must be > 0 (1 = every frame alike); got {cfg.first_frame_weight}"
        )
    if not cfg.content_weight >= 0:
        raise ValueError(f"content_weight must be >= 0 (0 = every position alike); got {cfg.content_weight}")
    if cfg.sigma_range is not None:
        band = list(cfg.sigma_range)
        if (
            len(band) != 2
            or not all(isinstance(v, (int, float)) for v in band)
            or not 0 <= band[0] < band[1] <= 1
        ):
            raise ValueError(f"sigma_range must be [lo, hi] with 0 <= lo < hi <= 1; got {cfg.sigma_range!r}")
        if cfg.task == "vae":
            raise ValueError("sigma_range is the noise levels a denoiser learns: task=vae draws none")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1); got {cfg.ema_decay}")
    if cfg.caption_word_dropout and cfg.pipeline:
        raise ValueError(
            "caption_word_dropout leaves words out of captions, and a pipeline= fine-tune reads each caption's "
            "embeddings from its disk cache, which holds the whole captions only: set caption_word_dropout=0"
        )
    if cfg.text_cache and cfg.train_text_encoder:
        raise ValueError("text_cache=true needs a frozen text encoder (train_text_encoder=false)")
    if cfg.text_new_words and (cfg.task != "denoiser" or cfg.pipeline or not cfg.train_text_encoder):
        raise ValueError(
            "text_new_words=true grows the vocabulary of the built-in text encoder a denoiser trains: it needs "
            "task=denoiser and train_text_encoder=true, without pipeline= (whose text embeddings are cached)"
        )
    task.check(cfg)
