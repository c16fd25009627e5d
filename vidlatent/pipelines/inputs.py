"""Media and masks for the jobs: reading a video, image or mask file (frame selection, fitting the size to the
model's multiple) and checking tensors given instead. The library jobs and the CLI both read through here, so a
file comes in the same whichever of them reads it.

Letters: b batch, c channels, t frames, h height, w width.
"""

from __future__ import annotations

import os

import torch

from ..config.pipeline import FrameSelection
from ..data.io import probe, read_video

Media = torch.Tensor | str | os.PathLike


def is_file_input(media) -> bool:
    """Whether ``media`` names a file (rather than being a tensor)."""
    return isinstance(media, (str, os.PathLike))


def read_clip(
    path: str | os.PathLike,
    selection: FrameSelection | None,
    multiple: int | tuple[int, int],
    temporal_factor: int = 4,
    image: bool = False,
) -> tuple[torch.Tensor, dict]:
    """A video or image file -> ((c, t, h, w) in [-1, 1], info) as ``selection`` says (default: every frame,
    1 + 4k of them, centre-cropped to ``multiple``). ``image``: its first frame alone. ``info["fit"]`` is the
    size fit's plan: ``data.io.restore_size(output, info["fit"])`` crops a padded input's output back."""
    sel = selection or FrameSelection()
    read = sel.read_keywords()
    if image:
        read.update(frames=1, frame_policy="none")
    return read_video(path, temporal_factor=temporal_factor, multiple=multiple, **read)


def read_mask(
    path: str | os.PathLike,
    selection: FrameSelection | None,
    multiple: int | tuple[int, int],
    frames: int,
    source_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A mask image or video -> (c, t, h, w) in [0, 1], at most ``frames`` frames, its size fitted as the
    input's was (``selection``'s size and size policy). ``source_size``: the input file's own (h, w), which
    the mask's must equal (checked before anything is fitted)."""
    if source_size is not None:
        mask_size = probe(path)["size"]
        if tuple(mask_size) != tuple(source_size):
            (mh, mw), (h, w) = mask_size, source_size
            raise ValueError(f"mask {path} is {mw}x{mh} but the input is {w}x{h}")
    sel = selection or FrameSelection()
    mask, _ = read_video(path, frames=frames, temporal_factor=1, size=sel.size, multiple=multiple,
                         size_policy=sel.size_policy)  # fmt: skip
    return (mask + 1) / 2


def one_channel(mask: torch.Tensor, name: str) -> torch.Tensor:
    """A mask read from a file (c, t, h, w) -> (1, t, h, w): its channels must agree (black and white, grey up
    to compression), else ValueError naming the file ``name``."""
    if (mask.amax(dim=0) - mask.amin(dim=0)).max() > 0.25:
        raise ValueError(f"the mask must be one channel (black and white); {name} has colour")
    return mask.mean(dim=0, keepdim=True)


def as_video(video) -> torch.Tensor:
    """A tensor (3, h, w), (3, t, h, w) or (b, 3, t, h, w) float -> (b, 3, t, h, w) float32, checked."""
    ok = isinstance(video, torch.Tensor) and video.ndim in (3, 4, 5)
    if not ok or video.shape[1 if video.ndim == 5 else 0] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"expected a video (b, 3, t, h, w), (3, t, h, w) or an image (3, h, w); got {shape}")
    if not video.is_floating_point():
        raise ValueError(f"expected a float video in [-1, 1]; got dtype {video.dtype} (use read_video)")
    if video.ndim == 3:
        video = video[:, None]
    if video.ndim == 4:
        video = video[None]
    return video.float()


def as_mask(mask, t: int, h: int, w: int) -> torch.Tensor:
    """A mask tensor in [0, 1] -> (1, t or 1, h, w) bool (True = regenerate), checked against the input's
    frames ``t`` and size; colour channels are averaged."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a tensor or an image/video file; got {type(mask).__name__}")
    m = mask.float()
    if m.ndim == 5:
        m = m[0]
    if m.ndim == 4:  # (c, t, h, w): average the colour channels
        m = m.mean(dim=0)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"mask must be (h, w), (t, h, w) or (c, t, h, w); got {tuple(mask.shape)}")
    if tuple(m.shape[-2:]) != (h, w):
        raise ValueError(
            f"mask is {m.shape[-1]}x{m.shape[-2]} but the input is {w}x{h} (width x height); they must match"
        )
    if m.shape[0] not in (1, t):
        raise ValueError(f"mask has {m.shape[0]} frames but the input has {t}; give 1 (an image) or {t}")
    return (m > 0.5)[None]
