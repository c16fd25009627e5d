"""The denoiser trainer: flow matching on cached latents, with exact resume.

Letters: b batch, c channels, t latent frames, h height, w width, n text tokens, d width.

``train(config)`` builds a ``Trainer`` and runs it. One optimizer step = ``grad_accum`` micro-batches; each
micro-batch draws sigmas (logit-normal or uniform, then shifted), noise and caption dropout from one seeded
``torch.Generator`` whose state, with the model, EMA, optimizer, LR schedule, the global RNG and the data
position, goes into every checkpoint, so an interrupted run resumed from a checkpoint computes the same
losses as one that was never stopped.

A checkpoint is a folder ``<output>/checkpoints/step-XXXXXXX/`` holding ``model.safetensors`` (denoiser and,
when trained, text encoder: keys ``dit.*`` / ``text_encoder.*``), ``ema.safetensors`` (same keys),
``state.pt`` (optimizer, scheduler, RNG states, data position; loads under ``weights_only=True``) and
``config.yaml``. Every file is written atomically; ``<output>/checkpoints/latest`` names the newest complete
folder and is written last.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from ..config import DiTConfig, load_config
from ..diffusion.flow import (
    TIMESTEP_SAMPLING,
    add_noise,
    flow_loss,
    sample_sigmas,
    shift_sigmas,
    velocity_target,
)
from ..models.dit import VideoDiT
from ..models.text import load_text_encoder
from .data import BucketSampler, LatentDataset

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "load_train_config", "train"]

SCHEDULES = ("constant", "cosine")
# settings that may change between an interrupted run and its resumption without a warning (steps only
# with the constant schedule: the cosine one depends on it)
RESUME_FREE = ("resume", "progress", "device", "output", "steps")
PRECISIONS = ("no", "bf16")


@dataclass
class TrainConfig:
    """Everything a denoiser training run needs; mirrored by ``configs/train/*.yaml``."""

    data: str = "???"  # folder of latent files (vidlatent encode's output)
    captions: str | None = None  # metadata.jsonl or .csv with path + caption (else sidecar .txt files)
    output: str = "runs/train"  # checkpoints/, metrics.jsonl
    dit: str = "tiny"  # dit preset name or vidlatent/diffusers folder
    dit_overrides: list[str] = field(default_factory=list)  # key=value DiTConfig fields (presets only)
    text_encoder: str = "tiny"  # preset name or folder
    train_text_encoder: bool = True  # the built-in encoder learns with the denoiser
    seed: int = 0
    steps: int = 1000  # optimizer steps
    batch_size: int = 1  # clips per micro-batch (one shape bucket)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1.0e-8
    schedule: str = "constant"  # constant | cosine (after warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    ema_decay: float = 0.999  # 0 = no EMA
    caption_dropout: float = 0.1  # probability a caption is replaced by "" (for classifier-free guidance)
    timestep_sampling: str = "logit_normal"  # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # sigma shift applied to the sampled sigmas
    mixed_precision: str = "no"  # no | bf16 (autocast)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the last step
    log_every: int = 1  # steps between metrics.jsonl rows
    resume: str | None = None  # "auto" (latest under output, if any) or a checkpoint folder
    device: str | None = None  # default: cuda if available
    progress: bool = True


def load_train_config(*files: str | os.PathLike, overrides=()) -> TrainConfig:
    """A ``TrainConfig`` from a preset name or yaml files and ``key=value`` overrides (merged in order)."""
    preset, paths = None, []
    for f in files:
        if not Path(f).exists() and "/" not in str(f) and not str(f).endswith((".yaml", ".yml")):
            preset = str(f)
        else:
            paths.append(f)
    cfg = load_config(TrainConfig, "train", preset, *paths, overrides=overrides)
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    if cfg.data == "???":
        raise ValueError("no training data: set data=<folder of latent files>")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; accepted: {', '.join(SCHEDULES)}")
    if cfg.mixed_precision not in PRECISIONS:
        raise ValueError(
            f"unknown mixed_precision {cfg.mixed_precision!r}; accepted: {', '.join(PRECISIONS)}"
        )
    if cfg.timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(
            f"unknown timestep_sampling {cfg.timestep_sampling!r}; accepted: {', '.join(TIMESTEP_SAMPLING)}"
        )
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1; got {getattr(cfg, name)}")
    if not 0 <= cfg.caption_dropout <= 1:
        raise ValueError(f"caption_dropout must be in [0, 1]; got {cfg.caption_dropout}")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1); got {cfg.ema_decay}")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped without writing a checkpoint of that state."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _LRLambda:
    """The LR schedule as a callable; checkpoints leave out what LambdaLR's state_dict keeps of it (the
    config), so ``state.pt`` stays loadable with ``weights_only=True``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.cfg)


class Trainer:
    """Flow-matching training of a ``VideoDiT`` (and optionally the built-in text encoder) on latent files."""

    def __init__(self, config: TrainConfig):
        _check(config)
        self.config = cfg = config
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.output = Path(cfg.output)
        self.dataset = LatentDataset(cfg.data, cfg.captions)
        if not len(self.dataset):
            raise ValueError(f"no usable latent files in {cfg.data}: {self.dataset.summary()}")
        self.sampler = BucketSampler(self.dataset, cfg.batch_size, seed=cfg.seed)
        channels = self.dataset.items[0].shape[0]

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.text_encoder = load_text_encoder(cfg.text_encoder, device=self.device)
            if Path(cfg.dit).exists():
                self.dit = VideoDiT.from_pretrained(cfg.dit, device=self.device, dtype=torch.float32)
            else:
                overrides = [
                    f"in_channels={channels}",
                    f"out_channels={channels}",
                    f"text_dim={self.text_encoder.dim}",
                    *cfg.dit_overrides,
                ]
                self.dit = VideoDiT(load_config(DiTConfig, "dit", cfg.dit, overrides=overrides)).to(
                    self.device
                )
        self.dit.gradient_checkpointing = cfg.gradient_checkpointing
        if self.dit.config.in_channels != channels:
            raise ValueError(
                f"the latents have {channels} channels; the denoiser takes {self.dit.config.in_channels}"
            )

        self.models = {"dit": self.dit}
        if cfg.train_text_encoder:
            if not any(p.requires_grad for p in self.text_encoder.parameters()):
                raise ValueError("train_text_encoder=true but the text encoder has no trainable parameters")
            self.models["text_encoder"] = self.text_encoder
        else:
            self.text_encoder.requires_grad_(False).eval()
        self.params = {f"{n}.{k}": p for n, m in self.models.items() for k, p in m.named_parameters()}
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _LRLambda(cfg))
        self.ema = (
            {k: p.detach().float().clone() for k, p in self.params.items()} if cfg.ema_decay > 0 else None
        )
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.step = 0  # optimizer steps done
        self.epoch, self.batch_index = 0, 0  # data position: next batch to read
        self.last_checkpoint: Path | None = None
        self.losses: list[float] = []  # loss of each step this process ran

    # ----------------------------------------------------------------------------------------- data

    def _next_batch(self) -> tuple[torch.Tensor, list[str]]:
        while True:
            batches = self.sampler.epoch(self.epoch)
            if self.batch_index >= len(batches):
                self.epoch, self.batch_index = self.epoch + 1, 0
                continue
            idx = batches[self.batch_index]
            self.batch_index += 1
            latents, captions = [], []
            for i in idx:
                try:
                    z, caption = self.dataset[i]
                except Exception as err:  # noqa: BLE001 - a file broken since the scan is reported, skipped
                    tqdm.write(f"skipping {self.dataset.items[i].path}: {type(err).__name__}: {err}")
                    continue
                latents.append(z)
                captions.append(caption)
            if latents:
                return torch.stack(latents).to(self.device), captions

    # ----------------------------------------------------------------------------------------- step

    def _micro_step(self, x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        cfg, b = self.config, x0.shape[0]
        gen = self.generator
        sigma = sample_sigmas(b, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, generator=gen)
        sigma = shift_sigmas(sigma, cfg.shift) if cfg.shift != 1.0 else sigma
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        drop = (torch.rand(b, generator=gen) < cfg.caption_dropout).tolist()
        captions = ["" if d else c for c, d in zip(captions, drop)]
        sigma = sigma.to(self.device)
        x_sigma = add_noise(x0, noise, sigma)
        target = velocity_target(x0, noise)
        use_bf16 = cfg.mixed_precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            context, mask = self.text_encoder.encode(captions)
            pred = self.dit(x_sigma, sigma, context, mask)
        return flow_loss(pred, target)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        for k, p in self.params.items():
            self.ema[k].lerp_(p.detach().float(), 1 - decay)

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics.

        Raises ``NonFiniteLossError`` (before touching the weights) when a loss or the gradient norm is NaN/inf.
        """
        cfg = self.config
        for m in self.models.values():
            m.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        pt, ph, pw = self.dit.config.patch_size
        for _ in range(cfg.grad_accum):
            x0, captions = self._next_batch()
            loss = self._micro_step(x0, captions)
            if not torch.isfinite(loss):
                where = self.last_checkpoint or "none written yet"
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at step {self.step + 1}; stopped without saving. "
                    f"Last good checkpoint: {where}. Lower lr, check the data, or disable bf16."
                )
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            b, _, t, h, w = x0.shape
            tokens += b * (t // pt) * (h // ph) * (w // pw)
        params = list(self.params.values())
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"gradient norm is {grad_norm} at step {self.step + 1} (loss {total:.4g}); stopped before "
                f"updating the weights. Last good checkpoint: {self.last_checkpoint or 'none written yet'}."
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self._update_ema()
        self.losses.append(total)
        return {"step": self.step, "loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}

    @contextlib.contextmanager
    def ema_weights(self):
        """Within the block, the trained models hold the EMA weights; the live ones come back after it."""
        if self.ema is None:
            raise ValueError("this run keeps no EMA weights (ema_decay=0)")
        live = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.ema[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(live[k])

    def export(self, folder: str | os.PathLike, ema: bool = True) -> Path:
        """Write ``folder/dit`` (``VideoDiT.from_pretrained`` reads it) and ``folder/text_encoder``
        (``load_text_encoder`` reads it), with the EMA weights when the run keeps them and ``ema`` is true.
        """
        folder = Path(folder)
        with self.ema_weights() if ema and self.ema is not None else contextlib.nullcontext():
            self.dit.save_pretrained(folder / "dit")
            self.text_encoder.save_pretrained(folder / "text_encoder")
        return folder

    @torch.no_grad()
    def evaluate(self, levels: int = 8, max_clips: int = 8, seed: int = 0, ema: bool = False) -> float:
        """Flow loss at fixed noise: ``levels`` evenly spread sigmas, seeded noise, the first ``max_clips`` clips
        with their captions. Deterministic, and it draws from no training RNG. ``ema=True`` scores the EMA
        weights (see ``ema_weights``).
        """
        if ema:
            with self.ema_weights():
                return self.evaluate(levels, max_clips, seed)
        gen = torch.Generator().manual_seed(seed)
        sigma = (torch.arange(levels, dtype=torch.float32) + 0.5) / levels
        for m in self.models.values():
            m.eval()
        losses = []
        for i in range(min(max_clips, len(self.dataset))):
            z, caption = self.dataset[i]
            x0 = z[None].expand(levels, *z.shape).to(self.device)
            noise = torch.randn(x0.shape, generator=gen).to(self.device)
            context, mask = self.text_encoder.encode([caption] * levels)
            s = sigma.to(self.device)
            pred = self.dit(add_noise(x0, noise, s), s, context, mask)
            losses.append(flow_loss(pred, velocity_target(x0, noise)).item())
        return sum(losses) / len(losses)

    # ----------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-XXXXXXX/`` atomically file by file, then point ``checkpoints/latest`` at it."""
        folder = self.output / "checkpoints" / f"step-{self.step:07d}"
        weights = {k: p.detach().cpu().contiguous() for k, p in self.params.items()}
        atomic_write(folder / "model.safetensors", lambda tmp: save_file(weights, tmp))
        if self.ema is not None:
            ema = {k: v.cpu().contiguous() for k, v in self.ema.items()}
            atomic_write(folder / "ema.safetensors", lambda tmp: save_file(ema, tmp))
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        atomic_write(folder / "state.pt", lambda tmp: torch.save(state, tmp))
        yaml = OmegaConf.to_yaml(OmegaConf.structured(self.config))
        atomic_write(folder / "config.yaml", lambda tmp: Path(tmp).write_text(yaml))
        atomic_write(
            self.output / "checkpoints" / "latest", lambda tmp: Path(tmp).write_text(folder.name + "\n")
        )
        self.last_checkpoint = folder
        return folder

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder under ``output``, or None."""
        pointer = self.output / "checkpoints" / "latest"
        if not pointer.is_file():
            return None
        return self.output / "checkpoints" / pointer.read_text().strip()

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore everything ``save_checkpoint`` wrote; the next step continues the saved run exactly."""
        folder = Path(folder)
        if not (folder / "state.pt").is_file():
            raise FileNotFoundError(f"{folder} is not a training checkpoint (no state.pt)")
        weights = load_file(folder / "model.safetensors")
        missing = set(self.params) ^ set(weights)
        if missing:
            raise ValueError(f"{folder}: checkpoint and model parameters differ: {sorted(missing)[:5]}")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(weights[k])
        if self.ema is not None:
            ema_file = folder / "ema.safetensors"
            src = load_file(ema_file) if ema_file.is_file() else weights
            self.ema = {k: src[k].float().to(self.device).clone() for k in self.params}
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        self.last_checkpoint = folder

    # ----------------------------------------------------------------------------------------- loop

    def _resume(self) -> None:
        resume = self.config.resume
        if resume is None:
            return
        folder = self.latest_checkpoint() if resume == "auto" else Path(resume)
        if folder is None:
            return  # "auto" with nothing to resume: a fresh run
        self.load_checkpoint(folder)
        saved = OmegaConf.load(folder / "config.yaml") if (folder / "config.yaml").is_file() else {}
        now = OmegaConf.structured(self.config)
        free = (
            RESUME_FREE
            if self.config.schedule == "constant"
            else tuple(k for k in RESUME_FREE if k != "steps")
        )
        changed = [k for k in now if k not in free and k in saved and saved[k] != now[k]]
        if changed:
            warnings.warn(
                f"resuming {folder} with changed settings ({', '.join(changed)}): the run will not match an "
                "uninterrupted one",
                stacklevel=2,
            )
        metrics = self.output / "metrics.jsonl"
        if metrics.is_file():  # drop rows the interrupted run logged after this checkpoint
            rows = [r for r in metrics.read_text().splitlines() if r and json.loads(r)["step"] <= self.step]
            atomic_write(metrics, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))

    def train(self, until: int | None = None) -> list[float]:
        """Run (resuming if ``config.resume`` says so) to ``config.steps``, or stop after step ``until``.

        Returns the losses of the steps this call ran. Writes metrics.jsonl rows and checkpoints, and at the
        last step the trained models (EMA weights where kept) to ``<output>/final`` (see ``export``).
        """
        cfg = self.config
        self._resume()
        stop = cfg.steps if until is None else min(until, cfg.steps)
        self.output.mkdir(parents=True, exist_ok=True)
        start = len(self.losses)
        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not cfg.progress, desc="train", dynamic_ncols=True
        )
        with open(self.output / "metrics.jsonl", "a") as log:
            while self.step < stop:
                t0 = time.perf_counter()
                m = self.train_step()
                m["tokens_per_s"] = m.pop("tokens") / max(time.perf_counter() - t0, 1e-9)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}", lr=f"{m['lr']:.2e}"
                )
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
        bar.close()
        if self.step == cfg.steps:
            self.export(self.output / "final")
        return self.losses[start:]


def train(config: TrainConfig, until: int | None = None) -> Trainer:
    """Build a ``Trainer`` for ``config``, run it (see ``Trainer.train``) and return it."""
    trainer = Trainer(config)
    trainer.train(until)
    return trainer
