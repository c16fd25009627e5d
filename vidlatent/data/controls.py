"""Control videos: what a control branch is trained on and steered with, made from clips or drawn by hand.

A control video is a clip of the same shape as the video it steers, (3, t, h, w) or (b, 3, t, h, w) float in
[-1, 1], like every clip of the library (a uint8 (f, h, w, 3) rendering of the shapes world becomes one with
``shapes.to_tensor``). Controls are white on black: 1 where the signal is, -1 elsewhere.

- Named transforms turn a clip into its control (``CONTROL_TRANSFORMS``, ``control_transform(name)``, so a
  config can say ``control_transform: silhouette``): ``silhouette``, the objects in white (the pixels the
  shapes world's oracle reads as coloured objects), and ``edges``, a thresholded colour Sobel edge map.
  ``make_control(clip, transform)`` applies one by name.
- ``world_control(world, index, transform)``: a shapes-world clip with its control, the silhouette drawn
  exactly from the scene's objects (``ShapesWorld.silhouette``: anti-aliased as the clip draws them).
- ``silhouette_path``: a control drawn from what a user asks for, one shape moving along a line, drawn by the
  world's own renderer (so it looks like the silhouettes training saw).
- Real data brings its own controls: ``control_path(clip)`` finds the control video beside a clip (same stem
  in a ``controls/`` folder), ``control_paths(clips)`` every clip's, naming all clips without one.

Letters: b batch, c colour channels (3), t frames, h height, w width.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from .io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .shapes import SHAPES, ShapesWorld, colour_masks, coverage, to_tensor

__all__ = [
    "CONTROL_TRANSFORMS",
    "ControlTransform",
    "control_path",
    "control_paths",
    "control_transform",
    "edges",
    "make_control",
    "silhouette",
    "silhouette_path",
    "world_control",
]

ControlTransform = Callable[[torch.Tensor], torch.Tensor]  # clip -> control of the same shape

CONTROL_SUFFIXES = (*VIDEO_EXTENSIONS, *IMAGE_EXTENSIONS)  # a control is any file read_video reads


def _check_clip(clip) -> None:
    if not isinstance(clip, torch.Tensor) or clip.ndim not in (4, 5) or clip.shape[-4] != 3:
        shape = tuple(clip.shape) if hasattr(clip, "shape") else type(clip).__name__
        raise ValueError(f"a clip is a float tensor (3, t, h, w) or (b, 3, t, h, w) in [-1, 1]; got {shape}")


def _white_on_black(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """bool (..., t, h, w) -> (..., 3, t, h, w) of ``like``'s dtype and device: 1 where set, -1 elsewhere."""
    video = mask.to(like.device, like.dtype) * 2 - 1
    return torch.stack([video] * 3, dim=-4)


# ------------------------------------------------------------------------------------------ transforms


def silhouette(clip: torch.Tensor) -> torch.Tensor:
    """The objects of ``clip`` in white on black: every pixel the shapes world's oracle reads as an object
    (saturated and bright enough, ``shapes.colour_masks``), hard-edged. For a shapes-world clip whose scene
    is known, ``ShapesWorld.silhouette`` draws the exact, anti-aliased one (``world_control``)."""
    _check_clip(clip)
    clips = clip if clip.ndim == 5 else clip[None]
    masks = [np.any(list(colour_masks(one.float()).values()), axis=0) for one in clips]
    out = _white_on_black(torch.from_numpy(np.stack(masks)), clip)
    return out if clip.ndim == 5 else out[0]


def edges(clip: torch.Tensor, threshold: float = 0.15) -> torch.Tensor:
    """The edges of ``clip`` in white on black: pixels whose colour Sobel gradient (the root sum of squares
    over the three channels of the per-channel Sobel responses, each divided by 4 so that a sharp step of
    size d in [0, 1] reads d) exceeds ``threshold``. The default keeps the shapes world's object outlines
    and drops its soft stripes, checks and gradients."""
    _check_clip(clip)
    clips = clip if clip.ndim == 5 else clip[None]
    b = clips.shape[0]
    frames = rearrange((clips.float() + 1) / 2, "b c t h w -> (b t c) 1 h w")
    smooth = torch.tensor([1.0, 2.0, 1.0], device=clip.device)
    slope = torch.tensor([-1.0, 0.0, 1.0], device=clip.device)
    kernel = torch.stack([torch.outer(smooth, slope), torch.outer(slope, smooth)])[:, None] / 4  # d/dx, d/dy
    grad = F.conv2d(F.pad(frames, (1, 1, 1, 1), mode="replicate"), kernel)  # (b t c) 2 h w
    grad = rearrange(grad, "(b t c) g h w -> b t (c g) h w", b=b, c=3)
    mask = grad.square().sum(2).sqrt() > threshold  # b t h w
    out = _white_on_black(mask, clip)
    return out if clip.ndim == 5 else out[0]


CONTROL_TRANSFORMS: dict[str, ControlTransform] = {"silhouette": silhouette, "edges": edges}


def control_transform(name: str) -> ControlTransform:
    """The transform ``CONTROL_TRANSFORMS`` names ``name``; ValueError listing the names for another."""
    if name not in CONTROL_TRANSFORMS:
        raise ValueError(f"unknown control transform {name!r}; accepted: {', '.join(CONTROL_TRANSFORMS)}")
    return CONTROL_TRANSFORMS[name]


def make_control(clip: torch.Tensor, transform: str | ControlTransform) -> torch.Tensor:
    """The control video of ``clip`` ((3, t, h, w) or (b, 3, t, h, w) in [-1, 1]) made by ``transform``: a
    name of ``CONTROL_TRANSFORMS`` or a function of a clip. Same shape, dtype and device as ``clip``."""
    fn = control_transform(transform) if isinstance(transform, str) else transform
    _check_clip(clip)
    control = fn(clip)
    if tuple(control.shape) != tuple(clip.shape):
        raise ValueError(
            f"control transform {transform!r} made a control of shape {tuple(control.shape)} for a clip of "
            f"shape {tuple(clip.shape)}; a control must have its clip's shape"
        )
    return control


# the transforms a shapes world draws exactly from its scenes instead of reading pixels
WORLD_CONTROLS: dict[str, Callable[[ShapesWorld, int], torch.Tensor]] = {"silhouette": ShapesWorld.silhouette}


def world_control(
    world: ShapesWorld, index: int, transform: str | ControlTransform
) -> tuple[torch.Tensor, str, torch.Tensor]:
    """Clip ``index`` of ``world`` with its control: (clip (3, f, h, w), caption, control (3, f, h, w)).

    ``silhouette`` is drawn exactly from the scene's objects (``ShapesWorld.silhouette``), any other transform
    reads the clip's pixels (``make_control``)."""
    clip, caption = world.clip(index)
    if transform in WORLD_CONTROLS:
        return clip, caption, WORLD_CONTROLS[transform](world, index)
    return clip, caption, make_control(clip, transform)


# --------------------------------------------------------------------------------- drawn by a user


def silhouette_path(
    shape: str,
    start: tuple[float, float],
    end: tuple[float, float],
    size: float = 0.15,
    frames: int = 17,
    height: int = 64,
    width: int = 64,
) -> torch.Tensor:
    """A silhouette control: a white ``shape`` on black moving at constant speed along a straight line from
    ``start`` to ``end``, (3, frames, height, width) float32 in [-1, 1].

    Positions are the shape's centre as fractions (x, y) of the frame's width and height, (0, 0) top left,
    (1, 1) bottom right; ``size`` is its radius as a fraction of the frame's shorter side (the shapes world
    draws 0.12 to 0.19). Drawn as the world draws its objects (``shapes.coverage``).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; accepted: {', '.join(SHAPES)}")
    for name, point in (("start", start), ("end", end)):
        if len(point) != 2 or not all(0.0 <= float(v) <= 1.0 for v in point):
            raise ValueError(
                f"{name} must be (x, y) as fractions of the frame's width and height, each in [0, 1]; "
                f"got {point}"
            )
    if not 0.0 < size <= 0.5:
        raise ValueError(
            f"size is a radius as a fraction of the frame's shorter side, in (0, 0.5]; got {size}"
        )
    if frames < 1 or height < 1 or width < 1:
        raise ValueError(f"need frames, height, width >= 1; got {frames}, {height}, {width}")
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    xs = (start[0] + (end[0] - start[0]) * t) * width
    ys = (start[1] + (end[1] - start[1]) * t) * height
    cov = coverage(shape, size * min(height, width), xs, ys, height, width)[..., None]
    frames_uint8 = np.clip(np.round(255.0 * np.repeat(cov, 3, axis=-1)), 0, 255).astype(np.uint8)
    return to_tensor(frames_uint8)


# -------------------------------------------------------------------------------- beside real clips


def _control_folder(clip: Path, controls: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    if root is None:
        return clip.parent / controls  # an absolute ``controls`` stays itself
    root = Path(root)
    return root / controls / clip.parent.relative_to(root)


def _find_control(clip: Path, folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if (p.is_dir() and p.name == clip.stem)  # a folder of numbered frames
        or (p.is_file() and p.stem == clip.stem and p.suffix.lower() in CONTROL_SUFFIXES)
    )


def control_path(
    clip: str | os.PathLike, controls: str | os.PathLike = "controls", root: str | os.PathLike | None = None
) -> Path:
    """The control video of the training clip ``clip``: the video, image or frame folder with the clip's stem
    (any suffix ``read_video`` reads) in the folder ``controls``.

    ``controls`` is relative to the clip's own folder (``data/a.mp4`` -> ``data/controls/a.mp4``) or absolute.
    With ``root`` (the folder the clips were found under), ``controls`` is relative to ``root`` and mirrors
    its subfolders (``root/x/a.mp4`` -> ``root/controls/x/a.*``), so clips of one stem in two folders keep two
    controls. FileNotFoundError when there is none, ValueError when two files could be it.
    """
    clip = Path(clip)
    folder = _control_folder(clip, controls, root)
    found = _find_control(clip, folder)
    if not found:
        raise FileNotFoundError(
            f"no control video for {clip}: expected {folder / clip.stem}.<video or image>"
        )
    if len(found) > 1:
        raise ValueError(f"several control videos for {clip}: {', '.join(map(str, found))}; keep one")
    return found[0]


def control_paths(
    clips: Sequence[str | os.PathLike],
    controls: str | os.PathLike = "controls",
    root: str | os.PathLike | None = None,
) -> dict[Path, Path]:
    """{clip: its control} for every clip (see ``control_path``). FileNotFoundError listing every clip that
    has no control (the first 20 by name, then how many more); ValueError for a clip with several."""
    found, missing = {}, []
    for clip in map(Path, clips):
        try:
            found[clip] = control_path(clip, controls, root)
        except FileNotFoundError:
            missing.append(clip)
    if missing:
        listed = ", ".join(str(p) for p in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise FileNotFoundError(
            f"{len(missing)} of {len(clips)} clips have no control video in their {controls!s}/ folder "
            f"(same name, any video or image suffix): {listed}{more}"
        )
    return found
