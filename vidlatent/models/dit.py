"""The Wan 2.1 transformer: patchify -> embedders -> blocks -> head -> unpatchify.

Numerically the model of Wan 2.1 T2V, I2V and FLF2V (and of diffusers' ``WanTransformer3DModel``), under our
own parameter names; ``from_pretrained`` reads our folders, diffusers folders and original Wan checkpoints.
The image-conditioned variant is the same model with two config options (``DiTConfig.image_dim``,
``image_pos_len``): an image embedder for CLIP tokens, and in every cross-attention a second key/value
projection that the same queries attend to (Wan adds the two attention outputs before the output projection).

Letters: b batch, c channels, t h w latent frames/height/width (after patching inside the model),
pt ph pw patch sizes, n video tokens, m text tokens, i image tokens, d model width, k heads, e head dim,
s modulation slots.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from ..checkpoint import (
    CONFIG_NAME,
    find_weights,
    load_into,
    load_state_dict,
    names_source,
    override_items,
    read_json,
    resolve_source,
    save_folder,
)
from ..config import DiTConfig, config_from_dict, config_to_dict, load_config, merge_config
from .layers import ATTENTION_BACKENDS, RMSNorm, apply_rope, attention, rope_3d

WAN_HEAD_DIM = 128  # every released Wan 2.1 model; used when a checkpoint's head count must be inferred
CLIP_TOKENS = 257  # Wan's CLIP ViT-H/14 at 224 px: 16 x 16 patches and a class token, per image
# original Wan ``model_type`` -> (image_dim, image_pos_len): CLIP ViT-H tokens are 1280 wide
WAN_MODEL_TYPES = {"t2v": (None, None), "i2v": (1280, None), "flf2v": (1280, 2 * CLIP_TOKENS)}


# ----------------------------------------------------------------------------------------------- helpers


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(b, dim)`` = [cos | sin] of ``t * max_period^(-i/(dim/2))``, computed in float64."""
    half = dim // 2
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    freqs = max_period ** (-torch.arange(half, dtype=dtype, device=t.device) / half)
    angle = t.to(dtype)[:, None] * freqs
    return torch.cat([angle.cos(), angle.sin()], dim=-1).float()


def _modulation_row(table: torch.Tensor, time_mod: torch.Tensor, i: int) -> torch.Tensor:
    """Row ``i`` of a block's table (1, s, d) plus the time modulation, (b, s or 1, d) or per token
    (b, n, s or 1, d) -> (b, 1, d) or (b, n, d). One row at a time: per token each is as large as the tokens in
    fp32, so a block makes each where it is used rather than all six at once (Wan 2.2 TI2V 5B at 720p: 0.3
    against 1.9 GB)."""
    row = table[:, i] + time_mod.select(-2, i if time_mod.shape[-2] > 1 else 0)  # (1, s or 1, d): shared
    return row if time_mod.ndim == 4 else row.unsqueeze(1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Layer-normalize ``x`` (no affine) in fp32, then ``* (1 + scale) + shift``; returns fp32."""
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return torch.addcmul(shift, normed, 1 + scale)


# ------------------------------------------------------------------------------------------------ blocks


class PatchEmbed(nn.Module):
    """Non-overlapping 3D patches -> tokens. The weight keeps Conv3d's layout ``(d, c, pt, ph, pw)``."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.patch = tuple(patch)
        self.weight = nn.Parameter(torch.empty(dim, in_channels, *patch))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch
        patches = rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
        return F.linear(patches, self.weight.flatten(1), self.bias)  # same sum as a strided Conv3d


class MLP(nn.Module):
    """Two linear layers around a GELU-tanh (``"gelu_tanh"``), an exact GELU (``"gelu"``) or SiLU (``"silu"``)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.act == "silu":
            return self.fc2(F.silu(x))
        return self.fc2(F.gelu(x, approximate="tanh" if self.act == "gelu_tanh" else "none"))


def layer_norm_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` computed in fp32 (weights too), returned in ``x``'s dtype."""
    w, b = norm.weight.float(), norm.bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], w, b, norm.eps).type_as(x)


class ImageEmbed(nn.Module):
    """CLIP image tokens (b, i, image_dim) -> (b, i, d): LayerNorm, exact-GELU MLP, LayerNorm (eps 1e-5, as Wan).

    ``pos_len`` (FLF2V) adds a learned position embedding to the ``pos_len`` tokens of both frames first, so
    the model can tell the first frame's tokens from the last's.
    """

    def __init__(self, image_dim: int, dim: int, pos_len: int | None):
        super().__init__()
        self.norm_in = nn.LayerNorm(image_dim)
        self.mlp = MLP(image_dim, image_dim, dim, "gelu")
        self.norm_out = nn.LayerNorm(dim)
        self.pos = nn.Parameter(torch.zeros(1, pos_len, image_dim)) if pos_len else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos is not None:
            image = image + self.pos
        return layer_norm_fp32(self.norm_out, self.mlp(layer_norm_fp32(self.norm_in, image)))


class Attention(nn.Module):
    """Multi-head attention with RMS query/key norm across all heads; self-attention when ``context`` is None.

    ``image_kv`` (image-conditioned cross-attention): keys and values of their own for ``image`` tokens; the
    same queries attend to the text and to the image separately, and the two outputs are summed.
    """

    def __init__(
        self, dim: int, num_heads: int, qk_norm: str, eps: float, backend: str, image_kv: bool = False
    ):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.exchange = None  # context-parallel self-attention (runtime.parallel sets it): (q, k, v, backend)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim, eps) if qk_norm == "rms_across_heads" else None
        self.k_norm = RMSNorm(dim, eps) if qk_norm == "rms_across_heads" else None
        if image_kv:
            self.k_image = nn.Linear(dim, dim)
            self.v_image = nn.Linear(dim, dim)
            self.k_image_norm = RMSNorm(dim, eps) if qk_norm == "rms_across_heads" else None

    def forward(self, x, context=None, rope=None, mask=None, image=None) -> torch.Tensor:
        src = x if context is None else context
        q, k, v = self.q(x), self.k(src), self.v(src)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (rearrange(z, "b n (k e) -> b n k e", k=self.num_heads) for z in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (rearrange(z, "b n k e -> b k n e") for z in (q, k, v))
        if self.exchange is None:
            out = attention(q, k, v, mask=mask, backend=self.backend)
        else:
            out = self.exchange(q, k, v, self.backend)
        if image is not None:
            k_img, v_img = self.k_image(image), self.v_image(image)
            if self.k_image_norm is not None:
                k_img = self.k_image_norm(k_img)
            k_img, v_img = (rearrange(z, "b i (k e) -> b k i e", k=self.num_heads) for z in (k_img, v_img))
            out = out + attention(q, k_img, v_img, backend=self.backend)
        return self.out(rearrange(out, "b k n e -> b n (k e)"))


class DiTBlock(nn.Module):
    """Modulated self-attention (with 3D rope), cross-attention to text (and image tokens), modulated GELU-tanh
    feed-forward."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.empty(1, 6, d))  # added to the shared time modulation
        self.self_attn = Attention(d, cfg.num_heads, cfg.qk_norm, cfg.eps, cfg.attention)
        self.cross_norm = nn.LayerNorm(d, eps=cfg.eps) if cfg.cross_attn_norm else None
        image_kv = cfg.image_dim is not None
        self.cross_attn = Attention(d, cfg.num_heads, cfg.qk_norm, cfg.eps, cfg.attention, image_kv=image_kv)
        self.mlp = MLP(d, cfg.ffn_dim, d, "gelu_tanh")

    def forward(self, x, context, time_mod, rope, context_mask, image=None) -> torch.Tensor:
        # rows 0-5, (b 1 d) fp32 vectors (b n d with per-token noise levels): shift, scale, gate of attention,
        # then of the feed-forward. Intermediates are passed on, not kept in names, so none outlives its use.
        row = partial(_modulation_row, self.modulation, time_mod)
        attn = self.self_attn(modulate(x, row(0), row(1), self.eps).type_as(x), rope=rope)
        x = torch.addcmul(x.float(), attn.float(), row(2)).type_as(x)
        del attn
        x = x + self.cross_attn(
            x if self.cross_norm is None else layer_norm_fp32(self.cross_norm, x),
            context=context, mask=context_mask, image=image,
        )  # fmt: skip
        y = self.mlp(modulate(x, row(3), row(4), self.eps).type_as(x))
        return torch.addcmul(x.float(), y.float(), row(5)).type_as(x)


class Head(nn.Module):
    """Final modulated norm and projection to ``c * pt * ph * pw`` values per token."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))
        self.proj = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        # the time embedding (b d), or (b n d) per token, as one modulation row shared by shift and scale
        time_emb = time_emb.unsqueeze(-2)
        shift, scale = (_modulation_row(self.modulation, time_emb, i) for i in range(2))
        return self.proj(modulate(x, shift, scale, self.eps).type_as(x))


# ----------------------------------------------------------------------------------------- the model


class Residuals:
    """What to add to the tokens after some blocks: a dict ``{block index: (b, n, d)}``, or an iterator of
    ``(block index, residual)`` pairs in block order, drawn one at a time as ``take`` moves past the last one
    drawn (a control branch computes its hints that way, so it holds one or two, not all of them through the
    forward).
    ``transform`` (e.g. a context-parallel rank's share of the tokens) is applied to each as it is taken."""

    def __init__(self, source):
        self._given = source if isinstance(source, Mapping) else None
        self._pairs = None if self._given is not None else iter(source)
        self._ahead: tuple[int, torch.Tensor] | None = None  # drawn for a later block
        self.transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def take(self, index: int) -> torch.Tensor | None:
        """The residual for block ``index`` (None: none); called with increasing indices, each at most once."""
        if self._given is not None:
            value = self._given.get(index)
        else:
            if self._ahead is None:
                self._ahead = next(self._pairs, None)
            if self._ahead is not None and self._ahead[0] < index:
                raise RuntimeError(
                    f"the residual for block {self._ahead[0]} was drawn after block {index} ran"
                )
            value = None
            if self._ahead is not None and self._ahead[0] == index:
                value, self._ahead = self._ahead[1], None
        return value if value is None or self.transform is None else self.transform(value)


# parameters kept in fp32 when the rest of the model is cast (small, and precision-sensitive)
_FP32_PARAMS = re.compile(r"^(time_embed\.|time_modulation\.)|modulation$")


class VideoDiT(nn.Module):
    """Wan 2.1 transformer: ``dit(x, sigma, context, context_mask=None)`` -> velocity ``noise - x0``; the
    image-conditioned variant (I2V / FLF2V) also takes ``image=`` CLIP tokens and ``condition=`` latents."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.dim % config.num_heads:
            raise ValueError(f"dim {config.dim} is not divisible by num_heads {config.num_heads}")
        if config.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention {config.attention!r}; available: {', '.join(ATTENTION_BACKENDS)}"
            )
        if config.qk_norm not in ("rms_across_heads", "none"):
            raise ValueError(f"unknown qk_norm {config.qk_norm!r}; available: rms_across_heads, none")
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        d, patch = config.dim, tuple(config.patch_size)
        self.patch_embed = PatchEmbed(config.in_channels, d, patch)
        self.text_embed = MLP(config.text_dim, d, d, "gelu_tanh")
        if config.image_dim is not None:
            self.image_embed = ImageEmbed(config.image_dim, d, config.image_pos_len)
        elif config.image_pos_len is not None:
            raise ValueError("image_pos_len (FLF2V) needs image_dim: it embeds the positions of image tokens")
        self.time_embed = MLP(config.freq_dim, d, d, "silu")
        self.time_modulation = nn.Linear(d, 6 * d)  # applied to silu(time embedding), shared by all blocks
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_layers))
        self.head = Head(d, config.out_channels * math.prod(patch), config.eps)
        self.context_parallel = None  # runtime.parallel.ContextParallel: this rank's share of every call
        init_weights(self)

    def set_attention(self, backend: str) -> None:
        """Switch every attention to another kernel (``models.layers.ATTENTION_BACKENDS``)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention backend {backend!r}; available: {', '.join(ATTENTION_BACKENDS)}"
            )
        self.config.attention = backend
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    @property
    def head_dim(self) -> int:
        return self.config.dim // self.config.num_heads

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        *,
        image: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        hints: Callable[..., Mapping[int, torch.Tensor]] | None = None,
        cache: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Velocity ``(b, c, t, h, w)`` for noisy latents ``x`` at noise level ``sigma`` (b,) in [0, 1], or
        at one noise level per video token, ``sigma`` (b, n) with n the tokens after patching in (t h w) order
        (Wan 2.2 TI2V's per-token timesteps: a clean first frame at 0, the rest at the step's level).

        ``sigma`` may be float64 (``1000 * sigma`` then stays exact for whole-number timesteps such as 999).
        ``context`` (b, m, text_dim) are text tokens. Without ``context_mask`` every token is attended to, as
        in Wan (which zero-pads prompts to ``text_len``); with a bool mask (b, m), False tokens are ignored.
        The output has ``x``'s dtype; inside, the model runs in its parameter dtype.

        Image-conditioned models (``config.image_dim``: Wan 2.1 I2V / FLF2V) also need ``image`` (b, i,
        image_dim), CLIP image tokens (Wan: the penultimate layer of its CLIP ViT-H, 257 tokens per image;
        FLF2V: the first frame's then the last frame's, ``image_pos_len`` = 514 in all), and a model with
        ``in_channels > out_channels`` needs ``condition`` (b, in_channels - out_channels, t, h, w), joined
        to ``x`` along channels before the patch embedding (Wan: 4 mask channels, then 16 image latents).

        ``hints`` (a control branch, ``models.control``): called once with the embedded inputs (the tokens
        entering block 0, text, time modulation, rope, context mask, image tokens), it returns residuals
        ``{block index: (b, n, d)}``, each added to the tokens after that block, or an iterator of ``(block
        index, residual)`` pairs in block order, drawn as the blocks reach them (one or two held at a time; a
        residual the blocks never reach, as under step caching, is never computed).

        ``cache`` (step caching, ``runtime.cache.CacheState``): ``cache(tokens, run_blocks, depth)`` returns the
        tokens after all ``depth`` blocks; ``run_blocks(tokens, start, stop, rows=None)`` runs blocks
        ``start..stop-1`` on the samples ``rows`` (an index tensor; None: all), so it may skip some of them.
        """
        kwargs = dict(image=image, condition=condition, hints=hints, cache=cache)
        if self.context_parallel is not None:  # under torchrun: this rank's share (runtime.parallel)
            return self.context_parallel.forward(self._forward, x, sigma, context, context_mask, **kwargs)
        return self._forward(x, sigma, context, context_mask, **kwargs)

    def _forward(self, x, sigma, context, context_mask, *, image, condition, hints, cache) -> torch.Tensor:
        sigma, context_mask = self._check_inputs(x, sigma, context, context_mask)
        self._check_image_inputs(x, image, condition)
        context, context_mask = _drop_masked_tokens(context, context_mask)
        cfg, dtype = self.config, self.patch_embed.weight.dtype
        pt, ph, pw = cfg.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)

        x_in = x if condition is None else torch.cat([x, condition.to(x)], dim=1)
        tokens = self.patch_embed(x_in.to(dtype))
        rope = rope_3d(grid, self.head_dim, device=x.device)
        time_emb, time_mod = self._time(sigma)
        text = self.text_embed(context.to(dtype))
        image = None if image is None else self.image_embed(image.to(dtype))

        residuals = Residuals(
            {} if hints is None else hints(tokens, text, time_mod, rope, context_mask, image)
        )
        if (par := self.context_parallel) is not None:  # a share of the tokens from here to the head
            if cache is not None:  # each rank would judge its own share and the ranks' collectives would part
                raise ValueError(
                    "step caching does not run under context parallel (torchrun) yet: use cache=None"
                )
            tokens, rope, time_emb, time_mod = par.split(tokens, rope, time_emb, time_mod)
            residuals.transform = par.split_tokens

        def run_blocks(tokens, start, stop, rows=None):  # blocks start..stop-1 on the samples ``rows`` (all)
            pick = (lambda v: v) if rows is None else (lambda v: v if v is None or len(v) == 1 else v[rows])
            inputs = (pick(text), pick(time_mod), rope, pick(context_mask), pick(image))
            for i, block in enumerate(self.blocks[start:stop], start):
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    tokens = checkpoint(block, tokens, *inputs, use_reentrant=False)
                else:
                    tokens = block(tokens, *inputs)
                if (residual := residuals.take(i)) is not None:
                    tokens = tokens + pick(residual)
            return tokens

        depth = len(self.blocks)
        if cache is None:  # handed over, not kept in this frame: each block's input is freed after it
            held = [tokens]
            del tokens
            tokens = run_blocks(held.pop(), 0, depth)
        else:
            tokens = cache(tokens, run_blocks, depth)

        out = self.head(tokens, time_emb)
        out = out if par is None else par.gather(out)
        unpatchify = "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)"
        out = rearrange(out, unpatchify, t=grid[0], h=grid[1], pt=pt, ph=ph, pw=pw)
        return out.to(x.dtype)

    def _time(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise levels (b,) or per token (b, n) -> the time embedding (b, d) / (b, n, d) and the shared
        modulation (b, 6, d) / (b, n, 6, d), fp32. Per token, each distinct level is embedded once."""
        cfg = self.config
        levels, where = (sigma, None) if sigma.ndim == 1 else torch.unique(sigma, return_inverse=True)
        freq = timestep_embedding(1000 * levels, cfg.freq_dim)
        time_emb = self.time_embed(freq.to(self.time_embed.fc1.weight.dtype)).float()
        time_mod = F.silu(time_emb).to(self.time_modulation.weight.dtype)
        time_mod = rearrange(self.time_modulation(time_mod).float(), "u (s d) -> u s d", s=6)
        if where is None:
            return time_emb, time_mod
        return time_emb[where], time_mod[where]

    def _check_inputs(self, x, sigma, context, context_mask):
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"x must be (b, c, t, h, w) latents; got shape {tuple(x.shape)}")
        b, c, t, h, w = x.shape
        if c != cfg.out_channels:
            raise ValueError(f"x has {c} channels; this model accepts {cfg.out_channels}")
        pt, ph, pw = cfg.patch_size
        if t % pt or h % ph or w % pw or t == 0:
            raise ValueError(
                f"latent size t={t}, h={h}, w={w} does not split into ({pt}, {ph}, {pw}) patches: "
                f"t must be a positive multiple of {pt}, h of {ph} and w of {pw}"
            )
        sigma = torch.as_tensor(sigma, device=x.device)  # float64 kept (exact whole-number timesteps)
        sigma = sigma if sigma.dtype == torch.float64 else sigma.float()
        n = (t // pt) * (h // ph) * (w // pw)
        if sigma.ndim == 2 and sigma.shape[0] in (1, b) and sigma.shape[1] == n:
            sigma = sigma.expand(b, n)
        elif sigma.ndim > 1 or sigma.numel() not in (1, b):
            raise ValueError(
                f"sigma must have shape ({b},) (one noise level per sample) or ({b}, {n}) (one per video "
                f"token, (t h w) order); got {tuple(sigma.shape)}"
            )
        else:
            sigma = sigma.reshape(-1).expand(b)
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(
                f"context must be (b={b}, m, text_dim={cfg.text_dim}) text tokens; got {tuple(context.shape)}"
            )
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise ValueError(
                    f"context_mask must be (b, m) = {tuple(context.shape[:2])}; got {tuple(context_mask.shape)}"
                )
            context_mask = context_mask.to(device=context.device, dtype=torch.bool)
        return sigma, context_mask

    def _check_image_inputs(self, x, image, condition) -> None:
        """Image tokens iff ``config.image_dim``; condition latents iff ``in_channels > out_channels``."""
        cfg, (b, _, t, h, w) = self.config, x.shape
        if cfg.image_dim is None and image is not None:
            raise ValueError(
                "this is a text-to-video denoiser (config.image_dim is None): it takes no image tokens; "
                "image-to-video with it keeps the first latent frame instead (VideoPipeline.animate)"
            )
        if cfg.image_dim is not None:
            ok = (
                image is not None
                and image.ndim == 3
                and (image.shape[0], image.shape[2]) == (b, cfg.image_dim)
                and cfg.image_pos_len in (None, image.shape[1])
            )
            if not ok:
                want = f"(b={b}, {cfg.image_pos_len or 'i'}, image_dim={cfg.image_dim})"
                both = ", the first frame's then the last frame's" if cfg.image_pos_len else ""
                raise ValueError(
                    f"this image-conditioned denoiser (Wan I2V / FLF2V) needs image={want} CLIP image tokens"
                    f"{both}; got {'none' if image is None else tuple(image.shape)}"
                )
        k = cfg.condition_channels
        if k == 0 and condition is not None:
            raise ValueError(
                "this denoiser takes no condition latents (its in_channels equal its out_channels)"
            )
        if k and (condition is None or tuple(condition.shape) != (b, k, t, h, w)):
            raise ValueError(
                f"this denoiser takes condition=(b, {k}, t, h, w) = {(b, k, t, h, w)} latents beside x (Wan "
                f"I2V: a 4-channel frame mask, then 16 image latents); got "
                f"{'none' if condition is None else tuple(condition.shape)}"
            )

    # ------------------------------------------------------------------------------------ weights io

    @classmethod
    @names_source("denoiser")
    def from_pretrained(
        cls,
        src: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        config: DiTConfig | None = None,
        overrides=None,
    ) -> VideoDiT:
        """Load from a shipped model's name (``"default"``: its trained denoiser), a preset name (random weights,
        e.g. ``"default-arch"``), a vidlatent folder, a diffusers ``WanTransformer3DModel`` folder (single or
        sharded safetensors; a pipeline root with ``transformer/`` works too), or an original Wan 2.1 checkpoint
        file or folder. The layout is told from the keys; the config comes from ``config`` if given, else from
        the folder's config.json, else from tensor shapes (heads = dim / 128, as in every Wan 2.1 model).

        A preset gives a freshly initialized model. ``dtype`` defaults to the checkpoint's; the time embedding
        and modulation tables stay fp32 as in the reference. Weights are assigned to a model built on the meta
        device, so no random initialization is spent on large models. ``overrides`` (a dict or ``key=value``
        strings) replace config fields. What ``src`` is, is told by ``checkpoint.resolve_source``.
        """
        overrides = override_items(overrides)
        source = resolve_source(src, "dit")
        if source.kind == "preset":
            base = config or load_config(DiTConfig, "dit", source.name)
            model = cls(merge_config(base, overrides) if overrides else base)
            return _cast(model, dtype).to(device) if dtype is not None else model.to(device)
        path = source.path
        meta: dict = {}
        if path.is_dir():
            if not (path / CONFIG_NAME).is_file() and (path / "transformer" / CONFIG_NAME).is_file():
                path = path / "transformer"
            meta = read_json(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else {}
            path = find_weights(path)
        kind = meta.get("_vidlatent_kind")
        if kind is not None and kind != "dit":
            raise ValueError(f"{src} holds a vidlatent {kind!r} model, not a dit")

        state = load_state_dict(path)
        layout = detect_layout(state)
        state = {"diffusers": from_diffusers_state_dict, "wan": from_wan_state_dict}.get(layout, dict)(state)
        check_not_fun_v11(state, src)
        if config is None:
            config = config_from_metadata(meta) or infer_config(state)
        if overrides:
            config = merge_config(config, overrides)
        if dtype is None:  # the dtype holding most of the weights (diffusers keeps a few in fp32)
            sizes: dict[torch.dtype, int] = {}
            for v in state.values():
                if v.is_floating_point():
                    sizes[v.dtype] = sizes.get(v.dtype, 0) + v.numel()
            dtype = max(sizes, key=sizes.get, default=torch.float32)
        with torch.device("meta"):
            model = cls(config)
        _cast(model, dtype)
        load_into(model, state, what=f"VideoDiT ({layout} checkpoint {path})")
        return model.to(device)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a vidlatent folder (config.json + model.safetensors) that ``from_pretrained`` reads back.
        ValueError (before writing) when the blocks hold fp8 weights: see ``check_saveable``."""
        self.check_saveable()
        save_folder(folder, self.state_dict(), config_to_dict(self.config), kind="dit")

    def check_saveable(self) -> None:
        """ValueError when the blocks' linear weights are stored as fp8 (``weights_dtype="fp8"``,
        ``runtime.fp8.quantize``): their state holds ``weight_fp8`` / ``weight_scale`` in place of ``weight``, a
        checkpoint no loader reads, and the full-precision weights are gone."""
        quantized = [
            n.removesuffix(".weight_fp8") for n, _ in self.named_buffers() if n.endswith(".weight_fp8")
        ]
        if quantized:
            raise ValueError(
                f"this denoiser's weights are stored as fp8 ({len(quantized)} linear layers, e.g. {quantized[0]}): "
                "a checkpoint of them would not load. Save from the model loaded without weights_dtype='fp8' "
                "(fp8 is applied when loading, so the saved weights keep their precision)"
            )


# Wan2.1-Fun V1.1 parts beside the Wan transformer (VideoX-Fun's wan_transformer3d.py): Control's reference-image
# path (a 2D patch embedding of a reference latent, its tokens put in front as an extra frame) and Control-Camera's
# adapter (camera rays added to the patch tokens). V1.0 Fun-Control is the plain transformer with 48 input channels.
FUN_V11_PARTS = {"ref_conv": "Control's reference-image path", "control_adapter": "Control-Camera's adapter"}


def check_not_fun_v11(state: Mapping[str, torch.Tensor], src) -> None:
    """ValueError naming them when a checkpoint holds Wan2.1-Fun V1.1 parts, which this model does not run."""
    found = [
        f"{k} ({what})" for k, what in FUN_V11_PARTS.items() if any(n.startswith(f"{k}.") for n in state)
    ]
    if found:
        raise ValueError(
            f"{src} is a Wan2.1-Fun V1.1 model: {', '.join(found)} is not supported; Wan2.1-Fun V1.0 Control "
            "(Wan2.1-Fun-1.3B-Control, Wan2.1-Fun-14B-Control: the Wan transformer with 48 input channels) loads"
        )


def init_linears_and_patch(model: nn.Module, patch_weight: torch.Tensor, patch_bias: torch.Tensor) -> None:
    """Every linear layer of ``model`` xavier-uniform with zero bias, and the patch embedding (a conv whose
    weight is viewed as ``(dim, fan_in)``) likewise: the base of the denoiser's and the control branch's init."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
    nn.init.zeros_(patch_bias)


def init_weights(model: VideoDiT) -> None:
    """All initialization in one place (Wan's scheme, plus adaLN-zero gates and a zero output projection).

    Linear layers xavier-uniform with zero bias; embedders normal(0.02); the shared time modulation and the
    gate rows of every block's table zero, so each block starts as the identity; the head projects to zero.
    """
    d = model.config.dim
    init_linears_and_patch(model, model.patch_embed.weight, model.patch_embed.bias)
    for layer in (model.text_embed.fc1, model.text_embed.fc2, model.time_embed.fc1, model.time_embed.fc2):
        nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(model.time_modulation.weight)
    nn.init.zeros_(model.time_modulation.bias)
    with torch.no_grad():
        for block in model.blocks:
            block.modulation.copy_(torch.randn_like(block.modulation) / d**0.5)
            block.modulation[:, [2, 5]] = 0.0  # the two gates
        model.head.modulation.copy_(torch.randn_like(model.head.modulation) / d**0.5)
    nn.init.zeros_(model.head.proj.weight)
    nn.init.zeros_(model.head.proj.bias)


def _cast(model: VideoDiT, dtype: torch.dtype) -> VideoDiT:
    """Cast to ``dtype`` but keep the time embedding and the modulation tables in fp32."""
    model.to(dtype)
    for name, param in model.named_parameters():
        if _FP32_PARAMS.search(name):
            param.data = param.data.float()
    return model


def _drop_masked_tokens(context: torch.Tensor, mask: torch.Tensor | None):
    """Remove text tokens masked in every sample (exact: they take no part), and the mask when all are kept."""
    if mask is None:
        return context, None
    if not bool(mask.any(dim=1).all()):
        raise ValueError("context_mask leaves a sample with no text token; keep at least one per sample")
    keep = mask.any(dim=0)
    if not bool(keep.all()):
        context, mask = context[:, keep], mask[:, keep]
    return context, (None if bool(mask.all()) else mask)


# -------------------------------------------------------------------------------- checkpoint layouts

# module paths as (ours, original Wan, diffusers); each maps its ".weight" and ".bias"
_TOP_MODULES = [
    ("patch_embed", "patch_embedding", "patch_embedding"),
    ("text_embed.fc1", "text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embed.fc2", "text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embed.fc1", "time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embed.fc2", "time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_modulation", "time_projection.1", "condition_embedder.time_proj"),
    ("head.proj", "head.head", "proj_out"),
    # image-conditioned models (I2V / FLF2V)
    ("image_embed.norm_in", "img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("image_embed.mlp.fc1", "img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("image_embed.mlp.fc2", "img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("image_embed.norm_out", "img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
]
_BLOCK_MODULES = [
    ("cross_norm", "norm3", "norm2"),  # Wan numbers its norms in a different order than diffusers
    ("mlp.fc1", "ffn.0", "ffn.net.0.proj"),
    ("mlp.fc2", "ffn.2", "ffn.net.2"),
    ("cross_attn.k_image", "cross_attn.k_img", "attn2.add_k_proj"),  # image-conditioned models
    ("cross_attn.v_image", "cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.k_image_norm", "cross_attn.norm_k_img", "attn2.norm_added_k"),
] + [
    (f"{ours}.{a}", f"{ours}.{b}", f"{theirs}.{c}")
    for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
    for a, b, c in (
        ("q", "q", "to_q"),
        ("k", "k", "to_k"),
        ("v", "v", "to_v"),
        ("out", "o", "to_out.0"),
        ("q_norm", "norm_q", "norm_q"),
        ("k_norm", "norm_k", "norm_k"),
    )
]


def _param_table(modules, params):
    rows = [tuple(f"{m}.{p}" for m in row) for row in modules for p in ("weight", "bias")]
    return rows + params


_TOP = _param_table(
    _TOP_MODULES,
    [
        ("head.modulation", "head.modulation", "scale_shift_table"),
        ("image_embed.pos", "img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),  # FLF2V
    ],
)
_BLOCK = _param_table(_BLOCK_MODULES, [("modulation", "modulation", "scale_shift_table")])
_LAYOUTS = {"vidlatent": 0, "wan": 1, "diffusers": 2}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def _translate(state: Mapping[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """Rename keys between layouts; keys the table does not know pass through (and show up as unexpected)."""
    i, j = _LAYOUTS[src], _LAYOUTS[dst]
    top = {row[i]: row[j] for row in _TOP}
    block = {row[i]: row[j] for row in _BLOCK}
    out = {}
    for key, value in state.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match and match[2] in block:
            out[f"blocks.{match[1]}.{block[match[2]]}"] = value
        else:
            out[top.get(key, key)] = value
    return out


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``"diffusers"``, ``"wan"`` (original Wan 2.1 keys) or ``"vidlatent"``, told from the key names."""
    if any(k.startswith("condition_embedder.") for k in state):
        return "diffusers"
    if any(k.startswith(("time_embedding.", "model.diffusion_model.")) for k in state):
        return "wan"
    return "vidlatent"


def from_diffusers_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``WanTransformer3DModel`` keys -> vidlatent keys (tensors are shared, not copied)."""
    return _translate(state, "diffusers", "vidlatent")


def to_diffusers_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vidlatent keys -> diffusers ``WanTransformer3DModel`` keys."""
    return _translate(state, "vidlatent", "diffusers")


def from_wan_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan 2.1 keys (``blocks.0.self_attn.q.weight``, optionally under ``model.diffusion_model.``)
    -> vidlatent keys."""
    prefix = "model.diffusion_model."
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    return _translate(state, "wan", "vidlatent")


def to_wan_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vidlatent keys -> original Wan 2.1 keys."""
    return _translate(state, "vidlatent", "wan")


def infer_config(state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """A DiTConfig read off vidlatent-layout tensor shapes. The head count is not in the shapes: it is
    ``num_heads`` if given, else ``dim / 128`` (true of every Wan 2.1 model)."""
    try:
        dim, in_channels, *patch = state["patch_embed.weight"].shape
        layers = {int(m[1]) for k in state if (m := _BLOCK_KEY.fullmatch(k))}
        image_norm, image_pos = state.get("image_embed.norm_in.weight"), state.get("image_embed.pos")
        cfg = DiTConfig(
            in_channels=in_channels,
            out_channels=state["head.proj.weight"].shape[0] // math.prod(patch),
            patch_size=list(patch),
            dim=dim,
            ffn_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
            freq_dim=state["time_embed.fc1.weight"].shape[1],
            text_dim=state["text_embed.fc1.weight"].shape[1],
            num_layers=max(layers) + 1,
            qk_norm="rms_across_heads" if "blocks.0.self_attn.q_norm.weight" in state else "none",
            cross_attn_norm="blocks.0.cross_norm.weight" in state,
            image_dim=None if image_norm is None else image_norm.shape[0],
            image_pos_len=None if image_pos is None else image_pos.shape[1],
        )
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"cannot read a VideoDiT config off this checkpoint's tensors (missing {err})"
        ) from err
    if num_heads is None:
        if dim % WAN_HEAD_DIM:
            raise ValueError(f"cannot infer the head count for dim {dim}; pass config= to from_pretrained")
        num_heads = dim // WAN_HEAD_DIM
    cfg.num_heads = num_heads
    return cfg


def config_from_metadata(meta: Mapping) -> DiTConfig | None:
    """DiTConfig from a folder's config.json: vidlatent, diffusers ``WanTransformer3DModel`` or original Wan
    (``WanModel``); None when the file says nothing usable."""
    if meta.get("_vidlatent_kind") == "dit":
        return config_from_dict(DiTConfig, {k: v for k, v in meta.items() if k != "_vidlatent_kind"})
    if meta.get("_class_name") == "WanTransformer3DModel":
        return config_from_diffusers(meta)
    if "num_heads" in meta and "dim" in meta:
        return config_from_wan(meta)
    return None


def config_from_diffusers(meta: Mapping) -> DiTConfig:
    """Map a diffusers ``WanTransformer3DModel`` config.json onto DiTConfig (Wan 2.1 T2V, I2V and FLF2V)."""
    heads, head_dim = meta.get("num_attention_heads", 40), meta.get("attention_head_dim", 128)
    image_dim, added_kv = meta.get("image_dim"), meta.get("added_kv_proj_dim")
    if (image_dim is None) != (added_kv is None) or added_kv not in (None, heads * head_dim):
        raise ValueError(
            f"unsupported Wan transformer: image_dim={image_dim}, added_kv_proj_dim={added_kv}; accepted: both "
            f"unset (text-to-video) or image_dim with added_kv_proj_dim = the model width {heads * head_dim} "
            "(Wan 2.1 I2V / FLF2V)"
        )
    if meta.get("pos_embed_seq_len") is not None and image_dim is None:
        raise ValueError("pos_embed_seq_len (FLF2V) without image_dim: not a Wan model this loader knows")
    return DiTConfig(
        in_channels=meta.get("in_channels", 16),
        out_channels=meta.get("out_channels") or meta.get("in_channels", 16),
        patch_size=list(meta.get("patch_size", [1, 2, 2])),
        dim=heads * head_dim,
        ffn_dim=meta.get("ffn_dim", 13824),
        freq_dim=meta.get("freq_dim", 256),
        text_dim=meta.get("text_dim", 4096),
        num_heads=heads,
        num_layers=meta.get("num_layers", 40),
        qk_norm="rms_across_heads" if meta.get("qk_norm", "rms_norm_across_heads") else "none",
        cross_attn_norm=bool(meta.get("cross_attn_norm", True)),
        eps=meta.get("eps", 1e-6),
        image_dim=image_dim,
        image_pos_len=meta.get("pos_embed_seq_len"),
    )


def to_diffusers_config(cfg: DiTConfig) -> dict:
    """The keyword arguments of diffusers' ``WanTransformer3DModel`` for this config."""
    if cfg.qk_norm != "rms_across_heads":
        raise ValueError(
            "diffusers' WanTransformer3DModel always has q/k norms; qk_norm must be rms_across_heads"
        )
    return dict(
        patch_size=tuple(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.dim // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        image_dim=cfg.image_dim,
        added_kv_proj_dim=None if cfg.image_dim is None else cfg.dim,
        pos_embed_seq_len=cfg.image_pos_len,
    )


def config_from_wan(meta: Mapping) -> DiTConfig:
    """Map an original Wan 2.1 ``WanModel`` config.json onto DiTConfig (``model_type`` t2v, i2v or flf2v).

    Wan's image-conditioned models take CLIP ViT-H tokens (width 1280, 257 per image; FLF2V: both frames').
    """
    model_type = meta.get("model_type", "t2v")
    if model_type not in WAN_MODEL_TYPES:
        raise ValueError(
            f"unsupported Wan model_type {model_type!r}; accepted: {', '.join(WAN_MODEL_TYPES)} "
            "(Wan 2.1 text-to-video, image-to-video, first-last-frame-to-video)"
        )
    image_dim, image_pos_len = WAN_MODEL_TYPES[model_type]
    return DiTConfig(
        in_channels=meta.get("in_dim", 16),
        out_channels=meta.get("out_dim", 16),
        patch_size=list(meta.get("patch_size", [1, 2, 2])),
        dim=meta["dim"],
        ffn_dim=meta.get("ffn_dim", 8192),
        freq_dim=meta.get("freq_dim", 256),
        text_dim=meta.get("text_dim", 4096),
        text_len=meta.get("text_len", 512),
        num_heads=meta["num_heads"],
        num_layers=meta.get("num_layers", 32),
        qk_norm="rms_across_heads" if meta.get("qk_norm", True) else "none",
        cross_attn_norm=bool(meta.get("cross_attn_norm", True)),
        eps=meta.get("eps", 1e-6),
        image_dim=image_dim,
        image_pos_len=image_pos_len,
    )
