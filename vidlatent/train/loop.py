"""The training loop, whatever it trains: steps, gradient accumulation, optimizer and LR schedule, the
non-finite guard, EMA, metrics.jsonl, progress, checkpoints and exact resume, ranks, a time budget, samples.

What is trained is a task (``tasks/``: ``config.task`` names it): the loop asks it for models, micro-batches
(``Batch``) and their losses (``Loss``), and for samples and the export. One optimizer step =
``grad_accum`` micro-batches. The run's ``torch.Generator`` (every micro-batch's sigmas, noise, dropout),
with the weights, EMA, optimizer, LR schedule, the global RNG and the data position, goes into every
checkpoint (``checkpointing``), so a run resumed from a checkpoint computes the same losses as one that was
never stopped.

Under ``torchrun --nproc_per_node=N`` (``distributed.setup``: nccl on CUDA, gloo on CPU) the task's models
run as DDP or FSDP2 (``parallel``); each rank computes its part of the global batch's mean loss. Rank 0 alone
writes metrics, checkpoints, samples and the export; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ..checkpoint import atomic_write
from ..config.train import TrainConfig
from . import checkpointing, distributed, optim
from .configure import check_config
from .ema import EMA
from .tasks import Batch, Loss, Position, task_class

__all__ = ["NonFiniteLossError", "Trainer", "train"]

# settings that may change between an interrupted run and its resumption without a warning (steps only
# with the constant schedule: the cosine one depends on it)
RESUME_FREE = ("resume", "progress", "device", "output", "steps", "parallel", "compile")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped without writing a checkpoint of that state."""


class _Forward(torch.nn.Module):
    """The trained models under one module whose forward is the task's (what DDP wraps and syncs)."""

    def __init__(self, models: dict[str, torch.nn.Module], fn):
        super().__init__()
        self.models = torch.nn.ModuleDict(models)
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class Trainer:
    """One training run of ``config``: the loop around the task ``config.task`` names (``self.task``).

    Attributes the loop does not have are the task's (``trainer.dit``, ``trainer.vae``, ``trainer.dataset``,
    ``trainer.calibrate_latents``)."""

    def __init__(self, config: TrainConfig):
        check_config(config)
        self.config = cfg = config
        self.dist, self.device = distributed.setup(cfg.device)
        self.output = Path(cfg.output)
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.position = Position()  # the next batch to read
        self.step = 0  # optimizer steps done
        self.elapsed = 0.0  # seconds spent in training steps, over resumes (max_minutes)
        self.last_checkpoint: Path | None = None
        self.losses: list[float] = []  # loss of each step this process ran
        self.flops_per_clip: dict[tuple, float] = {}  # by clip shape, for tasks with count_flops
        self.task = task_class(cfg.task)(cfg, self.device, self.dist)
        self.fsdp = self.dist.enabled and cfg.parallel == "fsdp"
        self.replicated = self._shard()  # FSDP: parameters kept whole on every rank
        self.params = {
            f"{n}.{k}": p
            for n, m in self.task.models.items()
            for k, p in m.named_parameters()
            if p.requires_grad
        }
        self.forward_module = self._wrap()
        # The fused update (one kernel on a GPU) rather than ~10 ops per parameter tensor: a small model's GPU
        # step is otherwise mostly kernel launches. Not under FSDP, where sharded and whole (sparse) parameters
        # mix and torch picks the implementation.
        self.fused = self.device.type in ("cuda", "cpu") and not self.fsdp and cfg.optimizer == "adamw"
        self.optimizer = optim.adamw(list(self.params.values()), cfg, self.fused)
        self.schedule = optim.Schedule(cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.ema = EMA(self.params, cfg.ema_decay) if cfg.ema_decay > 0 else None
        if self.fsdp and cfg.sample_every:
            warnings.warn("sample_every is not supported under parallel=fsdp; no samples", stacklevel=2)

    def __getattr__(self, name: str):
        if name == "task":  # not built yet (an error in __init__)
            raise AttributeError(name)
        return getattr(self.task, name)

    def _shard(self) -> list[torch.Tensor]:
        """Under FSDP, shard each task model (per block, then the root) but the sparse ones, which stay whole
        on every rank; returns those whole models' trainable parameters (their gradients are averaged here)."""
        if not self.fsdp:
            return []
        replicated = []
        for name, model in self.task.models.items():
            if name in self.task.sparse:
                replicated += [p for p in model.parameters() if p.requires_grad]
            else:
                distributed.wrap_fsdp(model)
        return replicated

    def _wrap(self) -> torch.nn.Module:
        """The module whose forward the task's loss calls: its models under DDP when there are ranks."""
        module = _Forward(self.task.models, self.task.forward)
        if not self.dist.enabled or self.fsdp:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        unused = self.task.find_unused or any(name in self.task.sparse for name in self.task.models)
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=unused)

    # ----------------------------------------------------------------------------------------- step

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics.

        Raises ``NonFiniteLossError`` (before touching the weights) when a loss or the gradient norm is NaN/inf.
        """
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for m in self.task.models.values():
            m.train()
        self.optimizer.zero_grad(set_to_none=True)
        batch, last, metrics = self._accumulate()
        grad_norm = self._reduce_gradients()
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"gradient norm is {grad_norm} at step {self.step + 1} (loss {metrics['loss']:.4g}); stopped "
                f"before updating the weights. Last good checkpoint: {self.last_checkpoint or 'none written yet'}."
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.elapsed += time.perf_counter() - started
        if self.config.max_minutes:  # the next step's lr follows the time spent so far
            self.schedule.time_used = self._time_used()
        self.scheduler.step()
        metrics.update(self.task.after_step(batch, last, self.step))
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.params, self.step)
        self.losses.append(metrics["loss"])
        metrics["peak_mem_gib"] = self._peak_memory()
        return {"step": self.step, "loss": metrics.pop("loss"), "lr": lr, "grad_norm": grad_norm, **metrics}

    def _peak_memory(self) -> float:
        """GiB: on CUDA the most memory allocated during the step (``max_memory_allocated``); on the CPU the
        process's peak resident set size so far (``ru_maxrss``)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux

    def _accumulate(self) -> tuple[Batch, Loss, dict]:
        """Run ``grad_accum`` micro-batches forward and backward (DDP reduces once, on the last); returns the
        last batch and its loss, and the step's metrics: mean loss, tokens, flops and the task's loss parts."""
        cfg, world = self.config, self.dist.world_size
        totals: dict[str, float] = {"loss": 0.0, "tokens": 0, "flops": 0.0}
        parts: dict[str, float] = {}
        for k in range(cfg.grad_accum):
            batch = self.task.next_batch(self.position, self.generator)
            no_sync = getattr(self.forward_module, "no_sync", None)  # DDP: reduce once per step
            sync = k == cfg.grad_accum - 1 or no_sync is None
            count = self._flop_counter(batch) if self.task.count_flops else contextlib.nullcontext()
            with contextlib.nullcontext() if sync else no_sync(), count:
                loss = self.task.loss(batch, self.forward_module, self.step)
                value = distributed.all_reduce_(loss.value.detach().clone())  # the global batch's loss
                if not torch.isfinite(value):
                    where = self.last_checkpoint or "none written yet"
                    raise NonFiniteLossError(
                        f"loss is {value.item()} at step {self.step + 1}; stopped without saving. "
                        f"Last good checkpoint: {where}. Lower lr, check the data, or disable bf16."
                    )
                (loss.value * world / cfg.grad_accum).backward()  # DDP/FSDP average over ranks
            totals["loss"] += value.item() / cfg.grad_accum
            totals["tokens"] += loss.tokens
            counted = self.flops_per_clip.get(tuple(batch.x.shape[1:]))
            totals["flops"] += loss.flops if counted is None else batch.n * counted
            for name, v in loss.parts.items():
                parts[name] = parts.get(name, 0.0) + v / cfg.grad_accum
        if self.dist.enabled and parts:
            names = sorted(parts)
            summed = distributed.all_reduce_(torch.tensor([parts[n] for n in names], dtype=torch.float64))
            parts = dict(zip(names, summed.tolist()))
        return batch, loss, {**totals, **parts}

    @contextlib.contextmanager
    def _flop_counter(self, batch: Batch):
        """Count the FLOPs (forward + backward) of the block per clip into ``flops_per_clip``, the first time
        a clip shape is seen (for tasks with ``count_flops``)."""
        key = tuple(batch.x.shape[1:])
        if key in self.flops_per_clip:
            yield
            return
        with FlopCounterMode(display=False) as counter:
            yield
        self.flops_per_clip[key] = counter.get_total_flops() / batch.x.shape[0]

    def _reduce_gradients(self) -> float:
        """Average the replicated (FSDP) gradients over ranks, clip, and return the global gradient norm."""
        world = self.dist.world_size
        for p in self.replicated:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            distributed.all_reduce_(p.grad).div_(world)
        params = list(self.params.values())
        return optim.clip_gradients(params, self.replicated, self.config.grad_clip, self.fsdp)

    def _time_used(self) -> float:
        """The fraction of ``max_minutes`` spent (0 without a budget): the ranks' largest, so all agree."""
        if not self.config.max_minutes:
            return 0.0
        spent = self.elapsed
        if self.dist.enabled:  # a collective per step only where there are ranks to agree
            spent = distributed.all_reduce_(torch.tensor([spent], device=self.device), op="max").item()
        return spent / (60 * self.config.max_minutes)

    @property
    def finished(self) -> bool:
        """Whether the run is over: all ``steps`` done, or its ``max_minutes`` spent."""
        return self.step >= self.config.steps or self.schedule.time_used >= 1

    # ----------------------------------------------------------------------------------------- results

    @contextlib.contextmanager
    def ema_weights(self):
        """Within the block, the trained models hold the EMA weights; the live ones come back after it."""
        if self.ema is None:
            raise ValueError("this run keeps no EMA weights (ema_decay=0)")
        with self.ema.swapped_into(self.params):
            yield

    def _maybe_ema(self, ema: bool = True):
        return self.ema_weights() if ema and self.ema is not None else contextlib.nullcontext()

    def evaluate(self, *args, ema: bool = False, **kwargs) -> float:
        """The task's deterministic score (the denoiser: flow loss at fixed noise; the VAE: PSNR);
        ``ema=True`` scores the EMA weights."""
        with self.ema_weights() if ema else contextlib.nullcontext():
            return self.task.evaluate(*args, **kwargs)

    def _plain_models(self) -> dict[str, torch.nn.Module]:
        """The trained models, unsharded: under FSDP, fresh copies (on rank 0; None elsewhere) holding the
        gathered weights; else the models themselves."""
        if not self.fsdp:
            return self.task.models
        out = {}
        for name, model in self.task.models.items():
            state = {k: distributed.full_tensor(v).cpu() for k, v in model.state_dict().items()}
            if self.dist.main:
                copy = self.task.unsharded(name)
                copy.load_state_dict(state)
                out[name] = copy.to(self.device)
        return out

    def export(self, folder: str | os.PathLike, ema: bool = True) -> Path:
        """Write the trained models (EMA weights when the run keeps them and ``ema`` is true) under ``folder``
        as the task lays them out (the denoiser: ``dit/``, ``text_encoder/`` or ``lora.safetensors``; the
        VAE: ``vae/``)."""
        folder = Path(folder)
        with self._maybe_ema(ema):
            models = self._plain_models()  # FSDP: a collective, every rank calls export
            if self.dist.main:
                self.task.export(folder, models)
        distributed.barrier()
        return folder

    @torch.no_grad()
    def write_sample(self) -> Path | None:
        """Write ``<output>/samples/step-XXXXXXX.gif`` (atomically) with the EMA weights where kept: the task's
        sample (the VAE: a held-out clip and its reconstruction; the denoiser: a short generation per
        ``sample_prompts`` entry). Draws from no training RNG. Returns the file, or None."""
        if self.fsdp:
            return None
        with self._maybe_ema():
            video = self.task.sample(self.config.seed)
        if video is None:
            return None
        from ..data.io import write_video

        return write_video(self.output / "samples" / f"step-{self.step:07d}.gif", video.cpu(), fps=8)

    # ----------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-XXXXXXX/`` (see ``checkpointing``); every rank calls it, rank 0 writes."""
        folder = checkpointing.folder_for(self.output, self.step)
        full = distributed.full_tensor  # FSDP: every rank gathers, rank 0 alone writes
        weights = {k: full(p.detach()).cpu().contiguous() for k, p in self.params.items()}
        ema = None
        if self.ema is not None:
            ema = {k: full(v).cpu().contiguous() for k, v in self.ema.weights.items()}
        optimizer = optim.optimizer_state(self.optimizer, self.task.models, self.fsdp)
        if self.dist.main:
            files, task_state = self.task.extra_state()
            state = {**self._state(), "optimizer": optimizer, **task_state}
            yaml = OmegaConf.to_yaml(OmegaConf.structured(self.config))
            checkpointing.write(folder, checkpointing.Checkpoint(weights, ema, state, files, yaml))
        self.last_checkpoint = folder
        distributed.barrier()  # the other ranks wait until the checkpoint is complete
        if self.config.export_checkpoints:  # also a pipeline folder for --model (the task's export)
            with torch.random.fork_rng(devices=[]):
                self.export(folder / "pipeline")
        return folder

    def _state(self) -> dict:
        """The loop's part of ``state.pt``: step, data position, time spent, schedule and RNG states."""
        return {
            "step": self.step,
            "epoch": self.position.epoch,
            "batch_index": self.position.batch_index,
            "elapsed": self.elapsed,
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder under ``output``, or None."""
        return checkpointing.latest(self.output)

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore everything ``save_checkpoint`` wrote; the next step continues the saved run exactly."""
        folder = Path(folder)
        ckpt = checkpointing.read(folder)
        differ = set(self.params) ^ set(ckpt.weights)
        if differ:
            raise ValueError(f"{folder}: checkpoint and model parameters differ: {sorted(differ)[:5]}")
        state = ckpt.state
        self.task.check_extra_state(folder, state)  # first: a task can name a checkpoint that does not fit
        shapes = [
            f"{k} {tuple(ckpt.weights[k].shape)} there, {tuple(p.shape)} here"
            for k, p in self.params.items()
            if ckpt.weights[k].shape != p.shape
        ]
        if shapes:
            raise ValueError(
                f"{folder}: checkpoint and model parameter shapes differ: {'; '.join(shapes[:5])}"
            )
        place = checkpointing.place_like
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(place(ckpt.weights[k], p))
        if self.ema is not None:
            self.ema.weights = {k: place(ckpt.ema[k].float(), p).clone() for k, p in self.params.items()}
        optim.load_optimizer_state(
            self.optimizer, state["optimizer"], self.task.models, self.fsdp, self.fused
        )
        self.task.load_extra_state(folder, state)
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = state["step"]
        self.position = Position(state["epoch"], state["batch_index"])
        self.elapsed = float(state.get("elapsed", 0.0))  # checkpoints from before max_minutes have none
        self.schedule.time_used = self._time_used()
        self.last_checkpoint = folder

    def _resume(self) -> None:
        """Load the checkpoint ``config.resume`` names ("auto": the latest, if any), warn about settings that
        changed since it was written, and drop the metrics rows logged after it."""
        resume = self.config.resume
        folder = self.latest_checkpoint() if resume == "auto" else None if resume is None else Path(resume)
        if folder is None:
            return
        self.load_checkpoint(folder)
        saved = OmegaConf.load(folder / "config.yaml") if (folder / "config.yaml").is_file() else {}
        now = OmegaConf.structured(self.config)
        free = (
            RESUME_FREE
            if self.config.schedule == "constant"
            else tuple(k for k in RESUME_FREE if k != "steps")
        )
        changed = [k for k in now if k not in free and k in saved and saved[k] != now[k]]
        if changed:
            warnings.warn(
                f"resuming {folder} with changed settings ({', '.join(changed)}): the run will not match an "
                "uninterrupted one",
                stacklevel=3,
            )
        metrics = self.output / "metrics.jsonl"
        if self.dist.main and metrics.is_file():  # drop rows the interrupted run logged after this checkpoint
            rows = [r for r in metrics.read_text().splitlines() if r and json.loads(r)["step"] <= self.step]
            atomic_write(metrics, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))

    # ----------------------------------------------------------------------------------------- loop

    def train(self, until: int | None = None) -> list[float]:
        """Run (resuming if ``config.resume`` says so) to ``config.steps`` (or until ``max_minutes`` of
        training steps are spent), or stop after step ``until``.

        Returns the losses of the steps this call ran. Writes metrics.jsonl rows and checkpoints, and at the
        last step the trained models (EMA weights where kept) to ``<output>/final`` (see ``export``).
        """
        cfg = self.config
        self._resume()
        stop = cfg.steps if until is None else min(until, cfg.steps)
        main = self.dist.main  # rank 0 alone writes metrics, checkpoints and the export
        if main:
            self.output.mkdir(parents=True, exist_ok=True)
        start = len(self.losses)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and main), desc="train",
                   dynamic_ncols=True)  # fmt: skip
        with open(self.output / "metrics.jsonl", "a") if main else contextlib.nullcontext() as log:
            while self.step < stop and not self.finished:
                t0 = time.perf_counter()
                m = self.train_step()
                seconds = max(time.perf_counter() - t0, 1e-9)
                last = self.finished
                m["tokens_per_s"] = m.pop("tokens") / seconds
                m["tflop_s"] = m.pop("flops") / seconds / 1e12  # model FLOPs, all ranks together
                if log is not None and (self.step % cfg.log_every == 0 or last):
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                _show(bar, m)
                if self.step % cfg.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and main:
                    self.write_sample()
        bar.close()
        if self.finished:
            self.export(self.output / "final")
        return self.losses[start:]


def _show(bar: tqdm, m: dict) -> None:
    """One step's metrics on the progress bar."""
    bar.update(1)
    extra = {"psnr": f"{m['psnr']:.2f}"} if "psnr" in m else {}
    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}", tflop_s=f"{m['tflop_s']:.3g}",
                    lr=f"{m['lr']:.2e}", **extra)  # fmt: skip


def train(config: TrainConfig, until: int | None = None) -> Trainer:
    """Build a ``Trainer`` for ``config``, run it (see ``Trainer.train``) and return it."""
    trainer = Trainer(config)
    trainer.train(until)
    return trainer
