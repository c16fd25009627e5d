"""The Wan VAE's foreign checkpoint layouts: diffusers ``AutoencoderKLWan`` and the original Wan 2.1 / 2.2
``WanVAE_`` files (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``), beside our own (``vae.py``).

What lives here: config translation both ways with diffusers' config.json, a single file's config inferred from
its keys and shapes, and the parameter-name maps with the import (rename, reshape singleton dims) and export of
state dicts. ``vae.py`` re-exports every public name, so ``from vidlatent.models.vae import diffusers_key_map``
keeps working.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..config import VAEConfig
from ..config.models import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

if TYPE_CHECKING:
    from .vae import CausalVAE


def vae_config_from_diffusers(raw: dict) -> dict:
    """Translate a diffusers ``AutoencoderKLWan`` config.json (Wan 2.1 or 2.2) into ``VAEConfig`` fields."""
    if raw.get("attn_scales"):
        raise ValueError(f"attn_scales {raw['attn_scales']} are not supported (Wan uses none)")
    patch = raw.get("patch_size") or 1
    cfg = VAEConfig()
    base = raw.get("base_dim", 96)
    in_channels, out_channels = raw.get("in_channels", 3), raw.get("out_channels", raw.get("in_channels", 3))
    if in_channels != out_channels:
        raise ValueError(f"in_channels ({in_channels}) != out_channels ({out_channels}) is not supported")
    if in_channels % (patch * patch):
        raise ValueError(f"in_channels {in_channels} is not a multiple of patch_size^2 ({patch * patch})")
    out = {
        "in_channels": in_channels // (patch * patch),  # diffusers counts the patchified channels
        "base_channels": base,
        "channel_mult": list(raw.get("dim_mult", cfg.channel_mult)),
        "num_res_blocks": raw.get("num_res_blocks", cfg.num_res_blocks),
        "temporal_downsample": list(raw.get("temperal_downsample", cfg.temporal_downsample)),
        "latent_channels": raw.get("z_dim", 16),
        "dropout": raw.get("dropout", 0.0),
        "patch_size": patch,
        "decoder_base_channels": raw.get("decoder_base_dim") if raw.get("decoder_base_dim") != base else None,
        "stage_shortcut": "resample" if raw.get("is_residual") else "none",
    }
    spatial = 2 ** (len(out["channel_mult"]) - 1) * patch
    if raw.get("scale_factor_spatial") not in (None, spatial):
        raise ValueError(
            f"scale_factor_spatial {raw['scale_factor_spatial']} does not fit dim_mult {out['channel_mult']} "
            f"and patch_size {patch} (which give {spatial})"
        )
    for name in ("latents_mean", "latents_std"):
        if raw.get(name) is not None:
            out[name] = list(raw[name])
        elif out["latent_channels"] != 16:  # diffusers' defaults are Wan 2.1's 16 values
            out[name] = _default_stats(out["latent_channels"])[name == "latents_std"]
    return out


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    """``VAEConfig`` -> diffusers ``AutoencoderKLWan`` constructor arguments. ValueError for a VAE whose first
    latent frame has statistics of its own (``first_latents_mean``): diffusers' config has no place for them; or
    that encodes the first frame as a still (``first_frame="still"``), which diffusers' encoder does not."""
    if cfg.first_latents_mean is not None:
        raise ValueError(
            "this VAE normalizes its first latent frame by statistics of its own (first_latents_mean / "
            "first_latents_std), which diffusers' AutoencoderKLWan config cannot hold"
        )
    if cfg.first_frame != "alone":
        raise ValueError(
            f"this VAE encodes a clip's first frame as a still (first_frame={cfg.first_frame!r}); diffusers' "
            "AutoencoderKLWan encodes it alone and would read these latents wrong"
        )
    p = cfg.patch_size
    return {
        "base_dim": cfg.base_channels,
        "decoder_base_dim": cfg.decoder_base_channels,
        "z_dim": cfg.latent_channels,
        "dim_mult": list(cfg.channel_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(cfg.temporal_downsample),  # (sic: diffusers' spelling)
        "dropout": cfg.dropout,
        "latents_mean": list(cfg.latents_mean),
        "latents_std": list(cfg.latents_std),
        "is_residual": cfg.stage_shortcut == "resample",
        "in_channels": cfg.in_channels * p * p,
        "out_channels": cfg.in_channels * p * p,
        "patch_size": p if p > 1 else None,
        "scale_factor_temporal": cfg.temporal_factor,
        "scale_factor_spatial": cfg.spatial_factor,
    }


def _default_stats(channels: int) -> tuple[list[float], list[float]]:
    """Published latent statistics for Wan's latent widths (16: 2.1, 48: 2.2); neutral ones otherwise."""
    if channels == 16:
        return list(WAN21_LATENTS_MEAN), list(WAN21_LATENTS_STD)
    if channels == 48:
        return list(WAN22_LATENTS_MEAN), list(WAN22_LATENTS_STD)
    return [0.0] * channels, [1.0] * channels


def _detect_layout(sd: dict) -> str:
    if "encoder.conv1.weight" in sd:
        return "wan"
    if "encoder.conv_in.weight" in sd and any(k.startswith("encoder.down_blocks.") for k in sd):
        return "diffusers"
    if any(k.startswith("encoder.stages.") for k in sd):
        return "vidlatent"
    raise ValueError(
        "unrecognised VAE checkpoint: expected original Wan 2.1 / 2.2 keys (encoder.conv1.weight, ...), "
        "diffusers AutoencoderKLWan keys (encoder.conv_in.weight, encoder.down_blocks...) or vidlatent keys"
    )


def vae_config_from_state_dict(sd: dict, layout: str) -> dict:
    """Infer a single-file checkpoint's config: Wan 2.1 or 2.2 structure, widths, latent and pixel channels.

    Wan 2.2 is told by its nested stages (``encoder.downsamples.0.downsamples.*`` in the original layout,
    ``encoder.down_blocks.0.resnets.*`` in diffusers'); its input is 2x2-patchified RGB. The rest (stage
    count, blocks per stage, which stages halve time) is Wan's.
    """
    wan = layout == "wan"
    residual = any(
        k.startswith("encoder.downsamples.0.downsamples." if wan else "encoder.down_blocks.0.resnets.")
        for k in sd
    )
    conv_in = sd["encoder.conv1.weight" if wan else "encoder.conv_in.weight"]
    dec_in = sd["decoder.conv1.weight" if wan else "decoder.conv_in.weight"]
    post = sd["conv2.weight" if wan else "post_quant_conv.weight"]
    patch = 2 if residual else 1
    cfg = VAEConfig()
    out = {
        "base_channels": conv_in.shape[0],
        "in_channels": conv_in.shape[1] // (patch * patch),
        "latent_channels": post.shape[0],
        "patch_size": patch,
        "stage_shortcut": "resample" if residual else "none",
    }
    dec_base = dec_in.shape[0] // cfg.channel_mult[-1]
    if dec_base != out["base_channels"]:
        out["decoder_base_channels"] = dec_base
    out["latents_mean"], out["latents_std"] = _default_stats(out["latent_channels"])
    return out


_RES = {"diffusers": ("norm1", "conv1", "norm2", "conv2", "conv_shortcut"), "wan": ("residual.0", "residual.2", "residual.3", "residual.6", "shortcut")}  # fmt: skip
_OURS_RES = ("norm1", "conv1", "norm2", "conv2", "skip")
_NORM_PARAM = {"weight": "gamma"}


def _block_keys(ours: str, theirs: str, layout: str, kind: str) -> dict[str, str]:
    """Map the module prefix ``ours`` (a ResBlock, FrameAttention, Resample) to ``theirs`` for one layout."""
    m: dict[str, str] = {}
    if kind == "res":
        for a, b in zip(_OURS_RES, _RES[layout]):
            if a.startswith("norm"):
                m[f"{ours}.{a}.weight"] = f"{theirs}.{b}.gamma"
            else:
                m[f"{ours}.{a}.weight"], m[f"{ours}.{a}.bias"] = f"{theirs}.{b}.weight", f"{theirs}.{b}.bias"
    elif kind == "attn":
        m[f"{ours}.norm.weight"] = f"{theirs}.norm.gamma"
        for a in ("to_qkv", "proj"):
            m[f"{ours}.{a}.weight"], m[f"{ours}.{a}.bias"] = f"{theirs}.{a}.weight", f"{theirs}.{a}.bias"
    elif kind == "resample":
        for a, b in (("spatial", "resample.1"), ("temporal", "time_conv")):
            m[f"{ours}.{a}.weight"], m[f"{ours}.{a}.bias"] = f"{theirs}.{b}.weight", f"{theirs}.{b}.bias"
    return m


def _stage_names(part: str, i: int, n: int, layout: str, nested: bool):
    """Foreign module prefix of stage ``i``'s block ``j`` (``j=None``: its resampler); ``n`` blocks a stage.

    Wan 2.1 original: one flat list per part (the decoder's stages hold one more block); diffusers nests the
    decoder only. Wan 2.2 (residual stages) is nested in both layouts.
    """
    if layout == "wan":
        group = "downsamples" if part == "encoder" else "upsamples"
        if nested:
            return lambda j: f"{part}.{group}.{i}.{group}.{n if j is None else j}"
        return lambda j: f"{part}.{group}.{i * (n + 1) + (n if j is None else j)}"
    if part == "encoder" and not nested:
        return lambda j: f"encoder.down_blocks.{i * (n + 1) + (n if j is None else j)}"
    blocks = "down_blocks" if part == "encoder" else "up_blocks"
    resampler = ("downsampler" if part == "encoder" else "upsampler") if nested else "upsamplers.0"
    return lambda j: f"{part}.{blocks}.{i}." + (resampler if j is None else f"resnets.{j}")


def _vae_key_map(model: CausalVAE, layout: str) -> dict[str, str]:
    cfg, m = model.config, {}
    wan = layout == "wan"

    def conv(ours: str, theirs: str) -> None:
        m[f"{ours}.weight"], m[f"{ours}.bias"] = f"{theirs}.weight", f"{theirs}.bias"

    def norm(ours: str, theirs: str) -> None:
        m[f"{ours}.weight"] = f"{theirs}.gamma"

    conv("quant_conv", "conv1" if wan else "quant_conv")
    conv("post_quant_conv", "conv2" if wan else "post_quant_conv")
    for part in ("encoder", "decoder"):
        conv(f"{part}.conv_in", f"{part}.conv1" if wan else f"{part}.conv_in")
        mid = f"{part}.middle" if wan else f"{part}.mid_block"
        m.update(_block_keys(f"{part}.mid.block1", f"{mid}.0" if wan else f"{mid}.resnets.0", layout, "res"))
        m.update(
            _block_keys(f"{part}.mid.attn", f"{mid}.1" if wan else f"{mid}.attentions.0", layout, "attn")
        )
        m.update(_block_keys(f"{part}.mid.block2", f"{mid}.2" if wan else f"{mid}.resnets.1", layout, "res"))
        norm(f"{part}.norm_out", f"{part}.head.0" if wan else f"{part}.norm_out")
        conv(f"{part}.conv_out", f"{part}.head.2" if wan else f"{part}.conv_out")
    for part in ("encoder", "decoder"):
        for i, stage in enumerate(getattr(model, part).stages):
            names = _stage_names(part, i, len(stage.blocks), layout, cfg.stage_shortcut == "resample")
            for j in range(len(stage.blocks)):
                m.update(_block_keys(f"{part}.stages.{i}.blocks.{j}", names(j), layout, "res"))
            if stage.resample is not None:
                m.update(_block_keys(f"{part}.stages.{i}.resample", names(None), layout, "resample"))
    own = set(model.state_dict())
    return {k: v for k, v in m.items() if k in own}


def diffusers_key_map(model: CausalVAE) -> dict[str, str]:
    """Our parameter names -> diffusers ``AutoencoderKLWan`` names."""
    return _vae_key_map(model, "diffusers")


def wan_key_map(model: CausalVAE) -> dict[str, str]:
    """Our parameter names -> original Wan ``WanVAE_`` names (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``)."""
    return _vae_key_map(model, "wan")


def import_state_dict(
    model: nn.Module, sd: dict, mapping: dict[str, str], layout: str
) -> dict[str, torch.Tensor]:
    """Rename a foreign state dict to ours; tensors are reshaped where only singleton dims differ.

    Keys the mapping does not cover are kept under their foreign names, so the fit check lists them.
    """
    inverse = {theirs: ours for ours, theirs in mapping.items()}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    out = {}
    for key, value in sd.items():
        ours = inverse.get(key)
        if ours is None:
            out[f"[{layout}] {key}"] = value
            continue
        if value.shape != shapes[ours] and value.numel() == math.prod(shapes[ours]):
            value = value.reshape(shapes[ours])
        out[ours] = value
    return out


def export_state_dict(
    model: nn.Module, mapping: dict[str, str], like: dict | None = None
) -> dict[str, torch.Tensor]:
    """Our state dict under foreign names (``mapping`` from ``diffusers_key_map``/``wan_key_map``).

    ``like`` (a foreign state dict or name -> shape) reshapes tensors to the foreign shapes.
    """
    out = {}
    for ours, value in model.state_dict().items():
        theirs = mapping[ours]
        if like is not None and theirs in like:
            shape = like[theirs].shape if hasattr(like[theirs], "shape") else like[theirs]
            value = value.reshape(shape)
        out[theirs] = value
    return out
