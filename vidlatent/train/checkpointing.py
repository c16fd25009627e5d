"""The training checkpoint folder: ``<output>/checkpoints/step-XXXXXXX/``.

It holds ``model.safetensors`` (the trained parameters, keys ``<model>.<parameter>``), ``ema.safetensors``
(same keys, when the run keeps an EMA), any task files (the VAE's ``disc.safetensors``), ``state.pt``
(optimizer, scheduler, RNG states, data position; plain tensors and numbers, loaded with
``weights_only=True``) and ``config.yaml``. Every file is written atomically, and
``<output>/checkpoints/latest`` (the folder's name) is written last, so it only ever names a complete one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_write

__all__ = ["Checkpoint", "folder_for", "latest", "write", "read", "place_like"]


@dataclass
class Checkpoint:
    """What one checkpoint folder holds (``ema``: None when the run keeps no EMA)."""

    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    state: dict
    files: dict[str, dict[str, torch.Tensor]]
    config_yaml: str = ""


def folder_for(output: Path, step: int) -> Path:
    """The checkpoint folder of optimizer step ``step`` under the run's ``output``."""
    return Path(output) / "checkpoints" / f"step-{step:07d}"


def latest(output: Path) -> Path | None:
    """The newest complete checkpoint folder under ``output``, or None."""
    pointer = Path(output) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    return pointer.parent / pointer.read_text().strip()


def write(folder: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` into ``folder`` file by file (each atomically), then point ``latest`` at it."""
    folder = Path(folder)
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(ckpt.weights, tmp))
    if ckpt.ema is not None:
        atomic_write(folder / "ema.safetensors", lambda tmp: save_file(ckpt.ema, tmp))
    for name, tensors in ckpt.files.items():
        atomic_write(folder / name, lambda tmp, tensors=tensors: save_file(tensors, tmp))
    atomic_write(folder / "state.pt", lambda tmp: torch.save(ckpt.state, tmp))
    atomic_write(folder / "config.yaml", lambda tmp: Path(tmp).write_text(ckpt.config_yaml))
    atomic_write(folder.parent / "latest", lambda tmp: Path(tmp).write_text(folder.name + "\n"))


def read(folder: Path) -> Checkpoint:
    """A checkpoint folder's weights, EMA (the weights when it has no ema.safetensors) and state. Task files
    are read by the task (``files`` is empty)."""
    folder = Path(folder)
    if not (folder / "state.pt").is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no state.pt)")
    weights = load_file(folder / "model.safetensors")
    ema_file = folder / "ema.safetensors"
    ema = load_file(ema_file) if ema_file.is_file() else weights
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    config = folder / "config.yaml"
    return Checkpoint(weights, ema, state, {}, config.read_text() if config.is_file() else "")


def place_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t`` (a full tensor) placed like ``p``: on its device, sharded like it when it is a DTensor."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
    return t.to(p.device)
