"""Clips with their control videos, for ``task: control``: pixel pairs the task encodes with its frozen VAE.

- ``WorldControls``: the procedural shapes world (``data: shapes``), each clip with the control a named
  transform makes of it (``data.controls.world_control``: the silhouette drawn exactly from the scene).
- ``FolderControls``: a folder of videos (``VideoFolderDataset``) whose control videos lie beside them in a
  ``controls/`` folder (``data.controls.control_path``; mirrored subfolders). A control is read with its
  clip's frame selection (start, stride or fps) and size, so the two line up frame by frame. Clips without a
  control are listed in ``skipped`` and left out; the control videos themselves are no training clips.

Letters: b batch, c colour channels (3), t frames, h height, w width.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch

from ..config.train import TrainConfig
from ..data.controls import control_path, control_transform, world_control
from ..data.shapes import ShapesWorld
from .distributed import Dist
from .tasks.base import Position

__all__ = ["FolderControls", "WorldControls"]

log = logging.getLogger(__name__)


class WorldControls:
    """Clip ``i`` of ``ShapesWorld(**data_options)`` (seeded by ``cfg.seed`` unless the options say) with its
    ``cfg.control_transform`` control. The world is endless, or ``length`` clips repeated (``key``)."""

    def __init__(self, cfg: TrainConfig):
        control_transform(cfg.control_transform)  # ValueError naming the accepted transforms
        self.transform = cfg.control_transform
        self.world = ShapesWorld(**{"seed": cfg.seed, **cfg.data_options})

    def key(self, index: int) -> int | None:
        """What clip ``index`` is the same as (for a cache of encodings); None for an endless world."""
        return index % self.world.length if self.world.length else None

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(clip (3, t, h, w), control (3, t, h, w), caption) of clip ``index``."""
        clip, caption, control = world_control(self.world, index, self.transform)
        return clip, control, caption


class FolderControls:
    """The clips under ``cfg.data`` that have a control video in ``cfg.controls`` beside them, in batches of
    ``cfg.batch_size`` per rank (``VideoBucketSampler``: one bucket each, an order fixed by seed and epoch)."""

    def __init__(self, cfg: TrainConfig, dist: Dist):
        from .video_data import VideoBucketSampler, folder_dataset

        self.clips = folder_dataset(cfg)
        root = Path(cfg.data) if Path(cfg.data).is_dir() else None
        folder = (root / cfg.controls).resolve() if root is not None else None
        kept, found, self.skipped = [], [], []
        for item in self.clips.items:
            if folder is not None and item.path.resolve().is_relative_to(folder):
                continue  # a control video, not a clip
            try:
                found.append(control_path(item.path, cfg.controls, root))
            except (FileNotFoundError, ValueError) as err:
                self.skipped.append((str(item.path), str(err)))
                continue
            kept.append(item)
        if self.skipped:
            log.warning(
                "%d clip(s) without a control video are left out: %s",
                len(self.skipped),
                "; ".join(p for p, _ in self.skipped),
            )
        if not kept:
            raise ValueError(
                f"no clip in {cfg.data} has a control video in its {cfg.controls}/ folder (same name, any video "
                f"suffix): {self.clips.summary()}; skipped: {', '.join(p for p, _ in self.skipped) or 'none'}"
            )
        self.clips.items = kept
        # the controls, read as their clips are: same frame counts, rates and buckets, another file
        self.controls = copy.copy(self.clips)
        self.controls.items = [dataclasses.replace(it, path=p) for it, p in zip(kept, found)]
        self.sampler = VideoBucketSampler(
            self.clips, cfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size
        )

    def __len__(self) -> int:
        return len(self.clips)

    def next(self, position: Position) -> tuple[list[int], int]:
        """(this rank's clip indices, the epoch) of the batch at ``position``, which it advances."""
        batches = self.sampler.epoch(position.epoch)
        if position.batch_index >= len(batches):
            position.epoch, position.batch_index = position.epoch + 1, 0
            batches = self.sampler.epoch(position.epoch)
        epoch = position.epoch
        indices = batches[position.batch_index]
        position.batch_index += 1
        return indices, epoch

    def read(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        """(clip, control, caption) of clip ``index`` in ``epoch``, or None (logged) when either fails to read."""
        try:
            clip, caption = self.clips.clip(index, epoch)
            control, _ = self.controls.clip(index, epoch)
        except (ValueError, OSError) as err:
            log.warning("skipped %s in epoch %d: %s", self.clips.items[index].path, epoch, err)
            return None
        return clip, control, caption
