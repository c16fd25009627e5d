"""``task: control``: a control branch (VACE's, ``models.control.ControlBranch``) learns to steer a frozen
denoiser with control videos.

The pipeline ``cfg.pipeline`` (a folder, ``"default"`` or a preset) gives the denoiser, the text encoder and
the VAE; all three stay frozen and only the branch trains (``models = {"control": branch}``, so the loop's
optimizer, EMA and checkpoints hold its parameters alone). Its hints go after the denoiser blocks
``cfg.control_layers`` (default every second, as VACE); ``control_init: copy`` starts block j of the branch
as the denoiser's block j (the hint projections stay zero either way, so step 0 is the plain denoiser).

Data (``train.control_data``): ``data: shapes`` draws clips of the shapes world with the control
``cfg.control_transform`` makes of each (silhouette, edges); a folder of videos brings its own control
videos in ``cfg.controls`` beside the clips (clips without one are listed and skipped). Each micro-batch's
clips are encoded by the frozen VAE (posterior mode, normalized) and their controls into VACE's control
latents (``pipelines.control.control_latents``: no mask, no reference; the clips and controls in one
VAE batch); a world of ``length`` clips keeps
each encoding in memory. The loss is flow matching of ``ControlledDiT``'s velocity, with the sigmas, noise
and caption dropout drawn as the denoiser task draws them (``Draws``), so ranks compute what one process
would and a resumed run what an uninterrupted one did.

``final/`` is a pipeline folder: the frozen pipeline and the trained branch in ``control/``.

Letters: b batch, c latent channels, t latent frames, h height, w width, j hints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config.control import control_config_for
from ...config.train import TrainConfig
from ...data.controls import control_transform
from ...diffusion.flow import add_noise, flow_loss, velocity_target
from ...models.control import ControlBranch, ControlledDiT
from ...pipelines.control import check_control_video, encode, fold_mask
from ..control_data import FolderControls, WorldControls
from ..distributed import Dist, all_reduce_, share
from . import register
from .base import Batch, Draws, Loss, Position, Task, draw_sigmas, drop_captions
from .denoiser import TextCache, dit_flops

__all__ = ["CONTROL_INITS", "ControlBatch", "ControlTask"]

CONTROL_INITS = ("zero", "copy")


@dataclass
class ControlBatch(Batch):
    """Clean latents ``x`` of this rank's share with their control latents ``control`` (b, 2c + p*q, t, h, w)."""

    control: torch.Tensor | None = None


@register
class ControlTask(Task):
    """A ``ControlBranch`` beside the frozen denoiser of ``cfg.pipeline``, on clips and their controls."""

    name = "control"

    @staticmethod
    def check(cfg: TrainConfig) -> None:
        if cfg.pipeline is None:
            raise ValueError(
                "task=control trains a control branch for a frozen pipeline: set pipeline=<folder>, "
                "pipeline=default or pipeline=tiny"
            )
        if cfg.data != "shapes" and not Path(cfg.data).exists():
            raise ValueError(
                f"task=control trains on data=shapes or a folder of videos with a {cfg.controls}/ folder of "
                f"control videos beside them; {cfg.data!r} does not exist"
            )
        if cfg.control_init not in CONTROL_INITS and not Path(str(cfg.control_init)).is_dir():
            raise ValueError(
                f"unknown control_init {cfg.control_init!r}; accepted: {', '.join(CONTROL_INITS)} or the folder of "
                "a trained branch to carry on (ControlBranch.save_pretrained's, or a pipeline folder with control/)"
            )
        control_transform(cfg.control_transform)  # names the accepted transforms
        others = {
            "lora_rank": cfg.lora_rank,
            "image_fraction": cfg.image_fraction,
            "compile": cfg.compile,
            "redraw_pipeline": cfg.redraw_pipeline,
            "first_frame_dropout < 1": cfg.first_frame_dropout < 1,
        }
        if any(others.values()):
            raise ValueError(
                f"{', '.join(k for k, v in others.items() if v)}: not for task=control (the denoiser is frozen)"
            )

    def __init__(self, cfg: TrainConfig, device: torch.device, dist: Dist):
        from ...pipelines.video import VideoPipeline

        self.cfg, self.device, self.dist = cfg, device, dist
        if dist.enabled and cfg.parallel == "fsdp":
            raise ValueError("task=control runs under parallel=ddp; a branch is small enough to keep whole")
        with torch.random.fork_rng(devices=[]):  # a preset's random weights leave the global RNG alone
            self.pipe = VideoPipeline.from_pretrained(cfg.pipeline, device=device, dtype=torch.float32)
        for model in (self.pipe.dit, self.pipe.text_encoder, self.pipe.vae):
            model.requires_grad_(False).eval()
        self.vae, self.dit = self.pipe.vae, self.pipe.dit
        self.world = WorldControls(cfg) if cfg.data == "shapes" else None
        self.folder = FolderControls(cfg, dist) if self.world is None else None
        self.branch = self._build_branch()
        self.model = ControlledDiT(self.dit, self.branch)
        self.models = {"control": self.branch}
        self.text = TextCache(self.pipe.text_encoder)
        self.encoded: dict = {}  # world clip -> (latents, control latents) on the CPU, for a finite world
        self.blank: dict = {}  # clip shape -> (inactive latents, folded mask) of a control without a mask

    def _build_branch(self) -> ControlBranch:
        """A fresh branch fitting the denoiser (seeded by ``cfg.seed``), its blocks copied with ``copy``; or, with
        ``control_init`` a folder, that trained branch carried on (its hints must sit after ``control_layers``)."""
        cfg, vae = self.cfg, self.vae
        channels = 2 * vae.config.latent_channels + vae.spatial_factor**2
        config = control_config_for(self.dit.config, cfg.control_layers, in_channels=channels)
        config.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.control_init not in CONTROL_INITS:
            folder = Path(cfg.control_init)
            folder = folder / "control" if (folder / "control" / "config.json").is_file() else folder
            branch = ControlBranch.from_pretrained(
                folder, dtype=torch.float32, overrides={"gradient_checkpointing": cfg.gradient_checkpointing}
            )
            theirs, ours = vars(branch.config), vars(config)
            wrong = [f"{k}: {theirs.get(k)!r} (want {v!r})" for k, v in ours.items() if theirs.get(k) != v]
            if wrong:
                raise ValueError(
                    f"control_init {cfg.control_init}: the branch does not fit this denoiser and control_layers: "
                    + "; ".join(wrong)
                )
            ControlledDiT(self.dit, branch)
            return branch.to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            branch = ControlBranch(config)
        if cfg.control_init == "copy":
            for j, block in enumerate(branch.blocks):
                block.block.load_state_dict(self.dit.blocks[j].state_dict())
        ControlledDiT(self.dit, branch)  # ValueError when the layers do not fit the denoiser
        return branch.to(self.device)

    # ----------------------------------------------------------------------------------------- data

    @torch.no_grad()
    def _encode(
        self, clips: list[torch.Tensor], controls: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips and their controls (each (3, t, h, w)) -> (latents (b c t h w), control latents) fp32: what
        ``control_latents`` makes without a mask, the clips and controls encoded in one VAE batch and the
        all-black inactive half once per clip shape."""
        b = len(clips)
        video = torch.stack([*clips, *controls]).to(self.device)
        check_control_video(video, self.vae.temporal_factor, self.vae.spatial_factor)
        z, reactive = encode(self.vae, video).split(b)
        shape = tuple(video.shape[1:])
        if shape not in self.blank:  # no mask: the whole control is reactive, nothing kept
            inactive = encode(self.vae, torch.zeros(1, *shape, device=self.device))
            ones = torch.ones(1, 1, *shape[1:], device=self.device)
            self.blank[shape] = inactive, fold_mask(ones, z.shape[2], self.vae.spatial_factor)
        inactive, folded = self.blank[shape]
        control = torch.cat([inactive.expand_as(reactive), reactive, folded.expand(b, -1, -1, -1, -1)], dim=1)
        return z, control

    def _world_pairs(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The encodings and captions of world clips ``indices`` (a finite world's from memory when there)."""
        todo = [i for i in indices if self.world.key(i) not in self.encoded]
        read = {i: self.world.read(i) for i in todo}
        fresh = {}
        if todo:
            z, c = self._encode([read[i][0] for i in todo], [read[i][1] for i in todo])
            fresh = {i: (z[k], c[k]) for k, i in enumerate(todo)}
            if self.world.key(todo[0]) is not None:
                for i in todo:
                    self.encoded[self.world.key(i)] = (fresh[i][0].cpu(), fresh[i][1].cpu())
        pairs = [fresh.get(i) or self.encoded[self.world.key(i)] for i in indices]
        captions = [read[i][2] if i in read else self.world.world.scene(i).caption for i in indices]
        z = torch.stack([p[0] for p in pairs]).to(self.device)
        return z, torch.stack([p[1] for p in pairs]).to(self.device), captions

    def next_batch(self, position: Position, generator: torch.Generator) -> ControlBatch:
        """Shapes: this rank's share of the next ``batch_size * ranks`` clips (draws from the shared generator,
        sliced). A folder: this rank's next batch, its draws from a generator seeded by (seed, epoch, batch,
        rank), so a resumed run draws what the uninterrupted one did."""
        rank, world = self.dist.rank, self.dist.world_size
        if self.world is not None:  # endless procedural clips: the data position is a clip counter
            n = self.cfg.batch_size * world
            start = position.batch_index * n
            position.batch_index += 1
            rows = list(share(n, rank, world))
            z, control, captions = self._world_pairs([start + j for j in rows])
            return ControlBatch(z, captions, Draws(generator, rows, n, sliced=self.dist.enabled), control)
        indices, epoch = self.folder.next(position)
        seed = ((self.cfg.seed * 1_000_003 + epoch) * 1_000_003 + position.batch_index) * 1009
        own = torch.Generator().manual_seed((seed + rank) % 2**63)
        read = [r for r in (self.folder.read(i, epoch) for i in indices) if r is not None]
        used = int(all_reduce_(torch.tensor([len(read)], device=self.device)).item())  # the mean's divisor
        if not read:  # every clip of this rank's batch failed to read: join with weight 0
            clip, control, _ = next(self.folder.read(i, 0) for i in range(len(self.folder)))
            z, c = self._encode([clip], [control])
            return ControlBatch(z, [""], Draws(own, [], world, own=True), c)
        z, c = self._encode([r[0] for r in read], [r[1] for r in read])
        draws = Draws(own, list(range(len(read))), used, own=True)
        return ControlBatch(z, [r[2] for r in read], draws, c)

    # ----------------------------------------------------------------------------------------- step

    def forward(self, x_sigma: torch.Tensor, sigma: torch.Tensor, captions: list[str], control: torch.Tensor):
        """(the controlled denoiser's velocity, the largest real text token count of the batch)."""
        context, mask = self.text.encode(captions)
        return self.model(x_sigma, sigma, context, mask, control=control), int(mask.sum(1).max())

    def loss(self, batch: ControlBatch, forward: Callable, step: int) -> Loss:
        """Flow matching of the controlled velocity: this rank's part of the global batch's mean."""
        cfg, x0, draws = self.cfg, batch.x, batch.draws
        sigma = draw_sigmas(cfg, draws).to(self.device)
        noise = draws(torch.randn, x0.shape).to(self.device)
        captions = drop_captions(batch.captions, draws, cfg.caption_dropout, cfg.caption_word_dropout)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            pred, text_tokens = forward(add_noise(x0, noise, sigma), sigma, captions, batch.control)
        value = flow_loss(pred, velocity_target(x0, noise))
        if self.dist.enabled or draws.own:  # this rank's part of the global batch mean
            value = value * (len(draws.rows) / batch.n)
        pt, ph, pw = self.dit.config.patch_size
        _, _, t, h, w = x0.shape
        tokens = (t // pt) * (h // ph) * (w // pw)
        # the denoiser's forward and backward, and the branch's share of its blocks again (an estimate)
        share_of_blocks = 1 + len(self.branch.config.layers) / self.dit.config.num_layers
        flops = batch.n * 3 * dit_flops(self.dit.config, tokens, text_tokens) * share_of_blocks
        return Loss(value, tokens=batch.n * tokens, flops=flops)

    # ----------------------------------------------------------------------------------------- results

    def _preview(self, count: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
        """The first ``count`` training clips, their controls and captions (clips, controls (3, t, h, w))."""
        if self.world is not None:
            read = [self.world.read(i) for i in range(count)]
        else:
            read = [r for r in (self.folder.read(i, 0) for i in range(min(count, len(self.folder)))) if r]
        return [r[0] for r in read], [r[1] for r in read], [r[2] for r in read]

    @torch.no_grad()
    def evaluate(self, levels: int = 8, max_clips: int = 4, seed: int = 0) -> float:
        """Flow loss of the controlled denoiser at fixed noise: ``levels`` evenly spread sigmas, seeded noise,
        the first ``max_clips`` training clips with their controls and captions. Draws from no training RNG."""
        gen = torch.Generator().manual_seed(seed)
        sigma = ((torch.arange(levels, dtype=torch.float32) + 0.5) / levels).to(self.device)
        self.branch.eval()
        clips, controls, captions = self._preview(max_clips)
        losses = []
        for clip, control, caption in zip(clips, controls, captions):
            z, c = self._encode([clip], [control])
            x0, c = z.expand(levels, *z.shape[1:]), c.expand(levels, *c.shape[1:])
            noise = torch.randn(x0.shape, generator=gen).to(self.device)
            context, mask = self.text.encode([caption] * levels)
            pred = self.model(add_noise(x0, noise, sigma), sigma, context, mask, control=c)
            losses.append(flow_loss(pred, velocity_target(x0, noise)).item())
        return sum(losses) / len(losses)

    @torch.no_grad()
    def sample(self, seed: int) -> torch.Tensor | None:
        """The first training clip's control beside a generation from it and its caption (``sample_steps``
        Euler steps)."""
        from ...pipelines.control import sample_control

        self.branch.eval()
        _, controls, captions = self._preview(1)
        if not controls:
            return None
        context, mask = self.text.encode(captions)
        control = controls[0][None].to(self.device)
        video = sample_control(self.vae, self.model, context, mask, control=control, sampler="euler",
                               steps=self.cfg.sample_steps, shift=self.cfg.shift,
                               generator=torch.Generator().manual_seed(seed), progress=False)  # fmt: skip
        return torch.cat([control[0].float(), video[0]], dim=-1)

    def unsharded(self, name: str) -> torch.nn.Module:
        return ControlBranch(self.branch.config)

    def export(self, folder: Path, models: dict[str, torch.nn.Module]) -> None:
        """``folder`` as a pipeline folder: the frozen pipeline with the trained branch in ``control/``
        (``VideoPipeline.save_pretrained``; ``VideoPipeline.from_pretrained(folder).control(...)`` runs it)."""
        from ...pipelines.video import VideoPipeline

        p = self.pipe
        VideoPipeline(
            p.vae, p.dit, p.text_encoder, p.config, p.image_encoder, control_branch=models["control"]
        ).save_pretrained(folder)
