"""An exponential moving average of the trained parameters, kept in fp32 beside them."""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor

__all__ = ["EMA"]


class EMA:
    """fp32 averages of ``params`` (name -> parameter; FSDP shards stay shards). The decay warms up as
    ``min(decay, (1 + step) / (10 + step))`` so early averages are not dominated by the initial weights."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.weights = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        """Move the averages towards ``params`` after optimizer step ``step`` (1-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        groups: dict[bool, tuple[list, list]] = {}  # one multi-tensor op per kind (FSDP shards or whole)
        for k, p in params.items():
            if p.dtype != torch.float32:  # parameters kept in another dtype: averaged in fp32
                self.weights[k].lerp_(p.detach().float(), 1 - decay)
                continue
            ema, live = groups.setdefault(isinstance(p, DTensor), ([], []))
            ema.append(self.weights[k])
            live.append(p)
        for ema, live in groups.values():
            torch._foreach_lerp_(ema, live, 1 - decay)

    @contextlib.contextmanager
    def swapped_into(self, params: dict[str, torch.Tensor]):
        """Within the block, ``params`` hold the averages; their own values come back after it."""
        live = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.weights[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(live[k])
