"""Peak tensor memory of a piece of work, counted where tensors are made: the same figure on every device.

A CUDA allocator reports its own peak, a CPU has none worth reading (the resident set counts the allocator's
caches, pages and libraries). ``PeakMemory`` counts the storages of the tensors that operators make while it is
active, and when each is freed, so its peak is what the work itself holds, on any device. On the ``meta``
device (tensors with shapes and no data) it sizes a run that would need a large GPU in seconds, on a CPU:

    with torch.no_grad(), PeakMemory() as memory:
        vae.to("meta").decode(torch.zeros(1, 16, 21, 60, 104, device="meta"))
    print(memory.peak / 2**30, memory.at_peak[:5])

What it does not see: tensors made before it starts (weights, inputs), and scratch space a kernel allocates
inside itself (a cuDNN workspace): a CUDA allocator's peak is that much higher. Attention: on ``meta``, SDPA
would run its math path and make the whole (tokens x tokens) attention matrix that a GPU's fused kernels never
hold, so while it is active ``torch.nn.functional.scaled_dot_product_attention`` on meta tensors runs as a
flash kernel does (PyTorch's CPU flash attention's meta shapes: the output and its log-sum-exp), as CUDA's
flash and cuDNN kernels hold it; a CPU runs that flash kernel itself. A model that binds the function at import
(``from torch.nn.functional import scaled_dot_product_attention``) is not redirected: vidlatent's and
diffusers' attention look it up when they call it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["Held", "PeakMemory"]


@dataclass(frozen=True)
class Held:
    """One storage alive at the peak: its size, the operator that made it and the shape it was made as."""

    bytes: int
    op: str
    shape: tuple[int, ...]


class PeakMemory(TorchDispatchMode):
    """Context manager: ``peak`` (bytes) of the tensor storages made inside it and alive at once,
    ``at_peak`` those storages (largest first), ``current`` the bytes still alive."""

    def __init__(self):
        super().__init__()
        self.peak = 0
        self.current = 0
        self.at_peak: list[Held] = []
        self._live: dict[int, Held] = {}  # storage -> what it holds
        self._tensors: dict[int, int] = {}  # storage -> tensors alive on it
        self._before: set[int] = set()  # storages made before it started (inputs, weights)

    def __enter__(self):
        self._sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _flash_on_meta(self._sdpa)
        return super().__enter__()

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._sdpa
        return super().__exit__(*exc)

    def _release(self, key: int) -> None:
        self._tensors[key] -= 1
        if self._tensors[key] == 0:
            self.current -= self._live.pop(key).bytes
            del self._tensors[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for tensor in tree_leaves((args, kwargs)):  # storages from before: their views are not new memory
            if isinstance(tensor, torch.Tensor):
                key = tensor.untyped_storage()._cdata
                if key not in self._live and key not in self._before:
                    self._before.add(key)
                    weakref.finalize(tensor, self._before.discard, key)
        out = func(*args, **kwargs)
        grew = False
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata  # the storage itself: views and in-place results share it
            if key in self._before:
                continue
            if key not in self._live:
                self._live[key] = Held(storage.nbytes(), str(func), tuple(tensor.shape))
                self._tensors[key] = 0
                self.current += storage.nbytes()
                grew = True
            self._tensors[key] += 1
            weakref.finalize(tensor, self._release, key)
        if grew and self.current > self.peak:
            self.peak = self.current
            self.at_peak = sorted(self._live.values(), key=lambda held: -held.bytes)
        return out


def _flash_on_meta(sdpa):
    """``sdpa`` for tensors with data; on meta tensors the flash kernel's shapes (no attention matrix)."""

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or kwargs.get("enable_gqa") or query.shape[:-2] != key.shape[:-2]:
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kwargs)  # fmt: skip
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )
        return out

    return attention
