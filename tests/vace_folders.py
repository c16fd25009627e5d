"""A tiny diffusers Wan VACE pipeline folder built offline (random weights): what ``WanVACEPipeline.save_pretrained``
writes for Wan 2.1 VACE, at widths a CPU runs in seconds (the T2V parts of ``wan_folders`` with a VACE
transformer whose control branch reads 2 x 4 latent channels and an 8 x 8 folded mask)."""

from __future__ import annotations

from pathlib import Path

import torch
from test_dit import randomize as randomize_dit
from wan_folders import TEXT_DIM, wan_t2v_parts

from vidlatent.config import DiTConfig, load_config
from vidlatent.models.dit import to_diffusers_config

VACE_LAYERS = [0, 1]


def wan_vace_pipeline(seed: int = 0, shift: float = 3.0):
    """diffusers' ``WanVACEPipeline`` holding tiny random parts."""
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    parts = wan_t2v_parts(seed, shift)
    c = parts["vae"].config.z_dim
    overrides = [f"in_channels={c}", f"out_channels={c}", f"text_dim={TEXT_DIM}", "num_layers=2"]
    cfg = load_config(DiTConfig, "dit", "tiny", overrides=overrides)
    transformer = WanVACETransformer3DModel(**to_diffusers_config(cfg), vace_layers=VACE_LAYERS,
                                            vace_in_channels=2 * c + 64).eval()  # fmt: skip
    randomize_dit(transformer, seed + 1)
    with torch.no_grad():  # keep the velocity O(1) so that several steps stay in a sane range
        transformer.proj_out.weight.mul_(0.3)
    pipe = WanVACEPipeline(**{**parts, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_vace_root(path: str | Path, seed: int = 0, shift: float = 3.0):
    """Write a tiny diffusers Wan VACE pipeline folder at ``path``; returns diffusers' pipeline object."""
    pipe = wan_vace_pipeline(seed, shift)
    pipe.save_pretrained(str(path))
    return pipe
