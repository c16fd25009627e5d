"""``task: vae``: a ``CausalVAE`` learns to reconstruct clips (L1 + SSIM + KL, optional perceptual, chroma
and edge terms, and a patch discriminator after ``disc_start`` steps); ``latent_noise`` decodes latents with
white noise added, as a denoiser leaves them.

``data: shapes`` draws endless clips from the procedural shapes world (``data_options`` are ``ShapesWorld``
arguments; the data position is a clip counter); a folder of videos is read by ``VideoBucketSampler``, each
rank its share of every global batch, with posterior noise drawn for the whole batch from the batch's own
seeded generator and sliced, so N ranks compute what one process does (clips that fail to load included: the
mean divides by the clips all ranks read).
``vae_train: decoder`` keeps the encoder (and so the latent space) fixed; with ``redraw_pipeline`` a share
of the encoded clips is re-drawn from its caption by that pipeline's denoiser (SDEdit) before the decoder
sees it, so the decoder learns to draw what a denoiser leaves.

Letters: b batch, c channels, t frames, h height, w width.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...config import VAEConfig, load_config
from ...config.train import TrainConfig
from ...data.shapes import ShapesWorld
from ...metrics import psnr
from ...models.vae import CausalVAE, StreamCache
from ...pipelines.batch import ChannelStats, add_clip, first_and_later
from .. import distributed
from ..distributed import Dist, share
from ..losses import PatchDiscriminator, hinge_d_loss, vae_loss
from . import register
from .base import Batch, Draws, Loss, Position, Task

__all__ = ["ClipBatch", "VAETask", "load_perceptual"]


def load_perceptual(cfg: TrainConfig, device) -> torch.nn.Module:
    """The optional perceptual loss network: ``cfg.perceptual`` names a factory ("package.module:function")
    that builds it, ``cfg.perceptual_weights`` a safetensors file for its weights; it is frozen."""
    module_name, _, attr = cfg.perceptual.partition(":")
    if not attr:
        raise ValueError(f"perceptual must be 'module:factory'; got {cfg.perceptual!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import the perceptual network {cfg.perceptual!r}: {err}") from err
    net = factory()
    if cfg.perceptual_weights:
        from ...checkpoint import load_into

        load_into(net, load_file(cfg.perceptual_weights), what=f"perceptual network {cfg.perceptual_weights}")
    return net.to(device).eval().requires_grad_(False)


@dataclass
class ClipBatch(Batch):
    """This rank's clips of a global batch of videos; ``used``: how many clips all ranks read of it (what the
    batch's mean divides by; 0 for a rank's weight-0 stand-in clip)."""

    used: int = 0


class _VideoBatches:
    """The folder's batches, this rank's share of each global batch of ``batch_size * ranks`` clips, read by a
    DataLoader that restarts wherever the position says."""

    def __init__(self, cfg: TrainConfig, dist: Dist):
        from ..video_data import VideoBucketSampler, folder_dataset

        self.videos = folder_dataset(cfg)
        if not len(self.videos):
            raise ValueError(f"no usable videos in {cfg.data}: {self.videos.summary()}")
        self.sampler = VideoBucketSampler(self.videos, cfg.batch_size * dist.world_size, seed=cfg.seed,
                                          rank=dist.rank, world_size=dist.world_size, split="clips")  # fmt: skip
        self.num_workers = cfg.num_workers
        self.loader, self.at = None, None  # the open loader and the position its next batch has
        self.batches: tuple[int, list[list[int]]] | None = None  # (epoch, its global batches)

    def next(self, position: Position) -> tuple[torch.Tensor, list[str], list[int], int]:
        """The batch at ``position`` (advanced past it; to the next epoch when this one is done): this rank's
        clips that loaded, their captions, their positions in the global batch, and the global batch's size."""
        from ..video_data import make_loader

        while True:
            if self.loader is None or self.at != (position.epoch, position.batch_index):
                self.loader = iter(make_loader(self.videos, self.sampler, position.epoch, indices=True,
                                               num_workers=self.num_workers, start=position.batch_index))  # fmt: skip
            batch = next(self.loader, None)
            if batch is None:
                position.epoch, position.batch_index, self.loader = position.epoch + 1, 0, None
                continue
            if self.batches is None or self.batches[0] != position.epoch:
                self.batches = position.epoch, self.sampler.global_batches(position.epoch)
            whole = self.batches[1][position.batch_index]
            position.batch_index += 1
            self.at = (position.epoch, position.batch_index)
            videos, captions, indices = batch
            mine = self.sampler.in_share(whole)
            keep = [k for k, i in enumerate(indices) if whole.index(i) in mine]  # not a weight-0 stand-in
            rows = [whole.index(indices[k]) for k in keep]
            return videos[keep], [captions[k] for k in keep], rows, len(whole)


@register
class VAETask(Task):
    """A ``CausalVAE`` (``cfg.vae``: a preset, fresh, or a folder) on the shapes world or a folder of videos."""

    name = "vae"
    count_flops = True

    @staticmethod
    def check(cfg: TrainConfig) -> None:
        if cfg.data != "shapes" and not Path(cfg.data).exists():
            raise ValueError(
                f"task=vae trains on data=shapes or a folder of videos; {cfg.data!r} does not exist"
            )
        mixed = 0 < (cfg.data_options or {}).get("image_fraction", 0) < 1
        if cfg.data == "shapes" and mixed and cfg.batch_size > 1:
            raise ValueError(
                "data_options.image_fraction between 0 and 1 mixes one-frame and longer clips, which cannot share "
                f"a batch (batch_size={cfg.batch_size}); use batch_size=1, or image_fraction 0 or 1"
            )
        if cfg.lora_rank:
            raise ValueError("LoRA (lora_rank > 0) trains the denoiser; set task=denoiser or lora_rank=0")
        if cfg.image_fraction:
            raise ValueError(
                "image_fraction trains the denoiser (task=denoiser) on first latent frames; a causal VAE already "
                "learns images from every clip's first frame, which it encodes on its own"
            )
        if cfg.compile:
            raise ValueError(
                "compile=true compiles the denoiser's blocks; set task=denoiser or compile=false"
            )
        if cfg.redraw_pipeline is not None:
            _check_redraw(cfg)
        if not cfg.latent_noise >= 0:
            raise ValueError(
                f"latent_noise must be >= 0 (a std in normalized latents; 0 = off); got {cfg.latent_noise}"
            )

    def __init__(self, cfg: TrainConfig, device: torch.device, dist: Dist):
        self.cfg, self.device, self.dist = cfg, device, dist
        self.world = ShapesWorld(**{"seed": cfg.seed, **cfg.data_options}) if cfg.data == "shapes" else None
        self.video_batches = _VideoBatches(cfg, dist) if self.world is None else None
        self.videos = None if self.video_batches is None else self.video_batches.videos
        opts = cfg.data_options or {}  # one-frame clips (images) leave the temporal layers unused
        if self.videos is not None:
            self.find_unused = any(f == 1 for f, _, _ in self.videos.buckets())
        else:
            self.find_unused = opts.get("frames") == 1 or opts.get("image_fraction", 0) > 0
        self.vae, self.disc = self._build_models()
        self.disc_optimizer = None
        if self.disc is not None:
            self.disc_optimizer = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
        self.perceptual = load_perceptual(cfg, device) if cfg.perceptual else None
        if cfg.vae_train == "decoder":  # latents of this VAE stay valid (e.g. a denoiser trains on them)
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)
        self.redraw = self._redraw_pipeline() if cfg.redraw_pipeline is not None else None
        self.models = {"vae": self.vae}

    def _build_models(self) -> tuple[CausalVAE, PatchDiscriminator | None]:
        """The VAE (a fresh preset starts with little posterior noise: ``logvar_init``) and the discriminator."""
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if Path(cfg.vae).exists():
                vae = CausalVAE.from_pretrained(
                    cfg.vae, device=self.device, dtype=torch.float32, overrides=cfg.vae_overrides
                )
            else:
                vae_cfg = load_config(VAEConfig, "vae", cfg.vae, overrides=cfg.vae_overrides)
                vae = CausalVAE(vae_cfg).to(self.device)
                with torch.no_grad():  # KL may raise the posterior noise again
                    vae.quant_conv.bias[vae_cfg.latent_channels :] = cfg.logvar_init
            disc = PatchDiscriminator().to(self.device) if cfg.disc_weight > 0 else None
        return vae, disc

    def _redraw_pipeline(self):
        """``redraw_pipeline``'s denoiser and text encoder (frozen) around the VAE being trained. Its encoder must
        be the one the denoiser learnt on: the re-drawn latents would mean nothing otherwise."""
        from ...pipelines.video import VideoPipeline

        ref = VideoPipeline.from_pretrained(self.cfg.redraw_pipeline, device=self.device)
        theirs, ours = ref.vae.state_dict(), self.vae.state_dict()
        differ = [
            k
            for k in theirs
            if k.startswith(("encoder.", "quant_conv."))
            and (k not in ours or not torch.equal(theirs[k], ours[k]))
        ]
        differ += [
            k
            for k in ("latents_mean", "latents_std")
            if getattr(ref.vae.config, k) != getattr(self.vae.config, k)
        ]
        if differ:
            raise ValueError(
                f"redraw_pipeline {self.cfg.redraw_pipeline}: its VAE encodes differently from the trained VAE "
                f"({len(differ)} differences: {', '.join(differ[:5])}); its denoiser learnt on other latents"
            )
        ref.dit.requires_grad_(False).eval()
        ref.text_encoder.requires_grad_(False).eval()
        return VideoPipeline(self.vae, ref.dit, ref.text_encoder, ref.config)

    # ----------------------------------------------------------------------------------------- data

    def next_batch(self, position: Position, generator: torch.Generator) -> Batch:
        """Shapes: this rank's share of the next ``batch_size * ranks`` clips (draws from the shared generator,
        sliced). Videos: this rank's share of the next global batch, its posterior noise drawn for the whole batch
        from a generator seeded by (seed, epoch, batch) and sliced, so ranks draw what one process draws and a
        resumed run what the uninterrupted one did. A rank with no clip (its share empty or failed to load) runs
        a zero clip with weight 0; a batch no rank could read is skipped."""
        rank, world = self.dist.rank, self.dist.world_size
        if self.video_batches is None:  # endless procedural clips: the data position is a clip counter
            n = self.cfg.batch_size * world
            start = position.batch_index * n
            position.batch_index += 1
            rows = list(share(n, rank, world))
            clips = [self.world.clip(start + j) for j in rows]
            draws = Draws(generator, rows, n, sliced=self.dist.enabled)
            return Batch(torch.stack([v for v, _ in clips]).to(self.device), [c for _, c in clips], draws)
        while True:
            videos, captions, rows, n = self.video_batches.next(position)
            used = int(distributed.all_reduce_(torch.tensor([len(rows)], device=self.device)).item())
            if used:
                break
        seed = ((self.cfg.seed * 1_000_003 + position.epoch) * 1_000_003 + position.batch_index) * 1009
        generator = torch.Generator().manual_seed(seed % 2**63)
        if not rows:  # nothing of this rank's share loaded: a zero clip with weight 0 (used = 0)
            videos, captions, rows, used = torch.zeros(1, *videos.shape[1:]), [""], [0], 0
        return ClipBatch(videos.to(self.device), captions, Draws(generator, rows, n, sliced=True), used)

    # ----------------------------------------------------------------------------------------- step

    def forward(self, video: torch.Tensor, captions: list[str], draws: Draws):
        """(reconstruction, mean, logvar) of a clip batch, sampling the posterior with ``draws``; with
        ``redraw_pipeline``, a share of the clips is decoded from latents re-drawn from their captions."""
        frozen = self.cfg.vae_train == "decoder"
        with torch.no_grad() if frozen else contextlib.nullcontext():
            moments = self.vae.encode_step(video, StreamCache())[0]
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        noise = draws(torch.randn, mean.shape).to(mean)
        z = mean + (0.5 * logvar).exp() * noise
        if self.redraw is not None:
            z = self._redrawn(z, mean, captions, draws)
        if self.cfg.latent_noise:
            z = self._noised(z, draws)
        return self.vae.decode_step(z, StreamCache())[0], mean, logvar

    def _noised(self, z: torch.Tensor, draws: Draws) -> torch.Tensor:
        """``z`` with white noise added in the normalized latents, each clip's std drawn in [0, latent_noise]."""
        level = draws(torch.rand, (len(z),)).to(z) * self.cfg.latent_noise
        noise = draws(torch.randn, z.shape).to(z)
        return self.vae.denormalize(self.vae.normalize(z) + level.view(-1, 1, 1, 1, 1) * noise)

    @torch.no_grad()
    def _redrawn(
        self, z: torch.Tensor, mean: torch.Tensor, captions: list[str], draws: Draws
    ) -> torch.Tensor:
        """``z`` with each clip picked (``redraw_fraction``) replaced by its posterior mean edited (SDEdit, the
        pipeline's sampler settings) after its caption at a strength drawn from ``redraw_strength``."""
        cfg = self.cfg
        pick, level, seed = draws(torch.rand, (len(z), 3)).unbind(1)
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

    def loss(self, batch: Batch, forward: Callable, step: int) -> Loss:
        """The VAE objective of the micro-batch (plus the adversarial term from ``disc_start`` on): this
        rank's part of the global batch's mean."""
        cfg, video = self.cfg, batch.x
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            recon, mean, logvar = forward(video, batch.captions, batch.draws)
        recon, mean, logvar = recon.float(), mean.float(), logvar.float()
        loss, parts = vae_loss(
            recon, video, mean, logvar, l1_weight=cfg.l1_weight, mse_weight=cfg.mse_weight,
            ssim_weight=cfg.ssim_weight, kl_weight=cfg.kl_weight, edge_weight=cfg.edge_weight,
            chroma_weight=cfg.chroma_weight, perceptual=self.perceptual, perceptual_weight=cfg.perceptual_weight,
        )  # fmt: skip
        fake = None
        if self.disc is not None and step >= cfg.disc_start:
            self.disc.requires_grad_(False)
            adv = -self.disc(recon).mean()
            loss = loss + cfg.disc_weight * adv
            parts["adv"] = float(adv.detach())
            fake = recon.detach()
        part = None  # this rank's part of the global batch mean
        if isinstance(batch, ClipBatch):  # of the clips all ranks read
            part = len(batch.draws.rows) / batch.used if batch.used else 0.0
        elif self.dist.enabled:
            part = len(batch.draws.rows) / batch.n
        if part is not None:
            parts = {k: v * part for k, v in parts.items()}
            loss = loss * part
        _, _, t, h, w = video.shape
        return Loss(loss, parts, tokens=batch.n * t * h * w, output=fake)  # the VAE counts pixels

    def after_step(self, batch: Batch, loss: Loss, step: int) -> dict[str, float]:
        """One discriminator update (hinge loss) on the last micro-batch's clips and reconstructions."""
        if self.disc is None or step < self.cfg.disc_start:
            return {}
        self.disc.requires_grad_(True)
        self.disc_optimizer.zero_grad(set_to_none=True)
        d_loss = hinge_d_loss(self.disc(batch.x), self.disc(loss.output))
        d_loss.backward()
        if self.dist.enabled:  # the mean of the ranks' gradients
            for p in self.disc.parameters():
                if p.grad is not None:
                    distributed.all_reduce_(p.grad).div_(self.dist.world_size)
            d_loss = distributed.all_reduce_(d_loss.detach().clone()) / self.dist.world_size
        self.disc_optimizer.step()
        return {"disc": float(d_loss.detach())}

    def extra_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        if self.disc is None:
            return {}, {}
        disc = {k: v.detach().cpu().contiguous() for k, v in self.disc.state_dict().items()}
        return {"disc.safetensors": disc}, {"disc_optimizer": self.disc_optimizer.state_dict()}

    def load_extra_state(self, folder: Path, state: dict) -> None:
        if self.disc is not None and (folder / "disc.safetensors").is_file():
            self.disc.load_state_dict(load_file(folder / "disc.safetensors"))
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])

    # ----------------------------------------------------------------------------------------- results

    @torch.no_grad()
    def evaluate(self, clips: int = 8, split: str = "heldout") -> float:
        """Mean PSNR (dB) of the VAE's reconstruction (posterior mode, clamped) of ``clips`` clips of the
        shapes world's ``split`` at the training size, drawn with a seed no training batch uses."""
        self.vae.eval()
        scores = []
        for video in self._eval_clips(clips, split, 10_000):
            video = video[None].to(self.device)
            recon = self.vae.decode(self.vae.encode(video).mode())
            scores.append(min(psnr(recon.float(), video, data_range=2.0), 100.0))
        return sum(scores) / len(scores)

    @torch.no_grad()
    def calibrate_latents(
        self, clips: int = 64, vae: CausalVAE | None = None
    ) -> tuple[list[float], list[float]]:
        """Set the VAE's (or ``vae``'s) ``latents_mean``/``latents_std`` to the per-channel statistics of the
        posterior mode over ``clips`` training-split clips, so a denoiser sees unit-scale latents; returns them.
        A VAE whose config has ``first_latents_mean`` / ``first_latents_std`` gets those of frame 0 alone, and
        ``latents_mean`` / ``latents_std`` of the later frames (of every frame when no clip has a later one).
        Accumulated clip by clip in float64 with the population standard deviation, as ``latent_stats``."""
        vae = self.vae if vae is None else vae
        vae.eval()
        parts = ("first", "later") if vae.config.first_latents_mean is not None else ("all",)
        stats = {part: ChannelStats() for part in parts}
        for video in self._eval_clips(clips, None, 20_000):
            add_clip(stats, vae.encode(video[None].to(self.device)).mode()[0])

        def listed(acc: ChannelStats) -> tuple[list[float], list[float]]:
            return acc.mean.tolist(), acc.std.clamp_min(1e-6).tolist()

        if "first" in stats:
            first, later = first_and_later(stats)
            vae.config.first_latents_mean, vae.config.first_latents_std = listed(first)
        else:
            later = stats["all"]
        mean, std = listed(later)
        vae.config.latents_mean, vae.config.latents_std = mean, std
        return mean, std

    def _eval_clips(self, clips: int, split: str | None, offset: int):
        """Clips for evaluation and calibration: the shapes world's ``split`` (None: the training one) at a
        seed no training batch uses, or (videos) the first ``clips`` clips of the folder as epoch 0 cuts them."""
        if self.videos is not None:
            for i in range(min(clips, len(self.videos))):
                yield self.videos[i][0]
            return
        opts = {**self.cfg.data_options, "seed": offset + self.cfg.seed}
        world = ShapesWorld(**(opts if split is None else {**opts, "split": split}))
        for i in range(clips):
            yield world.clip(i)[0]

    @torch.no_grad()
    def sample(self, seed: int) -> torch.Tensor:
        """A held-out clip and its reconstruction side by side."""
        video = next(self._eval_clips(1, "heldout", 10_000))[None].to(self.device)
        self.vae.eval()
        recon = self.vae.decode(self.vae.encode(video).mode()).float()
        return torch.cat([video, recon], dim=-1)[0]

    def unsharded(self, name: str) -> torch.nn.Module:
        return CausalVAE(self.vae.config)

    def export(self, folder: Path, models: dict[str, torch.nn.Module]) -> None:
        """``folder/vae``; a VAE whose encoder trained gets latent statistics calibrated on training clips."""
        if self.cfg.vae_train == "all":  # a frozen encoder keeps its statistics
            self.calibrate_latents(vae=models["vae"])
        models["vae"].save_pretrained(folder / "vae")


def _check_redraw(cfg: TrainConfig) -> None:
    if cfg.vae_train != "decoder":
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
