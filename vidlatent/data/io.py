"""Video and image files in and out: ``read_video`` / ``read_image`` give (c t h w) tensors in [-1, 1],
``probe`` a file's frame count, rate and size from its headers, ``write_video`` writes mp4, webm, gif, png
or a folder of png frames atomically.

Shapes: b batch (1 at most when writing), c colour channels (3, RGB), t frames, h height, w width.

Reading. Videos go through decord (random access: only the selected frames are decoded) when it imports,
else through PyAV, which decodes sequentially up to the last selected frame. A file
decord cannot decode is retried with pyav before a ``VideoReadError`` is raised. Both backends choose the
same frames (selection is computed from the container's frame count and rate, probed once with PyAV) and
convert YUV to RGB the same way (ffmpeg's swscale), so they return the same pixels. Images (png, jpg,
webp, ...), gifs and folders of numbered frames are read with pillow; an image is a one-frame clip, an
animated gif or webp a clip with the frame rate of its frame durations. Images are turned as their EXIF
orientation says (as viewers show them, and as videos follow their rotate tag), in their probed size too;
16-bit greyscale is scaled to 8 bits (value / 257), not clipped at 255; 32-bit float images are refused.

Frame selection: ``start`` (a source frame index), then every ``stride``-th frame, or the frame nearest in
time to each tick of a target ``fps`` (frames repeat when ``fps`` exceeds the source rate); at most
``frames`` of them. The frame policy then makes the count 1 + k * temporal_factor, what the causal VAE
takes: "trim" drops trailing frames, "pad" repeats the last one (up to ``frames`` when the clip is too
short), "none" raises unless the count already fits. The info dict says what was done.

Writing. mp4 is H.264 (libx264, crf 18, yuv420p, BT.601 matrix tagged, faststart) so that browsers and
phones play it; webm is VP9 (libvpx-vp9, crf 30) when the bundled ffmpeg has it. 4:2:0 chroma needs even
sizes, so an odd height or width is padded by one replicated row or column: the file is up to one pixel
larger and the picture is its top-left crop (ffmpeg's own conversion of odd sizes smears the last
column's colours). gif goes through ffmpeg with one palette built from all frames (palettegen +
paletteuse, ordered dithering), because pillow merges identical consecutive frames and the frame count
would change; gif delays are whole centiseconds, so rates above 50 fps do not play as written.
A path ending in .png or .jpg holds one frame; a path with no suffix is a folder of numbered frames
``00000.png, 00001.png, ...`` (read back by ``read_video`` on the folder, which has no frame rate). An
existing folder is replaced only when it is empty or holds nothing but such frames (an earlier write's);
a folder with any other file in it is refused, never deleted.
Every write goes to a temporary name in the target's folder first and is renamed into place.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import re
import shutil
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from vidlatent.checkpoint import (
    atomic_write,
    current_umask,
    is_disk_full,
    remove_stale_temporaries,
    temporary_prefix,
)
from vidlatent.checks import NonFiniteError, check_option

__all__ = [
    "FRAME_POLICIES",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "SIZE_POLICIES",
    "VIDEO_EXTENSIONS",
    "WRITE_EXTENSIONS",
    "VideoReadError",
    "VideoWriteError",
    "fit_to_multiple",
    "probe",
    "read_image",
    "read_video",
    "restore_size",
    "write_video",
]

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
# read with pillow; gif, webp and png may hold several frames
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# what a file manager leaves in a folder it showed (macOS Finder, Windows Explorer): not a user's file
_FILE_MANAGER_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
_FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # files in a frames folder
WRITE_EXTENSIONS = (".mp4", ".webm", ".gif", ".png", ".jpg", ".jpeg")
FRAME_POLICIES = ("trim", "pad", "none")
# how frames whose sides are not multiples of a model's are fitted (``fit_to_multiple``)
SIZE_POLICIES = ("crop", "pad", "resize")
MAX_PIXELS = 8192 * 8192  # larger frames are refused from their header ("image too large: W x H")
BACKENDS = ("auto", "decord", "pyav")

_CHUNK = 16  # frames decoded and resized at a time, to bound the uint8/float working memory
_MP4_CRF = 18
_WEBM_CRF = 30
_COLOR_TAGS = ["-colorspace", "smpte170m", "-color_range", "tv"]  # what swscale's default rgb->yuv uses
_DECORD_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Error: )?")
_GIF_FILTER = "split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=bayer:bayer_scale=5"
_ORIENTATION = 0x0112  # the EXIF tag: 1 as stored; 2-8 flipped and / or turned; 5-8 swap width and height
# the names ``_write_frames_dir`` gives frames (00000.png, ...): a folder holding only these is an earlier write's
_FRAME_NAME = re.compile(r"[0-9]{5,}\.png")


class VideoReadError(ValueError):
    """A file exists but cannot be decoded (corrupt, truncated, no video stream); names the file and why."""


class VideoWriteError(OSError, RuntimeError):
    """ffmpeg could not write a file (its encoder is missing, or it failed: its last lines say why). An
    OSError like a full disk, and a RuntimeError as it was before it had a class of its own."""


class _DecodeFailure(Exception):
    """Why one backend could not decode a file; becomes part of a VideoReadError."""


# ---------------------------------------------------------------------------------------------- helpers


@functools.cache
def _decord():
    """The decord module, or None where it has no wheel or fails to load. Its FFmpeg's log lines are silenced
    (a damaged file printed ``[mov,mp4,...] partial file`` to stderr): a failure reaches the caller as an error
    naming both backends' reasons."""
    try:
        import decord
    except Exception:  # ImportError, or OSError from a broken shared library
        return None
    try:
        decord.logging.set_level(decord.logging.QUIET)
    except AttributeError:  # a decord without its logging module
        pass
    return decord


@functools.cache
def _ffmpeg_encoders() -> frozenset[str]:
    import imageio_ffmpeg

    exe = imageio_ffmpeg.get_ffmpeg_exe()
    out = subprocess.run(
        [exe, "-hide_banner", "-encoders"], capture_output=True, text=True, check=False
    ).stdout
    return frozenset(
        line.split()[1] for line in out.splitlines() if len(line.split()) > 1 and line[:1] == " "
    )


def _one_line(err: BaseException) -> str:
    """``Type: first line`` of an exception, without decord's ``[time] file.cc:line:`` prefix."""
    text = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [""])[0]
    text = _DECORD_PREFIX.sub("", text)
    return f"{type(err).__name__}: {text}"


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _check_exists(path: Path) -> None:
    """FileNotFoundError for a path that does not exist, saying when it is a broken or looping link."""
    if path.exists():
        return
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13: a symlink loop
            raise FileNotFoundError(f"a symbolic link that loops: {path}") from None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise FileNotFoundError(f"a symbolic link that loops: {path}") from None
        raise FileNotFoundError(f"a broken symbolic link (its target is missing): {path}")
    raise FileNotFoundError(f"no such video, image or frame folder: {path}")


def _check_pixels(path, size: tuple[int, int], what: str = "image") -> None:
    """VideoReadError when frames of ``size`` (h, w) exceed ``MAX_PIXELS`` (read from a header: nothing
    has been decoded yet)."""
    h, w = size
    if h * w > MAX_PIXELS:
        side = math.isqrt(MAX_PIXELS)
        raise VideoReadError(
            f"cannot read {path}: {what} too large: {w} x {h} ({h * w / 1e6:.0f} megapixels; the limit is "
            f"{side} x {side}, vidlatent.data.io.MAX_PIXELS)"
        )


def _png_metadata_after_pixels(filename) -> bool:
    """Whether a png holds EXIF (an eXIf chunk, or ImageMagick's "Raw profile type exif" text) or XMP after
    its pixel data, where pillow finds them only by decoding the image. Reads chunk headers, not pixels;
    True when unsure (a truncated or unreadable file)."""
    try:
        with open(filename, "rb") as fp:
            fp.seek(8)  # the signature
            pixels_seen = False
            while len(head := fp.read(8)) == 8:  # each chunk: length, type, data, CRC
                length, kind, data = int.from_bytes(head[:4], "big"), head[4:], fp.tell()
                if kind == b"IEND":
                    return False
                if kind in (b"IDAT", b"fdAT"):
                    pixels_seen = True
                elif pixels_seen and kind == b"eXIf":
                    return True
                elif pixels_seen and kind in (b"tEXt", b"zTXt", b"iTXt"):
                    keyword = fp.read(min(length, 80)).split(b"\0", 1)[0]
                    if keyword in (b"Raw profile type exif", b"XML:com.adobe.xmp"):
                        return True
                fp.seek(data + length + 4)
    except OSError:
        pass
    return True


def _orientation(image, loaded: bool = False) -> int:
    """The EXIF orientation (1-8; 1 when there is none or it cannot be read) of a pillow image, from EXIF, a
    tiff's own tag or XMP, as ``ImageOps.exif_transpose`` reads it. Pillow's png ``getexif`` decodes the
    pixels to look for EXIF after them; here, unless the image is ``loaded`` already (its pixels decoded, all
    its metadata read), they are decoded only when such metadata is there."""
    from PIL import Image

    try:
        if (
            not loaded
            and image.format == "PNG"
            and "exif" not in image.info
            and getattr(image, "filename", None)
            and not _png_metadata_after_pixels(image.filename)
        ):
            exif = Image.Image.getexif(image)  # the header's metadata is all there is
        else:
            exif = image.getexif()
        return int(exif.get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: show the image as stored
        return 1


def _shown_size(image) -> tuple[int, int]:
    """(h, w) of a pillow image as viewers show it (and ``_rgb`` returns it): the EXIF orientation turns
    it by a quarter for values 5-8. A size ``_check_pixels`` refuses anyway is returned as stored. A tiff's
    stored size is read from its tags: newer pillows give ``size`` already turned (and turn it on load)."""
    tags = getattr(image, "tag_v2", None)
    if tags is not None and 256 in tags and 257 in tags:  # ImageWidth, ImageLength
        w, h = int(tags[256]), int(tags[257])
    else:
        w, h = int(image.size[0]), int(image.size[1])
    if h * w <= MAX_PIXELS and _orientation(image) in (5, 6, 7, 8):
        return w, h
    return h, w


def _image_header(path: Path) -> tuple[int, int]:
    """(h, w) of an image from its header, as shown (EXIF orientation applied, see ``_shown_size``), without
    decoding it. Pillow's own guard against huge images (DecompressionBombError) is bypassed here only to
    read the size, which ``_check_pixels`` then judges."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _shown_size(im)
    except Image.DecompressionBombError:
        pass
    Image.init()
    with open(path, "rb") as fp:
        prefix = fp.read(16)
        for fmt in Image.ID:  # what Image.open does, without its size check
            factory, accept = Image.OPEN[fmt]
            if accept and accept(prefix) is not True:
                continue
            fp.seek(0)
            try:
                im = factory(fp, str(path))
            except Exception:
                continue
            return _shown_size(im)
    raise VideoReadError(f"cannot read {path}: pillow cannot identify the image")


def fit_to_multiple(
    video: torch.Tensor, multiple: int | tuple[int, int], policy: str = "crop", name: str = "the input"
) -> tuple[torch.Tensor, dict]:
    """Make the sides of ``video`` (..., h, w) multiples of ``multiple`` (one int, or (height, width)); the
    one size policy of every job that reads frames:

    - ``"crop"``: centre-crop to the largest multiples inside (at most multiple - 1 pixels lost per side);
    - ``"pad"``: pad to the smallest multiples outside, centred, by repeating the edge pixels;
      ``restore_size`` crops a result back, so a job's output has the input's size;
    - ``"resize"``: resize to the nearest multiples (bilinear, antialiased; the aspect ratio bends a little).

    Returns (video, plan): a JSON-friendly ``plan`` with ``size_policy``, ``input_size`` (h, w), ``size``
    (h, w) after fitting, and ``box`` (crop: top, left, h, w kept) or ``pad`` (top, bottom, left, right).
    """
    if policy not in SIZE_POLICIES:
        raise ValueError(f"unknown size policy {policy!r}; accepted: {', '.join(SIZE_POLICIES)}")
    mh, mw = (multiple, multiple) if isinstance(multiple, int) else (int(multiple[0]), int(multiple[1]))
    h, w = (int(v) for v in video.shape[-2:])
    plan = {"size_policy": policy, "input_size": [h, w], "size": [h, w]}
    if h % mh == 0 and w % mw == 0 and h and w:
        return video, plan
    if policy == "crop":
        nh, nw = h // mh * mh, w // mw * mw
        if nh == 0 or nw == 0:
            raise ValueError(
                f"{name} is {w}x{h}, smaller than {mw}x{mh}: it cannot be cropped to multiples of {mw}x{mh}; "
                "use the size policy pad or resize"
            )
        top, left = (h - nh) // 2, (w - nw) // 2
        plan.update(size=[nh, nw], box=[top, left, nh, nw])
        return video[..., top : top + nh, left : left + nw], plan
    if policy == "pad":
        nh, nw = -(-h // mh) * mh, -(-w // mw) * mw
        top, left = (nh - h) // 2, (nw - w) // 2
        pad = [top, nh - h - top, left, nw - w - left]
        flat = video.reshape(-1, 1, h, w)  # F.pad's replicate mode wants (n, c, h, w)
        padded = F.pad(flat.float(), (pad[2], pad[3], pad[0], pad[1]), mode="replicate").to(video.dtype)
        plan.update(size=[nh, nw], pad=pad)
        return padded.reshape(*video.shape[:-2], nh, nw), plan
    nh, nw = max(mh, round(h / mh) * mh), max(mw, round(w / mw) * mw)
    flat = video.reshape(-1, 1, h, w).float()
    resized = F.interpolate(flat, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    lo, hi = video.min(), video.max()  # antialiasing may overshoot: stay in the input's range
    plan.update(size=[nh, nw])
    return resized.clamp(lo, hi).to(video.dtype).reshape(*video.shape[:-2], nh, nw), plan


def restore_size(video: torch.Tensor, plan: dict | None) -> torch.Tensor:
    """Undo a ``fit_to_multiple`` pad on a result of the fitted size (..., h, w): crop the padding away, so the
    result has the input's size. Crop and resize plans (and None) leave ``video`` as it is."""
    if not plan or plan.get("size_policy") != "pad" or "pad" not in plan:
        return video
    top, bottom, left, right = plan["pad"]
    h, w = video.shape[-2:]
    return video[..., top : h - bottom, left : w - right]


def frames_note(name, info: dict) -> str:
    """What the frame policy did to a clip ``read_video`` read (its ``info``), as a note ("" when nothing)."""
    selected, trimmed, padded = (
        info.get("frames_selected"),
        info.get("frames_trimmed"),
        info.get("frames_padded"),
    )
    if trimmed:
        return f"note: {name}: {selected} frames selected, the last {trimmed} dropped to make 1+4k"
    if padded:
        return f"note: {name}: {selected} frames selected, the last repeated {padded} times to make 1+4k"
    return ""


def size_note(name, plan: dict | None) -> str:
    """What fitting did, as a note for the user ("" when nothing): sizes as width x height."""
    if not plan or plan["input_size"] == plan["size"]:
        return ""
    (h, w), (nh, nw) = plan["input_size"], plan["size"]
    done = {"crop": "centre-cropped", "pad": "padded (the output is cropped back)", "resize": "resized"}
    return (
        f"note: {name}, read at {w}x{h}, was {done[plan['size_policy']]} to {nw}x{nh} (the model's multiple)"
    )


def _select(
    count: int, src_fps: float | None, start: int, stride: int, fps: float | None, frames: int | None
):
    """Source frame indices chosen by start / stride or target fps, at most ``frames`` of them."""
    if start >= count:
        raise ValueError(f"start={start} is past the end of a {count}-frame clip")
    limit = frames if frames is not None else math.inf
    if fps is None:
        return list(range(start, count, stride)[: frames or count])
    if src_fps is None:
        if count == 1:
            return [0]
        raise ValueError("fps= needs the source's frame rate, and this source has none; use stride=")
    ratio = src_fps / fps
    out = []
    while len(out) < limit:
        index = start + math.floor(len(out) * ratio + 0.5)
        if index >= count:
            break
        out.append(index)
    return out


def _apply_policy(
    indices: list[int], frames: int | None, policy: str, factor: int, path
) -> tuple[list, int, int]:
    """Make the count 1 + k * factor; returns (indices, trimmed, padded)."""
    n = len(indices)
    fits = (n - 1) % factor == 0
    if policy == "none":
        if frames is not None and n < frames:
            raise ValueError(
                f"{path}: asked for {frames} frames, the clip gives {n} from this start and step"
            )
        if not fits:
            raise ValueError(
                f"{path}: {n} frames selected, but frame_policy='none' needs 1 + {factor}k frames "
                f"({', '.join(str(1 + factor * k) for k in range(4))}, ...); use frame_policy='trim' or 'pad'"
            )
        return indices, 0, 0
    if policy == "trim":
        keep = 1 + (n - 1) // factor * factor
        return indices[:keep], n - keep, 0
    want = max(n, frames or 0)
    target = 1 + math.ceil((want - 1) / factor) * factor
    return indices + [indices[-1]] * (target - n), 0, target - n


def _plan_resize(src: tuple[int, int], size: tuple[int, int] | None):
    """Centre crop of the source to the target aspect ratio: (top, left, crop_h, crop_w)."""
    H, W = src
    if size is None:
        return 0, 0, H, W
    h, w = size
    if W * h > w * H:  # source wider than target: crop width
        ch, cw = H, min(W, max(1, round(H * w / h)))
    else:
        ch, cw = min(H, max(1, round(W * h / w))), W
    return (H - ch) // 2, (W - cw) // 2, ch, cw


def _to_unit(chunk: np.ndarray, crop, size) -> torch.Tensor:
    """(t h w c) uint8 -> (c t h w) float32 in [-1, 1], centre-cropped and resized."""
    top, left, ch, cw = crop
    x = torch.from_numpy(np.ascontiguousarray(chunk[:, top : top + ch, left : left + cw]))
    x = rearrange(x, "t h w c -> t c h w").float()
    if size is not None and (ch, cw) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp(0, 255)
    return rearrange(x, "t c h w -> c t h w") / 127.5 - 1.0


# ------------------------------------------------------------------------------------------ the decoders
# Each takes sorted distinct frame indices and yields (t h w c) uint8 chunks of them, in order.


def _probe(path: Path) -> dict:
    """Frame count (declared, or counted packets), frame rate and size (h, w) of the first video stream."""
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.video:
                raise VideoReadError(f"cannot read {path}: it has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            size = (int(stream.codec_context.height), int(stream.codec_context.width))
            count, damaged = (
                stream.frames,
                bool(stream.frames) and _implausible(stream.frames, stream, container, rate),
            )
            if not count or damaged:  # no count, or a damaged header's: count the packets
                count = sum(1 for packet in container.demux(stream) if packet.size)
    except VideoReadError:
        raise
    except Exception as err:
        raise VideoReadError(f"cannot read {path}: {_one_line(err)}") from err
    if count == 0:
        raise VideoReadError(f"cannot read {path}: the video stream holds no frames")
    if _display_rotation(path) % 180:  # a phone video stored 1920x1080 with rotate=90 shows as 1080x1920
        size = size[::-1]
    _check_pixels(path, size, "frames")
    return {"count": int(count), "fps": float(rate) if rate else None, "size": size, "damaged_count": damaged}


def _display_rotation(path: Path) -> int:
    """Degrees (counter-clockwise: 0, 90, 180 or 270) the display matrix of the first frame turns the stored
    frames by (a phone's ``rotate`` tag), as players and decord show them; 0 when it cannot be read. Decodes
    that one frame: PyAV exposes the matrix on frames only."""
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            frame = next(container.decode(video=0), None)
            return _quarter_turns(frame) * 90
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the reader, not here
        return 0


def _quarter_turns(frame) -> int:
    """The counter-clockwise quarter turns (0-3) a decoded PyAV frame's display matrix asks for."""
    return round((getattr(frame, "rotation", 0) or 0) / 90) % 4


def _implausible(count: int, stream, container, rate) -> bool:
    """Whether a declared frame count is far more than the stream's duration holds (a damaged header once
    declared 3.4 billion frames of a 2 KB file), or past ten million frames when there is no duration."""
    import av

    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    if seconds is None or not rate:
        return count > 10_000_000
    return count > 2 * seconds * float(rate) + 16


def _truncated(count: int, index: int) -> _DecodeFailure:
    return _DecodeFailure(
        f"truncated or corrupt: the container declares {count} frames, frame {index} is missing"
    )


def _decode_decord(path: Path, indices: list[int], count: int):
    decord = _decord()
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=0)
    if indices[-1] >= len(reader):
        raise _truncated(count, len(reader))
    for i in range(0, len(indices), _CHUNK):
        yield reader.get_batch(indices[i : i + _CHUNK]).asnumpy()


def _decode_pyav(path: Path, indices: list[int], count: int):
    """Decode forward (never seeking) and convert with swscale to rgb24, as imageio's pyav plugin does; PyAV
    itself, because that plugin's close() runs gc.collect() twice (0.2 s each once torch is imported)."""
    import av

    wanted = iter(indices)
    index, chunk = next(wanted, None), []
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        stream.thread_type = "FRAME"
        for i, frame in enumerate(container.decode(stream)):
            if i == index:  # turned as shown (the display matrix), as decord does
                chunk.append(np.rot90(frame.to_ndarray(format="rgb24"), _quarter_turns(frame)))
                index = next(wanted, None)
                if len(chunk) == _CHUNK or index is None:
                    yield np.stack(chunk)
                    chunk = []
            if index is None:
                return
    raise _truncated(count, index)


def _rgb(frame, path: Path) -> np.ndarray:
    """A pillow image (the frame it is seeked to) as (h w 3) uint8 RGB, turned as its EXIF orientation
    says (``ImageOps.exif_transpose``). 16-bit greyscale (modes I;16, I;16L, I;16B, I;16N) and 32-bit
    integer greyscale (mode I: pngs of 16 bits, tiffs of 32, taken as 16-bit values and clipped to
    0..65535) are scaled to 8 bits, value / 257 rounded, as pillow's own conversion to RGB would clip
    them at 255 (50% grey coming out white). Floating point (mode F) has no fixed range: refused."""
    from PIL import ImageOps

    frame.load()  # first: newer pillows turn a tiff on loading it (and drop its orientation tag)
    if _orientation(frame, loaded=True) != 1:  # loaded: no second pass over the file for a png's chunks
        frame = ImageOps.exif_transpose(frame)
    if frame.mode == "I" or frame.mode.startswith("I;16"):
        grey = np.clip(np.asarray(frame), 0, 65535).astype(np.uint32)  # any byte order, int32 for "I"
        grey = ((grey + 128) // 257).astype(np.uint8)  # 65535 / 255 = 257: round(value / 257)
        return np.repeat(grey[..., None], 3, axis=-1)
    if frame.mode == "F":
        raise _DecodeFailure(
            f"{path.name} holds 32-bit floating point pixels (pillow mode F), which have no fixed range; "
            "accepted: 8- or 16-bit images (save it as an 8- or 16-bit png or tiff)"
        )
    return np.asarray(frame.convert("RGB"))


def _decode_pillow(path: Path, indices: list[int]):
    from PIL import GifImagePlugin, Image

    with Image.open(path) as image:
        if image.format == "GIF":  # what imageio's pillow plugin, which read gifs before, sets (process-wide)
            GifImagePlugin.LOADING_STRATEGY = GifImagePlugin.LoadingStrategy.RGB_AFTER_DIFFERENT_PALETTE_ONLY
        for i in range(0, len(indices), _CHUNK):
            chunk = []
            for index in indices[i : i + _CHUNK]:
                image.seek(index)
                chunk.append(_rgb(image, path))
            yield np.stack(chunk)


def _decode_files(files: list[Path], indices: list[int]):
    from PIL import Image

    for i in range(0, len(indices), _CHUNK):
        chunk = []
        for index in indices[i : i + _CHUNK]:
            with Image.open(files[index]) as image:
                chunk.append(_rgb(image, files[index]))
        yield np.stack(chunk)


def _pillow_source(path: Path) -> dict:
    size = _image_header(path)  # as shown: EXIF orientation applied, as _rgb decodes it
    _check_pixels(path, size)
    with iio.imopen(str(path), "r", plugin="pillow") as reader:
        count = reader.properties(index=...).shape[0]
        durations = [reader.metadata(index=i).get("duration") for i in range(count)] if count > 1 else []
    durations = [d for d in durations if d]
    fps = 1000.0 * len(durations) / sum(durations) if durations else None
    return {"count": count, "fps": fps, "size": size}


def _folder_files(path: Path) -> list[Path]:
    files = [
        p for p in path.iterdir() if p.suffix.lower() in _FRAME_EXTENSIONS and not p.name.startswith(".")
    ]
    if not files:
        raise VideoReadError(
            f"cannot read {path}: the folder holds no image frames ({', '.join(_FRAME_EXTENSIONS)})"
        )
    return sorted(files, key=lambda p: _natural_key(p.name))


# ---------------------------------------------------------------------------------------------- reading


def probe(path: str | os.PathLike) -> dict:
    """What ``read_video`` would see in a file, from headers only (nothing is decoded):
    ``{"frames": count, "fps": rate or None, "size": (h, w)}``.

    A video container that declares no frame count has its packets counted. Images, gifs and folders of
    frames are probed with pillow (an image has 1 frame and no rate). Raises like ``read_video``:
    FileNotFoundError, ValueError for an unsupported suffix, VideoReadError for an unreadable file.
    """
    path = Path(path)
    _check_exists(path)
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            files = _folder_files(path)
            size = _image_header(files[0])
            _check_pixels(files[0], size)
            source = {"count": len(files), "fps": None, "size": size}
        elif suffix in IMAGE_EXTENSIONS:
            source = _pillow_source(path)
        elif suffix in VIDEO_EXTENSIONS:
            source = _probe(path)
        else:
            raise ValueError(f"unsupported file type {path.suffix!r} for {path}")
    except ValueError:  # VideoReadError included
        raise
    except Exception as err:
        raise VideoReadError(f"cannot read {path}: {_one_line(err)}") from err
    if min(source["size"]) < 1:
        raise VideoReadError(f"cannot read {path}: the header gives no frame size")
    return {"frames": source["count"], "fps": source["fps"], "size": source["size"]}


def read_video(
    path: str | os.PathLike,
    frames: int | None = None,
    start: int = 0,
    stride: int = 1,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    frame_policy: str = "trim",
    temporal_factor: int = 4,
    backend: str = "auto",
    multiple: int | tuple[int, int] | None = None,
    size_policy: str = "crop",
) -> tuple[torch.Tensor, dict]:
    """Read a video, gif, image or folder of frames as a (c t h w) float32 tensor in [-1, 1].

    Args:
        path: a video (``VIDEO_EXTENSIONS``), an image or gif (``IMAGE_EXTENSIONS``), or a folder of
            numbered image frames (as ``write_video`` writes them).
        frames: at most this many frames (after ``start`` and ``stride`` / ``fps``); None for all.
        start: index of the first source frame.
        stride: take every stride-th source frame. Exclusive with ``fps``.
        fps: resample to this frame rate by taking the source frame nearest each output tick.
        size: (h, w): centre-crop to that aspect ratio, then resize (bilinear, antialiased).
        frame_policy: "trim" drops trailing frames, "pad" repeats the last frame (up to ``frames``
            if the clip is shorter), "none" raises ValueError unless the count is already
            1 + k * temporal_factor.
        temporal_factor: the VAE's temporal compression; 1 accepts any count.
        backend: "auto" (decord, then pyav if decord is missing or fails), "decord" or "pyav".
            Used for video files only; images, gifs and folders are read with pillow.
        multiple: make the sides multiples of this (an int, or (height, width)) by ``size_policy``: "crop",
            "pad" or "resize" (see ``fit_to_multiple``), after ``size``; None leaves the size as it is.

    Returns:
        ``(video, info)``: video (c t h w) with c = 3; info a JSON-friendly dict with ``path``,
        ``backend``, ``source_frames``, ``source_fps``, ``source_size`` (h, w), ``frame_indices``
        (source index of every output frame, repeats included), ``fps`` (of the output; None when the
        source has none), ``size``, ``crop`` (top, left, h, w of the source region used),
        ``frame_policy``, ``frames_selected``, ``frames_trimmed``, ``frames_padded``, ``fit`` (the plan of
        ``fit_to_multiple``; None without ``multiple``) and, when decord failed and pyav read the file,
        ``fallback_reason``.

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: unsupported extension, bad arguments, or a frame count ``frame_policy="none"`` rejects.
        VideoReadError: the file cannot be decoded (a ValueError, so batch loops can catch bad files).
        ImportError: ``backend="decord"`` where decord is not installed.
    """
    path = Path(path)
    if frame_policy not in FRAME_POLICIES:
        raise ValueError(f"frame_policy must be one of {FRAME_POLICIES}, got {frame_policy!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if frames is not None and frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    if start < 0 or stride < 1 or temporal_factor < 1:
        raise ValueError(
            f"need start >= 0, stride >= 1, temporal_factor >= 1; got {start}, {stride}, {temporal_factor}"
        )
    if fps is not None and stride != 1:
        raise ValueError("give either stride or a positive fps, not both")
    check_option("fps", fps)
    if size is not None:
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (height, width) with positive sides, got {size}")
        size = (int(size[0]), int(size[1]))
        _check_pixels("the size asked", size, "frames")
    if size_policy not in SIZE_POLICIES:
        raise ValueError(f"size_policy must be one of {SIZE_POLICIES}, got {size_policy!r}")
    _check_exists(path)

    suffix = path.suffix.lower()
    if path.is_dir():
        files = _folder_files(path)
        try:
            _check_pixels(files[0], _image_header(files[0]))
        except VideoReadError:
            raise
        except Exception as err:
            raise VideoReadError(f"cannot read {files[0]}: {_one_line(err)}") from err
        source = {"count": len(files), "fps": None}
        kind = "folder"
    elif suffix in IMAGE_EXTENSIONS:
        try:
            source = _pillow_source(path)
        except VideoReadError:
            raise
        except Exception as err:
            raise VideoReadError(f"cannot read {path}: {_one_line(err)}") from err
        kind = "pillow"
    elif suffix in VIDEO_EXTENSIONS:
        source = _probe(path)
        kind = "video"
    else:
        raise ValueError(
            f"unsupported file type {path.suffix!r} for {path}; accepted: videos {', '.join(VIDEO_EXTENSIONS)}, "
            f"images {', '.join(IMAGE_EXTENSIONS)}, or a folder of frames"
        )

    selected = _select(source["count"], source["fps"], start, stride, fps, frames)
    indices, trimmed, padded = _apply_policy(selected, frames, frame_policy, temporal_factor, path)
    distinct = sorted(set(indices))

    def decoders():
        """(backend name, generator) in the order to try them."""
        if kind == "folder":
            yield "pillow", _decode_files(files, distinct)
        elif kind == "pillow":
            yield "pillow", _decode_pillow(path, distinct)
        else:
            if source.get("damaged_count") and backend != "pyav":  # decord would trust it: std::bad_alloc
                failures.append("decord: skipped: the header declares an implausible frame count")
            elif backend in ("auto", "decord"):
                if _decord() is not None:
                    yield "decord", _decode_decord(path, distinct, source["count"])
                elif backend == "decord":
                    raise ImportError(
                        "backend='decord' but decord is not installed; use backend='auto' or 'pyav'"
                    )
            if backend in ("auto", "pyav"):
                yield "pyav", _decode_pyav(path, distinct, source["count"])

    failures, out, used = [], None, None
    for name, chunks in decoders():
        try:
            out, crop, decoded_size = _assemble(chunks, len(distinct), size)
            used = name
            break
        except Exception as err:  # decord raises DECORDError or RuntimeError, pyav av.error.*, pillow OSError
            failures.append(
                f"{name}: {err}" if isinstance(err, _DecodeFailure) else f"{name}: {_one_line(err)}"
            )
    if out is None:
        raise VideoReadError(f"cannot decode {path}: " + "; ".join(failures))

    if indices != distinct:
        position = {index: i for i, index in enumerate(distinct)}
        out = out[:, [position[index] for index in indices]]
    fit = None
    if multiple is not None:
        out, fit = fit_to_multiple(out, multiple, size_policy, str(path))

    src_fps = source["fps"]
    info = {
        "path": str(path),
        "backend": used,
        "source_frames": source["count"],
        "source_fps": src_fps,
        "source_size": decoded_size,
        "frame_indices": indices,
        "fps": fps if fps is not None and src_fps is not None else (src_fps / stride if src_fps else None),
        "size": tuple(out.shape[-2:]),
        "crop": crop,
        "frame_policy": frame_policy,
        "frames_selected": len(selected),
        "frames_trimmed": trimmed,
        "frames_padded": padded,
        "fit": fit,
    }
    if failures:
        info["fallback_reason"] = "; ".join(failures)
    return out, info


def _assemble(chunks, n: int, size) -> tuple[torch.Tensor, tuple, tuple]:
    """Stack decoded chunks into one (c t h w) tensor, cropping and resizing each chunk.

    Returns the tensor, the crop (top, left, h, w) in source pixels and the source size (h, w).
    """
    out, crop, done, shape = None, None, 0, None
    for chunk in chunks:
        if chunk.ndim != 4 or chunk.shape[-1] != 3:
            raise _DecodeFailure(f"decoded frames have shape {chunk.shape[1:]}, expected (h, w, 3)")
        if out is None:
            shape = chunk.shape[1:]
            crop = _plan_resize(shape[:2], size)
            h, w = size if size is not None else crop[2:]
            out = torch.empty(3, n, h, w)
        elif chunk.shape[1:] != shape:
            raise _DecodeFailure(
                f"frame size changes from {shape[1]}x{shape[0]} to {chunk.shape[2]}x{chunk.shape[1]}"
            )
        out[:, done : done + len(chunk)] = _to_unit(chunk, crop, size)
        done += len(chunk)
    if done != n:
        raise _DecodeFailure(f"decoded {done} of {n} frames")
    return out, tuple(int(v) for v in crop), (int(shape[0]), int(shape[1]))


def read_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image (or the first frame of a video or gif) as a (c t h w) tensor with t = 1, in [-1, 1].

    ``size`` (h, w) centre-crops to that aspect ratio and resizes, as in ``read_video``.
    """
    video, _ = read_video(path, frames=1, size=size, frame_policy="none")
    return video


# ---------------------------------------------------------------------------------------------- writing


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """(c t h w) or (1 c t h w), float in [-1, 1] or uint8 -> (t h w c) uint8 numpy, rounded."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(
                f"write_video writes one clip; got a batch of {video.shape[0]}: write each video[i]"
            )
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be (3, t, h, w) or (1, 3, t, h, w), got {tuple(video.shape)}")
    video = video.detach().cpu()
    if video.dtype != torch.uint8:
        video = video.float()
        if not torch.isfinite(video).all():  # a NaN would become a grey pixel: never write that silently
            raise NonFiniteError("the video to write holds NaN/inf values; nothing was written")
        video = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(rearrange(video, "c t h w -> t h w c").numpy())


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad odd heights / widths by replicating the last row / column (4:2:0 chroma needs even sizes)."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _encode_ffmpeg(
    tmp: str, frames: np.ndarray, fps: float, codec: str, pix_fmt: str, params: list[str], target: Path
) -> None:
    """Pipe rgb24 frames through the ffmpeg that imageio-ffmpeg ships; raise with ffmpeg's message on failure.

    Not ``imageio_ffmpeg.write_frames``: it ignores ffmpeg's exit status (a clip small enough to fit the
    pipe buffer "succeeds" with an empty file) and sends ffmpeg's errors to the console, not the exception.
    """
    import imageio_ffmpeg

    _, h, w, _ = frames.shape
    rate = Fraction(fps).limit_denominator(100_000)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error", "-nostdin"]
    cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(rate), "-i", "pipe:0", "-an"]
    cmd += ["-c:v", codec, "-pix_fmt", pix_fmt, *params, tmp]
    done = subprocess.run(cmd, input=frames.tobytes(), capture_output=True, check=False)
    if done.returncode != 0 or os.path.getsize(tmp) == 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        reason = " | ".join(lines[-3:]) or f"exit status {done.returncode}, empty output"
        raise VideoWriteError(f"ffmpeg failed to write {target} ({codec}): {reason}")


def _write_frames_dir(folder: Path, frames: np.ndarray) -> None:
    """Numbered pngs (``00000.png, 00001.png, ...``) into a temporary sibling folder, then renamed into
    place. An existing folder is replaced only when it is empty or every entry in it is a file named as
    this writes them (``_FRAME_NAME``: an earlier write's frames) or a file manager's own (``.DS_Store``,
    ``Thumbs.db``, ``desktop.ini``: the folder was looked at); anything else in it (``mine.png``, ``notes.txt``,
    a subfolder, another hidden file) refuses the write with FileExistsError, deleting nothing."""
    if folder.exists():
        if not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder; cannot write frames there")
        strangers = sorted(
            p.name + ("/" if p.is_dir() else "")
            for p in folder.iterdir()
            if not ((_FRAME_NAME.fullmatch(p.name) or p.name in _FILE_MANAGER_FILES) and p.is_file())
        )
        if strangers:
            shown = ", ".join(strangers[:3]) + (
                f", ... ({len(strangers)} in all)" if len(strangers) > 3 else ""
            )
            raise FileExistsError(
                f"{folder} holds files that are not frames written by vidlatent ({shown}); not replacing it: "
                "write to another folder, or empty this one (a folder is replaced only when it holds nothing "
                "but numbered frames 00000.png, 00001.png, ...)"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)  # what a killed run left
    digits = max(5, len(str(len(frames) - 1)))
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(folder.name), suffix=".tmp", dir=folder.parent))
    old = None
    try:
        for i, frame in enumerate(frames):
            iio.imwrite(tmp / f"{i:0{digits}d}.png", frame, plugin="pillow", extension=".png")
        if folder.exists():
            old = Path(
                tempfile.mkdtemp(prefix=temporary_prefix(folder.name), suffix=".old", dir=folder.parent)
            )
            os.replace(folder, old / "frames")
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        os.replace(tmp, folder)
    except BaseException as err:
        if old is not None and not folder.exists():
            os.replace(old / "frames", folder)  # put the previous frames back
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise OSError(errno.ENOSPC, "no space left on device (nothing was written)", str(folder)) from err
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_video(
    path: str | os.PathLike, video: torch.Tensor, fps: float = 16, crf: int | None = None
) -> Path:
    """Write a (c t h w) or (1 c t h w) clip, float in [-1, 1] (rounded to uint8) or uint8, atomically.

    The format follows the path: ``.mp4`` H.264 / yuv420p (``crf`` default 18); ``.webm`` VP9 (``crf``
    default 30; needs libvpx-vp9 in the bundled ffmpeg); ``.gif``; ``.png`` / ``.jpg`` for one frame;
    no suffix for a folder of numbered pngs ``00000.png, 00001.png, ...`` (an existing folder is replaced
    only if it is empty or holds nothing but frames so named, an earlier write's, and a file manager's
    ``.DS_Store`` / ``Thumbs.db``; any other file in it raises FileExistsError). Odd sizes are padded to even
    for mp4 and webm, by one replicated row / column.
    Returns the path written.

    Raises:
        ValueError: unsupported suffix, wrong shape, several frames for a single-image format.
        FileExistsError: a folder target is a file, or a folder holding anything but earlier frames.
        VideoWriteError: the ffmpeg encoder is missing or fails (an OSError; so is a full disk).
    """
    if isinstance(path, torch.Tensor):
        raise ValueError(
            "write_video(path, video) takes the path first, then the clip; got a tensor as the path"
        )
    path = Path(path)
    frames = _to_uint8(video)
    check_option("fps", fps)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == "":
        _write_frames_dir(path, frames)
        return path
    if suffix not in WRITE_EXTENSIONS:
        raise ValueError(
            f"cannot write {path}: unsupported suffix {path.suffix!r}; accepted: {', '.join(WRITE_EXTENSIONS)}, "
            "or a path without suffix for a folder of png frames"
        )
    if suffix in (".png", ".jpg", ".jpeg"):
        if len(frames) != 1:
            raise ValueError(
                f"cannot write {len(frames)} frames to one image {path}; give a path without suffix "
                f"(e.g. {path.with_suffix('')}) for a folder of numbered pngs, or .mp4 / .gif / .webm"
            )
        atomic_write(path, lambda tmp: iio.imwrite(tmp, frames[0], plugin="pillow", extension=suffix))
        return path

    if suffix == ".mp4":
        codec, pix_fmt, frames = "libx264", "yuv420p", _even(frames)
        params = ["-crf", str(_MP4_CRF if crf is None else crf), "-preset", "medium", *_COLOR_TAGS]
        params += ["-movflags", "+faststart", "-f", "mp4"]
    elif suffix == ".webm":
        codec, pix_fmt, frames = "libvpx-vp9", "yuv420p", _even(frames)
        params = ["-crf", str(_WEBM_CRF if crf is None else crf), "-b:v", "0", "-deadline", "good"]
        params += ["-cpu-used", "4", "-row-mt", "1", *_COLOR_TAGS, "-f", "webm"]
    else:
        codec, pix_fmt, params = "gif", "pal8", ["-vf", _GIF_FILTER, "-loop", "0", "-f", "gif"]
    if codec not in _ffmpeg_encoders():
        import imageio_ffmpeg

        raise VideoWriteError(
            f"cannot write {path}: the ffmpeg at {imageio_ffmpeg.get_ffmpeg_exe()} has no {codec} encoder; "
            "write .mp4 or .gif, or point IMAGEIO_FFMPEG_EXE at an ffmpeg built with it"
        )

    atomic_write(path, lambda tmp: _encode_ffmpeg(tmp, frames, fps, codec, pix_fmt, params, path))
    return path
