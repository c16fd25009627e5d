"""Peak tensor memory of a piece of work, counted where tensors are made: the same figure on every device.

A CUDA allocator reports its own peak, a CPU has none worth reading (the resident set counts the allocator's
caches, pages and libraries). ``PeakMemory`` counts the storages of the tensors that operators make while it is
active, and when each is freed, so its peak is what the work itself holds, on any device. On the ``meta``
device (tensors with shapes and no data) it sizes a run that would need a large GPU in seconds, on a CPU:

    with torch.no_grad(), PeakMemory() as memory:
        vae.to("meta").decode(torch.zeros(1, 16, 21, 60, 104, device="meta"))
    print(memory.peak / 2**30, memory.at_peak[:5])

What it does not see: tensors made before it starts (weights, inputs), and scratch space a kernel allocates
inside itself (a cuDNN workspace): a CUDA allocator's peak is that much higher. What it sees differently: on
``meta`` (and on a CPU) attention runs SDPA's math path, which makes the whole (tokens x tokens) attention
matrix that a GPU's fused kernels never hold; size a transformer's attention on the device itself. (The VAE's
attention, over one frame at its lowest resolution, is small either way.)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
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
