"""Tiny Wan 2.2 diffusers pipelines built offline (random weights, the local word-level tokenizer of
``wan_folders``): TI2V-5B-shaped (a 48-channel VAE, ``expand_timesteps=True``) and A14B-shaped (two experts and
a ``boundary_ratio``; T2V, and I2V with condition latents and no CLIP).

The TI2V VAE is Wan 2.2-structured like the real one (``is_residual``, 2x2 pixel patches, 4x16x16, 48 latent
channels: the ``tiny2.2`` preset's widths); the A14B VAE is Wan 2.1's (4x8x8, 16 channels: the ``tiny`` preset's),
as the real A14B releases ship ``Wan2.1_VAE.pth``. The denoisers are the tiny preset's. Weights are unit-gain
random so every part moves the output.
"""

from __future__ import annotations

import dataclasses

import torch
from test_dit import randomize as randomize_dit
from test_vae import randomize as randomize_vae
from wan_folders import TEXT_DIM, tiny_umt5

from vidlatent.config import DiTConfig, VAEConfig, load_config
from vidlatent.models.dit import to_diffusers_config
from vidlatent.models.vae import vae_config_to_diffusers


def tiny_vae(latent_channels: int, seed: int = 0, preset: str | None = None):
    """diffusers' ``AutoencoderKLWan`` of ``preset``'s structure and widths with ``latent_channels`` and random
    latent statistics. ``preset`` None: ``tiny2.2`` (Wan 2.2-structured, 16x) for 48 channels, else ``tiny``
    (Wan 2.1-structured, 8x)."""
    from diffusers import AutoencoderKLWan

    preset = preset or ("tiny2.2" if latent_channels == 48 else "tiny")
    g = torch.Generator().manual_seed(seed)
    cfg = dataclasses.replace(
        load_config(VAEConfig, "vae", preset),
        latent_channels=latent_channels,
        latents_mean=(0.3 * torch.randn(latent_channels, generator=g)).tolist(),
        latents_std=(0.5 + torch.rand(latent_channels, generator=g)).tolist(),
    )
    vae = AutoencoderKLWan(**vae_config_to_diffusers(cfg)).eval()
    randomize_vae(vae, seed)
    return vae


def tiny_transformer(in_channels: int, out_channels: int, seed: int):
    from diffusers import WanTransformer3DModel

    overrides = [f"in_channels={in_channels}", f"out_channels={out_channels}", f"text_dim={TEXT_DIM}"]
    cfg = load_config(DiTConfig, "dit", "tiny", overrides=overrides)
    transformer = WanTransformer3DModel(**to_diffusers_config(cfg)).eval()
    randomize_dit(transformer, seed)
    with torch.no_grad():  # keep the velocity O(1) so that the steps stay in a sane range
        transformer.proj_out.weight.mul_(0.3)
    return transformer


def parts(
    latent_channels: int = 48, seed: int = 0, shift: float = 3.0, image: bool = False, experts: int = 1
):
    """Components of a tiny Wan 2.2 pipeline: vae, transformer (and transformer_2 with two experts), text
    encoder, tokenizer, scheduler. ``image``: the denoisers take condition latents (I2V-A14B: a 4-channel
    frame mask and the image latents) beside the noise."""
    from diffusers import UniPCMultistepScheduler

    c = latent_channels
    vae = tiny_vae(c, seed)
    in_channels = 2 * c + 4 if image else c
    text_encoder, tokenizer = tiny_umt5(seed + 2)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
    )
    out = dict(vae=vae, transformer=tiny_transformer(in_channels, c, seed + 1), text_encoder=text_encoder,
               tokenizer=tokenizer, scheduler=scheduler)  # fmt: skip
    if experts == 2:
        out["transformer_2"] = tiny_transformer(in_channels, c, seed + 11)
    return out


def pipeline(cls_name: str = "WanPipeline", **config):
    """A diffusers ``cls_name`` holding ``parts(...)``; ``config``: ``parts`` keywords and the pipeline's own
    (``expand_timesteps``, ``boundary_ratio``)."""
    import diffusers

    part_kw = {
        k: config.pop(k) for k in ("latent_channels", "seed", "shift", "image", "experts") if k in config
    }
    components = parts(**part_kw)
    if cls_name == "WanImageToVideoPipeline":
        components.update(image_encoder=None, image_processor=None)
    pipe = getattr(diffusers, cls_name)(**components, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def saved(folder, cls_name: str = "WanPipeline", **config):
    """``pipeline(cls_name, **config)`` saved to ``folder`` (a diffusers root): (folder, the pipeline)."""
    ref = pipeline(cls_name, **config)
    ref.save_pretrained(str(folder))
    return folder, ref
