"""The 3D causal VAE (Wan 2.1 and 2.2 families): causal convolutions, streaming in time, tiling in space.

Letters: b batch, c channels, t frames, h height, w width, n tokens (pixels of one frame).

Every layer is causal in time: a frame's output depends on that frame and earlier ones only. So a clip can
be processed chunk by chunk, each layer carrying the few past frames it needs in a ``StreamCache`` that is
passed in and handed back explicitly. Two layers treat the clip's first frame specially, which is what makes
an image (t = 1) encode exactly like the first frame of any video that starts with it:

* ``TimeDownsample`` passes the first frame through and halves the rest with a stride-2 causal conv;
* ``TimeUpsample`` passes the first frame through and doubles the rest with a causal conv into 2x channels.

The whole-clip result and the chunked result are the same function of the input; only memory and speed
differ. The module layout is our own; ``diffusers_key_map`` and ``wan_key_map`` (in ``vae_layouts.py``,
re-exported here) translate to the diffusers ``AutoencoderKLWan`` and original Wan 2.1 / 2.2 checkpoint layouts.

Wan 2.2 is the same network with three options of ``VAEConfig``: ``patch_size`` folds 2x2 pixel patches into
channels around the encoder/decoder (``Encoder``/``Decoder`` do the folding, so streaming and tiling see
pixels), ``decoder_base_channels`` widens the decoder, and ``stage_shortcut="resample"`` adds a
parameter-free shortcut around each ``Stage`` (``PoolShortcut`` down, ``RepeatShortcut`` up) and keeps the
channels through the decoder's upsamplers. The shortcuts follow the same first-frame rule as the resamplers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce

from ..checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    find_weights,
    load_into,
    load_state_dict,
    names_source,
    override_items,
    read_json,
    resolve_source,
    save_folder,
)
from ..config import VAEConfig, config_from_dict, config_to_dict, load_config
from ..config.models import VAE_FIRST_FRAME, VAE_STAGE_SHORTCUTS
from .layers import RMSNorm, attention
from .vae_layouts import (  # noqa: F401  (re-exported: the layouts lived here before)
    _default_stats,
    _detect_layout,
    diffusers_key_map,
    export_state_dict,
    import_state_dict,
    vae_config_from_diffusers,
    vae_config_from_state_dict,
    vae_config_to_diffusers,
    wan_key_map,
)

# --------------------------------------------------------------------------------------------- helpers


@dataclass
class StreamCache:
    """Carry state of one clip streamed through the VAE in time chunks.

    ``past`` holds, for every causal layer, the last input frames it needs to continue the clip; ``started``
    holds the layers that have already passed the clip's first frame through. A fresh cache means "the clip
    starts here". Caches are plain objects: create one per clip, pass it to every chunk, drop it at the end.
    """

    past: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    started: set[nn.Module] = field(default_factory=set)


class DiagonalGaussian:
    """The encoder's posterior: a diagonal Gaussian over raw latents (b c t h w)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``mean + std * eps``; ``eps`` comes from ``generator`` on its own device (CPU by default)."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=gen_device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over all but the batch dimension."""
        var = torch.exp(self.logvar)
        return 0.5 * (self.mean.pow(2) + var - 1.0 - self.logvar).flatten(1).sum(1)


def conv3d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1, 1), padding=(0, 0, 0)
):
    """``F.conv3d``, except that CPU inference always goes through oneDNN.

    PyTorch picks its slow im2col kernel for "small" inputs by a size rule (batch*channels*frames*height <=
    20480), which catches exactly the one-frame chunks of causal streaming: measured 4-14x slower there.
    """
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
    ):
        return torch.ops.aten.mkldnn_convolution(
            x.contiguous(), weight.contiguous(), bias, list(padding), list(stride), [1, 1, 1], 1
        )
    return F.conv3d(x, weight, bias, stride, padding)


def _as_conv3d_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 2D conv weight (o i kh kw) used as a per-frame 3D conv weight (o i 1 kh kw)."""
    return weight.unsqueeze(2) if weight.dim() == 4 else weight


# --------------------------------------------------------------------------------------------- layers


class CausalConv3d(nn.Conv3d):
    """3D convolution, zero-padded only on the past side in time; spatial padding is symmetric.

    With a cache, the past frames come from the previous chunk instead of zeros. ``pre`` (the norm and
    activation before the convolution, called as ``pre(x)`` or ``pre(x, out=...)``) is applied to ``x`` first;
    at inference it writes straight into the time-padded input, so no separate activation is held beside it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]):
        kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_channels, out_channels, kernel, padding=(0, kernel[1] // 2, kernel[2] // 2))
        self.time_pad = kernel[0] - 1

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None, pre=None) -> torch.Tensor:
        if self.time_pad == 0:
            return conv3d(x if pre is None else pre(x), self.weight, self.bias, self.stride, self.padding)
        past = cache.past.get(self) if cache is not None else None
        if past is None and x.shape[2] == 1 and cache is not None:
            # A clip's first frame alone: its past is all zeros, so only the last time tap contributes.
            x = x if pre is None else pre(x)
            cache.past[self] = F.pad(x, (0, 0, 0, 0, self.time_pad - 1, 0))
            return conv3d(x, self.weight[:, :, -1:], self.bias, self.stride, self.padding)
        if pre is not None and not torch.is_grad_enabled():
            x = self._padded(x, past, pre)
        else:
            x = x if pre is None else pre(x)
            if past is None:
                past = x.new_zeros(*x.shape[:2], self.time_pad, *x.shape[3:])
            x = torch.cat([past, x], dim=2)
        if cache is not None:  # a copy: a view would keep the whole padded input alive until the next chunk
            cache.past[self] = x[:, :, -self.time_pad :].clone()
        return conv3d(x, self.weight, self.bias, self.stride, self.padding)

    def _padded(self, x: torch.Tensor, past: torch.Tensor | None, pre) -> torch.Tensor:
        """``past`` (zeros when None) and ``pre(x)`` in one new tensor, ``pre`` writing into it."""
        padded = x.new_empty(x.shape[0], x.shape[1], self.time_pad + x.shape[2], *x.shape[3:])
        head, tail = padded[:, :, : self.time_pad], padded[:, :, self.time_pad :]
        head.zero_() if past is None else head.copy_(past)
        made = pre(x, out=tail)
        if made.data_ptr() != tail.data_ptr():  # a ``pre`` that made a new tensor after all
            tail.copy_(made)
        return padded


def norm_silu(norm: RMSNorm, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU of ``norm(x)``: the ``pre`` of the VAE's convolutions (in place on its result at inference)."""
    return F.silu(norm(x, out=out), inplace=not torch.is_grad_enabled())


class ResBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1 conv) skip."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(in_channels, channels_first=True)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = RMSNorm(out_channels, channels_first=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.skip = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()  # reuse buffers at inference; autograd needs the originals
        h = self.conv1(x, cache, pre=partial(norm_silu, self.norm1))
        h = self.conv2(h, cache, pre=self._pre2)
        skip = x if self.skip is None else self.skip(x)  # last: its output is not held beside the convs'
        return h.add_(skip) if inplace else h + skip

    def _pre2(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.dropout(norm_silu(self.norm2, x, out))


class FrameAttention(nn.Module):
    """Single-head self-attention among the pixels of each frame (no mixing across time)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, channels_first=True, spatial_dims=2)
        self.to_qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = rearrange(self.norm(x), "b c t h w -> (b t) (h w) c")
        qkv = F.linear(tokens, self.to_qkv.weight.flatten(1), self.to_qkv.bias)
        q, k, v = rearrange(qkv, "bt n (three c) -> three bt 1 n c", three=3)
        out = F.linear(attention(q, k, v)[:, 0], self.proj.weight.flatten(1), self.proj.bias)
        return x + rearrange(out, "(b t) (h w) c -> b c t h w", b=b, h=h)


class SpatialDownsample(nn.Module):
    """Halve h and w with a stride-2 3x3 conv per frame (zero pad right/bottom); optionally halve time too."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.spatial = nn.Conv2d(channels, channels, 3, stride=2)
        self.temporal = TimeDownsample(channels) if temporal else None

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        x = conv3d(
            F.pad(x, (0, 1, 0, 1)), _as_conv3d_weight(self.spatial.weight), self.spatial.bias, (1, 2, 2)
        )
        return x if self.temporal is None else self.temporal(x, cache)


class TimeDownsample(nn.Conv3d):
    """The clip's first frame passes through; later frames are halved by a stride-2 conv over (prev, a, b).

    Chunks after the clip's first frame must hold an even number of frames.
    """

    def __init__(self, channels: int):
        super().__init__(channels, channels, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        past = cache.past.get(self) if cache is not None else None
        first = None
        if past is None:  # the clip starts in this chunk
            first, x = x[:, :, :1], x[:, :, 1:]
            past = first
        if x.shape[2] % 2:
            raise ValueError(
                f"TimeDownsample needs an even number of frames after the first, got {x.shape[2]}"
            )
        x = torch.cat([past, x], dim=2)
        if cache is not None:
            cache.past[self] = x[:, :, -1:].clone()
        out = conv3d(x, self.weight, self.bias, self.stride) if x.shape[2] > 1 else x[:, :, :0]
        return out if first is None else torch.cat([first, out], dim=2)


class SpatialUpsample(nn.Module):
    """Optionally double time, then double h and w (nearest) and convolve to ``out_channels``."""

    def __init__(self, channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.temporal = TimeUpsample(channels) if temporal else None
        self.spatial = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if self.temporal is not None:
            x = self.temporal(x, cache)
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return conv3d(x, _as_conv3d_weight(self.spatial.weight), self.spatial.bias, padding=(0, 1, 1))


class TimeUpsample(CausalConv3d):
    """The clip's first frame passes through; each later frame becomes two via a causal conv to 2x channels.

    The causal conv runs over the frames after the first, starting from zeros (as Wan 2.1 does).
    """

    def __init__(self, channels: int):
        super().__init__(channels, channels * 2, (3, 1, 1))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        first = None
        if cache is None or self not in cache.started:
            first, x = x[:, :, :1], x[:, :, 1:]
            if cache is not None:
                cache.started.add(self)
        if x.shape[2]:
            x = rearrange(super().forward(x, cache), "b (two c) t h w -> b c (t two) h w", two=2)
        return x if first is None else torch.cat([first, x], dim=2)


class MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block1 = ResBlock(channels, channels, dropout)
        self.attn = FrameAttention(channels)
        self.block2 = ResBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return self.block2(self.attn(self.block1(x, cache)), cache)


class PoolShortcut(nn.Module):
    """Parameter-free downsampling shortcut (Wan 2.2): fold (time, h, w) neighbours into channels, then
    average consecutive groups of channels down to ``out_channels``.

    Time pairs are taken as (first frame alone, then pairs), like ``TimeDownsample``: a chunk holding the
    clip's first frame has an odd length and gets one zero frame in front of it.
    """

    def __init__(self, in_channels: int, out_channels: int, time: int, space: int):
        super().__init__()
        factor = time * space * space
        if (in_channels * factor) % out_channels:
            raise ValueError(
                f"a pooling shortcut needs in_channels x {factor} ({in_channels * factor}) divisible by "
                f"out_channels ({out_channels})"
            )
        self.out_channels, self.time, self.space = out_channels, time, space

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if x.shape[2] % self.time:
            x = F.pad(x, (0, 0, 0, 0, self.time - x.shape[2] % self.time, 0))
        s = self.space
        x = rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w", ft=self.time, fh=s, fw=s)
        return reduce(x, "b (c g) t h w -> b c t h w", "mean", c=self.out_channels)


class RepeatShortcut(nn.Module):
    """Parameter-free upsampling shortcut (Wan 2.2): repeat each channel, then unfold channel groups into
    (time, h, w) neighbours at ``out_channels``.

    The clip's first frame becomes one frame (the last of its time copies), like ``TimeUpsample``.
    """

    def __init__(self, in_channels: int, out_channels: int, time: int, space: int):
        super().__init__()
        factor = time * space * space
        if (out_channels * factor) % in_channels:
            raise ValueError(
                f"a repeating shortcut needs out_channels x {factor} ({out_channels * factor}) divisible by "
                f"in_channels ({in_channels})"
            )
        self.repeats = out_channels * factor // in_channels
        self.time, self.space = time, space

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        first = cache is None or self not in cache.started
        if cache is not None:
            cache.started.add(self)
        s = self.space
        x = x.repeat_interleave(self.repeats, dim=1)
        x = rearrange(x, "b (c ft fh fw) t h w -> b c (t ft) (h fh) (w fw)", ft=self.time, fh=s, fw=s)
        return x[:, :, self.time - 1 :] if first else x


class Stage(nn.Module):
    """Residual blocks at one resolution, then an optional resampler; an optional shortcut adds a
    resampled copy of the stage's input to its output (Wan 2.2)."""

    def __init__(
        self, blocks: list[nn.Module], resample: nn.Module | None, shortcut: nn.Module | None = None
    ):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        skip = x
        for block in self.blocks:
            x = block(x, cache)
        if self.resample is not None:
            x = self.resample(x, cache)
        return x if self.shortcut is None else x + self.shortcut(skip, cache)


# --------------------------------------------------------------------------------------------- encoder / decoder


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Fold p x p pixel patches into channels: (b c t h w) -> (b c*p*p t h/p w/p), Wan 2.2's channel order."""
    return x if p == 1 else rearrange(x, "b c t (h ph) (w pw) -> b (c pw ph) t h w", ph=p, pw=p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of ``patchify``."""
    return x if p == 1 else rearrange(x, "b (c pw ph) t h w -> b c t (h ph) (w pw)", ph=p, pw=p)


class Encoder(nn.Module):
    """Pixels (b, in_channels, t, h, w) -> latent moments (b, 2*latent_channels, t', h', w')."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_channels * m for m in [1, *cfg.channel_mult]]
        last = len(cfg.channel_mult) - 1
        residual = cfg.stage_shortcut == "resample"
        self.patch_size = cfg.patch_size
        self.conv_in = CausalConv3d(cfg.in_channels * cfg.patch_size**2, dims[0], 3)
        self.stages = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            blocks = [ResBlock(cin if j == 0 else cout, cout, cfg.dropout) for j in range(cfg.num_res_blocks)]
            temporal = i < last and bool(cfg.temporal_downsample[i])
            down = SpatialDownsample(cout, temporal) if i < last else None
            skip = PoolShortcut(cin, cout, 2 if temporal else 1, 2 if i < last else 1) if residual else None
            self.stages.append(Stage(blocks, down, skip))
        self.mid = MidBlock(dims[-1], cfg.dropout)
        self.norm_out = RMSNorm(dims[-1], channels_first=True)
        self.conv_out = CausalConv3d(dims[-1], cfg.latent_channels * 2, 3)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        x = self.conv_in(patchify(x, self.patch_size), cache)
        for stage in self.stages:
            x = stage(x, cache)
        x = self.mid(x, cache)
        return self.conv_out(x, cache, pre=partial(norm_silu, self.norm_out))


class Decoder(nn.Module):
    """Raw latents (b, latent_channels, t', h', w') -> pixels (b, in_channels, t, h, w), unclamped."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.channel_mult
        dims = [cfg.decoder_channels * m for m in [mult[-1], *mult[::-1]]]
        temporal_up = list(cfg.temporal_downsample)[::-1]
        last = len(mult) - 1
        residual = cfg.stage_shortcut == "resample"
        self.patch_size = cfg.patch_size
        self.conv_in = CausalConv3d(cfg.latent_channels, dims[0], 3)
        self.mid = MidBlock(dims[0], cfg.dropout)
        self.stages = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0 and not residual:
                cin = cin // 2  # Wan 2.1: each upsampler halves the channels
            blocks = [
                ResBlock(cin if j == 0 else cout, cout, cfg.dropout) for j in range(cfg.num_res_blocks + 1)
            ]
            temporal = i < last and bool(temporal_up[i])
            up = SpatialUpsample(cout, cout if residual else cout // 2, temporal) if i < last else None
            skip = RepeatShortcut(cin, cout, 2 if temporal else 1, 2) if residual and i < last else None
            self.stages.append(Stage(blocks, up, skip))
        self.norm_out = RMSNorm(dims[-1], channels_first=True)
        self.conv_out = CausalConv3d(dims[-1], cfg.in_channels * cfg.patch_size**2, 3)

    def forward(self, z: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        x = self.mid(self.conv_in(z, cache), cache)
        for stage in self.stages:
            x = stage(x, cache)
        return unpatchify(self.conv_out(x, cache, pre=partial(norm_silu, self.norm_out)), self.patch_size)


# --------------------------------------------------------------------------------------------- tiling


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, ramp_in: bool, ramp_out: bool) -> torch.Tensor:
    """1D blending weights: rise over ``overlap`` at a shared leading edge, fall at a shared trailing one."""
    weight = torch.ones(length)
    if overlap > 0:
        up = (torch.arange(overlap) + 0.5) / overlap
        if ramp_in:
            weight[:overlap] = torch.minimum(weight[:overlap], up)
        if ramp_out:
            weight[-overlap:] = torch.minimum(weight[-overlap:], up.flip(0))
    return weight


def tiled_apply(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Run ``fn`` on overlapping spatial tiles of ``x`` (b c t h w) and blend the results linearly.

    ``tile`` and ``overlap`` are in input pixels; ``scale`` is output size / input size (1/8 to encode, 8 to
    decode). Every tile covers the whole clip in time, so tiling never breaks causality.
    """
    h, w = x.shape[-2:]
    stride = tile - overlap
    out = weights = None
    ys, xs = _tile_starts(h, tile, stride), _tile_starts(w, tile, stride)
    o_overlap = int(overlap * scale)
    for y0 in ys:
        for x0 in xs:
            piece = fn(x[..., y0 : y0 + tile, x0 : x0 + tile])
            if out is None:
                shape = (*piece.shape[:3], int(h * scale), int(w * scale))
                out = piece.new_zeros(shape)
                weights = piece.new_zeros(shape[-2:])
            ph, pw = piece.shape[-2:]
            oy, ox = int(y0 * scale), int(x0 * scale)
            wy = _ramp(ph, min(o_overlap, ph), y0 > 0, y0 + tile < h)
            wx = _ramp(pw, min(o_overlap, pw), x0 > 0, x0 + tile < w)
            mask = (wy[:, None] * wx[None, :]).to(piece)
            out[..., oy : oy + ph, ox : ox + pw] += piece * mask
            weights[oy : oy + ph, ox : ox + pw] += mask
    return out / weights


# --------------------------------------------------------------------------------------------- the VAE


def latent_statistics(
    z: torch.Tensor, mean, std, first_mean=None, first_std=None, channel_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``mean`` / ``std`` shaped to broadcast over latents ``z`` whose channels are ``channel_dim``
    and frames the dimension after it; with ``first_mean`` / ``first_std`` the first latent frame gets its own
    (``z`` then starts at a clip's first frame). Same dtype and device as ``z``."""
    shape = [1] * z.dim()
    shape[channel_dim] = -1

    def per_channel(values) -> torch.Tensor:
        return torch.as_tensor(values, device=z.device, dtype=z.dtype).view(shape)

    m, s = per_channel(mean), per_channel(std)
    time = channel_dim + 1
    if first_mean is None or z.dim() <= time:
        return m, s
    later = [max(z.shape[time] - 1, 0) if d == time else 1 for d in range(z.dim())]
    m = torch.cat([per_channel(first_mean), m.repeat(later)], dim=time)
    s = torch.cat([per_channel(first_std), s.repeat(later)], dim=time)
    return m, s


class CausalVAE(nn.Module):
    """Video VAE: (b,3,1+4k,h,w) in [-1,1] <-> raw latents (b,c,1+k,h/s,w/s); images are one-frame clips.

    ``s`` is ``spatial_factor``: 8 for Wan 2.1 (16 latent channels), 16 for Wan 2.2 (48 latent channels).

    ``encode`` returns a :class:`DiagonalGaussian`; ``decode`` maps raw latents back to pixels in [-1, 1].
    ``normalize``/``denormalize`` convert raw latents to and from the unit-scale latents a denoiser sees.
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        cfg = config or VAEConfig()
        n_down = len(cfg.channel_mult) - 1
        if len(cfg.temporal_downsample) != n_down:
            raise ValueError(
                f"temporal_downsample needs one entry per downsampling stage ({n_down}), got "
                f"{list(cfg.temporal_downsample)}"
            )
        for name in ("latents_mean", "latents_std", "first_latents_mean", "first_latents_std"):
            values = getattr(cfg, name)
            if values is not None and len(values) != cfg.latent_channels:
                raise ValueError(f"{name} needs {cfg.latent_channels} values, got {len(values)}")
        if (cfg.first_latents_mean is None) != (cfg.first_latents_std is None):
            raise ValueError("first_latents_mean and first_latents_std are set together or not at all")
        if cfg.stage_shortcut not in VAE_STAGE_SHORTCUTS:
            raise ValueError(
                f"stage_shortcut must be one of {', '.join(VAE_STAGE_SHORTCUTS)}, got {cfg.stage_shortcut!r}"
            )
        if cfg.patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer (1 = no patches), got {cfg.patch_size}")
        if cfg.first_frame not in VAE_FIRST_FRAME:
            raise ValueError(
                f"first_frame must be one of {', '.join(VAE_FIRST_FRAME)}, got {cfg.first_frame!r}"
            )
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = CausalConv3d(cfg.latent_channels * 2, cfg.latent_channels * 2, 1)
        self.post_quant_conv = CausalConv3d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    # ---------------------------------------------------------------- properties

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---------------------------------------------------------------- input checks

    def _check_video(self, video: torch.Tensor) -> None:
        cfg, tf, sf = self.config, self.temporal_factor, self.spatial_factor
        if not isinstance(video, torch.Tensor):
            raise ValueError(
                f"video must be a torch.Tensor (b,{cfg.in_channels},t,h,w), got {type(video).__name__}"
            )
        if video.dim() != 5:
            raise ValueError(
                f"video must have shape (b,{cfg.in_channels},t,h,w) with 5 dims, got {tuple(video.shape)}; "
                "add a batch dim with video[None] or a time dim for an image with image[:, :, None]"
            )
        if not video.is_floating_point():
            raise ValueError(f"video must be a float tensor in [-1, 1], got dtype {video.dtype}")
        b, c, t, h, w = video.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"video must have {cfg.in_channels} channels in dim 1, got {c} (shape {tuple(video.shape)})"
            )
        if (t - 1) % tf:
            raise ValueError(f"video frames must be 1+{tf}k (1, {1 + tf}, {1 + 2 * tf}, ...), got t={t}")
        if h % sf or w % sf or h == 0 or w == 0:
            raise ValueError(
                f"video height and width must be positive multiples of {sf}, got {w}x{h} (width x height)"
            )

    def _check_latents(self, z: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or not z.is_floating_point():
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"latents must be a float tensor (b,{cfg.latent_channels},t,h,w), got {shape}")
        self._check_latent_channels(z.shape[1])

    def _check_latent_channels(self, channels: int) -> None:
        """Latents with another channel count were made by another VAE: say which, in one line."""
        ours = self.config.latent_channels
        if channels == ours:
            return
        known = {16: "a Wan 2.1 VAE", 48: "a Wan 2.2 VAE"}
        theirs = f" (as {known[channels]} makes)" if channels in known else ""
        release = {(16, "none"): known[16], (48, "resample"): known[48]}.get(
            (ours, self.config.stage_shortcut)
        )
        this = f" ({release})" if release else ""
        raise ValueError(
            f"latents have {channels} channels{theirs}, but this VAE{this} takes {ours} channels: they were "
            "made by a different VAE; decode them with the VAE that encoded them"
        )

    def _use_tiling(self, tile: bool | None, h: int, w: int) -> bool:
        if tile is None:
            return max(h, w) > self.config.auto_tile_above
        return bool(tile)

    # ---------------------------------------------------------------- streaming steps

    def encode_step(self, frames: torch.Tensor, cache: StreamCache) -> tuple[torch.Tensor, StreamCache]:
        """Encode the next chunk of a clip: returns its latent moments (b, 2c, t', h', w') and the cache.

        The first chunk of a clip must start with the clip's first frame; after it, chunks hold a multiple of
        ``temporal_factor`` frames. ``encode`` calls this in a loop; call it yourself to stream a clip from
        a reader without holding it all in memory. With ``config.first_frame == "still"`` the first chunk's first
        latent frame is that of a still clip of its first frame; with ``"still_context"`` the first chunk is
        encoded after ``temporal_factor`` copies of its first frame (see ``VAEConfig.first_frame``).
        """
        fresh = not cache.past and not cache.started
        if self.config.first_frame == "still_context" and fresh:  # the clip's frame 0 repeated in front
            repeats = frames[:, :, :1].expand(-1, -1, self.temporal_factor, -1, -1)
            moments = self.quant_conv(self.encoder(torch.cat([repeats, frames], dim=2), cache))
            return moments[:, :, 1:], cache
        moments = self.quant_conv(self.encoder(frames, cache))
        if self.config.first_frame == "still" and fresh:
            still = frames[:, :, :1].expand(-1, -1, 1 + self.temporal_factor, -1, -1)
            first = self.quant_conv(self.encoder(still, StreamCache()))[:, :, 1:2]
            moments = torch.cat([first, moments[:, :, 1:]], dim=2)
        return moments, cache

    def decode_step(self, z: torch.Tensor, cache: StreamCache) -> tuple[torch.Tensor, StreamCache]:
        """Decode the next chunk of raw latents (any number of frames) and return pixels and the cache."""
        return self.decoder(self.post_quant_conv(z), cache), cache

    def _chunks(self, t: int, first: int, size: int) -> list[tuple[int, int]]:
        bounds, start = [(0, min(first, t))], min(first, t)
        while start < t:
            bounds.append((start, min(start + size, t)))
            start += size
        return bounds

    def _encode_moments(self, video: torch.Tensor, chunk_size: int) -> torch.Tensor:
        if chunk_size <= 0:
            return self.encode_step(video, StreamCache())[0]
        t, cache, outs = video.shape[2], StreamCache(), []
        for a, b in self._chunks(t, 1, chunk_size * self.temporal_factor):
            outs.append(self.encode_step(video[:, :, a:b], cache)[0])
        return torch.cat(outs, dim=2)

    def _decode_pixels(self, z: torch.Tensor, chunk_size: int, out_device=None) -> torch.Tensor:
        """Decode chunk by chunk into one preallocated output (on ``out_device``; default z's device)."""
        if chunk_size <= 0:
            return self.decode_step(z, StreamCache())[0].to(out_device or z.device)
        t, cache, video, done = z.shape[2], StreamCache(), None, 0
        for a, b in self._chunks(t, 1, chunk_size):
            pixels = self.decode_step(z[:, :, a:b], cache)[0].clamp_(-1.0, 1.0)
            if video is None:
                frames = 1 + self.temporal_factor * (t - 1)
                shape = (*pixels.shape[:2], frames, *pixels.shape[3:])
                video = torch.empty(shape, device=out_device or z.device, dtype=pixels.dtype)
            video[:, :, done : done + pixels.shape[2]] = pixels
            done += pixels.shape[2]
        return video

    # ---------------------------------------------------------------- public API

    def encode(
        self, video: torch.Tensor, chunk_size: int | None = None, tile: bool | None = None
    ) -> DiagonalGaussian:
        """Encode a clip (b,3,1+4k,h,w) in [-1,1] into a posterior over raw latents (b,c,1+k,h/s,w/s),
        ``s`` = ``spatial_factor``.

        ``chunk_size``: latent frames per streamed chunk after the first (default ``config.chunk_size``;
        0 = the whole clip in one pass); every chunk size gives the same result. ``tile``: spatial tiling
        (None = automatic above ``config.auto_tile_above`` pixels).
        """
        self._check_video(video)
        video = video.to(device=self.device, dtype=self.dtype)
        chunk = self.config.chunk_size if chunk_size is None else chunk_size
        fn = lambda v: self._encode_moments(v, chunk)  # noqa: E731
        if self._use_tiling(tile, *video.shape[-2:]):
            sf = self.spatial_factor
            size = max(sf, self.config.tile_size // sf * sf)
            overlap = min(size - sf, self.config.tile_overlap // sf * sf)
            moments = tiled_apply(fn, video, size, overlap, 1.0 / sf)
        else:
            moments = fn(video)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(
        self, z: torch.Tensor, chunk_size: int | None = None, tile: bool | None = None, out_device=None
    ) -> torch.Tensor:
        """Decode raw latents (b,c,t',h',w') into a clip (b,3,1+4(t'-1),s*h',s*w') clamped to [-1, 1].

        ``out_device`` (e.g. ``"cpu"``) gathers the decoded frames there as they are made, so the
        accelerator's memory holds one chunk's activations however long the clip is.
        """
        self._check_latents(z)
        z = z.to(device=self.device, dtype=self.dtype)
        chunk = self.config.chunk_size if chunk_size is None else chunk_size
        fn = lambda v: self._decode_pixels(v, chunk, out_device)  # noqa: E731
        sf = self.spatial_factor
        if self._use_tiling(tile, z.shape[-2] * sf, z.shape[-1] * sf):
            size = max(1, self.config.tile_size // sf)
            overlap = min(size - 1, self.config.tile_overlap // sf)
            video = tiled_apply(fn, z, size, overlap, float(sf))
        else:
            video = fn(z)
        return video.clamp(-1.0, 1.0)

    def encode_stream(self, chunks: Iterable[torch.Tensor]) -> Iterator[DiagonalGaussian]:
        """Encode a clip given as an iterable of frame chunks (first chunk starts with frame 0; then
        multiples of 4 frames), yielding the posterior of each chunk. Memory stays bounded by the chunk."""
        cache = StreamCache()
        for frames in chunks:
            moments, cache = self.encode_step(frames.to(device=self.device, dtype=self.dtype), cache)
            mean, logvar = moments.chunk(2, dim=1)
            yield DiagonalGaussian(mean, logvar)

    def decode_stream(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Decode raw latents given as an iterable of chunks, yielding pixel chunks clamped to [-1, 1]."""
        cache = StreamCache()
        for z in chunks:
            video, cache = self.decode_step(z.to(device=self.device, dtype=self.dtype), cache)
            yield video.clamp(-1.0, 1.0)

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.dim() == 5:
            self._check_latent_channels(z.shape[1])
        cfg = self.config
        padded = z[(None,) * (5 - z.dim())]  # an unbatched clip (c, t, h, w) as a batch of one
        return latent_statistics(
            padded, cfg.latents_mean, cfg.latents_std, cfg.first_latents_mean, cfg.first_latents_std
        )

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (b, c, t, h, w) of whole clips -> unit-scale latents: (z - latents_mean) / latents_std per
        channel (frame 0 by ``first_latents_mean`` / ``first_latents_std`` when the config has them)."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Unit-scale latents of whole clips -> raw latents: the inverse of ``normalize``."""
        mean, std = self._stats(z)
        return z * std + mean

    # ---------------------------------------------------------------- weights in and out

    @classmethod
    def from_config(cls, config: VAEConfig, device=None, dtype=None) -> CausalVAE:
        return cls(config).to(device=device, dtype=dtype)

    @classmethod
    @names_source("VAE")
    def from_pretrained(cls, src: str | Path, device=None, dtype=None, overrides=None, **fields) -> CausalVAE:
        """Load a VAE from a shipped model's name (``"default"``: its trained VAE), a preset name (random init,
        e.g. ``"default-arch"``), a vidlatent folder, a diffusers ``AutoencoderKLWan`` folder (Wan 2.1 or 2.2),
        or an original Wan VAE checkpoint (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth`` or the same keys in
        .safetensors).

        ``overrides`` (a dict or ``key=value`` strings) and keyword ``fields`` replace config fields (e.g.
        ``chunk_size=2``). Weights load without executing code; keys or shapes that do not fit raise an error
        listing them. What ``src`` is, is told by ``checkpoint.resolve_source``.
        """
        overrides = {**override_items(overrides), **fields}
        source = resolve_source(src, "vae")
        if source.kind == "preset":
            cfg = load_config(
                VAEConfig, "vae", source.name, overrides=[f"{k}={v}" for k, v in overrides.items()]
            )
            return cls.from_config(cfg, device, dtype)
        path = source.path
        if path.is_dir():
            cfg_file = path / CONFIG_NAME
            if not cfg_file.is_file():
                raise FileNotFoundError(
                    f"{path} has no {CONFIG_NAME}; expected a vidlatent or diffusers VAE folder"
                )
            raw = read_json(cfg_file)
            if raw.get("_vidlatent_kind") == "vae":
                raw.pop("_vidlatent_kind")
                cfg = config_from_dict(VAEConfig, {**raw, **overrides})
                sd, layout = load_state_dict(path / WEIGHTS_NAME), "vidlatent"
            elif raw.get("_class_name", "AutoencoderKLWan") == "AutoencoderKLWan":
                cfg = config_from_dict(VAEConfig, {**vae_config_from_diffusers(raw), **overrides})
                sd, layout = load_state_dict(find_weights(path)), "diffusers"
            else:
                raise ValueError(
                    f"{path} holds a {raw['_class_name']}, not an AutoencoderKLWan or vidlatent VAE"
                )
        else:
            sd = load_state_dict(path)
            layout = _detect_layout(sd)
            cfg = config_from_dict(VAEConfig, {**vae_config_from_state_dict(sd, layout), **overrides})
        with torch.device("meta"):
            model = cls(cfg)
        if layout != "vidlatent":
            mapping = diffusers_key_map(model) if layout == "diffusers" else wan_key_map(model)
            sd = import_state_dict(model, sd, mapping, layout)
        load_into(model, sd, what=f"CausalVAE ({layout} layout from {path})")
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (atomically) into ``folder``."""
        save_folder(folder, self.state_dict(), config_to_dict(self.config), kind="vae")
