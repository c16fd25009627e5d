"""Scoring a silhouette control: does the generated object go where the control says, in the asked colour?

The held-out set (``heldout_controls``): clips of the shapes world's held-out split (one object each, of a
colour/shape/motion combination no training clip shows; seed ``CONTROL_SEED``, the clips the default model's
animate and edit splits start from), each giving a caption, its silhouette control
(``ShapesWorld.silhouette``) and the clip itself (the ground truth).

A video generated from a case's caption and control is scored against that control (``score_control``):

- ``iou``: per frame, the intersection over union of the generated object's mask (``shapes.object_mask``: the
  largest region of the colour of the largest object the oracle finds) and the control's (its white pixels,
  ``control_mask``); the mean over frames, then (``tally_control``) over clips. A frame where both are empty
  counts 1.
- ``colour``: whether the largest object the oracle finds has the caption's colour (``nothing``: it
  found none).

The same prompts generated without the control, scored against the same silhouettes, give the numbers to
compare with. ``evaluate_control`` runs any generating function over the set and tallies.

Letters: b batch, c colour channels (3), t frames, h height, w width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..data.shapes import ShapesWorld, object_mask, oracle
from .shapes import ANIMATE_SEED

__all__ = [
    "CONTROL_SEED",
    "ControlCase",
    "HeldoutControls",
    "control_mask",
    "evaluate_control",
    "heldout_controls",
    "mask_iou",
    "score_control",
    "tally_control",
]

CONTROL_SEED = ANIMATE_SEED  # the held-out world's clips: the ones the animate and edit splits start from


@dataclass
class ControlCase:
    """One held-out item: the clip's caption, its silhouette control and the clip, (3, t, h, w) in [-1, 1]."""

    caption: str
    control: torch.Tensor
    video: torch.Tensor
    colour: str
    shape: str
    motion: str


class HeldoutControls(Sequence):
    """``count`` held-out cases (``ControlCase``), made when asked for: clips ``0 .. count-1`` of the held-out
    world ``ShapesWorld(height, width, frames, split="heldout", seed=seed)``. ``stack(start, stop)`` gives a
    batch: (captions, controls (b, 3, t, h, w), videos (b, 3, t, h, w), colours)."""

    def __init__(
        self, count: int = 216, seed: int = CONTROL_SEED, height: int = 64, width: int = 64, frames: int = 17
    ):
        if count < 1:
            raise ValueError(f"count must be >= 1; got {count}")
        self.count = count
        self.world = ShapesWorld(height, width, frames, split="heldout", seed=seed)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(f"case {index} of {self.count}")
        index %= self.count
        scene = self.world.scene(index)
        obj = scene.objects[0]  # held-out clips show one object
        video, caption = self.world.clip(index)
        return ControlCase(caption, self.world.silhouette(index), video, obj.colour, obj.shape, obj.motion)

    def stack(self, start: int, stop: int) -> tuple[list[str], torch.Tensor, torch.Tensor, list[str]]:
        """Cases ``start .. stop-1`` as a batch: (captions, controls, videos, colours)."""
        cases = self[start:stop]
        return (
            [c.caption for c in cases],
            torch.stack([c.control for c in cases]),
            torch.stack([c.video for c in cases]),
            [c.colour for c in cases],
        )


def heldout_controls(
    count: int = 216, seed: int = CONTROL_SEED, height: int = 64, width: int = 64, frames: int = 17
) -> HeldoutControls:
    """The held-out control set: ``count`` (caption, silhouette control, ground-truth clip) cases of the
    held-out world (see ``HeldoutControls``). The default is the size the default model's evaluation scores
    (216)."""
    return HeldoutControls(count, seed, height, width, frames)


def control_mask(control: torch.Tensor) -> np.ndarray:
    """The white pixels of a control video (3, t, h, w) in [-1, 1], brighter than mid grey: bool (t, h, w)."""
    return (control.detach().float().mean(0) > 0).cpu().numpy()


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame intersection over union of two bool (t, h, w) masks: float64 (t,); 1 where both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes: {a.shape} and {b.shape}")
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def score_control(video: torch.Tensor, control: torch.Tensor, colour: str) -> dict:
    """One generated ``video`` (3, t, h, w) in [-1, 1] against the ``control`` (3, t, h, w) it was made from
    and the colour its prompt asked: ``{"iou": mean over frames, "colour": right or not, "found": the oracle's
    colour or None}``. ValueError when the two are not the same size."""
    if tuple(video.shape) != tuple(control.shape):
        raise ValueError(
            f"the video {tuple(video.shape)} and its control {tuple(control.shape)} must have one shape"
        )
    found = oracle(video)
    top = found[0]["colour"] if found else None
    wanted = control_mask(control)
    generated = object_mask(video, top) if found else np.zeros_like(wanted)
    iou = mask_iou(generated, wanted)
    return {"iou": float(iou.mean()), "colour": top == colour, "found": top}


def tally_control(rows: list[dict]) -> dict:
    """The set's numbers from ``score_control``'s rows: clips, mean IoU (over clips of per-clip means), the
    lowest clip's, the share of clips with IoU >= 0.5, the colour-right rate and the rate of clips where the
    oracle found nothing."""
    n = len(rows)
    if not n:
        raise ValueError("no rows to tally")
    ious = [row["iou"] for row in rows]
    return {
        "clips": n,
        "iou": float(np.mean(ious)),
        "iou_min": float(np.min(ious)),
        "iou_at_least_0.5": sum(iou >= 0.5 for iou in ious) / n,
        "colour": sum(row["colour"] for row in rows) / n,
        "nothing": sum(row["found"] is None for row in rows) / n,
    }


def evaluate_control(
    make: Callable[[list[str], torch.Tensor, int], torch.Tensor],
    cases: HeldoutControls,
    batch: int = 24,
    seed: int = 0,
) -> dict:
    """Score a generator over the held-out ``cases``: ``make(captions, controls (b, 3, t, h, w), seed)``
    returns the videos (b, 3, t, h, w) in [-1, 1]; the batch from case ``start`` on is made with ``seed +
    start``. A generator that ignores the controls gives the numbers without control. Returns
    ``tally_control``'s numbers, ``ious`` (every clip's) and ``rows`` (``score_control``'s, to pool runs with
    ``tally_control``)."""
    rows = []
    for start in range(0, len(cases), batch):
        captions, controls, _, colours = cases.stack(start, min(start + batch, len(cases)))
        videos = make(captions, controls, seed + start)
        for video, control, colour in zip(videos, controls, colours):
            rows.append(score_control(video.cpu(), control, colour))
    return {**tally_control(rows), "ious": [row["iou"] for row in rows], "rows": rows}
