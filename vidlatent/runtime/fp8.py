"""fp8 weight storage for the denoiser: each linear weight of its blocks kept as float8 e4m3 with one fp32 scale
per output channel, turned back into the compute dtype (bf16 or fp32) just before its matmul.

Why per output channel: a row of a linear weight makes one output feature, so one scale per row is exact to
apply after the matmul and costs 4 bytes per row (1/d of the row's bytes). Trained Wan layers have rows whose
largest values differ by several times; one scale for the whole tensor spends e4m3's 3 mantissa bits and its
range on the largest row and leaves the small rows coarse or flushed below its smallest normal (2^-6).
``quantize`` takes ``per="tensor"`` too, to measure the difference (the issue's numbers are in the README).

What stays in high precision: everything outside the blocks (patch, text, time and image embedders, the shared
time modulation, the head) and, inside the blocks, the norms, the modulation tables and every bias.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
GRANULARITIES = ("channel", "tensor")


def check_float8() -> torch.dtype:
    """torch's float8 e4m3 dtype; RuntimeError naming the torch version when this torch has none."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise RuntimeError(
            f"weights_dtype='fp8' needs torch.float8_e4m3fn (torch >= 2.1); this torch {torch.__version__} has "
            "none: upgrade torch, or use weights_dtype=None (the stored dtype) / bf16"
        )
    return dtype


class Float8Linear(nn.Module):
    """A linear layer whose weight is stored as float8 e4m3 (``weight_fp8``, (out, in)) with an fp32 scale
    (``weight_scale``, (out, 1) per channel or (1, 1) per tensor); the bias stays as it was. Computes
    ``x @ (weight_fp8 * scale)^T + bias`` in ``x``'s dtype."""

    def __init__(self, linear: nn.Linear, per: str = "channel"):
        super().__init__()
        if per not in GRANULARITIES:
            raise ValueError(f"unknown fp8 scale granularity {per!r}; accepted: {', '.join(GRANULARITIES)}")
        fp8 = check_float8()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        amax = w.abs().amax(dim=1, keepdim=True) if per == "channel" else w.abs().amax().reshape(1, 1)
        scale = amax.clamp_min(torch.finfo(torch.float32).tiny) / E4M3_MAX
        self.register_buffer("weight_fp8", (w / scale).to(fp8))
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias  # the same Parameter, high precision

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (out, in) in ``dtype``, as the matmul sees it."""
        return self.weight_fp8.to(dtype) * self.weight_scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        per = "channel" if self.weight_scale.shape[0] > 1 else "tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per {per}"


def quantize(model: nn.Module, per: str = "channel") -> int:
    """Store every ``nn.Linear`` inside ``model.blocks`` as ``Float8Linear`` (in place); returns how many.

    The rest of the model (embedders, time modulation, head, norms, modulation tables, biases) is untouched.
    """
    check_float8()
    count = 0
    for block in model.blocks:
        for module in list(block.modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    setattr(module, child_name, Float8Linear(child, per))
                    count += 1
    return count


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (what its weights take in memory)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
