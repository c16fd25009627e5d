"""The attention kernel as a named choice, checked where it will run, and regional compilation of the denoiser.

Attention: ``models.layers.ATTENTION_BACKENDS`` are torch's SDPA (``sdpa`` lets torch pick; ``cudnn``, ``flash``,
``efficient``, ``math`` force one) and two optional packages, ``flash_attn`` (Dao's flash-attn 2) and
``sage`` (SageAttention), used where their package is installed. ``check_attention`` runs the chosen kernel once
at the model's head size and dtype on the target device, so an impossible choice fails at setup with one line
naming what works there, not at the first step.

Letters: b batch, k heads, n tokens, e head dim.
"""

from __future__ import annotations

import importlib.util

import torch
from einops import rearrange

from ..models.layers import ATTENTION_BACKENDS, attention

PACKAGES = {"flash_attn": "flash_attn", "sage": "sageattention"}  # backend -> the module it imports


def installed_packages() -> list[str]:
    """The optional attention packages importable here."""
    return [name for name, module in PACKAGES.items() if importlib.util.find_spec(module) is not None]


def external_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``flash_attn`` or ``sage`` attention on ``(b k n e)`` tensors (no mask), as ``models.layers.attention``
    calls them."""
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        out = flash_attn_func(*(rearrange(z, "b k n e -> b n k e") for z in (q, k, v)))
        return rearrange(out, "b n k e -> b k n e")
    if backend == "sage":
        from sageattention import sageattn

        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    raise ValueError(f"{backend!r} is not an optional attention package; those are {', '.join(PACKAGES)}")


def working_backends(device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """The attention backends that run on ``device`` at ``dtype`` and ``head_dim``."""
    return [b for b in ATTENTION_BACKENDS if _runs(b, device, dtype, head_dim) is None]


def _runs(backend: str, device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when ``backend`` computes a small attention here; else why not (one line)."""
    if backend in PACKAGES and importlib.util.find_spec(PACKAGES[backend]) is None:
        return f"the {PACKAGES[backend]} package is not installed"
    q = torch.randn(1, 2, 16, head_dim, device=device, dtype=dtype)
    try:
        attention(q, q, q, backend=backend)
    except Exception as err:  # torch says "No available kernel", a package says what it lacks
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def check_attention_name(backend: str) -> None:
    """ValueError naming the accepted names (``ATTENTION_BACKENDS``) unless ``backend`` is one of them."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention {backend!r}; accepted: {', '.join(ATTENTION_BACKENDS)}")


def check_attention(backend: str, device, dtype: torch.dtype, head_dim: int) -> str:
    """``backend`` if it runs on ``device`` at ``dtype`` and ``head_dim``; ValueError naming what does otherwise."""
    check_attention_name(backend)
    why = _runs(backend, device, dtype, head_dim)
    if why is not None:
        works = working_backends(device, dtype, head_dim)
        have = ", ".join(installed_packages()) or "none"
        raise ValueError(
            f"attention {backend!r} cannot run on {torch.device(device)} at {str(dtype).removeprefix('torch.')}, "
            f"head dim {head_dim} ({why}); works here: {', '.join(works)}; optional packages installed: {have}"
        )
    return backend


def compile_blocks(model: torch.nn.Module, **options) -> int:
    """Regional compilation: every block's ``forward`` goes through one ``torch.compile`` (the blocks share their
    code, so Dynamo traces it once and reuses the graph for all of them, however many there are). Hooks on the
    blocks (block offload) stay outside the compiled region. Returns the number of blocks."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward, **options)
    return len(model.blocks)
