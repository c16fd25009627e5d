"""One rank of the 2-process checks in test_train_ends_ddp.py, started by torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_ends_worker.py SCENARIO OUT [key=value ...]

Each rank writes ``OUT/rank-<r>.json`` with what it saw; the test asserts on those files.

- ``broken``: one optimizer step, then rank 1 overwrites the latent file of its share of the next global
  batch with garbage; before that next step each rank computes, in plain (unwrapped) autograd, the per-clip
  losses of the whole global batch with the draws the step will make, and after it compares the step's loss
  and gradients with the mean over the clips that were read.
- ``budget``: a fake clock makes rank 1's steps three times as long as rank 0's; with ``max_minutes`` both must
  stop at the step where the slower rank spends the budget.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import torch
from worker_exit import leave_and_exit

from vidlatent.train import Trainer, distributed, load_train_config, loop
from vidlatent.train.tasks.base import Draws
from vidlatent.train.tasks.denoiser import LatentBatch


def next_global_batch(trainer: Trainer) -> list[int]:
    """The dataset indices of the global batch the trainer reads next (as ``DenoiserTask.next_batch`` finds it)."""
    pos = copy.copy(trainer.position)
    while True:
        batches = trainer.task.sampler.epoch(pos.epoch)
        if pos.batch_index < len(batches):
            return batches[pos.batch_index]
        pos.epoch, pos.batch_index = pos.epoch + 1, 0


def per_clip_losses(trainer: Trainer, idx: list[int]) -> torch.Tensor:
    """The flow loss of each clip of the global batch ``idx``, with the draws the next step makes."""
    task = trainer.task
    clips = [task.dataset[i] for i in idx]
    generator = torch.Generator().manual_seed(0)
    generator.set_state(trainer.generator.get_state())
    draws = Draws(generator, list(range(len(idx))), len(idx), sliced=True)
    batch = LatentBatch(torch.stack([z for z, _ in clips]), [c for _, c in clips], draws)
    x_sigma, sigma, target, captions, _ = task._noised(batch)
    pred, _ = task.forward(x_sigma, sigma, captions)
    return (pred - target).square().flatten(1).mean(1)


def broken(out: Path, overrides: list[str]) -> dict:
    trainer = Trainer(load_train_config("tiny", overrides=overrides))
    rank = trainer.dist.rank
    trainer.train_step()
    idx = next_global_batch(trainer)
    losses = per_clip_losses(trainer, idx)
    kept = [j for j in range(len(idx)) if j not in distributed.share(len(idx), 1, 2)]  # rank 1's share breaks
    expected = losses[kept].mean()
    params = list(trainer.params.values())
    grads = torch.autograd.grad(expected, params, allow_unused=True)
    distributed.barrier()
    if rank == 1:
        for j in distributed.share(len(idx), 1, 2):
            Path(trainer.task.dataset.items[idx[j]].path).write_bytes(b"broken mid-run")
    distributed.barrier()
    metrics = trainer.train_step()
    zero = torch.zeros_like
    diff = max(
        ((zero(p) if p.grad is None else p.grad) - (zero(p) if g is None else g)).abs().max().item()
        for p, g in zip(params, grads)
    )
    scale = max(g.abs().max().item() for g in grads if g is not None)
    return {
        "loss": metrics["loss"],
        "expected": expected.item(),
        "all_clips": losses.mean().item(),
        "grad_diff": diff,
        "grad_scale": scale,
        "global_batch": len(idx),
    }


def budget(out: Path, overrides: list[str]) -> dict:
    trainer = Trainer(load_train_config("tiny", overrides=overrides))
    rank = trainer.dist.rank
    now = [0.0]

    def perf_counter() -> float:  # each call moves the clock on: a step spans one tick of 1 s or 3 s
        now[0] += 1.0 + 2.0 * rank
        return now[0]

    loop.time = types.SimpleNamespace(perf_counter=perf_counter)
    losses = trainer.train()
    return {
        "step": trainer.step,
        "elapsed": trainer.elapsed,
        "losses": losses,
        "lr": trainer.scheduler.get_last_lr()[0],
        "final": (Path(trainer.config.output) / "final").is_dir(),
    }


def main() -> None:
    scenario, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    result = {"broken": broken, "budget": budget}[scenario](out, overrides)
    rank = distributed.setup("cpu")[0].rank
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    leave_and_exit(rank)


if __name__ == "__main__":
    main()
