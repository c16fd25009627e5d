"""One trainer for the denoiser (flow matching on cached latents) and the VAE, with exact resume.

``task: denoiser`` trains a ``VideoDiT`` (and the built-in text encoder) on latent files; ``task: vae`` trains
a ``CausalVAE`` on clips (L1 + SSIM + KL, optional patch discriminator after ``disc_start`` steps). For
the VAE, ``data: shapes`` draws endless clips from the procedural shapes world (``data_options`` are
``ShapesWorld`` arguments); the denoiser trains on latent files (``cache_world_latents`` writes them for the
shapes world, ``vidlatent encode`` for video files).

Letters: b batch, c channels, t latent frames, h height, w width, n text tokens, d width.

``train(config)`` builds a ``Trainer`` and runs it. One optimizer step = ``grad_accum`` micro-batches; each
micro-batch draws sigmas (logit-normal or uniform, then shifted), noise and caption dropout from one seeded
``torch.Generator`` whose state, with the model, EMA, optimizer, LR schedule, the global RNG and the data
position, goes into every checkpoint, so an interrupted run resumed from a checkpoint computes the same
losses as one that was never stopped.

Under ``torchrun --nproc_per_node=N`` (``distributed.setup``: nccl on CUDA, gloo on CPU) the models run as
DDP or FSDP2 (``parallel``). Every rank reads the same global batch of ``batch_size * N`` clips and takes
its share; sigmas, noise and caption dropout are drawn for the whole global batch from the shared generator
and sliced, so N ranks compute what one process with the global batch would (a rank with an empty share
joins with a weight-0 clip). Rank 0 alone writes metrics, checkpoints, samples and the export; every rank
resumes from the same checkpoint. For ``task: vae`` on a folder of videos, ``VideoBucketSampler`` deals
whole batches to the ranks instead, and each batch's posterior noise comes from its own seeded generator.

``lora_rank > 0`` trains LoRA adapters (``train.lora``) on the denoiser's blocks: checkpoints hold the
adapters (and the text encoder when trained), the export writes ``final/lora.safetensors``.
``first_frame_dropout < 1`` trains image-to-video conditioning (sample it with ``animate(...,
first_frame="clean")``), ``image_fraction > 0`` trains that share of micro-batches on their first latent
frame alone (one-frame generation from video latents), ``text_cache`` encodes each caption once
with a frozen text encoder, ``sample_every`` writes ``<output>/samples/step-XXXXXXX.gif``. Each step's model
FLOPs give the ``tflop_s`` of metrics.jsonl.

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
from torch.distributed.tensor import DTensor
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from ..config import DiTConfig, VAEConfig, load_config
from ..data.shapes import ShapesWorld
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
from ..models.vae import CausalVAE, StreamCache
from ..pipelines.encode import psnr
from . import distributed
from .data import BucketSampler, LatentDataset
from .distributed import share
from .losses import PatchDiscriminator, hinge_d_loss, vae_loss

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "dit_flops", "load_train_config", "train"]

SCHEDULES = ("constant", "cosine")
TASKS = ("denoiser", "vae")
# settings that may change between an interrupted run and its resumption without a warning (steps only
# with the constant schedule: the cosine one depends on it)
RESUME_FREE = ("resume", "progress", "device", "output", "steps", "parallel", "compile")
PRECISIONS = ("no", "bf16")


@dataclass
class TrainConfig:
    """Everything a training run needs; mirrored by ``configs/train/*.yaml``."""

    task: str = "denoiser"  # denoiser | vae
    data: str = "???"  # folder of latent files (vidlatent encode's output), or "shapes" (procedural)
    # ShapesWorld arguments when data=shapes; VideoFolderDataset ones (frames, size, buckets, fps, stride,
    # images) when task=vae trains on a folder of videos
    data_options: dict = field(default_factory=dict)
    num_workers: int = 0  # DataLoader worker processes reading videos (task=vae on a folder)
    captions: str | None = None  # metadata.jsonl or .csv with path + caption (else sidecar .txt files)
    data_in_memory: bool = False  # denoiser: read every latent file once at the start, not per batch
    output: str = "runs/train"  # checkpoints/, metrics.jsonl
    dit: str = "tiny"  # dit preset name or vidlatent/diffusers folder
    dit_overrides: list[str] = field(default_factory=list)  # key=value DiTConfig fields (presets only)
    text_encoder: str = "tiny"  # preset name or folder
    train_text_encoder: bool = True  # the built-in encoder learns with the denoiser
    text_overrides: list[str] = field(default_factory=list)  # key=value text config fields (presets only)
    vae: str = "tiny"  # vae preset or folder: trained when task=vae; encodes data=shapes for the denoiser
    vae_overrides: list[str] = field(default_factory=list)  # key=value VAEConfig fields (presets only)
    l1_weight: float = 1.0  # VAE objective (task=vae)
    mse_weight: float = 0.0
    ssim_weight: float = 0.2
    kl_weight: float = 1.0e-6
    # "module:factory" making a (recon, target) -> scalar loss module (your code)
    perceptual: str | None = None
    perceptual_weights: str | None = None  # safetensors file loaded into it (no code runs while loading)
    perceptual_weight: float = 0.0
    chroma_weight: float = 0.0  # MSE of the Cb/Cr colour differences (see losses.vae_loss)
    edge_weight: float = 0.0  # extra L1/MSE weight on pixels at edges of the target (see losses.edge_weights)
    vae_train: str = "all"  # all | decoder (the encoder and so the latent space stay fixed)
    # vae_train=decoder: a pipeline folder (or "default") whose denoiser re-draws a share of the encoded clips
    # from their captions (SDEdit) before the decoder sees them, so it learns to draw what a denoiser leaves
    redraw_pipeline: str | None = None
    redraw_fraction: float = 0.5  # share of the clips re-drawn
    # each re-drawn clip's SDEdit strength: uniform in [lo, hi]
    redraw_strength: list[float] = field(default_factory=lambda: [0.05, 0.4])
    logvar_init: float = -6.0  # bias of a fresh VAE's log-variance outputs (0 = std-1 posterior noise, slow)
    disc_weight: float = 0.0  # adversarial weight; 0 = no discriminator
    disc_start: int = 0  # optimizer step at which the discriminator starts
    disc_lr: float = 1.0e-4
    seed: int = 0
    steps: int = 1000  # optimizer steps
    max_minutes: float = 0.0  # wall-clock budget of the training steps (summed over resumes); 0 = none
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
    # denoiser: torch.compile each DiT block (fewer kernel launches; compiles on the first step)
    compile: bool = False
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the last step
    log_every: int = 1  # steps between metrics.jsonl rows
    resume: str | None = None  # "auto" (latest under output, if any) or a checkpoint folder
    device: str | None = None  # default: cuda if available
    progress: bool = True
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 per DiT block, then the root), under torchrun
    first_frame_dropout: float = 1.0  # image to video: P(the clean first latent frame is NOT given); 1 = off
    image_fraction: float = 0.0  # denoiser: P(a micro-batch keeps its first latent frame only); 0 = off
    text_cache: bool = False  # frozen text encoder (train_text_encoder=false): encode each caption once
    sample_every: int = 0  # steps between <output>/samples/step-XXXXXXX.gif (0 = none); EMA weights if kept
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle moves right"])  # denoiser
    sample_steps: int = 10  # sampler steps of a denoiser sample
    lora_rank: int = 0  # > 0: train LoRA adapters on the denoiser's blocks instead of its weights
    lora_alpha: float | None = None  # adapter scale alpha / rank; default alpha = rank
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "ffn"])  # see train.lora.add_lora


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
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    if cfg.vae_train not in ("all", "decoder"):
        raise ValueError(f"unknown vae_train {cfg.vae_train!r}; accepted: all, decoder")
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; accepted: {', '.join(TASKS)}")
    if cfg.data == "???":
        raise ValueError("no training data: set data=<folder of latent files> or data=shapes")
    if cfg.task == "vae" and cfg.data != "shapes" and not Path(cfg.data).exists():
        raise ValueError(f"task=vae trains on data=shapes or a folder of videos; {cfg.data!r} does not exist")
    mixed = 0 < (cfg.data_options or {}).get("image_fraction", 0) < 1
    if cfg.task == "vae" and cfg.data == "shapes" and mixed and cfg.batch_size > 1:
        raise ValueError(
            "data_options.image_fraction between 0 and 1 mixes one-frame and longer clips, which cannot share a "
            f"batch (batch_size={cfg.batch_size}); use batch_size=1, or image_fraction 0 or 1"
        )
    if cfg.num_workers < 0:
        raise ValueError(f"num_workers must be >= 0; got {cfg.num_workers}")
    if cfg.max_minutes < 0:
        raise ValueError(f"max_minutes must be >= 0 (0 = no time budget); got {cfg.max_minutes}")
    if cfg.parallel not in distributed.PARALLEL:
        raise ValueError(f"unknown parallel {cfg.parallel!r}; accepted: {', '.join(distributed.PARALLEL)}")
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
    if cfg.sample_every < 0 or cfg.sample_steps < 1:
        raise ValueError(
            f"need sample_every >= 0 and sample_steps >= 1; got {cfg.sample_every}, {cfg.sample_steps}"
        )
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1; got {getattr(cfg, name)}")
    if cfg.lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0 = no LoRA); got {cfg.lora_rank}")
    if cfg.lora_rank and cfg.task != "denoiser":
        raise ValueError("LoRA (lora_rank > 0) trains the denoiser; set task=denoiser or lora_rank=0")
    if not 0 <= cfg.first_frame_dropout <= 1:
        raise ValueError(f"first_frame_dropout must be in [0, 1]; got {cfg.first_frame_dropout}")
    if not 0 <= cfg.image_fraction <= 1:
        raise ValueError(f"image_fraction must be in [0, 1]; got {cfg.image_fraction}")
    if cfg.image_fraction and cfg.task != "denoiser":
        raise ValueError(
            "image_fraction trains the denoiser (task=denoiser) on first latent frames; a causal VAE already "
            "learns images from every clip's first frame, which it encodes on its own"
        )
    if cfg.compile and cfg.task != "denoiser":
        raise ValueError("compile=true compiles the denoiser's blocks; set task=denoiser or compile=false")
    if cfg.text_cache and cfg.train_text_encoder:
        raise ValueError("text_cache=true needs a frozen text encoder (train_text_encoder=false)")
    if not 0 <= cfg.caption_dropout <= 1:
        raise ValueError(f"caption_dropout must be in [0, 1]; got {cfg.caption_dropout}")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1); got {cfg.ema_decay}")
    if cfg.redraw_pipeline is not None:
        if cfg.task != "vae" or cfg.vae_train != "decoder":
            raise ValueError(
                "redraw_pipeline trains the decoder on re-drawn latents: set task=vae and vae_train=decoder"
            )
        strength = list(cfg.redraw_strength)
        if len(strength) != 2 or not 0 <= strength[0] <= strength[1] <= 1:
            raise ValueError(
                f"redraw_strength must be [lo, hi] with 0 <= lo <= hi <= 1; got {cfg.redraw_strength}"
            )
        if not 0 < cfg.redraw_fraction <= 1:
            raise ValueError(f"redraw_fraction must be in (0, 1]; got {cfg.redraw_fraction}")


def _load_perceptual(cfg: TrainConfig, device) -> torch.nn.Module:
    """The optional perceptual loss network: ``cfg.perceptual`` names a factory ("package.module:function")
    that builds it, ``cfg.perceptual_weights`` a safetensors file for its weights; it is frozen."""
    import importlib

    module_name, _, attr = cfg.perceptual.partition(":")
    if not attr:
        raise ValueError(f"perceptual must be 'module:factory'; got {cfg.perceptual!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import the perceptual network {cfg.perceptual!r}: {err}") from err
    net = factory()
    if cfg.perceptual_weights:
        from ..checkpoint import load_into

        load_into(net, load_file(cfg.perceptual_weights), what=f"perceptual network {cfg.perceptual_weights}")
    return net.to(device).eval().requires_grad_(False)


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped without writing a checkpoint of that state."""


def lr_factor(step: int, cfg: TrainConfig, time_used: float = 0.0) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warm-up, then constant or cosine.

    With ``max_minutes`` the cosine runs to whichever ends first: ``steps``, or the budget (``time_used`` is
    the fraction of it spent), so a run stopped by its budget has finished its schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = max((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps), time_used)
    progress = min(1.0, progress)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _LRLambda:
    """The LR schedule as a callable; checkpoints leave out what LambdaLR's state_dict keeps of it (the
    config), so ``state.pt`` stays loadable with ``weights_only=True``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.time_used = 0.0  # fraction of max_minutes spent (set by the trainer before each step)

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.cfg, self.time_used)


def dit_flops(config: DiTConfig, tokens: int, text_tokens: int) -> int:
    """FLOPs (2 per multiply-add) of one ``VideoDiT`` forward on one sample of ``tokens`` video tokens and
    ``text_tokens`` text tokens: every linear layer (2 x weights x the tokens it sees), the patch embedding,
    and attention (4 x L x L x dim per layer for self-attention, 4 x L x m x dim for cross-attention).
    Norms, rope and elementwise work are left out. Training costs about 3x this (forward + backward)."""
    d, f, L, m = config.dim, config.ffn_dim, tokens, text_tokens
    patch = math.prod(config.patch_size)
    total = 2 * L * config.in_channels * patch * d  # patch embedding
    total += 2 * m * (config.text_dim * d + d * d)  # text embedding MLP
    total += 2 * (config.freq_dim * d + d * d + d * 6 * d)  # time embedding and modulation (per sample)
    per_layer = 2 * L * 4 * d * d + 4 * L * L * d  # self-attention: q k v out, scores and values
    per_layer += 2 * L * 2 * d * d + 2 * m * 2 * d * d + 4 * L * m * d  # cross-attention
    per_layer += 2 * L * 2 * d * f  # feed-forward
    total += config.num_layers * per_layer
    total += 2 * L * d * config.out_channels * patch  # head
    return total


class _Forward(torch.nn.Module):
    """The trained models under one module whose forward is the trainer's (what DDP wraps and syncs)."""

    def __init__(self, models: dict[str, torch.nn.Module], fn):
        super().__init__()
        self.models = torch.nn.ModuleDict(models)
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class Trainer:
    """Training of a ``VideoDiT`` (flow matching; optionally with the built-in text encoder) on latent files,
    or of a ``CausalVAE`` on procedural clips (``config.task``)."""

    def __init__(self, config: TrainConfig):
        _check(config)
        self.config = cfg = config
        self.dist, self.device = distributed.setup(cfg.device)
        self.output = Path(cfg.output)
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.step = 0  # optimizer steps done
        self.elapsed = 0.0  # seconds spent in training steps, over resumes (max_minutes)
        self.epoch, self.batch_index = 0, 0  # data position: next batch to read
        self.last_checkpoint: Path | None = None
        self.losses: list[float] = []  # loss of each step this process ran
        self.disc = self.disc_optimizer = None
        self._flops: dict[tuple, float] = {}  # VAE training FLOPs per clip, by clip shape (counted once)
        self._text_tokens = 0
        self._text_cache: dict[str, torch.Tensor] = {}  # caption -> real tokens (n d), with text_cache
        self._rows, self._n, self._weight = [], 1, None  # the micro-batch's share of its global batch
        self._micro_gen: torch.Generator | None = None  # task=vae on videos: the batch's own generator
        if cfg.task == "vae":
            self._build_vae()
        else:
            self._build_denoiser()
        if cfg.compile:
            # per block: one graph serves every block; before FSDP wraps them (torchtitan's order)
            for block in self.dit.blocks:
                block.compile()
        self.fsdp = self.dist.enabled and cfg.parallel == "fsdp"
        if self.fsdp and cfg.lora_rank:
            raise ValueError("LoRA training under parallel=fsdp is not supported; use parallel=ddp")
        self._replicated = []  # FSDP: parameters kept whole on every rank, their gradients averaged here
        if self.fsdp:
            for name, m in self.models.items():
                if name == "text_encoder":  # small, and a batch's captions need not use every embedding
                    self._replicated += [p for p in m.parameters() if p.requires_grad]
                else:
                    distributed.wrap_fsdp(m)
        self.params = {
            f"{n}.{k}": p for n, m in self.models.items() for k, p in m.named_parameters() if p.requires_grad
        }
        self._forward_module = _Forward(self.models, self._forward)
        if self.dist.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # a batch's captions need not use every token embedding of the built-in text encoder
            unused = "text_encoder" in self.models
            self._forward_module = DistributedDataParallel(
                self._forward_module, device_ids=ids, find_unused_parameters=unused
            )
        # The fused update (one kernel on a GPU) rather than ~10 ops per parameter tensor: a small model's GPU
        # step is otherwise mostly kernel launches. Not under FSDP, where sharded and whole (text encoder)
        # parameters mix and torch picks the implementation.
        self._fused = self.device.type in ("cuda", "cpu") and not self.fsdp
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=self._fused or None,
        )
        self._lr_lambda = _LRLambda(cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.ema = (
            {k: p.detach().float().clone() for k, p in self.params.items()} if cfg.ema_decay > 0 else None
        )

    def _build_vae(self) -> None:
        cfg = self.config
        self.world = self.videos = self._loader = None
        if cfg.data == "shapes":
            self.world = ShapesWorld(**{"seed": cfg.seed, **cfg.data_options})
        else:  # a folder of videos (and images): buckets of clip shapes, this rank's share of the batches
            from .video_data import VideoBucketSampler, VideoFolderDataset

            opts = dict(cfg.data_options)
            for key in ("size",):
                if opts.get(key) is not None:
                    opts[key] = tuple(opts[key])
            if opts.get("buckets") is not None:
                opts["buckets"] = [tuple(b) for b in opts["buckets"]]
            self.videos = VideoFolderDataset(cfg.data, cfg.captions, seed=cfg.seed, **opts)
            if not len(self.videos):
                raise ValueError(f"no usable videos in {cfg.data}: {self.videos.summary()}")
            self.video_sampler = VideoBucketSampler(
                self.videos,
                cfg.batch_size,
                seed=cfg.seed,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if Path(cfg.vae).exists():
                self.vae = CausalVAE.from_pretrained(cfg.vae, device=self.device, dtype=torch.float32)
            else:
                vae_cfg = load_config(VAEConfig, "vae", cfg.vae, overrides=cfg.vae_overrides)
                self.vae = CausalVAE(vae_cfg).to(self.device)
                with torch.no_grad():  # start with little posterior noise; KL may raise it again
                    self.vae.quant_conv.bias[vae_cfg.latent_channels :] = cfg.logvar_init
            if cfg.disc_weight > 0:
                self.disc = PatchDiscriminator().to(self.device)
        self.perceptual = _load_perceptual(cfg, self.device) if cfg.perceptual else None
        if cfg.vae_train == "decoder":  # latents of this VAE stay valid (e.g. a denoiser trains on them)
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)
        self.redraw = self._redraw_pipeline() if cfg.redraw_pipeline is not None else None
        self.models = {"vae": self.vae}
        if self.disc is not None:
            self.disc_optimizer = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))

    def _redraw_pipeline(self):
        """``redraw_pipeline``'s denoiser and text encoder (frozen) around the VAE being trained. Its encoder must
        be the one the denoiser learnt on: the re-drawn latents would mean nothing otherwise."""
        from ..pipelines.video import VideoPipeline

        ref = VideoPipeline.from_pretrained(self.config.redraw_pipeline, device=self.device)
        theirs, ours = ref.vae.state_dict(), self.vae.state_dict()
        differ = [
            k
            for k in theirs
            if k.startswith(("encoder.", "quant_conv."))
            and (k not in ours or not torch.equal(theirs[k], ours[k]))
        ]
        stats = ("latents_mean", "latents_std")
        differ += [k for k in stats if getattr(ref.vae.config, k) != getattr(self.vae.config, k)]
        if differ:
            raise ValueError(
                f"redraw_pipeline {self.config.redraw_pipeline}: its VAE encodes differently from the trained VAE "
                f"({len(differ)} differences: {', '.join(differ[:5])}); its denoiser learnt on other latents"
            )
        ref.dit.requires_grad_(False).eval()
        ref.text_encoder.requires_grad_(False).eval()
        return VideoPipeline(self.vae, ref.dit, ref.text_encoder, ref.config)

    def _build_denoiser(self) -> None:
        cfg = self.config
        self.dataset = LatentDataset(cfg.data, cfg.captions, in_memory=cfg.data_in_memory)
        if not len(self.dataset):
            raise ValueError(f"no usable latent files in {cfg.data}: {self.dataset.summary()}")
        # every rank reads the same global batches (batch_size clips per rank) and takes its share
        self.sampler = BucketSampler(self.dataset, cfg.batch_size * self.dist.world_size, seed=cfg.seed)
        channels = self.dataset.items[0].shape[0]

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.text_encoder = load_text_encoder(
                cfg.text_encoder, device=self.device, overrides=cfg.text_overrides
            )
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
        if cfg.lora_rank:  # base weights frozen; the adapters' A and B train (B starts at zero)
            from .lora import add_lora

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 1)
                add_lora(self.dit, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets))
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

    # ----------------------------------------------------------------------------------------- data

    def _next_batch(self) -> tuple[torch.Tensor, list[str]]:
        """This rank's share of the next global batch; sets ``_rows`` (its positions in the global batch, for
        slicing the draws made for the whole of it), ``_n`` (the global batch size) and ``_weight``.

        Every rank reads the same global batch and takes the positions ``distributed.share`` gives it. A rank
        whose share is empty (a bucket's last, smaller batch) runs one clip with weight 0, so that every rank
        joins the gradient reduction.
        """
        rank, world = self.dist.rank, self.dist.world_size
        self._micro_gen = None
        if self.config.task == "vae" and self.videos is not None:
            return self._next_video_batch()
        if self.config.task == "vae":  # endless procedural clips: the data position is a clip counter
            n = self.config.batch_size * world
            start = self.batch_index * n
            self.batch_index += 1
            rows = list(share(n, rank, world))
            clips = [self.world.clip(start + j) for j in rows]
            self._rows, self._n, self._weight = rows, n, None
            return torch.stack([v for v, _ in clips]).to(self.device), [c for _, c in clips]
        while True:
            batches = self.sampler.epoch(self.epoch)
            if self.batch_index >= len(batches):
                self.epoch, self.batch_index = self.epoch + 1, 0
                continue
            idx = batches[self.batch_index]
            self.batch_index += 1
            latents, captions, rows = [], [], []
            for j in share(len(idx), rank, world):
                i = idx[j]
                try:
                    z, caption = self.dataset[i]
                except Exception as err:  # noqa: BLE001 - a file broken since the scan is reported, skipped
                    tqdm.write(f"skipping {self.dataset.items[i].path}: {type(err).__name__}: {err}")
                    continue
                latents.append(z)
                captions.append(caption)
                rows.append(j)
            if not self.dist.enabled:
                if latents:
                    self._rows, self._n, self._weight = list(range(len(rows))), len(rows), None
                    return torch.stack(latents).to(self.device), captions
                continue
            # ranks must agree on the batch: a share that is empty (or all broken) becomes a weight-0 clip
            self._n = len(idx)
            if not latents:
                latents, captions, rows = [torch.zeros(self.dataset.items[idx[0]].shape)], [""], [0]
                self._weight = torch.zeros(1)
            else:
                self._weight = torch.full((len(rows),), 1.0 / len(idx))
            self._rows = rows
            return torch.stack(latents).to(self.device), captions

    def _next_video_batch(self) -> tuple[torch.Tensor, list[str]]:
        """This rank's next batch of video clips (``VideoBucketSampler`` deals whole batches to ranks).

        The posterior noise comes from a generator seeded by (seed, epoch, batch, rank), so ranks draw
        different noise and a resumed run draws what the uninterrupted one did."""
        from .video_data import make_loader

        while True:
            if self._loader is None:
                self._loader = iter(
                    make_loader(
                        self.videos,
                        self.video_sampler,
                        self.epoch,
                        num_workers=self.config.num_workers,
                        start=self.batch_index,
                    )
                )
            batch = next(self._loader, None)
            if batch is None:
                self.epoch, self.batch_index, self._loader = self.epoch + 1, 0, None
                continue
            self.batch_index += 1
            videos, captions = batch
            seed = ((self.config.seed * 1_000_003 + self.epoch) * 1_000_003 + self.batch_index) * 1009
            self._micro_gen = torch.Generator().manual_seed((seed + self.dist.rank) % 2**63)
            world = self.dist.world_size
            if not len(videos):  # every clip of this rank's batch failed to load: join with weight 0
                videos, captions = torch.zeros(1, *videos.shape[1:]), [""]
                self._rows, self._n = [], world
            else:
                self._rows, self._n = list(range(len(videos))), len(videos) * world
            return videos.to(self.device), captions

    # ----------------------------------------------------------------------------------------- step

    def _vae_forward(
        self, video: torch.Tensor, captions: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, mean, logvar) of a clip batch, sampling the posterior with the trainer's RNG; with
        ``redraw_pipeline``, a share of the clips is decoded from latents re-drawn from their captions."""
        frozen = self.config.vae_train == "decoder"
        with torch.no_grad() if frozen else contextlib.nullcontext():
            moments = self.vae.encode_step(video, StreamCache())[0]
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        noise = self._draw(torch.randn, mean.shape).to(mean)
        z = mean + (0.5 * logvar).exp() * noise
        if self.redraw is not None:
            z = self._redrawn(z, mean, captions)
        return self.vae.decode_step(z, StreamCache())[0], mean, logvar

    @torch.no_grad()
    def _redrawn(self, z: torch.Tensor, mean: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """``z`` with each clip picked (``redraw_fraction``) replaced by its posterior mean edited (SDEdit, the
        pipeline's sampler settings) after its caption at a strength drawn from ``redraw_strength``."""
        cfg = self.config
        pick, level, seed = self._draw(torch.rand, (len(z), 3)).unbind(1)
        lo, hi = cfg.redraw_strength
        z = z.clone()
        with torch.autocast(self.device.type, enabled=False):  # sampled in fp32, as the pipeline samples
            for i in torch.nonzero(pick < cfg.redraw_fraction).flatten().tolist():
                start = self.vae.normalize(mean[i : i + 1].float())
                strength = lo + (hi - lo) * float(level[i])
                edited = self.redraw.edit_latents(
                    start, captions[i], strength, seed=int(seed[i] * 2**31), progress=False
                )
                z[i : i + 1] = self.vae.denormalize(edited).to(z.dtype)
        return z

    def _vae_micro_step(self, video: torch.Tensor, captions: list[str]) -> torch.Tensor:
        cfg = self.config
        use_bf16 = cfg.mixed_precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            recon, mean, logvar = self._forward_module(video, captions)
        recon, mean, logvar = recon.float(), mean.float(), logvar.float()
        loss, parts = vae_loss(
            recon,
            video,
            mean,
            logvar,
            l1_weight=cfg.l1_weight,
            mse_weight=cfg.mse_weight,
            ssim_weight=cfg.ssim_weight,
            kl_weight=cfg.kl_weight,
            edge_weight=cfg.edge_weight,
            chroma_weight=cfg.chroma_weight,
            perceptual=self.perceptual,
            perceptual_weight=cfg.perceptual_weight,
        )
        self._parts = parts
        if self.disc is not None and self.step >= cfg.disc_start:
            self.disc.requires_grad_(False)
            adv = -self.disc(recon).mean()
            loss = loss + cfg.disc_weight * adv
            self._parts["adv"] = float(adv.detach())
            self._fake = recon.detach()
        if self.dist.enabled or self._micro_gen is not None:  # this rank's part of the global batch mean
            share = len(self._rows) / self._n
            self._parts = {k: v * share for k, v in self._parts.items()}
            loss = loss * share
        return loss

    def _disc_step(self, real: torch.Tensor) -> float:
        """One discriminator update on the last micro-batch (hinge loss)."""
        self.disc.requires_grad_(True)
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss = hinge_d_loss(self.disc(real), self.disc(self._fake))
        loss.backward()
        if self.dist.enabled:  # the mean of the ranks' gradients
            for p in self.disc.parameters():
                if p.grad is not None:
                    distributed.all_reduce_(p.grad).div_(self.dist.world_size)
            loss = distributed.all_reduce_(loss.detach().clone()) / self.dist.world_size
        self.disc_optimizer.step()
        return float(loss.detach())

    def _micro_step(self, x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        if self.config.task == "vae":
            return self._vae_micro_step(x0, captions)
        cfg = self.config
        sample = lambda n, generator: sample_sigmas(  # noqa: E731
            n, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, generator=generator
        )
        sigma = self._draw(sample, ())
        sigma = shift_sigmas(sigma, cfg.shift) if cfg.shift != 1.0 else sigma
        noise = self._draw(torch.randn, x0.shape).to(self.device)
        drop = (self._draw(torch.rand, ()) < cfg.caption_dropout).tolist()
        captions = ["" if d else c for c, d in zip(captions, drop)]
        sigma = sigma.to(self.device)
        x_sigma = add_noise(x0, noise, sigma)
        target = velocity_target(x0, noise)
        weight = None  # (b 1 t 1 1) loss weights when first frames are given
        if cfg.first_frame_dropout < 1:  # drawn only when on, so runs without it keep their draws
            given = (self._draw(torch.rand, ()) >= cfg.first_frame_dropout).to(self.device)
            given &= x0.shape[2] > 1  # an image has no frame after the first to learn
            first = torch.zeros(1, 1, x0.shape[2], 1, 1, dtype=torch.bool, device=self.device)
            first[:, :, 0] = True
            keep = given.view(-1, 1, 1, 1, 1) & first  # the clean first frame (sigma 0 there), not learned
            x_sigma = torch.where(keep, x0, x_sigma)
            weight = (~keep).float()
        use_bf16 = cfg.mixed_precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = self._forward_module(x_sigma, sigma, captions)
        if weight is None and not self.dist.enabled:
            return flow_loss(pred, target)
        sq = (pred.float() - target.float()).square()
        if weight is None:
            per_sample = sq.flatten(1).mean(dim=1)
        else:  # the mean over the frames in the loss
            per_sample = (sq * weight).flatten(1).sum(1) / weight.expand_as(sq).flatten(1).sum(1)
        if not self.dist.enabled:
            return per_sample.mean()
        return (per_sample * self._weight.to(per_sample.device)).sum()  # this rank's part of the global mean

    def _draw(self, fn, shape) -> torch.Tensor:
        """``fn(size, generator=...)`` drawn for the whole global batch (``(_n, *shape[1:])``) from the shared
        generator, sliced to this rank's rows: each clip gets what a single process would draw for it."""
        if self._micro_gen is not None:  # per-batch generator: this rank's clips only
            return fn(tuple(shape) if len(shape) else len(self._rows), generator=self._micro_gen)
        full = fn((self._n, *tuple(shape)[1:]) if len(shape) else self._n, generator=self.generator)
        return full[self._rows] if self.dist.enabled else full

    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``text_encoder.encode``; with ``text_cache``, each distinct caption is encoded once and its real
        tokens are kept, then batches are zero-padded to their longest caption with mask False."""
        if not self.config.text_cache:
            return self.text_encoder.encode(captions)
        for c in dict.fromkeys(captions):
            if c not in self._text_cache:
                with torch.no_grad():
                    tokens, mask = self.text_encoder.encode([c])
                self._text_cache[c] = tokens[0][mask[0]].float()
        rows = [self._text_cache[c] for c in captions]
        n = max(r.shape[0] for r in rows)
        context = torch.zeros(len(rows), n, rows[0].shape[1], device=rows[0].device)
        mask = torch.zeros(len(rows), n, dtype=torch.bool, device=rows[0].device)
        for i, r in enumerate(rows):
            context[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
        return context, mask

    def _forward(self, *args):
        """The trained models' forward (what DDP wraps): ``(video, captions)`` -> VAE (reconstruction, mean, logvar);
        ``(x_sigma, sigma, captions)`` -> the denoiser's velocity."""
        if self.config.task == "vae":
            return self._vae_forward(*args)
        x_sigma, sigma, captions = args
        context, mask = self._encode_text(captions)
        self._text_tokens = int(mask.sum(1).max()) if mask is not None else context.shape[1]
        return self.dit(x_sigma, sigma, context, mask)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        groups: dict[bool, tuple[list, list]] = {}  # one multi-tensor op per kind (FSDP shards or whole)
        for k, p in self.params.items():
            if p.dtype != torch.float32:  # parameters kept in another dtype: averaged in fp32
                self.ema[k].lerp_(p.detach().float(), 1 - decay)
                continue
            ema, live = groups.setdefault(isinstance(p, DTensor), ([], []))
            ema.append(self.ema[k])
            live.append(p)
        for ema, live in groups.values():
            torch._foreach_lerp_(ema, live, 1 - decay)

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics.

        Raises ``NonFiniteLossError`` (before touching the weights) when a loss or the gradient norm is NaN/inf.
        """
        cfg = self.config
        started = time.perf_counter()
        for m in self.models.values():
            m.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens, flops, parts = 0.0, 0, 0.0, {}
        pt, ph, pw = self.dit.config.patch_size if cfg.task == "denoiser" else (1, 1, 1)
        world = self.dist.world_size
        for k in range(cfg.grad_accum):
            x0, captions = self._next_batch()
            if cfg.image_fraction and torch.rand((), generator=self.generator) < cfg.image_fraction:
                # one-frame training (text to image) from video latents: a causal VAE encodes a clip's first
                # frame exactly as it encodes that frame alone, so latent frame 0 is the image's latent. Drawn
                # from the shared generator: every rank makes the same choice. Only when on: other runs keep
                # their draws.
                x0 = x0[:, :, :1]
            last = k == cfg.grad_accum - 1
            no_sync = getattr(self._forward_module, "no_sync", None)  # DDP: reduce once per step
            # the VAE's FLOPs are counted (forward + backward) once per clip shape
            key = tuple(x0.shape[1:])
            counter = FlopCounterMode(display=False) if cfg.task == "vae" and key not in self._flops else None
            with (
                contextlib.nullcontext() if last or no_sync is None else no_sync(),
                counter or contextlib.nullcontext(),
            ):
                loss = self._micro_step(x0, captions)
                value = distributed.all_reduce_(loss.detach().clone())  # the global batch's loss
                if not torch.isfinite(value):
                    where = self.last_checkpoint or "none written yet"
                    raise NonFiniteLossError(
                        f"loss is {value.item()} at step {self.step + 1}; stopped without saving. "
                        f"Last good checkpoint: {where}. Lower lr, check the data, or disable bf16."
                    )
                (loss * world / cfg.grad_accum).backward()  # DDP/FSDP average over ranks
            total += value.item() / cfg.grad_accum
            _, _, t, h, w = x0.shape
            sample_tokens = (t // pt) * (h // ph) * (w // pw)  # the VAE counts pixels
            tokens += self._n * sample_tokens
            if counter is not None:
                self._flops[key] = counter.get_total_flops() / x0.shape[0]
            if cfg.task == "vae":
                flops += self._n * self._flops[key]
            else:
                flops += self._n * 3 * dit_flops(self.dit.config, sample_tokens, self._text_tokens)
            for name, v in getattr(self, "_parts", {}).items():
                parts[name] = parts.get(name, 0.0) + v / cfg.grad_accum
        for p in self._replicated:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            distributed.all_reduce_(p.grad).div_(world)
        if self.dist.enabled and parts:
            names = sorted(parts)
            summed = distributed.all_reduce_(torch.tensor([parts[n] for n in names], dtype=torch.float64))
            parts = dict(zip(names, summed.tolist()))
        params = list(self.params.values())
        if self.fsdp:
            grad_norm = self._clip_fsdp(params)
        elif cfg.grad_clip > 0:
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
        self.elapsed += time.perf_counter() - started
        if cfg.max_minutes:  # the next step's lr follows the time spent so far
            self._lr_lambda.time_used = self._time_used()
        self.scheduler.step()
        if self.disc is not None and self.step >= cfg.disc_start:
            parts["disc"] = self._disc_step(x0)
        self.step += 1
        self._update_ema()
        self.losses.append(total)
        metrics = {
            "step": self.step,
            "loss": total,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "flops": flops,
        }
        return {**metrics, **parts}

    def _time_used(self) -> float:
        """The fraction of ``max_minutes`` spent (0 without a budget): the ranks' largest, so all agree."""
        if not self.config.max_minutes:
            return 0.0
        spent = self.elapsed
        if self.dist.enabled:  # a collective per step only where there are ranks to agree
            spent = distributed.all_reduce_(torch.tensor([spent], device=self.device), op="max").item()
        return spent / (60 * self.config.max_minutes)

    @property
    def finished(self) -> bool:
        """Whether the run is over: all ``steps`` done, or its ``max_minutes`` spent."""
        return self.step >= self.config.steps or self._lr_lambda.time_used >= 1

    def _clip_fsdp(self, params: list[torch.Tensor]) -> float:
        """Global gradient norm (and clipping, like ``clip_grad_norm_``) over sharded and replicated grads."""
        replicated = {id(p) for p in self._replicated}
        norms = []
        for group in ([p for p in params if id(p) not in replicated], self._replicated):
            grads = [p.grad for p in group if p.grad is not None]
            if grads:
                norms.append(distributed.full_tensor(torch.nn.utils.get_total_norm(grads)).float())
        total = torch.stack(norms).square().sum().sqrt()
        if self.config.grad_clip > 0:
            coef = (self.config.grad_clip / (total + 1e-6)).clamp(max=1.0).item()
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return total.item()

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

        With LoRA (``lora_rank > 0``) the adapter goes to ``folder/lora.safetensors`` in diffusers' layout
        (``load_lora`` and diffusers' ``load_lora_weights`` read it) and ``folder/dit`` holds the base model
        only when ``config.dit`` is a preset (a folder base is where it was); merge for inference with
        ``load_lora`` + ``merge_lora``.
        """
        folder = Path(folder)
        with self.ema_weights() if ema and self.ema is not None else contextlib.nullcontext():
            models = self._plain_models()  # FSDP: a collective, every rank calls export
            if self.dist.main:
                if self.config.task == "vae" and self.config.vae_train == "all":  # frozen encoder: stats kept
                    self.calibrate_latents(vae=models["vae"])
                for name, model in models.items():
                    if name == "dit" and self.config.lora_rank:
                        self._export_lora(folder)
                        continue
                    model.save_pretrained(folder / name)
                if self.config.task == "denoiser" and "text_encoder" not in self.models:
                    self.text_encoder.save_pretrained(folder / "text_encoder")
        distributed.barrier()
        return folder

    def _export_lora(self, folder: Path) -> None:
        from .lora import remove_lora, save_lora

        save_lora(self.dit, folder / "lora.safetensors", layout="diffusers")
        if not Path(self.config.dit).exists():  # a preset's base weights exist only in this run
            import copy

            remove_lora(copy.deepcopy(self.dit), merge=False).save_pretrained(folder / "dit")

    @torch.no_grad()
    def write_sample(self) -> Path | None:
        """Write ``<output>/samples/step-XXXXXXX.gif`` (atomically) with the EMA weights where kept: for the
        VAE, a held-out clip and its reconstruction side by side; for the denoiser, a short generation per
        ``sample_prompts`` entry (side by side), decoded by ``config.vae`` when its latent channels match the
        denoiser's (else nothing is written). Draws from no training RNG. Returns the file, or None."""
        if self.fsdp:
            if not getattr(self, "_warned_sample", False):
                warnings.warn("sample_every is not supported under parallel=fsdp; no samples", stacklevel=2)
                self._warned_sample = True
            return None
        cfg = self.config
        path = self.output / "samples" / f"step-{self.step:07d}.gif"
        with self.ema_weights() if self.ema is not None else contextlib.nullcontext():
            if cfg.task == "vae":
                video = next(self._eval_clips(1, "heldout", 10_000))[None].to(self.device)
                self.vae.eval()
                recon = self.vae.decode(self.vae.encode(video).mode()).float()
                out = torch.cat([video, recon], dim=-1)[0]
            else:
                vae = self._sample_vae()
                if vae is None:
                    return None
                from ..diffusion.sampling import denoise

                self.dit.eval()
                context, mask = self._encode_text(list(cfg.sample_prompts))
                shape = (len(cfg.sample_prompts), *self.dataset.items[0].shape)
                gen = torch.Generator().manual_seed(cfg.seed)
                z = denoise(
                    self.dit,
                    shape,
                    context,
                    mask,
                    sampler="euler",
                    steps=cfg.sample_steps,
                    shift=cfg.shift,
                    generator=gen,
                    progress=False,
                )
                out = torch.cat(list(vae.decode(vae.denormalize(z)).float()), dim=-1)
        from ..data.io import write_video

        return write_video(path, out.cpu(), fps=8)

    def _sample_vae(self) -> CausalVAE | None:
        """``config.vae`` for decoding denoiser samples (loaded once), or None (with one warning) when it does
        not load or its latent channels differ from the denoiser's."""
        if not hasattr(self, "_decoder"):
            self._decoder = None
            try:
                from ..pipelines.encode import load_vae

                with torch.random.fork_rng(devices=[]):  # a preset's random init leaves the global RNG alone
                    vae = load_vae(self.config.vae, device=self.device)[0].eval()
            except Exception as err:  # noqa: BLE001 - samples are optional; training goes on
                warnings.warn(f"no samples: vae={self.config.vae!r} does not load ({err})", stacklevel=2)
                return None
            channels = self.dit.config.in_channels
            if vae.config.latent_channels != channels:
                warnings.warn(
                    f"no samples: vae={self.config.vae!r} has {vae.config.latent_channels} latent channels, "
                    f"the denoiser {channels}",
                    stacklevel=2,
                )
                return None
            self._decoder = vae
        return self._decoder

    def _plain_models(self) -> dict[str, torch.nn.Module]:
        """The trained models, unsharded: under FSDP, fresh copies (on rank 0; None elsewhere) holding the
        gathered weights; else the models themselves."""
        if not self.fsdp:
            return self.models
        out = {}
        for name, model in self.models.items():
            state = {k: distributed.full_tensor(v).cpu() for k, v in model.state_dict().items()}
            if not self.dist.main:
                continue
            cfg = self.config
            if name == "vae":
                copy = CausalVAE(model.config)
            elif name == "dit":
                copy = VideoDiT(model.config)
            else:
                copy = load_text_encoder(cfg.text_encoder, device="cpu", overrides=cfg.text_overrides)
            copy.load_state_dict(state)
            out[name] = copy.to(self.device)
        return out

    @torch.no_grad()
    def evaluate(self, levels: int = 8, max_clips: int = 8, seed: int = 0, ema: bool = False) -> float:
        """Flow loss at fixed noise: ``levels`` evenly spread sigmas, seeded noise, the first ``max_clips`` clips
        with their captions. Deterministic, and it draws from no training RNG. ``ema=True`` scores the EMA
        weights (see ``ema_weights``).
        """
        if ema:
            with self.ema_weights():
                return self.evaluate(levels, max_clips, seed)
        if self.config.task == "vae":
            return self.evaluate_vae(max_clips)
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

    @torch.no_grad()
    def calibrate_latents(
        self, clips: int = 64, vae: CausalVAE | None = None
    ) -> tuple[list[float], list[float]]:
        """Set the VAE's (or ``vae``'s) ``latents_mean``/``latents_std`` to the per-channel statistics of the
        posterior mode over ``clips`` training-split clips, so a denoiser sees unit-scale latents; returns them."""
        vae = self.vae if vae is None else vae
        vae.eval()
        z = torch.cat(
            [
                vae.encode(video[None].to(self.device)).mode()[0].flatten(1).double()
                for video in self._eval_clips(clips, None, 20_000)
            ],
            dim=1,
        )
        mean, std = z.mean(1).tolist(), z.std(1).clamp_min(1e-6).tolist()
        vae.config.latents_mean, vae.config.latents_std = mean, std
        return mean, std

    @torch.no_grad()
    def evaluate_vae(self, clips: int = 8, split: str = "heldout") -> float:
        """Mean PSNR (dB) of the VAE's reconstruction (posterior mode, clamped) of ``clips`` clips of the
        shapes world's ``split`` at the training size, drawn with a seed no training batch uses."""
        self.vae.eval()
        scores = []
        for video in self._eval_clips(clips, split, 10_000):
            video = video[None].to(self.device)
            recon = self.vae.decode(self.vae.encode(video).mode())
            scores.append(min(psnr(recon.float(), video, data_range=2.0), 100.0))
        return sum(scores) / len(scores)

    def _eval_clips(self, clips: int, split: str | None, offset: int):
        """Clips for evaluation and calibration: the shapes world's ``split`` (None: the training one) at a
        seed no training batch uses, or (videos) the first ``clips`` clips of the folder as epoch 0 cuts them."""
        if self.videos is not None:
            for i in range(min(clips, len(self.videos))):
                yield self.videos[i][0]
            return
        opts = {**self.config.data_options, "seed": offset + self.config.seed}
        world = ShapesWorld(**(opts if split is None else {**opts, "split": split}))
        for i in range(clips):
            yield world.clip(i)[0]

    # ----------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-XXXXXXX/`` atomically file by file, then point ``checkpoints/latest`` at it."""
        folder = self.output / "checkpoints" / f"step-{self.step:07d}"
        full = distributed.full_tensor  # FSDP: every rank gathers, rank 0 alone writes
        weights = {k: full(p.detach()).cpu().contiguous() for k, p in self.params.items()}
        ema = {k: full(v).cpu().contiguous() for k, v in self.ema.items()} if self.ema is not None else None
        optimizer = self._optimizer_state()
        if not self.dist.main:
            distributed.barrier()
            self.last_checkpoint = folder
            return folder
        atomic_write(folder / "model.safetensors", lambda tmp: save_file(weights, tmp))
        if ema is not None:
            atomic_write(folder / "ema.safetensors", lambda tmp: save_file(ema, tmp))
        if self.disc is not None:
            disc = {k: v.detach().cpu().contiguous() for k, v in self.disc.state_dict().items()}
            atomic_write(folder / "disc.safetensors", lambda tmp: save_file(disc, tmp))
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "elapsed": self.elapsed,
            "optimizer": optimizer,
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        if self.disc_optimizer is not None:
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        atomic_write(folder / "state.pt", lambda tmp: torch.save(state, tmp))
        yaml = OmegaConf.to_yaml(OmegaConf.structured(self.config))
        atomic_write(folder / "config.yaml", lambda tmp: Path(tmp).write_text(yaml))
        atomic_write(
            self.output / "checkpoints" / "latest", lambda tmp: Path(tmp).write_text(folder.name + "\n")
        )
        self.last_checkpoint = folder
        distributed.barrier()  # the other ranks wait until the checkpoint is complete
        return folder

    def _optimizer_state(self) -> dict:
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(torch.nn.ModuleDict(self.models), self.optimizer, options=opts)

    def _load_optimizer_state(self, state: dict) -> None:
        if not self.fsdp:
            self.optimizer.load_state_dict(state)
            # the saved groups bring back the implementation they were saved with: this run's choice wins
            for group in self.optimizer.param_groups:
                group["fused"], group["foreach"] = self._fused or None, None
            if self._fused:  # fused AdamW counts its steps in fp32 on each parameter's device
                for p, st in self.optimizer.state.items():
                    if "step" in st:
                        st["step"] = st["step"].to(p.device, torch.float32)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(torch.nn.ModuleDict(self.models), self.optimizer, state, options=opts)

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
                p.copy_(_like(weights[k], p))
        if self.ema is not None:
            ema_file = folder / "ema.safetensors"
            src = load_file(ema_file) if ema_file.is_file() else weights
            self.ema = {k: _like(src[k].float(), p).clone() for k, p in self.params.items()}
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        self._load_optimizer_state(state["optimizer"])
        if self.disc is not None and (folder / "disc.safetensors").is_file():
            self.disc.load_state_dict(load_file(folder / "disc.safetensors"))
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        self.elapsed = float(state.get("elapsed", 0.0))  # checkpoints from before max_minutes have none
        self._lr_lambda.time_used = self._time_used()
        self._loader = None  # task=vae on videos: the loader restarts at the restored position
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
        if self.dist.main and metrics.is_file():  # drop rows the interrupted run logged after this checkpoint
            rows = [r for r in metrics.read_text().splitlines() if r and json.loads(r)["step"] <= self.step]
            atomic_write(metrics, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))

    def train(self, until: int | None = None) -> list[float]:
        """Run (resuming if ``config.resume`` says so) to ``config.steps`` (or until ``max_minutes`` of
        training steps are spent), or stop after step ``until``.

        Returns the losses of the steps this call ran. Writes metrics.jsonl rows and checkpoints, and at the
        last step the trained models (EMA weights where kept) to ``<output>/final`` (see ``export``).
        """
        cfg = self.config
        self._resume()
        stop = cfg.steps if until is None else min(until, cfg.steps)
        main = self.dist.main  # rank 0 alone writes metrics, checkpoints and the export
        if main:
            self.output.mkdir(parents=True, exist_ok=True)
        start = len(self.losses)
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (cfg.progress and main),
            desc="train",
            dynamic_ncols=True,
        )
        with open(self.output / "metrics.jsonl", "a") if main else contextlib.nullcontext() as log:
            while self.step < stop and not self.finished:
                t0 = time.perf_counter()
                m = self.train_step()
                seconds = max(time.perf_counter() - t0, 1e-9)
                last = self.finished
                m["tokens_per_s"] = m.pop("tokens") / seconds
                m["tflop_s"] = m.pop("flops") / seconds / 1e12  # model FLOPs, all ranks together
                if log is not None and (self.step % cfg.log_every == 0 or last):
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                bar.update(1)
                extra = {"psnr": f"{m['psnr']:.2f}"} if "psnr" in m else {}
                bar.set_postfix(
                    loss=f"{m['loss']:.4f}",
                    tok_s=f"{m['tokens_per_s']:.0f}",
                    tflop_s=f"{m['tflop_s']:.3g}",
                    lr=f"{m['lr']:.2e}",
                    **extra,
                )
                if self.step % cfg.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and main:
                    self.write_sample()
        bar.close()
        if self.finished:
            self.export(self.output / "final")
        return self.losses[start:]


def _like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t`` (a full tensor) placed like ``p``: on its device, sharded like it when it is a DTensor."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
    return t.to(p.device)


def train(config: TrainConfig, until: int | None = None) -> Trainer:
    """Build a ``Trainer`` for ``config``, run it (see ``Trainer.train``) and return it."""
    trainer = Trainer(config)
    trainer.train(until)
    return trainer
