"""vidlatent.data.io on real files made by ffmpeg's lavfi test sources.

Shapes: c colour channels (3), t frames, h height, w width.
"""

from __future__ import annotations

import math
import os
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from vidlatent.data import VideoReadError, probe, read_image, read_video, write_video
from vidlatent.data import io as vio

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
HAS_DECORD = vio._decord() is not None
HAS_VP9 = "libvpx-vp9" in vio._ffmpeg_encoders()
needs_decord = pytest.mark.skipif(
    not HAS_DECORD, reason="decord is not installed (no wheel for this platform)"
)
BACKENDS = ["decord", "pyav"] if HAS_DECORD else ["pyav"]
LEVEL = 2 / 255  # one uint8 step in [-1, 1] units


def ffmpeg(*args) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *map(str, args)], check=True)


def lavfi_source(
    size: str = "64x48", seconds: float = 2, rate: int = 8, source: str = "testsrc"
) -> list[str]:
    return ["-f", "lavfi", "-i", f"{source}=size={size}:rate={rate}", "-t", str(seconds)]


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict:
    """Real files, 16 frames at 8 fps unless named otherwise."""
    d = tmp_path_factory.mktemp("media")
    f = {name: d / name for name in ["h264.mp4", "mjpeg.avi", "anim.gif", "odd.avi", "odd444.mp4", "one.mp4"]}
    ffmpeg(*lavfi_source(), "-c:v", "libx264", "-pix_fmt", "yuv420p", f["h264.mp4"])
    ffmpeg(*lavfi_source(), "-c:v", "mjpeg", "-q:v", "2", f["mjpeg.avi"])
    ffmpeg(*lavfi_source(), f["anim.gif"])
    ffmpeg(*lavfi_source("33x27"), "-c:v", "mjpeg", "-q:v", "2", f["odd.avi"])
    ffmpeg(*lavfi_source("33x27"), "-c:v", "libx264", "-pix_fmt", "yuv444p", f["odd444.mp4"])
    ffmpeg(*lavfi_source(), "-frames:v", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p", f["one.mp4"])
    f["image.png"] = d / "image.png"
    ffmpeg(*lavfi_source(), "-frames:v", "1", f["image.png"])
    if HAS_VP9:
        f["vp9.webm"] = d / "vp9.webm"
        vp9 = ["-c:v", "libvpx-vp9", "-b:v", "0", "-crf", "30", "-deadline", "realtime"]
        ffmpeg(*lavfi_source(), *vp9, f["vp9.webm"])

    # Broken files. moov at the end, cut: no header. moov first (faststart), cut: frames missing.
    # avi cut in half: the header declares 16 frames, 7 are left. Random bytes. A gif named .mp4,
    # which decord refuses ("broken metadata") and pyav reads: a real decord failure to fall back from.
    full = d / "tmp_faststart.mp4"
    ffmpeg(*lavfi_source(source="testsrc2"), "-c:v", "libx264", "-g", "4", "-movflags", "+faststart", full)
    for name, src in [("cut_header.mp4", f["h264.mp4"]), ("cut_data.mp4", full), ("cut.avi", f["mjpeg.avi"])]:
        data = src.read_bytes()
        f[name] = d / name
        f[name].write_bytes(data[: len(data) // 2])
    f["garbage.mp4"] = d / "garbage.mp4"
    f["garbage.mp4"].write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    f["gif_named.mp4"] = d / "gif_named.mp4"
    f["gif_named.mp4"].write_bytes(f["anim.gif"].read_bytes())
    return f


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] tensors, on the 0..255 scale."""
    mse = ((a - b) * 127.5).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def smooth_clip(t: int = 9, h: int = 48, w: int = 64) -> torch.Tensor:
    """(c t h w) in [-1, 1]: moving colour gradients, the kind of content 4:2:0 chroma keeps well."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    frames = [
        torch.stack([0.8 * torch.sin(2 * x + 0.3 * k), 0.8 * y, 0.6 * torch.cos(2 * (x + y) - 0.2 * k)])
        for k in range(t)
    ]
    return torch.stack(frames, dim=1)


def no_temp_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.startswith(".")]


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize(
    "name, t, hw",
    [
        ("h264.mp4", 13, (48, 64)),
        ("mjpeg.avi", 13, (48, 64)),
        ("vp9.webm", 13, (48, 64)),
        ("anim.gif", 13, (48, 64)),
        ("odd.avi", 13, (27, 33)),
        ("odd444.mp4", 13, (27, 33)),
        ("one.mp4", 1, (48, 64)),
        ("image.png", 1, (48, 64)),
    ],
)
def test_read_shapes_range_and_info(media, name, t, hw):
    if name not in media:
        pytest.skip("the bundled ffmpeg has no libvpx-vp9 encoder")
    video, info = read_video(media[name])
    assert video.shape == (3, t, *hw) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert video.min() < -0.8 and video.max() > 0.8  # testsrc has near-black and near-white areas
    assert info["source_size"] == hw and info["size"] == hw
    assert info["frame_indices"] == list(range(t))
    assert info["frame_policy"] == "trim" and info["frames_padded"] == 0
    if t > 1:
        assert info["source_frames"] == 16 and info["frames_trimmed"] == 3
        assert info["fps"] == pytest.approx(8, rel=0.02) and info["source_fps"] == pytest.approx(8, rel=0.02)
    assert info["backend"] == ("pillow" if name.endswith((".gif", ".png")) else BACKENDS[0])


@needs_decord
@pytest.mark.parametrize("name", ["h264.mp4", "mjpeg.avi", "vp9.webm", "odd.avi", "odd444.mp4"])
def test_backends_agree(media, name):
    # Both decode with ffmpeg and convert with swscale: identical here (decord 0.6, av 18); allow one
    # uint8 step for differently built ffmpegs. Random access (start, stride) must pick the same frames.
    if name not in media:
        pytest.skip("the bundled ffmpeg has no libvpx-vp9 encoder")
    for kwargs in [{}, {"start": 3, "stride": 2, "frames": 5}]:
        a, info_a = read_video(media[name], backend="decord", **kwargs)
        b, info_b = read_video(media[name], backend="pyav", **kwargs)
        assert (info_a["backend"], info_b["backend"]) == ("decord", "pyav")
        assert info_a["frame_indices"] == info_b["frame_indices"]
        assert (a - b).abs().max() <= LEVEL + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_access_picks_the_right_frame(media, backend):
    full, _ = read_video(media["h264.mp4"], temporal_factor=1, backend=backend)
    for index in [0, 5, 11, 15]:
        one, info = read_video(media["h264.mp4"], start=index, frames=1, backend=backend)
        assert info["frame_indices"] == [index]
        assert torch.equal(one[:, 0], full[:, index])


def test_decord_missing_uses_pyav(media, monkeypatch):
    monkeypatch.setattr(vio, "_decord", lambda: None)
    video, info = read_video(media["h264.mp4"])
    assert info["backend"] == "pyav" and "fallback_reason" not in info and video.shape[1] == 13
    with pytest.raises(ImportError, match="decord is not installed"):
        read_video(media["h264.mp4"], backend="decord")


@needs_decord
def test_decord_failure_falls_back_to_pyav(media):
    video, info = read_video(media["gif_named.mp4"])
    assert info["backend"] == "pyav" and "decord" in info["fallback_reason"]
    reference, _ = read_video(media["anim.gif"])
    assert video.shape == reference.shape == (3, 13, 48, 64)
    assert (video - reference).abs().max() <= LEVEL + 1e-6
    with pytest.raises(VideoReadError, match="decord: DECORDError"):
        read_video(media["gif_named.mp4"], backend="decord")


def test_frame_policies(media):
    path = media["mjpeg.avi"]  # 16 frames
    full, info = read_video(path, temporal_factor=1)
    assert full.shape[1] == 16 and info["frames_trimmed"] == 0

    trimmed, info = read_video(path)
    assert trimmed.shape[1] == 13 and info["frames_trimmed"] == 3 and info["frames_selected"] == 16
    assert torch.equal(trimmed, full[:, :13])

    padded, info = read_video(path, frame_policy="pad")
    assert padded.shape[1] == 17 and info["frames_padded"] == 1 and info["frame_indices"][-2:] == [15, 15]
    assert torch.equal(padded[:, :16], full) and torch.equal(padded[:, 16], full[:, 15])

    padded, info = read_video(path, frames=21, frame_policy="pad")  # asks for more than the clip has
    assert padded.shape[1] == 21 and info["frames_padded"] == 5

    exact, info = read_video(path, frames=13, frame_policy="none")
    assert exact.shape[1] == 13 and info["frames_trimmed"] == info["frames_padded"] == 0
    with pytest.raises(ValueError, match=r"16 frames selected.*1 \+ 4k frames \(1, 5, 9, 13"):
        read_video(path, frame_policy="none")
    with pytest.raises(ValueError, match="asked for 21 frames, the clip gives 16"):
        read_video(path, frames=21, frame_policy="none")
    with pytest.raises(ValueError, match="frame_policy must be one of"):
        read_video(path, frame_policy="loop")

    video, info = read_video(path, frames=10)  # not 1 + 4k: trim takes 9 of the 10
    assert video.shape[1] == 9 and info["frames_trimmed"] == 1


def test_single_frame_video(media):
    video, info = read_video(media["one.mp4"], frame_policy="none")
    assert video.shape == (3, 1, 48, 64) and info["source_frames"] == 1
    video, info = read_video(media["one.mp4"], frames=5, frame_policy="pad")
    assert video.shape[1] == 5 and info["frame_indices"] == [0] * 5
    assert torch.equal(video[:, 4], video[:, 0])


def test_stride_fps_and_start(media):
    path = media["h264.mp4"]
    full, _ = read_video(path, temporal_factor=1)

    video, info = read_video(path, stride=2)  # 0, 2, ..., 14: 8 frames, trimmed to 5
    assert info["frame_indices"] == [0, 2, 4, 6, 8] and info["fps"] == 4
    assert torch.equal(video, full[:, [0, 2, 4, 6, 8]])

    by_fps, info = read_video(path, fps=4)  # half the source rate is the same as stride 2
    assert info["frame_indices"] == [0, 2, 4, 6, 8] and info["fps"] == 4
    assert torch.equal(by_fps, video)

    video, info = read_video(path, start=3, stride=3)
    assert info["frame_indices"] == [3, 6, 9, 12, 15]

    video, info = read_video(path, fps=16, temporal_factor=1)  # above the source rate: frames repeat
    steps = [b - a for a, b in zip(info["frame_indices"], info["frame_indices"][1:])]
    assert set(steps) == {0, 1} and info["frame_indices"][-1] == 15 and video.shape[1] == 31

    video, info = read_video(path, fps=3, start=1, frames=5, frame_policy="none")
    assert info["frame_indices"] == [1, 4, 6, 9, 12]  # nearest source frame to each 1/3 s tick

    with pytest.raises(ValueError, match="start=16 is past the end of a 16-frame clip"):
        read_video(path, start=16)
    with pytest.raises(ValueError, match="either stride or a positive fps"):
        read_video(path, stride=2, fps=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_and_center_crop(media, backend):
    path = media["h264.mp4"]  # 64 wide, 48 high
    full, _ = read_video(path, backend=backend)

    video, info = read_video(path, size=(48, 48), backend=backend)  # pure crop, no resampling
    assert info["crop"] == (0, 8, 48, 48) and torch.equal(video, full[..., 8:56])

    video, info = read_video(path, size=(32, 32), backend=backend)
    assert video.shape == (3, 13, 32, 32) and info["size"] == (32, 32) and info["crop"] == (0, 8, 48, 48)
    assert video.min() >= -1 and video.max() <= 1

    video, info = read_video(path, size=(16, 64), backend=backend)  # wider than the source: crop rows
    assert video.shape[-2:] == (16, 64) and info["crop"] == (16, 0, 16, 64)

    video, info = read_video(path, size=(96, 80), backend=backend)  # upscaling works too
    assert video.shape[-2:] == (96, 80) and info["crop"] == (0, 12, 48, 40)

    with pytest.raises(ValueError, match="size must be"):
        read_video(path, size=(0, 32))


def test_read_image(media):
    image = read_image(media["image.png"])
    assert image.shape == (3, 1, 48, 64)
    assert read_image(media["image.png"], size=(24, 24)).shape == (3, 1, 24, 24)
    first, _ = read_video(media["h264.mp4"], frames=1)
    assert torch.equal(read_image(media["h264.mp4"]), first)
    video, info = read_video(media["image.png"], frames=5, frame_policy="pad")  # an image as a still clip
    assert video.shape[1] == 5 and info["fps"] is None and info["backend"] == "pillow"


def as_read(image: np.ndarray) -> torch.Tensor:
    """(h w 3) uint8 -> (c t h w) with t = 1 in [-1, 1], as ``read_video`` returns an image."""
    return torch.from_numpy(image).permute(2, 0, 1)[:, None].float() / 127.5 - 1


def mode_of(path) -> str:
    """The pillow mode a file opens in."""
    with Image.open(path) as image:
        return image.mode


def test_16bit_greyscale_is_scaled_to_8_bits_not_clipped(media, tmp_path):
    # pillow's own conversion of 16-bit grey to RGB clips every value above 255: 50% grey came out white
    grey = np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)
    grey[0, :4] = [32768, 257 * 200, 128, 65535]
    expected = as_read(np.repeat(np.round(grey / 257).astype(np.uint8)[..., None], 3, axis=-1))
    Image.fromarray(np.round(grey / 257).astype(np.uint8)).save(tmp_path / "g8.png")
    assert torch.equal(read_image(tmp_path / "g8.png"), expected)  # the same picture in 8 bits

    Image.fromarray(grey).save(tmp_path / "g16.png")
    Image.fromarray(grey).save(tmp_path / "g16.tif")
    Image.frombytes("I;16B", (64, 48), grey.astype(">u2").tobytes()).save(tmp_path / "g16b.tif")
    (tmp_path / "frames").mkdir()
    Image.fromarray(grey).save(tmp_path / "frames" / "00000.png")
    for name, mode in {"g16.png": "I;16", "g16.tif": "I;16", "g16b.tif": "I;16B"}.items():
        assert mode_of(tmp_path / name) == mode  # the modes this covers
        assert torch.equal(read_image(tmp_path / name), expected), name
    wide = grey.astype(np.int32)  # mode I: 32-bit integers, taken as 16-bit values, clipped to 0..65535
    wide[1, :2] = [100_000, -5]
    Image.fromarray(wide).save(tmp_path / "i32.tif")
    assert mode_of(tmp_path / "i32.tif") == "I"
    clipped = expected.clone()
    clipped[:, 0, 1, :2] = torch.tensor([1.0, -1.0])
    assert torch.equal(read_image(tmp_path / "i32.tif"), clipped)
    assert torch.equal(read_image(tmp_path / "frames"), expected)  # a folder of 16-bit frames too
    middle = read_image(tmp_path / "g16.png")[0, 0, 0, 0].item()
    assert middle == pytest.approx(1 / 255, abs=1e-6)  # 32768, 50% grey: 128, not white

    with Image.open(media["image.png"]) as image:  # 16-bit RGB still works: the same picture, each v * 257
        rgb = np.asarray(image.convert("RGB")).astype(np.uint16) * 257
    (tmp_path / "rgb48.raw").write_bytes(rgb.astype(">u2").tobytes())
    raw = ["-f", "rawvideo", "-pix_fmt", "rgb48be", "-s", "64x48", "-i", tmp_path / "rgb48.raw"]
    ffmpeg(*raw, tmp_path / "rgb48.png")
    assert torch.equal(read_image(tmp_path / "rgb48.png"), read_image(media["image.png"]))

    Image.fromarray(grey.astype(np.float32) / 65535).save(tmp_path / "float.tif")  # mode F: no fixed range
    with pytest.raises(
        VideoReadError, match=r"float\.tif holds 32-bit floating point pixels \(pillow mode F\)"
    ):
        read_image(tmp_path / "float.tif")


def move_exif_after_pixels(png: bytes) -> bytes:
    """A png with its eXIf chunk moved after the pixel data (IDAT), where the format allows it too."""
    chunks, pos = [], 8
    while pos < len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        chunks.append(png[pos : pos + 12 + length])
        pos += 12 + length
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    return png[:8] + b"".join(rest[:-1] + exif + rest[-1:])  # ... IDAT, eXIf, IEND


@pytest.mark.parametrize("suffix", [".png", ".webp", ".tif", ".jpg"])
def test_exif_orientation_is_applied_as_viewers_show_it(tmp_path, suffix):
    stored = (((smooth_clip(1)[:, 0] + 1) * 127.5).round().byte().permute(1, 2, 0)).numpy()  # 48 x 64
    shown = {  # what each EXIF orientation shows of the stored (h w c) pixels
        1: stored,
        2: stored[:, ::-1],
        3: stored[::-1, ::-1],
        4: stored[::-1],
        5: stored.transpose(1, 0, 2),
        6: np.rot90(stored, -1),  # a phone held upright: stored 64 wide, shown 48 wide x 64 high
        7: np.rot90(stored, 2).transpose(1, 0, 2),
        8: np.rot90(stored, 1),
    }
    for orientation, expected in shown.items():
        path = tmp_path / f"o{orientation}{suffix}"
        image = Image.fromarray(stored)
        exif = image.getexif()
        exif[0x0112] = orientation
        image.save(path, exif=exif.tobytes(), **({"lossless": True} if suffix == ".webp" else {}))
        h, w = expected.shape[:2]
        assert probe(path)["size"] == (h, w), orientation
        video, info = read_video(path)
        assert info["source_size"] == (h, w) and video.shape == (3, 1, h, w), orientation
        if suffix == ".jpg":
            assert psnr(video, as_read(np.ascontiguousarray(expected))) > 30, orientation
        else:
            assert torch.equal(video, as_read(np.ascontiguousarray(expected))), orientation
    if suffix != ".png":
        return
    (tmp_path / "frames").mkdir()  # a folder of frames, probed from its first
    (tmp_path / "frames" / "00000.png").write_bytes((tmp_path / "o6.png").read_bytes())
    assert probe(tmp_path / "frames")["size"] == (64, 48)
    assert torch.equal(read_image(tmp_path / "frames"), as_read(np.ascontiguousarray(shown[6])))
    late = tmp_path / "late.png"  # EXIF after the pixels: probed and decoded alike
    late.write_bytes(move_exif_after_pixels((tmp_path / "o6.png").read_bytes()))
    assert probe(late)["size"] == (64, 48)
    assert torch.equal(read_image(late), as_read(np.ascontiguousarray(shown[6])))


# ------------------------------------------------------------------------------------------------ writing
# PSNR bounds (dB on 0..255), measured here with the bundled ffmpeg's x264 and libvpx, bounds ~3.5 dB
# lower for other builds. At these tiny sizes 4:2:0 chroma subsampling, not the codec, sets the ceiling:
# the smooth clip through lossless ffv1 in yuv420p gives 40.1 dB (52.1 in yuv444p). H.264 crf 18
# measures 37.8 (bound 34), VP9 crf 30 36.9 (bound 33), the odd-size H.264 clip, whose gradients are
# steeper per pixel, 33.7 (bound 30). gif is one 256-colour palette with ordered dithering: testsrc
# measures 35.3 (bound 31); the smooth clip only 28.3, palette-bound. png is lossless: exact after rounding.
# A wrong colour matrix, swapped channels or a shifted frame costs far more than these margins.


def quantized(video: torch.Tensor) -> torch.Tensor:
    return ((video.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def test_roundtrip_mp4(tmp_path):
    clip = smooth_clip()
    out = write_video(tmp_path / "clip.mp4", clip, fps=12)
    video, info = read_video(out, frame_policy="none")
    assert video.shape == clip.shape and info["source_fps"] == 12
    assert psnr(video, clip) > 34
    assert no_temp_files(tmp_path)


def test_roundtrip_mp4_odd_size_is_padded(tmp_path):
    clip = smooth_clip(5, 27, 33)
    write_video(tmp_path / "odd.mp4", clip)
    video, info = read_video(tmp_path / "odd.mp4", frame_policy="none")
    assert info["source_size"] == (28, 34)  # one replicated row and column
    assert psnr(video[..., :27, :33], clip) > 30
    assert psnr(video[..., 27, :33], clip[..., 26, :]) > 30  # the padding repeats the last row


@pytest.mark.skipif(not HAS_VP9, reason="the bundled ffmpeg has no libvpx-vp9 encoder")
def test_roundtrip_webm(tmp_path):
    clip = smooth_clip()
    write_video(tmp_path / "clip.webm", clip, fps=8)
    video, info = read_video(tmp_path / "clip.webm", frame_policy="none")
    assert video.shape == clip.shape and info["source_fps"] == 8
    assert psnr(video, clip) > 33


def test_roundtrip_gif_keeps_repeated_frames(media, tmp_path):
    clip, _ = read_video(media["h264.mp4"], frames=9)
    clip = torch.cat([clip, clip[:, -1:], clip[:, -1:], clip[:, -1:], clip[:, -1:]], dim=1)  # 13, 4 repeats
    write_video(tmp_path / "clip.gif", clip, fps=10)
    video, info = read_video(tmp_path / "clip.gif", frame_policy="none")
    assert video.shape == clip.shape  # pillow's gif writer would have merged the repeats
    assert info["source_fps"] == pytest.approx(10)
    assert psnr(video, clip) > 31


def test_roundtrip_png_and_rounding(tmp_path):
    values = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, -3.0, 0.0])
    image = values.repeat(3, 1, 8, 1)  # (c t h w) = (3, 1, 8, 8)
    write_video(tmp_path / "one.png", image)
    back = read_image(tmp_path / "one.png")
    pixels = ((back[0, 0, 0] + 1) * 127.5).round().tolist()
    assert pixels == [0, 64, 128, 191, 255, 255, 0, 128]  # 63.75 -> 64, 127.5 -> 128, clamped
    image[0, 0, 3, 5] = float("nan")  # a NaN is refused, not written as a grey pixel
    with pytest.raises(ValueError, match="NaN/inf values; nothing was written"):
        write_video(tmp_path / "nan.png", image)
    assert not list(tmp_path.glob("*nan*"))
    clip = smooth_clip(5)
    write_video(tmp_path / "batch.png", clip[None, :, :1])  # (1 c t h w) is accepted
    assert torch.allclose(read_image(tmp_path / "batch.png"), quantized(clip[:, :1]), atol=1e-6)


def test_roundtrip_frames_folder(tmp_path):
    clip = smooth_clip(5)
    out = write_video(tmp_path / "frames", clip)
    assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(5)]
    video, info = read_video(out, frame_policy="none")
    assert torch.allclose(video, quantized(clip), atol=1e-6)
    assert info["backend"] == "pillow" and info["fps"] is None and info["source_frames"] == 5
    with pytest.raises(ValueError, match="fps= needs the source's frame rate"):
        read_video(out, fps=8)

    write_video(out, clip[:, :1])  # replacing an earlier frames folder
    assert os.listdir(out) == ["00000.png"] and no_temp_files(tmp_path)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not frames written by vidlatent \(notes\.txt\)"):
        write_video(out, clip)


def test_frames_folder_replaces_only_its_own_frames(tmp_path):
    clip = smooth_clip(5)
    out = tmp_path / "empty"
    out.mkdir()
    write_video(out, clip)  # an empty folder is written into
    assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(5)]
    write_video(out, clip[:, :2])  # a rerun replaces its own frames
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png"] and no_temp_files(tmp_path)

    mine = tmp_path / "od2"  # nothing but png files, none of them named as frames: the user's
    mine.mkdir()
    (mine / "mine.png").write_bytes(b"a picture of mine")
    with pytest.raises(
        FileExistsError,
        match=r"od2 holds files that are not frames written by vidlatent \(mine\.png\); not replacing it: "
        r"write to another folder, or empty this one",
    ):
        write_video(mine, clip)
    assert os.listdir(mine) == ["mine.png"] and (mine / "mine.png").read_bytes() == b"a picture of mine"

    for name in [".DS_Store", "Thumbs.db"]:  # the folder was shown in Finder / Explorer: still ours
        (out / name).write_bytes(b"x")
    write_video(out, clip[:, :3])
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png"] and no_temp_files(tmp_path)

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for name in ["0001.png", "00002.PNG", ".hidden", ".DS_Store"]:  # our frames, with strangers among them
        (out / name).write_bytes(b"x")
    (out / "sub").mkdir()
    with pytest.raises(FileExistsError, match=r"\(\.hidden, 00002\.PNG, 0001\.png, \.\.\. \(4 in all\)\)"):
        write_video(out, clip)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == {
        **before,
        **{name: b"x" for name in ["0001.png", "00002.PNG", ".hidden", ".DS_Store"]},
    }
    assert (out / "sub").is_dir() and no_temp_files(tmp_path)


# ------------------------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("name", ["clip.mp4", "clip.gif"])
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, name):
    target = tmp_path / name

    def fail_midway(tmp, frames, *args):
        with open(tmp, "wb") as f:
            f.write(b"half a video")
        raise RuntimeError("encoder died")

    monkeypatch.setattr(vio, "_encode_ffmpeg", fail_midway)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_video(target, smooth_clip(5))
    assert os.listdir(tmp_path) == []

    target.write_bytes(b"previous video")  # an existing file is kept intact on failure
    with pytest.raises(RuntimeError):
        write_video(target, smooth_clip(5))
    assert target.read_bytes() == b"previous video" and os.listdir(tmp_path) == [name]


def test_ffmpeg_error_is_reported_and_cleaned_up(tmp_path, monkeypatch):
    monkeypatch.setattr(vio, "_GIF_FILTER", "no_such_filter")  # a real ffmpeg failure
    with pytest.raises(RuntimeError, match=r"ffmpeg failed to write .*clip\.gif"):
        write_video(tmp_path / "clip.gif", smooth_clip(5))
    assert os.listdir(tmp_path) == []


def test_failed_frames_folder_write_keeps_the_old_folder(tmp_path, monkeypatch):
    out = write_video(tmp_path / "frames", smooth_clip(5))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_imwrite, calls = vio.iio.imwrite, []

    def fail_on_third(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_imwrite(path, *args, **kwargs)

    monkeypatch.setattr(vio.iio, "imwrite", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        write_video(out, smooth_clip(9))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert os.listdir(tmp_path) == ["frames"]


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize(
    "name, reason",
    [
        ("garbage.mp4", "Invalid data found"),
        ("cut_header.mp4", "End of file|Invalid data found"),
        ("cut_data.mp4", "Invalid data found|truncated or corrupt"),
        ("cut.avi", "declares 16 frames, frame 7 is missing"),
    ],
)
def test_corrupt_files_raise_video_read_error(media, name, reason, backend):
    with pytest.raises(VideoReadError, match=reason) as caught:
        read_video(media[name], backend=backend)
    assert str(media[name]) in str(caught.value) and isinstance(caught.value, ValueError)


@pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed")
def test_a_damaged_file_prints_nothing_but_the_error(media, capfd):
    """decord's bundled FFmpeg printed ``[mov,mp4,...] partial file`` to the process's stderr beside our error."""
    capfd.readouterr()
    with pytest.raises(VideoReadError, match="decord: "):
        read_video(media["cut_data.mp4"], backend="auto")
    assert capfd.readouterr().err == ""


def test_batch_loop_survives_bad_files(media):
    names = ["h264.mp4", "garbage.mp4", "cut_data.mp4", "mjpeg.avi", "cut.avi", "image.png"]
    good, bad = [], []
    for name in names:
        try:
            read_video(media[name])
            good.append(name)
        except VideoReadError:
            bad.append(name)
    assert good == ["h264.mp4", "mjpeg.avi", "image.png"] and len(bad) == 3


def test_argument_and_path_errors(media, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")
    (tmp_path / "clip.xyz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.xyz'.*\.mp4.*\.png"):
        read_video(tmp_path / "clip.xyz")
    with pytest.raises(
        ValueError, match=r"unsupported suffix '\.xyz'; accepted: \.mp4, \.webm, \.gif, \.png"
    ):
        write_video(tmp_path / "clip.xyz", smooth_clip(5))
    with pytest.raises(ValueError, match="cannot write 5 frames to one image"):
        write_video(tmp_path / "clip.png", smooth_clip(5))
    with pytest.raises(ValueError, match="batch of 2"):
        write_video(tmp_path / "clip.mp4", smooth_clip(5)[None].repeat(2, 1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"\(3, t, h, w\)"):
        write_video(tmp_path / "clip.mp4", torch.zeros(4, 5, 8, 8))
    with pytest.raises(ValueError, match="backend must be one of"):
        read_video(media["h264.mp4"], backend="opencv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoReadError, match="holds no image frames"):
        read_video(tmp_path / "empty")
    assert no_temp_files(tmp_path)


def test_missing_encoder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(vio, "_ffmpeg_encoders", lambda: frozenset({"libx264", "gif"}))
    with pytest.raises(RuntimeError, match="has no libvpx-vp9 encoder; write .mp4 or .gif"):
        write_video(tmp_path / "clip.webm", smooth_clip(5))
    assert os.listdir(tmp_path) == []


def test_written_outputs_get_the_usual_permissions(tmp_path):
    from vidlatent.checkpoint import current_umask

    video = torch.zeros(3, 5, 32, 32)
    write_video(tmp_path / "clip.mp4", video)
    write_video(tmp_path / "frames", video[:, :2])
    mask = current_umask()
    assert (tmp_path / "clip.mp4").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "frames").stat().st_mode & 0o777 == 0o777 & ~mask
