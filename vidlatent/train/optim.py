"""The optimizer side of a run: AdamW, the LR schedule (warm-up, then constant or cosine, optionally ending
with a time budget), gradient clipping over sharded and whole gradients, and the optimizer's checkpoint state.

``optimizer``: ``adamw`` is torch's, fused (one kernel for all parameters) on CUDA and the CPU outside FSDP;
``adamw8bit`` is bitsandbytes' ``AdamW8bit``, whose two moment buffers take 1 byte per value instead of 4
(a full fine-tune of 1.3B parameters: 2.6 GB of optimizer state instead of 10.4 GB).

Precision: ``mixed_precision=bf16`` autocasts the forward and backward to bf16 while the weights, gradients
and AdamW states stay fp32 (fp32 master weights), rather than bf16 weights with bf16 AdamW: an update smaller
than 1/256 of a weight (bf16's 8-bit mantissa) is lost in a bf16 weight, which at lr 1e-4 is most of them.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from ..config.train import TrainConfig
from . import distributed

__all__ = [
    "OPTIMIZERS",
    "lr_factor",
    "Schedule",
    "adamw",
    "check_optimizer",
    "clip_gradients",
    "optimizer_state",
    "load_optimizer_state",
]

OPTIMIZERS = ("adamw", "adamw8bit")


def lr_factor(step: int, cfg: TrainConfig, time_used: float = 0.0) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warm-up, then constant or cosine.

    With ``max_minutes`` the cosine runs to whichever ends first: ``steps``, or the budget (``time_used`` is
    the fraction of it spent), so a run stopped by its budget has finished its schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = max((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps), time_used)
    progress = min(1.0, progress)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """The LR schedule as LambdaLR's callable; checkpoints leave out what LambdaLR's state_dict keeps of it
    (the config), so ``state.pt`` stays loadable with ``weights_only=True``. ``time_used`` is the fraction of
    ``max_minutes`` spent, which the loop keeps current."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.time_used = 0.0

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.cfg, self.time_used)


def check_optimizer(name: str) -> None:
    """Raise ``ValueError`` for an unknown optimizer, or ``adamw8bit`` where bitsandbytes is not installed."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "optimizer=adamw8bit needs bitsandbytes, which is not installed (pip install bitsandbytes; it "
            "wants a CUDA GPU); use optimizer=adamw"
        )


def adamw(params: list[torch.Tensor], cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW over ``params`` as ``cfg`` sets it: torch's (``fused``: one kernel per step rather than ~10 ops
    per tensor), or bitsandbytes' 8-bit one (``cfg.optimizer == "adamw8bit"``)."""
    check_optimizer(cfg.optimizer)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(
            params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def clip_gradients(
    params: list[torch.Tensor], replicated: list[torch.Tensor], max_norm: float, fsdp: bool
) -> float:
    """The global gradient norm of ``params``, clipped to ``max_norm`` (0: not clipped). Under FSDP the norm
    gathers the sharded gradients and adds the ``replicated`` (whole on every rank) ones."""
    if not fsdp:
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
    whole = {id(p) for p in replicated}
    norms = []
    for group in ([p for p in params if id(p) not in whole], replicated):
        grads = [p.grad for p in group if p.grad is not None]
        if grads:
            norms.append(distributed.full_tensor(torch.nn.utils.get_total_norm(grads)).float())
    total = torch.stack(norms).square().sum().sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0).item()
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total.item()


def optimizer_state(optimizer: torch.optim.Optimizer, models: dict, fsdp: bool) -> dict:
    """The optimizer's state dict; under FSDP the full (gathered, on the CPU) one: a collective."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(torch.nn.ModuleDict(models), optimizer, options=opts)


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict, models: dict, fsdp: bool, fused: bool
):
    """Restore ``optimizer_state``'s output. The saved groups bring back the implementation they were saved
    with: this run's choice (``fused``) wins, with the step counts where fused AdamW keeps them."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(torch.nn.ModuleDict(models), optimizer, state, options=opts)
        return
    optimizer.load_state_dict(state)
    if not isinstance(optimizer, torch.optim.AdamW):  # bitsandbytes' keeps its own settings
        return
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = fused or None, None
    if fused:  # fused AdamW counts its steps in fp32 on each parameter's device
        for p, st in optimizer.state.items():
            if "step" in st:
                st["step"] = st["step"].to(p.device, torch.float32)
