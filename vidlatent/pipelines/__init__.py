"""Jobs built on the one sampling loop: ``VideoPipeline`` (generate, edit, inpaint, animate, morph)."""

from ..data.latents import load_latents
from .batch import decode_latents, encode_clips, latent_stats, reconstruct
from .encode import psnr, ssim  # ssim: the float form of vidlatent.metrics.ssim
from .interpolate import (
    arc_length_weights,
    content_order,
    ease,
    lerp,
    morph_weights,
    slerp,
    smoothness,
    staggered_slerp,
)
from .video import PipelineConfig, PipelinePreset, VideoPipeline, latent_mask

__all__ = [
    "PipelineConfig",
    "PipelinePreset",
    "VideoPipeline",
    "arc_length_weights",
    "decode_latents",
    "encode_clips",
    "latent_stats",
    "load_latents",
    "psnr",
    "reconstruct",
    "ssim",
    "ease",
    "latent_mask",
    "lerp",
    "morph_weights",
    "slerp",
    "smoothness",
    "staggered_slerp",
    "content_order",
]
