"""What a pipeline's denoiser reads beside its noisy latents, and how the pipeline hands its denoiser(s) to the
sampling loop when Wan 2.2 asks for more than one call shape.

- ``denoiser_input``: which of ``DENOISER_INPUTS`` a denoiser takes, told once from its config and the VAE: the
  ``DiTConfig.condition_channels`` latents joined to the noisy ones before the patch embedding are nothing
  (text-to-video), a frame mask and a still's latents (Wan I2V), or a control video's and a first frame's
  latents (Wan2.1-Fun Control: ``pipelines.control.fun_control_inputs`` builds them).
- ``CleanFrames``: Wan 2.2 TI2V-5B's per-token timesteps. The kept (clean) latent frames' tokens are given
  noise level 0 and the rest the step's, as diffusers' pipelines do with ``expand_timesteps=True``.
- ``ExpertPlacement``: Wan 2.2 A14B's two experts, with only the active one on the accelerator when asked:
  the low-noise expert waits on the CPU until the switch (``sampling.SecondExpert.on_switch``), then the
  high-noise one goes there.

Letters: b batch, t h w latent frames/height/width, pt ph pw patch sizes, n video tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import reduce, repeat

from ..config import DiTConfig
from ..models import lora
from ..models.dit import VideoDiT

# What a denoiser takes beside its noisy latents (c latent channels, k pixel frames per latent frame)
DENOISER_INPUTS = {
    "text": "nothing: c channels in (text-to-video; Wan 2.2 TI2V-5B)",
    "image": "a k-channel frame mask, then c still latents: 2c + k in (Wan 2.1 I2V / FLF2V, Wan 2.2 I2V-A14B)",
    "fun_control": "c control-video latents, then c first-frame latents: 3c in (Wan2.1-Fun Control)",
}


def denoiser_input(config: DiTConfig, latent_channels: int, temporal_factor: int) -> str | None:
    """Which of ``DENOISER_INPUTS`` a denoiser of ``config`` takes beside the latents of a VAE with
    ``latent_channels`` channels and ``temporal_factor`` pixel frames per latent frame, told by its condition
    channels; None when they are none of them. A VAE with as many latent channels as its temporal factor (a
    tiny test VAE: 4 and 4) makes the image and Fun-Control layouts the same size; the image one is meant then
    (every released Wan VAE has 16 or 48 channels, and 4 frames per latent frame)."""
    c, k = latent_channels, temporal_factor
    kinds = {0: "text", 2 * c: "fun_control", c + k: "image"}  # a later key wins a tie: image
    return kinds.get(config.condition_channels) if config.out_channels == c else None


class CleanFrames(nn.Module):
    """``dit`` with the tokens of the ``clean`` latent frames (a (t,) bool) at noise level 0: ``forward(x,
    sigma (b,), ...)`` calls ``dit(x, sigma (b, n), ...)``, the step's level elsewhere."""

    def __init__(self, dit: VideoDiT, clean: torch.Tensor):
        super().__init__()
        self.dit, self.clean = dit, clean.bool()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context, context_mask=None, **kwargs):
        pt, ph, pw = self.dit.config.patch_size
        # a patch is clean if all of it is
        clean = reduce(self.clean.to(x.device), "(t pt) -> t", "min", pt=pt)
        noisy = repeat(~clean, "t -> (t h w)", h=x.shape[3] // ph, w=x.shape[4] // pw)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        return self.dit(x, sigma * noisy.to(sigma.dtype), context, context_mask, **kwargs)


class ExpertPlacement:
    """Where a two-expert pipeline keeps its experts: the active one on ``device``, the idle one on ``idle``
    (the CPU). ``start()`` before sampling puts the high-noise expert (``first``) on the device and the other
    away; ``switch()`` (the loop calls it once, at the boundary) swaps them. ``moves`` counts the switches, so
    a test can see that it happened once per run. A loaded LoRA's factors move with their layers."""

    def __init__(self, first: nn.Module, second: nn.Module, device: torch.device, idle="cpu"):
        self.first, self.second = first, second
        self.device, self.idle = torch.device(device), torch.device(idle)
        self.moves = 0

    def start(self) -> None:
        _place(self.second, self.idle)
        _place(self.first, self.device)

    def switch(self) -> None:
        _place(self.first, self.idle)
        _place(self.second, self.device)
        self.moves += 1


def check_experts(dit: VideoDiT, dit_2: VideoDiT) -> None:
    """Two experts must read and write the same things (channels, patches, text and image widths); ValueError
    naming what differs."""
    fields = ("in_channels", "out_channels", "patch_size", "text_dim", "image_dim", "image_pos_len")
    differ = [f"{f} {getattr(dit.config, f)} vs {getattr(dit_2.config, f)}" for f in fields
              if getattr(dit.config, f) != getattr(dit_2.config, f)]  # fmt: skip
    if differ:
        raise ValueError(f"the two experts (dit, dit_2) do not fit one pipeline: {', '.join(differ)}")


def _place(model: nn.Module, device: torch.device) -> None:
    """Move ``model`` (and its loaded LoRAs' tensors) to ``device``, when it is not there already."""
    if next(model.parameters()).device != device:
        model.to(device)
        lora.move_loras(model, device)
