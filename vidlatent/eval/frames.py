"""Frame quality of generated shapes-world clips: a malformed first frame, and ghost objects.

A clip asks for one object (colour, shape). Read with the world's oracle (``vidlatent.data.shapes``):

* **malformed first frame**: in frame 0 the asked colour's object (``object_mask``) fits its best shape template
  poorly (``shape_fit``: IoU < ``MIN_IOU`` with a circle, square or triangle drawn by ``coverage`` at the
  mask's centroid, at the size that fits its area best; ``misfit``), or its area is more than ``MAX_GROWTH``
  times its median area over the clip's frames (``oversize``). A frame 0 without the object fits nothing
  (IoU 0).
* **ghost**: a second object appears: the asked colour shows a second connected region of at least the
  oracle's ``min_area`` in at least ``GHOST_FRAMES`` frames (``ghost_same``), or a colour that was not asked is
  present, as the oracle counts an object, in at least half the frames (``ghost_other``; a clip drawn wholly in
  the wrong colour counts here too).

``frame_quality`` reads one clip, ``frame_shares`` counts a split's clips and ``pool_shares`` merges seeds.
"""

from __future__ import annotations

import math

import numpy as np

from ..data.shapes import SHAPES, colour_masks, coverage

MIN_IOU = 0.75  # a frame's object fits its best shape template at least this well
MAX_GROWTH = 1.5  # frame 0's object is at most this many times its median area over the clip
GHOST_FRAMES = 3  # a second region of the asked colour in this many frames is a ghost
MIN_AREA = 0.004  # the oracle's min_area: the least share of the frame an object covers
FLAGS = (
    "malformed",
    "misfit",
    "oversize",
    "first_missing",
    "misfit_mid",
    "ghost",
    "ghost_same",
    "ghost_other",
)
# the size that gives each template an area of 1 pixel (area = k * size**2; square: half-side 0.9 size)
_AREA_PER_SIZE2 = {"circle": math.pi, "square": 1.8**2, "triangle": 1.8}
_SIZE_STEPS = np.linspace(0.85, 1.15, 7)  # the sizes tried, around the one whose area matches


def _template(shape: str, size: float, x: float, y: float, h: int, w: int) -> np.ndarray:
    """``shape`` of radius ``size`` as a bool (h, w) mask (pixels at least half covered), its centroid at (x, y)."""
    cover = coverage(shape, size, [x], [y], h, w)[0]
    total = cover.sum()
    if total > 0:  # shift by the template's own centroid offset (a triangle's lies below its centre)
        gy, gx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
        x, y = 2 * x - (gx * cover).sum() / total, 2 * y - (gy * cover).sum() / total
        cover = coverage(shape, size, [x], [y], h, w)[0]
    return cover >= 0.5


def shape_fit(mask: np.ndarray) -> tuple[float, str | None]:
    """How well a bool (h, w) ``mask`` (one object) fits its best shape template: (IoU, shape). Each of
    ``SHAPES`` is drawn at the mask's centroid at the sizes around the one whose area matches the mask's;
    the best IoU wins. An empty mask gives (0.0, None)."""
    mask = np.asarray(mask, dtype=bool)
    area = int(mask.sum())
    if area == 0:
        return 0.0, None
    h, w = mask.shape
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    x, y = gx[mask].mean(), gy[mask].mean()
    best = (0.0, None)
    for shape in SHAPES:
        size0 = math.sqrt(area / _AREA_PER_SIZE2[shape])
        for step in _SIZE_STEPS:
            tmpl = _template(shape, size0 * step, x, y, h, w)
            iou = (tmpl & mask).sum() / max(1, (tmpl | mask).sum())
            if iou > best[0]:
                best = (float(iou), shape)
    return best


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sizes largest first) of the connected regions of a bool (h, w) ``mask``."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    sizes = np.asarray(ndimage.sum(mask, labels, index=np.arange(1, n + 1))) if n else np.zeros(0)
    return labels, sizes


def frame_quality(video, colour: str, min_area: float = MIN_AREA) -> dict:
    """One clip's first-frame and ghost reading (see the module's docstring) for a caption asking one object of
    ``colour``; ``video`` as for the oracle ((3, f, h, w) in [-1, 1] or uint8 (f, h, w, 3)).

    Returns ``first_iou`` and ``mid_iou`` (frame 0's and the middle frame's fit, ``shape_fit``), ``growth``
    (frame 0's area over the median), and the booleans of ``FLAGS``: ``misfit`` (first_iou < ``MIN_IOU``),
    ``oversize`` (growth > ``MAX_GROWTH``), ``malformed`` (either), ``first_missing`` (no object in frame 0),
    ``misfit_mid`` (the middle frame fits as badly: for comparison), ``ghost_same``, ``ghost_other``, ``ghost``
    (either)."""
    masks = colour_masks(video)
    if colour not in masks:
        raise ValueError(f"unknown colour {colour!r}; accepted: {', '.join(masks)}")
    f, h, w = masks[colour].shape
    least = min_area * h * w
    objects, seconds = [], 0
    for frame in masks[colour]:
        labels, sizes = _components(frame)
        objects.append(labels == 1 + int(np.argmax(sizes)) if len(sizes) else np.zeros((h, w), dtype=bool))
        seconds += len(sizes) > 1 and bool(np.sort(sizes)[-2] >= least)
    areas = np.array([m.sum() for m in objects], dtype=np.float64)
    median = float(np.median(areas))
    first_iou, _ = shape_fit(objects[0])
    mid_iou, _ = shape_fit(objects[f // 2])
    growth = float(areas[0] / median) if median > 0 else (math.inf if areas[0] > 0 else 0.0)
    others = [
        name for name, m in masks.items()
        if name != colour and (m.reshape(f, -1).sum(1) >= least).sum() >= max(1, f / 2)
    ]  # fmt: skip
    row = {
        "first_iou": first_iou,
        "mid_iou": mid_iou,
        "growth": growth,
        "other_colours": others,
        "misfit": bool(first_iou < MIN_IOU),
        "oversize": growth > MAX_GROWTH,
        "first_missing": bool(areas[0] < least),
        "misfit_mid": bool(mid_iou < MIN_IOU),
        "ghost_same": seconds >= GHOST_FRAMES,
        "ghost_other": bool(others),
    }
    row["malformed"] = row["misfit"] or row["oversize"]
    row["ghost"] = row["ghost_same"] or row["ghost_other"]
    return row


def frame_shares(rows: list[dict]) -> dict:
    """The share of ``rows`` (``frame_quality``'s) with each of ``FLAGS``, the median first-frame IoU, and
    ``clips`` (how many)."""
    n = max(len(rows), 1)
    shares = {flag: sum(bool(row[flag]) for row in rows) / n for flag in FLAGS}
    ious = [row["first_iou"] for row in rows]
    return {"clips": len(rows), **shares, "first_iou_median": float(np.median(ious)) if ious else 0.0}


def pool_shares(parts: list[dict]) -> dict:
    """``frame_shares`` of several runs merged, weighted by their clips (the median IoU: the runs' mean)."""
    n = sum(p["clips"] for p in parts)
    pooled = {flag: sum(p[flag] * p["clips"] for p in parts) / max(n, 1) for flag in FLAGS}
    iou = sum(p["first_iou_median"] for p in parts) / max(len(parts), 1)
    return {"clips": n, **pooled, "first_iou_median": iou}
