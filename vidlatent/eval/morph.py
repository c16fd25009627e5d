"""Do morphs keep an object? Pairs of one-object stills of the shapes world's held-out split (different colour,
shape and position) morphed into each other; every middle frame read back by the world's oracle.

A frame *holds an object* when the oracle's colour segmentation (``colour_masks``: the pixels saturated and bright
enough to be an object, each given its nearest palette colour) has a connected region covering at least the
oracle's ``min_area`` of the frame. The region may span two palette colours: a morph from purple to red passes
through magenta, which the segmentation splits between the two. The report (``morph_report``) gives, over the
middle frames (all but the two ends) of every morph:

  kept          the share of middle frames that hold an object
  all_kept      the share of morphs whose every middle frame holds one
  ends_colour   the share of middle frames whose object is mostly A's or B's colour (not a third colour)
  step_mean     smoothness: the mean absolute pixel change between consecutive frames, on the [-1, 1] scale
                (``pipelines.interpolate.smoothness``), averaged over the morphs
  step_max      the largest such step, averaged over the morphs (a pop or a cut shows here)
  jump          the median over the morphs of max step / median step (about 1: even change)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..data.shapes import ShapesWorld, colour_masks
from ..pipelines.interpolate import smoothness

MORPH_SEED = 31  # the held-out world whose clips give the stills
MIN_AREA = 0.004  # the oracle's default min_area


def morph_pairs(count: int, seed: int = MORPH_SEED, height: int = 64, width: int = 64) -> list[dict]:
    """``count`` pairs of one-object stills: the first frames of held-out clips of the world (seed ``seed``),
    paired in order so that the two differ in colour and shape. Each pair is a dict: ``a``, ``b`` (3, 1, h, w)
    in [-1, 1], ``prompt_a``, ``prompt_b`` ("a red circle") and ``colours`` (A's, B's)."""
    world = ShapesWorld(height, width, 1, split="heldout", seed=seed)
    pairs: list[dict] = []
    pool: list[tuple[torch.Tensor, str, str]] = []
    index = 0
    while len(pairs) < count:
        still = world.clip(index)[0]
        obj = world.scene(index).objects[0]
        index += 1
        match = next((k for k, p in enumerate(pool) if p[1] != obj.colour and p[2] != obj.shape), None)
        if match is None:
            pool.append((still, obj.colour, obj.shape))
            continue
        match = pool.pop(match)
        pairs.append({"a": match[0], "b": still, "prompt_a": f"a {match[1]} {match[2]}",
                      "prompt_b": f"a {obj.colour} {obj.shape}", "colours": (match[1], obj.colour)})  # fmt: skip
    return pairs


def object_frames(video: torch.Tensor, min_area: float = MIN_AREA) -> list[str | None]:
    """Per frame of ``video`` (3, t, h, w) in [-1, 1]: the main palette colour of its largest object (a
    connected region of the oracle's coloured pixels covering at least ``min_area`` of the frame), or None
    where the frame holds none."""
    from scipy import ndimage

    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"object_frames needs a video (3, t, h, w); got {tuple(video.shape)}")
    _, t, h, w = video.shape
    masks = colour_masks(video)
    names = list(masks)
    label = np.full((t, h, w), -1)
    for k, name in enumerate(names):
        label[masks[name]] = k
    out: list[str | None] = []
    for frame in label:
        regions, n = ndimage.label(frame >= 0)
        sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
        if n == 0 or sizes.max() < min_area * h * w:
            out.append(None)
            continue
        colours = np.bincount(frame[regions == 1 + sizes.argmax()], minlength=len(names))
        out.append(names[int(colours.argmax())])
    return out


def morph_report(videos: list[torch.Tensor], colours: list[tuple[str, str]] | None = None, min_area=MIN_AREA):
    """Score morph videos, each (3, t, h, w) with t >= 3 (see the module docstring for the keys). ``colours``:
    each morph's (A's, B's) colour, for ``ends_colour`` (left out without them). Also ``blank``: per morph,
    the middle frames (indices) without an object."""
    if not videos:
        raise ValueError("morph_report needs at least one video")
    if colours is not None and len(colours) != len(videos):
        raise ValueError(f"morph_report got {len(videos)} videos and {len(colours)} colour pairs")
    found, steps, tops, jumps = [], [], [], []
    for video in videos:
        if video.ndim != 4 or video.shape[1] < 3:
            raise ValueError(f"a morph is a video (3, t, h, w) with t >= 3; got {tuple(video.shape)}")
        found.append(object_frames(video, min_area)[1:-1])
        stats = smoothness(video)
        steps.append(stats["mean"])
        tops.append(stats["max"])
        jumps.append(stats["jump"])
    middle = sum(len(f) for f in found)
    report = {
        "morphs": len(videos),
        "middle_frames": middle,
        "kept": sum(c is not None for f in found for c in f) / middle,
        "all_kept": sum(all(c is not None for c in f) for f in found) / len(videos),
    }
    if colours is not None:
        report["ends_colour"] = sum(c in pair for f, pair in zip(found, colours) for c in f) / middle
    report.update(
        step_mean=float(np.mean(steps)),
        step_max=float(np.mean(tops)),
        jump=float(np.median(jumps)),
        blank=[[i + 1 for i, c in enumerate(f) if c is None] for f in found],
    )
    return report


def morph_scores(make: Callable[[dict, int], torch.Tensor], count: int, seeds=(0,), log=None) -> dict:
    """``morph_report`` of ``make(pair, seed)`` (a morph video (3, t, h, w) or (1, 3, t, h, w)) over ``count``
    pairs per seed, pooled; seed ``s`` takes its pairs from the held-out world ``MORPH_SEED + s`` (a job that
    samples gets ``s`` as its seed too). ``per_seed`` holds each seed's report; ``log`` gets a line per seed."""
    videos, colours, per_seed = [], [], []
    for seed in seeds:
        pairs = morph_pairs(count, MORPH_SEED + seed)
        made = [make(pair, seed) for pair in pairs]
        made = [v[0] if v.ndim == 5 else v for v in made]
        per_seed.append({"seed": seed, **morph_report(made, [p["colours"] for p in pairs])})
        videos += made
        colours += [p["colours"] for p in pairs]
        if log is not None:
            r = per_seed[-1]
            log(
                f"  seed {seed}: kept {r['kept']:.4f}, all kept {r['all_kept']:.4f}, step {r['step_mean']:.4f}"
            )
    return {**morph_report(videos, colours), "seeds": list(seeds), "per_seed": per_seed}
