"""How a pipeline hands its denoiser(s) to the sampling loop when Wan 2.2 asks for more than one call shape.

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

from ..models import lora
from ..models.dit import VideoDiT


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
