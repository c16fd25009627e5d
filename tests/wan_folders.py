"""Tiny diffusers Wan pipeline folders built offline (random weights, a local word-level tokenizer).

``wan_t2v_root(path)`` writes what ``WanPipeline.save_pretrained`` writes for a released Wan 2.1 T2V model
(model_index.json, vae/, transformer/, text_encoder/, tokenizer/, scheduler/), at widths a CPU runs in
seconds; ``wan_i2v_root(path, flf=...)`` what ``WanImageToVideoPipeline`` writes for Wan 2.1 I2V / FLF2V (the
same, with an image-conditioned transformer, image_encoder/ and image_processor/); ``wan_fun_control_root(path)``
a Wan2.1-Fun Control model in that layout (a transformer of 3c input channels, as community diffusers conversions
of alibaba-pai's checkpoints are laid out; diffusers has no Fun-Control pipeline). Weights are random with unit gain
(tests/test_dit.py, tests/test_vae.py), so every part of the network moves the output and a wrong convention shows
up as a large difference.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from test_dit import randomize as randomize_dit
from test_text import make_tokenizer
from test_vae import randomize as randomize_vae

from vidlatent.config import DiTConfig, VAEConfig, load_config
from vidlatent.models.dit import to_diffusers_config
from vidlatent.models.vae import vae_config_to_diffusers

TEXT_DIM = 32
CLIP_DIM, CLIP_TOKENS = 24, 17  # a 32 px CLIP with 8 px patches: 16 patches and the class token


def tiny_umt5(seed: int = 0):
    """A two-layer UMT5 encoder of width ``TEXT_DIM`` for the local tokenizer's vocabulary."""
    import transformers as tf

    tok = make_tokenizer()
    cfg = tf.UMT5Config(
        vocab_size=len(tok), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.UMT5EncoderModel(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():  # T5's init is tiny; larger weights make the text count
                if p.ndim > 1:
                    p.mul_(4.0)
    return model, tok


def wan_t2v_parts(seed: int = 0, shift: float = 3.0, dit_layers: int = 2):
    """diffusers/transformers modules of a tiny Wan T2V pipeline: vae, transformer, text_encoder, tokenizer,
    scheduler (UniPC on flow sigmas with ``flow_shift=shift``, as the released folders configure it)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    vae_cfg = load_config(VAEConfig, "vae", "tiny")
    vae = AutoencoderKLWan(**vae_config_to_diffusers(vae_cfg)).eval()
    randomize_vae(vae, seed)
    c = vae_cfg.latent_channels
    overrides = [f"in_channels={c}", f"out_channels={c}", f"text_dim={TEXT_DIM}", f"num_layers={dit_layers}"]
    dit_cfg = load_config(DiTConfig, "dit", "tiny", overrides=overrides)
    transformer = WanTransformer3DModel(**to_diffusers_config(dit_cfg)).eval()
    randomize_dit(transformer, seed + 1)
    with torch.no_grad():  # keep the velocity O(1) so that 10+ steps stay in a sane range
        transformer.proj_out.weight.mul_(0.3)
    text_encoder, tokenizer = tiny_umt5(seed + 2)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
    )
    return dict(vae=vae, transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler)  # fmt: skip


def wan_t2v_pipeline(seed: int = 0, shift: float = 3.0):
    """diffusers' ``WanPipeline`` holding the tiny random parts."""
    from diffusers import WanPipeline

    pipe = WanPipeline(**wan_t2v_parts(seed, shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_t2v_root(path: str | Path, seed: int = 0, shift: float = 3.0):
    """Write a tiny diffusers Wan T2V pipeline folder at ``path``; returns diffusers' pipeline object."""
    pipe = wan_t2v_pipeline(seed, shift)
    pipe.save_pretrained(str(path))
    return pipe


def tiny_clip(seed: int = 0):
    """A three-layer CLIP vision tower (tokens of width ``CLIP_DIM``, ``CLIP_TOKENS`` per image) and its processor."""
    import transformers as tf

    cfg = tf.CLIPVisionConfig(hidden_size=CLIP_DIM, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.CLIPVisionModel(cfg).eval()
    processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, processor


def wan_i2v_parts(seed: int = 0, shift: float = 3.0, flf: bool = False):
    """The parts of a tiny ``WanImageToVideoPipeline``: the T2V parts with an image-conditioned transformer (noise,
    a 4-channel frame mask and image latents in; FLF2V: a position embedding over both stills' CLIP tokens), a
    CLIP vision encoder and its image processor."""
    from diffusers import WanTransformer3DModel

    parts = wan_t2v_parts(seed, shift)
    c = parts["vae"].config.z_dim
    overrides = [
        f"in_channels={2 * c + 4}",
        f"out_channels={c}",
        f"text_dim={TEXT_DIM}",
        f"image_dim={CLIP_DIM}",
    ]
    overrides += [f"image_pos_len={2 * CLIP_TOKENS}"] if flf else []
    transformer = WanTransformer3DModel(
        **to_diffusers_config(load_config(DiTConfig, "dit", "tiny", overrides=overrides))
    )
    randomize_dit(transformer.eval(), seed + 1)
    with torch.no_grad():
        transformer.proj_out.weight.mul_(0.3)
        if flf:  # the generic randomizer leaves it near zero; a real one tells the two stills apart
            transformer.condition_embedder.image_embedder.pos_embed.normal_(
                generator=torch.Generator().manual_seed(seed)
            )
    image_encoder, image_processor = tiny_clip(seed + 3)
    return {
        **parts,
        "transformer": transformer,
        "image_encoder": image_encoder,
        "image_processor": image_processor,
    }


def wan_i2v_root(path: str | Path, seed: int = 0, shift: float = 3.0, flf: bool = False):
    """Write a tiny diffusers Wan I2V (or FLF2V) pipeline folder at ``path``; returns diffusers' pipeline object."""
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline(**wan_i2v_parts(seed, shift, flf))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(path))
    return pipe


# The Fun-Control folder's VAE has 8 latent channels, not the tiny VAE's 4: with 4 channels and 4 pixel frames per
# latent frame, Wan I2V's input (2c + 4) and Fun-Control's (3c) would be the same size, and the folder an I2V one.
FUN_LATENT_CHANNELS = 8


def wan_fun_control_parts(seed: int = 0, shift: float = 3.0):
    """The parts of a tiny Wan2.1-Fun Control folder: the T2V parts with an 8-channel VAE, an image-conditioned
    transformer reading 3 x 8 channels (noise, control latents, first-frame latents), a CLIP vision encoder and
    its image processor."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    parts = wan_t2v_parts(seed, shift)
    c = FUN_LATENT_CHANNELS
    vae_cfg = replace(
        load_config(VAEConfig, "vae", "tiny"),
        latent_channels=c,
        latents_mean=[0.1 * (i - 3) for i in range(c)],
        latents_std=[0.5 + 0.25 * i for i in range(c)],
    )
    vae = AutoencoderKLWan(**vae_config_to_diffusers(vae_cfg)).eval()
    randomize_vae(vae, seed)
    overrides = [f"in_channels={3 * c}", f"out_channels={c}", f"text_dim={TEXT_DIM}", f"image_dim={CLIP_DIM}"]
    transformer = WanTransformer3DModel(
        **to_diffusers_config(load_config(DiTConfig, "dit", "tiny", overrides=overrides))
    )
    randomize_dit(transformer.eval(), seed + 1)
    with torch.no_grad():
        transformer.proj_out.weight.mul_(0.3)
    image_encoder, image_processor = tiny_clip(seed + 3)
    return {**parts, "vae": vae, "transformer": transformer, "image_encoder": image_encoder,
            "image_processor": image_processor}  # fmt: skip


def wan_fun_control_root(path: str | Path, seed: int = 0, shift: float = 3.0) -> dict:
    """Write a tiny Wan2.1-Fun Control folder in the diffusers layout (a ``WanImageToVideoPipeline`` root whose
    transformer reads 3c channels) at ``path``; returns its parts (diffusers / transformers modules)."""
    from diffusers import WanImageToVideoPipeline

    parts = wan_fun_control_parts(seed, shift)
    WanImageToVideoPipeline(**parts).save_pretrained(str(path))
    return parts
