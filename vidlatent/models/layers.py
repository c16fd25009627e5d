"""Shared layers. ``attention`` is the one place that calls a fused attention kernel.

Letters: b batch, h heads, n query tokens, m key tokens, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# "sdpa" lets torch pick the kernel; the others force one (cuDNN is the fastest on H100/H200 at Wan's shapes:
# 596 vs flash 364 TFLOP/s on an H200, see DESIGN.md), failing where that kernel cannot take the inputs.
_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
EXTERNAL = ("flash_attn", "sage")  # optional packages, called by runtime.kernels where installed (no mask)
ATTENTION_BACKENDS = ("sdpa", *_KERNELS, *EXTERNAL)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Scaled dot-product attention on ``(b h n d)`` tensors; ``mask`` (b m) bool keeps True keys.

    Every attention in vidlatent goes through here, so a faster kernel is swapped in one place.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; available: {', '.join(ATTENTION_BACKENDS)}")
    attn_mask = None if mask is None else mask[:, None, None, :]
    if backend in EXTERNAL and mask is None:  # a masked call (padded text) takes torch's own kernel
        from ..runtime.kernels import external_attention

        return external_attention(backend, q, k, v)
    if backend == "sdpa" or backend in EXTERNAL:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    with sdpa_kernel(_KERNELS[backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class RMSNorm(torch.nn.Module):
    """RMS normalization, computed in fp32 for low-precision inputs, then scaled by a learned ``weight``.

    Two layouts, one idea (the root mean square over ``dim`` features becomes 1):

    * ``channels_first=False`` (the transformers): over the last dimension, ``x * rsqrt(mean(x^2) + eps)``,
      weight ``(dim,)``.
    * ``channels_first=True`` (Wan's VAE): over dimension 1 of a ``(b c ...)`` tensor, ``x * sqrt(c) /
      max(||x||, 1e-12)`` (``F.normalize``'s clamp instead of ``eps``), weight ``(c, 1, ..., 1)`` with
      ``spatial_dims`` ones, the shape Wan's checkpoints store. ``eps`` is not used.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, channels_first: bool = False, spatial_dims: int = 3):
        super().__init__()
        self.eps = eps
        self.channels_first = channels_first
        shape = (dim, *([1] * spatial_dims)) if channels_first else (dim,)
        self.weight = torch.nn.Parameter(torch.ones(shape))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out`` (channels-first layout, outside autograd only): a tensor shaped like ``x`` to write the result
        into (``x`` itself, or a slice of a convolution's input) instead of a new one."""
        if self.channels_first:
            return self._over_channels(x, out)
        if out is not None:
            raise ValueError("RMSNorm takes out= in the channels-first layout only")
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight

    def _over_channels(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        # x / max(||x||, 1e-12) over channels, as F.normalize. The norm and the factors are at least fp32 (fp16
        # squares overflow), and no full-size copy of x is made at inference: at the decoder's full resolution an
        # fp32 copy of a bf16 x was most of the VAE's peak memory. A low-precision tensor times an fp32 one would
        # promote to a new fp32 tensor, so the products go through ``out=`` and in place, which compute in fp32
        # and round once into x's dtype; x over its norm comes first, so fp16 products stay in range.
        compute = torch.promote_types(x.dtype, torch.float32)
        if x.dtype == compute:  # a sum of squares: 4x faster on a CPU than vector_norm over dim 1
            inv_norm = x.pow(2).sum(1, keepdim=True).clamp_min(1e-24).rsqrt()
        else:  # summed in fp32 without an fp32 copy of x (fp16 squares would overflow)
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=compute)
            inv_norm = norm.clamp_min(1e-12).reciprocal()  # one channel: out of place costs nothing
        scale = self.scale * self.weight.view(-1, *([1] * (x.dim() - 2))).to(compute)
        if torch.is_grad_enabled():
            if out is not None:
                raise ValueError("RMSNorm's out= is for inference (autograd needs its input kept)")
            return (x.to(compute) * inv_norm * scale).to(x.dtype)
        out = torch.mul(x, inv_norm, out=torch.empty_like(x) if out is None else out)
        return out.mul_(scale)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """How Wan splits a head's channels between time, height and width rotations (each even)."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_3d(grid: tuple[int, int, int], head_dim: int, device=None, theta: float = 10000.0) -> torch.Tensor:
    """Rotations ``(n, head_dim/2, 2)`` as (cos, sin) for the tokens of a ``t x h x w`` grid, in ``t h w`` order.

    Each axis owns a contiguous slice of the channel pairs (``rope_axis_dims``); pair ``i`` of an axis with
    ``a`` channels turns by ``position * theta^(-2i/a)``. Angles are computed in float64 as Wan does.
    """
    fp64 = torch.device(device or "cpu").type != "mps"
    dtype = torch.float64 if fp64 else torch.float32
    angles = []
    for axis, (size, dim) in enumerate(zip(grid, rope_axis_dims(head_dim))):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=dtype, device=device) / dim)
        angle = torch.outer(torch.arange(size, dtype=dtype, device=device), freqs)  # (size, dim/2)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = size
        angles.append(angle.view(shape).expand(*grid, dim // 2))
    angle = torch.cat(angles, dim=-1).flatten(0, 2)
    return torch.stack([angle.cos(), angle.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2i, 2i+1)`` of ``x (b n h d)`` by ``rope (n, d/2, 2)``; computed in fp32.

    Eager mode multiplies complex numbers (one fast kernel); under torch.compile the same product is written
    out in real arithmetic, which Inductor can fuse (it does not generate code for complex tensors).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        cos, sin = rope[:, None].unbind(-1)
        real, imag = pairs.unbind(-1)
        out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rope)[:, None])
    return out.flatten(-2).type_as(x)
