"""Shared layers. ``attention`` is the one place that calls a fused attention kernel.

Letters: b batch, h heads, n query tokens, m key tokens, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("sdpa",)


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
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; available: {', '.join(ATTENTION_BACKENDS)}")
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
