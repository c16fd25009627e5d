"""``task: denoiser``: a ``VideoDiT`` (and the built-in text encoder) learns flow matching on latent files.

Each micro-batch draws sigmas (logit-normal or uniform, then shifted), noise and caption dropout for the
whole global batch from the run's generator (``Draws``), so N ranks compute what one process would.
``lora_rank > 0`` trains LoRA adapters on the blocks (the export writes ``lora.safetensors``);
``first_frame_dropout < 1`` trains image-to-video conditioning (the clean first latent frame is given and
left out of the loss); ``image_fraction > 0`` trains that share of micro-batches on their first latent
frame alone (one-frame generation); ``first_frame_weight`` weighs a clip's first latent frame in its loss,
``content_weight`` the positions that hold content (``content_weights``);
``text_cache`` encodes each caption once with a frozen encoder;
``text_new_words`` gives the trained built-in encoder the captions' words outside its vocabulary.

Letters: b batch, c channels, t latent frames, h height, w width, n text tokens, d width.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...checkpoint import atomic_write
from ...config import DiTConfig, config_to_dict, list_presets, load_config
from ...config.pipeline import PipelineConfig
from ...config.train import TrainConfig
from ...diffusion.flow import add_noise, flow_loss, velocity_target
from ...models.dit import VideoDiT
from ...models.text import BuiltinTextEncoder, TextEncoder, load_text_encoder
from ...models.vae import CausalVAE
from ..cache import PipelineParts, prepare_cache
from ..data import BucketSampler, LatentDataset
from ..distributed import Dist, all_reduce_, share
from . import register
from .base import Batch, Draws, Loss, Position, Task, draw_sigmas, drop_captions

__all__ = ["DenoiserTask", "LatentBatch", "TextCache", "content_weights", "dit_flops", "save_diffusers_dit"]


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


@dataclass
class LatentBatch(Batch):
    """Clean latents ``x`` of this rank's share; ``weight``: each clip's weight in the global batch's mean
    under ranks (None in one process: the plain mean)."""

    weight: torch.Tensor | None = None
    items: list[int] = field(default_factory=list)  # the dataset indices of the clips in x
    condition: torch.Tensor | None = None  # an image-conditioned denoiser's (b c t h w) first-frame latents
    image: torch.Tensor | None = None  # and the first frames' CLIP tokens (b i d)


class TextCache:
    """A frozen text encoder's real tokens per distinct caption (each encoded once); batches are zero-padded
    to their longest caption with mask False."""

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder
        self.tokens: dict[str, torch.Tensor] = {}  # caption -> (n d)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for c in dict.fromkeys(captions):
            if c not in self.tokens:
                with torch.no_grad():
                    tokens, mask = self.encoder.encode([c])
                self.tokens[c] = tokens[0][mask[0]].float()
        rows = [self.tokens[c] for c in captions]
        n = max(r.shape[0] for r in rows)
        context = torch.zeros(len(rows), n, rows[0].shape[1], device=rows[0].device)
        mask = torch.zeros(len(rows), n, dtype=torch.bool, device=rows[0].device)
        for i, r in enumerate(rows):
            context[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
        return context, mask


# content_weights: a position this many times its frame's mean distance gets the full weight
CONTENT_CAP = 4.0


def content_weights(x0: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-position loss weights (b, 1, t, h, w) of clean latents ``x0`` (b, c, t, h, w): ``1 + strength *
    min(r / CONTENT_CAP, 1)``, ``r`` being a position's squared distance (summed over channels) from its frame's
    per-channel median over the frame's mean such distance. Objects over a flat background, a few positions of
    a frame, then weigh up to ``1 + strength`` times the background, faint ones (a colour the VAE encodes
    weakly) as much as bright ones, since each frame is measured against itself. A frame that is all alike
    (no distance anywhere) weighs 1 everywhere."""
    x = x0.float()
    median = x.flatten(3).median(dim=3).values[..., None, None]
    dist = (x - median).square().sum(1, keepdim=True)
    mean = dist.mean(dim=(3, 4), keepdim=True)
    ratio = torch.where(mean > 0, dist / mean.clamp_min(1e-12), torch.zeros_like(dist))
    return 1.0 + strength * (ratio / CONTENT_CAP).clamp(max=1.0)


@register
class DenoiserTask(Task):
    """Flow matching of a ``VideoDiT`` on latent files (``cfg.data``), captions from ``cfg.captions``."""

    name = "denoiser"
    sparse = ("text_encoder",)  # a batch's captions need not use every token embedding

    @staticmethod
    def check(cfg: TrainConfig) -> None:
        if cfg.redraw_pipeline is not None:
            raise ValueError(
                "redraw_pipeline trains the decoder on re-drawn latents: set task=vae and vae_train=decoder"
            )
        if cfg.pipeline is not None:
            from ..cache import is_clip_folder

            if not is_clip_folder(cfg.data):
                raise ValueError(
                    f"pipeline={cfg.pipeline} fine-tunes on a folder of captioned clips (videos or images); "
                    f"data={cfg.data} holds none"
                )

    def __init__(self, cfg: TrainConfig, device: torch.device, dist: Dist):
        self.cfg, self.device, self.dist = cfg, device, dist
        # fine-tuning a pipeline folder: latents and text embeddings come from the disk cache (train.cache)
        self.parts = PipelineParts.of(cfg.pipeline) if cfg.pipeline else None
        self.plan = prepare_cache(cfg, self.parts, dist, device) if self.parts else None
        data, captions = (self.plan.latents, self.plan.captions) if self.plan else (cfg.data, cfg.captions)
        self.dataset = LatentDataset(data, captions, in_memory=cfg.data_in_memory)
        if not len(self.dataset):
            raise ValueError(f"no usable latent files in {data}: {self.dataset.summary()}")
        # every rank reads the same global batches (batch_size clips per rank) and takes its share
        self.sampler = BucketSampler(self.dataset, cfg.batch_size * dist.world_size, seed=cfg.seed)
        self.text_encoder, self.dit = self._build_models(self.dataset.items[0].shape[0])
        self.i2v = self.dit.config.image_dim is not None  # Wan 2.1 I2V: first-frame conditioning, cached
        if self.i2v and (cfg.image_fraction or cfg.first_frame_dropout < 1 or self.parts is None):
            raise ValueError(
                "an image-conditioned denoiser (Wan I2V) fine-tunes from pipeline= on clips (its conditioning is "
                "cached), without image_fraction or first_frame_dropout (it is always given the first frame)"
            )
        if self.i2v and self.dit.config.image_pos_len is not None:
            raise ValueError("fine-tuning Wan's first-last-frame model (FLF2V) is not supported; I2V is")
        self.mask_channels = self.dit.config.in_channels - 2 * self.dit.config.out_channels
        if dist.enabled and cfg.parallel == "fsdp" and cfg.lora_rank:
            raise ValueError("LoRA training under parallel=fsdp is not supported; use parallel=ddp")
        self.models = {"dit": self.dit}
        if self.text_encoder is None:  # fine-tuning a pipeline: its text embeddings are cached
            pass
        elif cfg.train_text_encoder:
            if not any(p.requires_grad for p in self.text_encoder.parameters()):
                raise ValueError("train_text_encoder=true but the text encoder has no trainable parameters")
            self.models["text_encoder"] = self.text_encoder
            if cfg.text_new_words:  # before the loop makes the optimizer: the word embedding grows
                self._add_caption_words()
        else:
            self.text_encoder.requires_grad_(False).eval()
        self._text_cache = TextCache(self.text_encoder) if cfg.text_cache and self.text_encoder else None
        self.sample_vae = self._load_sample_vae() if cfg.sample_every and dist.main else None

    def _build_models(self, channels: int) -> tuple[TextEncoder, VideoDiT]:
        """The text encoder and the denoiser (a preset's fresh weights seeded by ``cfg.seed``), with LoRA
        adapters and compiled blocks as the config says."""
        cfg, text_encoder = self.cfg, None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if self.parts is None:  # a pipeline's text encoder stays on disk: its embeddings are cached
                text_encoder = load_text_encoder(
                    cfg.text_encoder, device=self.device, overrides=cfg.text_overrides
                )
            if self.parts is not None:
                dit = VideoDiT.from_pretrained(self.parts.dit, device=self.device, dtype=torch.float32)
            elif Path(cfg.dit).exists():
                dit = VideoDiT.from_pretrained(cfg.dit, device=self.device, dtype=torch.float32)
            else:
                sizes = [
                    f"in_channels={channels}",
                    f"out_channels={channels}",
                    f"text_dim={text_encoder.dim}",
                ]
                dit_cfg = load_config(DiTConfig, "dit", cfg.dit, overrides=[*sizes, *cfg.dit_overrides])
                dit = VideoDiT(dit_cfg).to(self.device)
        dit.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.lora_rank:  # base weights frozen; the adapters' A and B train (B starts at zero)
            from ..lora import add_lora

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 1)
                add_lora(dit, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets))
        if dit.config.out_channels != channels or (
            dit.config.image_dim is None and dit.config.in_channels != channels
        ):
            raise ValueError(
                f"the latents have {channels} channels; the denoiser takes {dit.config.in_channels}"
            )
        if (
            cfg.compile
        ):  # per block: one graph serves every block; before FSDP wraps them (torchtitan's order)
            for block in dit.blocks:
                block.compile()
        return text_encoder, dit

    def _add_caption_words(self) -> None:
        """``text_new_words``: the training captions' words outside the built-in encoder's vocabulary join it,
        in order of first use (the same on every rank, and on resume from the same captions)."""
        enc = self.text_encoder
        if not isinstance(enc, BuiltinTextEncoder):
            raise ValueError(
                f"text_new_words=true grows a built-in text encoder's vocabulary; text_encoder={self.cfg.text_encoder}"
                f" is a {type(enc).__name__}, whose tokenizer reads every word"
            )
        added = enc.add_words(item.caption for item in self.dataset.items)
        if self.dist.main:
            shown = ", ".join(added[:50]) + (f", ... ({len(added) - 50} more)" if len(added) > 50 else "")
            tqdm.write(
                f"text_new_words: the text encoder learns {len(added)} new word(s) from the captions: {shown}"
                if added
                else "text_new_words: the captions hold no word outside the text encoder's vocabulary"
            )

    def extra_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        if not self.cfg.text_new_words:
            return {}, {}
        return {}, {"text_vocab": list(self.text_encoder.config.vocab)}

    def check_extra_state(self, folder: Path, state: dict) -> None:
        saved = state.get("text_vocab")
        if not self.cfg.text_new_words or saved is None:
            return
        now = self.text_encoder.config.vocab
        if saved != now:
            gone, new = [w for w in saved if w not in now], [w for w in now if w not in saved]
            raise ValueError(
                f"{folder}: the checkpoint's text vocabulary ({len(saved)} words) is not the one this run made "
                f"from its captions ({len(now)}): the captions changed since (only in the checkpoint: "
                f"{', '.join(gone[:20]) or 'none'}; only now: {', '.join(new[:20]) or 'none'})"
            )

    # ----------------------------------------------------------------------------------------- data

    def next_batch(self, position: Position, generator: torch.Generator) -> LatentBatch:
        """This rank's share of the next global batch of the bucket sampler's epoch.

        Every rank reads the same global batch and takes the positions ``distributed.share`` gives it; a rank
        whose share is empty (a bucket's last, smaller batch) or all broken runs one clip with weight 0, so
        that every rank joins the gradient reduction. With ``image_fraction``, a draw from the shared generator
        (the same on every rank) keeps only the first latent frame: a causal VAE encodes a clip's first frame
        exactly as that frame alone, so it is the image's latent."""
        while True:
            batches = self.sampler.epoch(position.epoch)
            if position.batch_index >= len(batches):
                position.epoch, position.batch_index = position.epoch + 1, 0
                continue
            idx = batches[position.batch_index]
            position.batch_index += 1
            batch = self._read_share(idx, generator)
            if batch is not None:
                break
        if self.cfg.image_fraction and torch.rand((), generator=generator) < self.cfg.image_fraction:
            batch.x = batch.x[:, :, :1]
        if self.i2v:
            batch.condition, batch.image = self._image_condition(batch.items)
        return batch

    def _image_condition(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition (b 4+c t h w): Wan's frame mask (the first latent frame given) and the cached latents
        of [first frame, zeros, ...]; CLIP tokens (b i d) of the first frames) of the dataset's clips ``items``."""
        from safetensors.torch import load_file

        files = [load_file(self.plan.root / "image" / self.dataset.items[i].path.name) for i in items]
        latents = torch.stack([f["condition"] for f in files])
        b, _, t, h, w = latents.shape
        mask = torch.zeros(b, self.mask_channels, t, h, w)
        mask[:, :, 0] = 1.0
        condition = torch.cat([mask, latents], dim=1).to(self.device)
        return condition, torch.stack([f["image"] for f in files]).to(self.device)

    def _read_share(self, idx: list[int], generator: torch.Generator) -> LatentBatch | None:
        """This rank's clips of the global batch ``idx``; a file broken since the scan is reported and
        skipped (None: nothing left on any rank)."""
        latents, captions, rows, items = [], [], [], []
        for j in share(len(idx), self.dist.rank, self.dist.world_size):
            try:
                z, caption = self.dataset[idx[j]]
            except Exception as err:  # noqa: BLE001 - a file broken since the scan is reported, skipped
                tqdm.write(f"skipping {self.dataset.items[idx[j]].path}: {type(err).__name__}: {err}")
                continue
            latents.append(z)
            captions.append(caption)
            rows.append(j)
            items.append(idx[j])
        if not self.dist.enabled:
            if not latents:
                return None
            draws = Draws(generator, list(range(len(rows))), len(rows))
            return LatentBatch(torch.stack(latents).to(self.device), captions, draws, items=items)
        # ranks must agree on the batch: the mean divides by the clips all ranks read (none: the next batch);
        # a share that is empty (or all broken) becomes a weight-0 clip
        used = int(all_reduce_(torch.tensor([len(rows)], device=self.device)).item())
        if not used:
            return None
        if not latents:
            latents, captions, rows = [torch.zeros(self.dataset.items[idx[0]].shape)], [""], [0]
            items = [idx[0]]
            weight = torch.zeros(1)
        else:
            weight = torch.full((len(rows),), 1.0 / used)
        draws = Draws(generator, rows, len(idx), sliced=True)
        return LatentBatch(torch.stack(latents).to(self.device), captions, draws, weight, items)

    # ----------------------------------------------------------------------------------------- step

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The captions' text tokens and mask (through the text cache when there is one; from the disk cache
        when fine-tuning a pipeline, as its denoiser reads them: no mask for Wan's)."""
        if self.plan is not None:
            context, mask = self.plan.text.encode(captions)
            return context.to(self.device), None if mask is None else mask.to(self.device)
        if self._text_cache is not None:
            return self._text_cache.encode(captions)
        return self.text_encoder.encode(captions)

    def forward(self, x_sigma: torch.Tensor, sigma: torch.Tensor, captions: list[str], extra=None):
        """(the denoiser's velocity, the largest real text token count of the batch); ``extra``: an
        image-conditioned denoiser's ``image`` and ``condition`` keywords."""
        context, mask = self.encode_text(captions)
        text_tokens = int(mask.sum(1).max()) if mask is not None else context.shape[1]
        return self.dit(x_sigma, sigma, context, mask, **(extra or {})), text_tokens

    def _noised(
        self, batch: LatentBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
        """(x_sigma, sigma, velocity target, captions after dropout, per-frame loss weights (b or 1, 1, t, 1, 1)
        or None)."""
        cfg, x0, draws = self.cfg, batch.x, batch.draws
        sigma = draw_sigmas(cfg, draws)
        noise = draws(torch.randn, x0.shape).to(self.device)
        captions = drop_captions(batch.captions, draws, cfg.caption_dropout, cfg.caption_word_dropout)
        sigma = sigma.to(self.device)
        x_sigma, weight = add_noise(x0, noise, sigma), None
        if cfg.first_frame_dropout < 1:  # drawn only when on, so runs without it keep their draws
            given = (draws(torch.rand) >= cfg.first_frame_dropout).to(self.device)
            given &= x0.shape[2] > 1  # an image has no frame after the first to learn
            first = torch.zeros(1, 1, x0.shape[2], 1, 1, dtype=torch.bool, device=self.device)
            first[:, :, 0] = True
            keep = given.view(-1, 1, 1, 1, 1) & first  # the clean first frame (sigma 0 there), not learned
            x_sigma = torch.where(keep, x0, x_sigma)
            weight = (~keep).float()
        if cfg.first_frame_weight != 1 and x0.shape[2] > 1:  # a one-frame image has no later frame to weigh
            frames = torch.ones(1, 1, x0.shape[2], 1, 1, device=self.device)
            frames[:, :, 0] = cfg.first_frame_weight
            weight = frames if weight is None else weight * frames
        if cfg.content_weight:
            content = content_weights(x0, cfg.content_weight)
            weight = content if weight is None else weight * content
        return x_sigma, sigma, velocity_target(x0, noise), captions, weight

    def loss(self, batch: LatentBatch, forward: Callable, step: int) -> Loss:
        """The flow-matching loss of the micro-batch: this rank's part of the global batch's mean."""
        x_sigma, sigma, target, captions, weight = self._noised(batch)
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.mixed_precision == "bf16"
        ):
            extra = {"image": batch.image, "condition": batch.condition} if self.i2v else None
            pred, text_tokens = forward(x_sigma, sigma, captions, extra)
        pt, ph, pw = self.dit.config.patch_size
        _, _, t, h, w = batch.x.shape
        tokens = (t // pt) * (h // ph) * (w // pw)
        flops = batch.n * 3 * dit_flops(self.dit.config, tokens, text_tokens)
        if weight is None and not self.dist.enabled:
            return Loss(flow_loss(pred, target), tokens=batch.n * tokens, flops=flops)
        sq = (pred.float() - target.float()).square()
        if weight is None:
            per_sample = sq.flatten(1).mean(dim=1)
        else:  # the weighted mean over the frames in the loss
            per_sample = (sq * weight).flatten(1).sum(1) / weight.expand_as(sq).flatten(1).sum(1)
        if self.dist.enabled:  # this rank's part of the global mean
            value = (per_sample * batch.weight.to(per_sample.device)).sum()
        else:
            value = per_sample.mean()
        return Loss(value, tokens=batch.n * tokens, flops=flops)

    # ----------------------------------------------------------------------------------------- results

    @torch.no_grad()
    def evaluate(self, levels: int = 8, max_clips: int = 8, seed: int = 0) -> float:
        """Flow loss at fixed noise: ``levels`` evenly spread sigmas, seeded noise, the first ``max_clips`` clips
        with their captions. Deterministic, and it draws from no training RNG."""
        gen = torch.Generator().manual_seed(seed)
        sigma = (torch.arange(levels, dtype=torch.float32) + 0.5) / levels
        for m in self.models.values():
            m.eval()
        losses = []
        for i in range(min(max_clips, len(self.dataset))):
            z, caption = self.dataset[i]
            x0 = z[None].expand(levels, *z.shape).to(self.device)
            noise = torch.randn(x0.shape, generator=gen).to(self.device)
            context, mask = self.encode_text([caption] * levels)
            s, extra = sigma.to(self.device), {}
            if self.i2v:
                condition, image = self._image_condition([i])
                extra = {"condition": condition.expand(levels, *condition.shape[1:]),
                         "image": image.expand(levels, *image.shape[1:])}  # fmt: skip
            pred = self.dit(add_noise(x0, noise, s), s, context, mask, **extra)
            losses.append(flow_loss(pred, velocity_target(x0, noise)).item())
        return sum(losses) / len(losses)

    @torch.no_grad()
    def sample(self, seed: int) -> torch.Tensor | None:
        """A short generation per ``sample_prompts`` entry, side by side, decoded by ``cfg.vae`` (None when
        that VAE does not load or its latent channels differ from the denoiser's)."""
        if self.sample_vae is None or self.i2v:  # image-to-video samples: not yet
            return None
        from ...diffusion.sampling import denoise

        cfg = self.cfg
        self.dit.eval()
        context, mask = self.encode_text(list(cfg.sample_prompts))
        shape = (len(cfg.sample_prompts), *self.dataset.items[0].shape)
        gen = torch.Generator().manual_seed(seed)
        z = denoise(self.dit, shape, context, mask, sampler="euler", steps=cfg.sample_steps, shift=cfg.shift,
                    generator=gen, progress=False)  # fmt: skip
        vae = self.sample_vae
        return torch.cat(list(vae.decode(vae.denormalize(z)).float()), dim=-1)

    def _load_sample_vae(self) -> CausalVAE | None:
        """``cfg.vae`` for decoding samples, or None (with a warning) when it does not load or its latent
        channels differ from the denoiser's."""
        try:
            from ...pipelines.batch import load_vae

            with torch.random.fork_rng(devices=[]):  # a preset's random init leaves the global RNG alone
                src = self.parts.folder if self.parts is not None else self.cfg.vae
                vae = load_vae(src, device=self.device)[0].eval()
        except Exception as err:  # noqa: BLE001 - samples are optional; training goes on
            warnings.warn(f"no samples: vae={self.cfg.vae!r} does not load ({err})", stacklevel=3)
            return None
        channels = self.dit.config.in_channels
        if vae.config.latent_channels != channels:
            warnings.warn(
                f"no samples: vae={self.cfg.vae!r} has {vae.config.latent_channels} latent channels, "
                f"the denoiser {channels}",
                stacklevel=3,
            )
            return None
        return vae

    def unsharded(self, name: str) -> torch.nn.Module:
        if name == "dit":
            return VideoDiT(self.dit.config)
        encoder = load_text_encoder(self.cfg.text_encoder, device="cpu", overrides=self.cfg.text_overrides)
        if self.cfg.text_new_words:  # the words this run added
            encoder.add_words(self.text_encoder.config.vocab)
        return encoder

    def export(self, folder: Path, models: dict[str, torch.nn.Module]) -> None:
        """A pipeline folder every job takes with ``--model``: the denoiser, ``text_encoder/``, ``vae/`` (the
        VAE the latents were made with) and ``pipeline.json`` (the sampler settings).

        The denoiser: ``dit/`` (ours), or for a fine-tuned pipeline ``transformer/`` in diffusers' layout
        (``WanTransformer3DModel.from_pretrained`` reads it). With LoRA the adapter goes to ``lora.safetensors``
        in diffusers' layout (``load_lora`` and diffusers' ``load_lora_weights`` read it) and ``base.json``
        names the base denoiser it goes on (``pipelines.finetuned``): ``dit/`` here when ``cfg.dit`` is a
        preset (its weights exist only in this run), else the folder the run started from."""
        from ...pipelines.finetuned import write_base

        for name, model in models.items():
            if name == "dit" and self.cfg.lora_rank:
                write_base(folder, self._export_lora(model, folder), [("lora.safetensors", 1.0)])
            elif name == "dit" and self.parts is not None:
                save_diffusers_dit(model, folder / "transformer")
            else:
                model.save_pretrained(folder / name)
        if self.parts is not None:
            from ...pipelines.assemble import copy_into_place

            copy_into_place(self.plan.root / "text_encoder", folder / "text_encoder")
            for name in ("image_encoder", "image_processor"):  # Wan I2V: the CLIP vision encoder
                if self.i2v and (self.parts.folder / name).is_dir():
                    copy_into_place(self.parts.folder / name, folder / name)
            CausalVAE.from_pretrained(self.parts.vae).save_pretrained(folder / "vae")
            config = self.parts.config
        else:
            if "text_encoder" not in models:
                self.text_encoder.save_pretrained(folder / "text_encoder")
            config = self._export_vae(folder)
        text = json.dumps(config_to_dict(config), indent=2)
        atomic_write(folder / "pipeline.json", lambda p: Path(p).write_text(text))

    def _export_lora(self, dit: VideoDiT, folder: Path) -> str:
        """Write ``lora.safetensors`` (and ``dit/``, the base, for a preset); returns the base's path for
        ``base.json``."""
        from ..lora import remove_lora, save_lora

        save_lora(dit, folder / "lora.safetensors", layout="diffusers")
        if self.parts is not None:
            return str(self.parts.dit.resolve())
        if Path(self.cfg.dit).exists():
            return str(Path(self.cfg.dit).resolve())
        remove_lora(copy.deepcopy(dit), merge=False).save_pretrained(folder / "dit")
        return "dit"

    def _export_vae(self, folder: Path) -> PipelineConfig:
        """Write ``folder/vae``: the VAE the latent files record (their ``vae`` entry: source and fingerprint),
        else ``cfg.vae`` with a warning; returns the pipeline config for the folder (the ``cfg.dit`` pipeline
        preset's, else the defaults) at the size of the training clips."""
        from ...config.pipeline import PipelinePreset
        from ...data.latents import read_latent_metadata
        from ...pipelines.batch import load_vae

        records = {}
        for item in self.dataset.items:
            try:
                vae = read_latent_metadata(item.path).get("vae") or {}
            except (OSError, ValueError):  # a file broken since the scan (reported then): the others say
                continue
            records.setdefault(vae.get("fingerprint"), vae)
        record = next(iter(records.values()), {})
        if len(records) > 1:
            warnings.warn(
                f"the latent files were made with {len(records)} different VAEs; final/vae is "
                f"{record.get('src')!r}",
                stacklevel=3,
            )
        vae, why = None, "the latent files do not record their VAE (written by an older vidlatent)"
        if record.get("fingerprint"):  # the recorded source, else cfg.vae: whichever has those weights
            why = f"neither the recorded VAE {record.get('src')!r} nor vae={self.cfg.vae!r} is the one that made them"
            for src in dict.fromkeys([str(record.get("src", "")).removeprefix("preset:"), self.cfg.vae]):
                vae = _vae_that_made(src, record)
                if vae is not None:
                    break
        if vae is None:
            warnings.warn(f"{why}: final/vae is vae={self.cfg.vae!r}; re-encode, or set vae= to the VAE that "
                          "made the latents", stacklevel=3)  # fmt: skip
            with torch.random.fork_rng(devices=[]):
                vae = load_vae(self.cfg.vae)[0]
        vae.save_pretrained(folder / "vae")
        presets = list_presets("pipeline")
        config = (
            load_config(PipelinePreset, "pipeline", self.cfg.dit).pipeline
            if self.cfg.dit in presets
            else None
        )
        config = copy.deepcopy(config) if config is not None else PipelineConfig()
        _, t, h, w = self.dataset.items[0].shape
        sf, tf = vae.config.spatial_factor, vae.config.temporal_factor
        config.frames, config.height, config.width = 1 + tf * (t - 1), h * sf, w * sf
        return config


def _vae_that_made(src: str, record: dict) -> CausalVAE | None:
    """The VAE at ``src`` when it is the one a latent file's ``vae`` record names (same fingerprint), as it is or
    with the record's config fields over its own (a cache made with ``vae_overrides``, e.g. ``first_frame=still``,
    by the same weights); None when neither fits or ``src`` does not load. ``src`` is read once: under the
    record's config the loaded weights are rebuilt, not read again (a Wan VAE is ~500 MB)."""
    from ...config import config_from_dict
    from ...config.models import VAEConfig
    from ...data.latents import vae_fingerprint
    from ...pipelines.batch import load_vae

    try:
        with torch.random.fork_rng(devices=[]):
            vae = load_vae(src)[0]
        if vae_fingerprint(vae) == record["fingerprint"]:
            return vae
        own = config_to_dict(vae.config)
        fields = {k: v for k, v in (record.get("config") or {}).items() if k in own and own[k] != v}
        if not fields:
            return None
        weights = vae.state_dict()
        # building draws initial weights: training's RNG stays as it was
        with torch.random.fork_rng(devices=[]):
            vae = CausalVAE(config_from_dict(VAEConfig, {**own, **fields})).eval()
        vae.load_state_dict(weights)
    except Exception:  # noqa: BLE001 - moved, deleted or the record's fields do not fit: not this one
        return None
    return vae if vae_fingerprint(vae) == record["fingerprint"] else None


def save_diffusers_dit(dit: VideoDiT, folder: Path) -> None:
    """Write ``dit`` as diffusers writes a ``WanTransformer3DModel`` (config.json +
    diffusion_pytorch_model.safetensors), which diffusers and ``VideoDiT.from_pretrained`` both read."""
    from safetensors.torch import save_file

    from ...models.dit import to_diffusers_config, to_diffusers_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in to_diffusers_state_dict(dit.state_dict()).items()}
    config = {"_class_name": "WanTransformer3DModel", **to_diffusers_config(dit.config)}
    atomic_write(
        folder / "diffusion_pytorch_model.safetensors", lambda p: save_file(state, p, {"format": "pt"})
    )
    atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2)))
