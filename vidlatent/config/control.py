"""The config of a control branch (``models.control.ControlBranch``, VACE's layout).

A control branch runs beside one denoiser and must have its geometry (width, heads, feed-forward width, patch
size, norms): ``control_config_for`` copies those off a ``DiTConfig``. Its own settings are the channels of
the control latents it reads and the denoiser blocks after which it adds its hints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .models import DiTConfig

# VACE's control latents: 16 inactive + 16 reactive video latents, and an 8 x 8 pixel mask folded to 64 channels
VACE_IN_CHANNELS = 96


# the fields a control block shares with the denoiser it fits (and builds its blocks from)
BLOCK_FIELDS = (
    "dim", "ffn_dim", "num_heads", "patch_size", "qk_norm", "cross_attn_norm", "eps", "image_dim", "attention",
)  # fmt: skip


@dataclass
class ControlConfig:
    """A VACE control branch. Defaults are Wan 2.1 VACE 1.3B (a hint after every second of 30 blocks)."""

    in_channels: int = VACE_IN_CHANNELS
    layers: list[int] = field(default_factory=lambda: list(range(0, 30, 2)))  # denoiser blocks given a hint
    # the denoiser's geometry (control blocks are denoiser blocks; ``control_config_for`` copies it)
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    qk_norm: str = "rms_across_heads"
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int | None = None
    attention: str = "sdpa"
    gradient_checkpointing: bool = False

    def block_config(self) -> DiTConfig:
        """The DiTConfig a control block is built from (only the block's fields matter)."""
        return DiTConfig(**{k: _copy(getattr(self, k)) for k in BLOCK_FIELDS})


def control_config_for(
    dit: DiTConfig, layers: list[int] | None = None, in_channels: int = VACE_IN_CHANNELS
) -> ControlConfig:
    """A ControlConfig that fits the denoiser ``dit``: hints after ``layers`` (default: every second block,
    as VACE 1.3B) from control latents of ``in_channels`` channels."""
    return ControlConfig(
        in_channels=in_channels,
        layers=list(range(0, dit.num_layers, 2)) if layers is None else list(layers),
        **{k: _copy(getattr(dit, k)) for k in BLOCK_FIELDS},
    )


def _copy(value):
    return list(value) if isinstance(value, (list, tuple)) else value
