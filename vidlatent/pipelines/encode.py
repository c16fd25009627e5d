"""The old path of the batch jobs, the latent file format, path expansion and the metrics; kept so that
``from vidlatent.pipelines.encode import ...`` goes on working. New code imports from their homes:

* ``vidlatent.pipelines.batch``: ``encode_clips``, ``decode_latents``, ``latent_stats``, ``write_stats``,
  ``reconstruct``, ``load_vae``, ``JobReport``, ``ChannelStats``, ``Reconstruction``;
* ``vidlatent.data.latents``: the latent file format (``load_latents``, ``read_latent_metadata``,
  ``write_latents``, ``latent_name``, ``vae_fingerprint``, ...);
* ``vidlatent.data.paths``: ``expand_paths``, ``shard``;
* ``vidlatent.metrics``: ``psnr``, ``ssim``, ``gaussian_window``, ``ssim_map``.
"""

from __future__ import annotations

import torch

from .. import metrics
from ..data.latents import (
    FORMAT,
    FORMAT_VERSION,
    LATENT_SUFFIX,
    LATER_SETTINGS,
    latent_file_metadata,
    latent_name,
    load_latents,
    read_latent_metadata,
    vae_fingerprint,
)
from ..data.latents import write_latents as _write_latents
from ..data.paths import expand_paths, shard
from ..metrics import gaussian_window, psnr, ssim_map
from .batch import (
    DECODE_FORMATS,
    ChannelStats,
    JobReport,
    Reconstruction,
    decode_latents,
    encode_clips,
    first_frame_stats,
    latent_stats,
    load_vae,
    reconstruct,
    write_stats,
)

__all__ = [
    "DECODE_FORMATS",
    "FORMAT",
    "FORMAT_VERSION",
    "LATENT_SUFFIX",
    "LATER_SETTINGS",
    "ChannelStats",
    "JobReport",
    "Reconstruction",
    "decode_latents",
    "encode_clips",
    "_write_latents",
    "expand_paths",
    "gaussian_window",
    "latent_file_metadata",
    "latent_name",
    "first_frame_stats",
    "latent_stats",
    "load_latents",
    "load_vae",
    "psnr",
    "read_latent_metadata",
    "reconstruct",
    "shard",
    "ssim",
    "ssim_map",
    "vae_fingerprint",
    "write_stats",
]


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    channels: str = "rgb",
    window: int = 11,
    sigma: float = 1.5,
) -> float:
    """``vidlatent.metrics.ssim`` of two clips (c t h w) or images (c h w) computed in float64, as a float
    (what this name returned before it moved)."""
    return float(metrics.ssim(a.double(), b.double(), data_range, channels, window, sigma))
