"""Media and masks for the jobs: reading a video, image or mask file (frame selection, fitting the size to the
model's multiple) and checking tensors given instead. The library jobs and the CLI both read through here, so a
file comes in the same whichever of them reads it.

Letters: b batch, c channels, t frames, h height, w width.
"""

from __future__ import annotations

import os

import torch

from ..config.pipeline import FrameSelection
from ..data.io import IMAGE_EXTENSIONS, probe, read_video

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
    """A black-and-white mask image or video -> (1, t, h, w) in [0, 1], its size fitted as the input's was
    (``selection``'s size and size policy). A video mask's frames are taken as the input's were (``selection``'s
    start, stride or fps and frame policy), at most ``frames``; an image is one mask for every frame.
    ``source_size``: the input file's own (h, w), which the mask's must equal (checked before anything is
    fitted). ValueError for a mask in colour or with transparency (a mask is read from its grey level)."""
    header = probe(path)
    if source_size is not None and tuple(header["size"]) != tuple(source_size):
        (mh, mw), (h, w) = header["size"], source_size
        raise ValueError(f"mask {path} is {mw}x{mh} but the input is {w}x{h}")
    _check_opaque(path)
    read = (selection or FrameSelection()).read_keywords()
    if header["frames"] == 1:  # an image: no frames to select
        read.update(frames=1, start=0, stride=1, fps=None)
    else:
        read.update(frames=frames)
    mask, _ = read_video(path, temporal_factor=1, multiple=multiple, **read)
    return one_channel((mask + 1) / 2, str(path))


def _check_opaque(path: str | os.PathLike) -> None:
    """ValueError when an image file has transparent pixels: editors often draw a mask's shape in its alpha
    over black, which reading the colours alone would take for "keep everything"."""
    if os.path.isdir(path) or not str(path).lower().endswith(IMAGE_EXTENSIONS):
        return
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
            return
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            raise ValueError(
                f"mask {path} has transparent pixels; a mask is read from its grey level (white = regenerate, "
                "black = keep), not its transparency: save it opaque, its shape in white on black"
            )


def one_channel(mask: torch.Tensor, name: str) -> torch.Tensor:
    """A mask read from a file (c, t, h, w) -> (1, t, h, w): its channels must agree (black and white, grey up
    to compression), else ValueError naming the file ``name``."""
    if (mask.amax(dim=0) - mask.amin(dim=0)).max() > 0.25:
        raise ValueError(
            f"the mask must be one channel (black and white: white = regenerate, black = keep); {name} has colour"
        )
    return mask.mean(dim=0, keepdim=True)


def as_video(video) -> torch.Tensor:
    """A tensor (3, h, w), (3, t, h, w) or (b, 3, t, h, w) float -> (b, 3, t, h, w) float32, checked."""
    ok = isinstance(video, torch.Tensor) and video.ndim in (3, 4, 5)
    if not ok or video.shape[1 if video.ndim == 5 else 0] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"expected a video (b, 3, t, h, w), (3, t, h, w) or an image (3, h, w); got {shape}")
    check_pixels(video)
    if video.ndim == 3:
        video = video[:, None]
    if video.ndim == 4:
        video = video[None]
    return video.float()


def check_pixels(video, name: str = "video") -> None:
    """ValueError unless ``video`` is a float tensor whose values lie in [-1, 1] (up to 1.5: resampling
    overshoots a little); one pass over it. Pixels 0-255 or 0-1 as floats are the usual slip, and the message
    says how to map them."""
    if not isinstance(video, torch.Tensor):
        raise ValueError(
            f"expected the {name} as a float tensor in [-1, 1]; got {type(video).__name__} "
            "(a file: read it with vidlatent.data.read_video)"
        )
    if not video.is_floating_point():
        raise ValueError(f"expected a float {name} in [-1, 1]; got dtype {video.dtype} (use read_video)")
    if not video.numel():
        return
    lo, hi = (float(v) for v in torch.aminmax(video.detach()))
    if lo < -1.5 or hi > 1.5:
        raise ValueError(
            f"expected a float {name} in [-1, 1]; its values span {lo:.4g} to {hi:.4g} (pixels 0-255: "
            "x / 127.5 - 1; 0-1: x * 2 - 1)"
        )


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
