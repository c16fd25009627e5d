"""Data-parallel training: the process group from torchrun's environment, rank shares, DDP/FSDP2 wrapping.

``torchrun --nproc_per_node=N vidlatent train CONFIG`` starts N processes; each calls ``setup`` (nccl on
CUDA, gloo on CPU) and takes a disjoint share of every global batch (``share``). Without torchrun's
environment (``WORLD_SIZE`` unset or 1) everything here is a no-op: rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["PARALLEL", "Dist", "setup", "share", "all_reduce_", "barrier", "wrap_fsdp", "full_tensor"]

PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> tuple[Dist, torch.device]:
    """Join the process group torchrun's environment describes (once per process) and pick the device:
    ``cuda:<local_rank>`` when CUDA is used, else the CPU. Returns ``(Dist, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError("the process group disagrees with WORLD_SIZE/RANK")
    return Dist(rank, world, local), dev


def share(n: int, rank: int, world_size: int) -> range:
    """Positions ``[lo, hi)`` of a global batch of ``n`` that ``rank`` takes (``torch.tensor_split`` bounds:
    the first ``n % world_size`` ranks take one more; ranks past ``n`` take none)."""
    q, r = divmod(n, world_size)
    lo = rank * q + min(rank, r)
    return range(lo, lo + q + (rank < r))


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (``op="max"``: the largest of) ``t`` over ranks in place (nothing without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def wrap_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: shard each transformer block (``model.blocks``, when there are any), then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``t``, gathering a sharded DTensor (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
