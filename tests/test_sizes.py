"""One size policy for every job that reads frames (issue 21, point 3): crop, pad or resize to the model's
multiple, sizes printed width x height, huge images refused from their header; and the small ones: a looping
link in an encode folder is listed, a very long prompt's warning is short."""

from __future__ import annotations

import os
import re
import struct
import warnings
import zlib

import pytest
import torch

from vidlatent.cli import main
from vidlatent.data.io import MAX_PIXELS, fit_to_multiple, probe, read_video, restore_size, write_video
from vidlatent.pipelines.encode import decode_latents, encode_clips, load_latents, reconstruct


def pattern(frames: int, h: int, w: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return 0.8 * torch.stack(
        [torch.stack([torch.sin(3 * x + 0.3 * i), torch.cos(2 * y), x * y]) for i in range(frames)], 1
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds almost nothing (as a hostile file would)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("sizes")
    write_video(d / "photo.png", pattern(1, 150, 200))  # 200x150
    write_video(d / "odd.png", pattern(1, 61, 97))  # 97x61
    write_video(d / "portrait.png", pattern(1, 300, 100))  # 100x300
    write_video(d / "clip.gif", pattern(5, 94, 150))  # 150x94
    (d / "huge.png").write_bytes(png_header(20000, 20000))
    return d


@pytest.mark.parametrize(
    "policy, size, kept",
    [("crop", (56, 96), "box"), ("pad", (64, 104), "pad"), ("resize", (64, 96), "size")],
)
def test_fit_to_multiple(policy, size, kept):
    video = pattern(2, 61, 97)
    out, plan = fit_to_multiple(video, 8, policy)
    assert (
        tuple(out.shape) == (3, 2, *size) and plan["size_policy"] == policy and plan["input_size"] == [61, 97]
    )
    assert kept in plan and plan["size"] == list(size)
    back = restore_size(out, plan)
    if policy == "pad":  # the input comes back exactly; the border repeats the edge pixels
        assert torch.equal(back, video)
        top, _, left, _ = plan["pad"]
        assert torch.equal(out[..., 0, left : left + 97], video[..., 0, :])
    else:
        assert back is out
    assert fit_to_multiple(out if policy != "pad" else back, 1, policy)[0].shape[-2:] == back.shape[-2:]
    with pytest.raises(
        ValueError, match="is 97x61, smaller than 128x16: .* use the size policy pad or resize"
    ):
        fit_to_multiple(video, (16, 128), "crop")


def test_read_video_fits_any_size(media):
    for policy, size in (("crop", (56, 96)), ("pad", (64, 104)), ("resize", (64, 96))):
        video, info = read_video(media / "odd.png", multiple=8, size_policy=policy)
        assert tuple(video.shape[-2:]) == size and info["fit"]["size_policy"] == policy
    video, info = read_video(media / "clip.gif", multiple=8)
    assert tuple(video.shape) == (3, 5, 88, 144) and info["fit"]["box"] == [3, 3, 88, 144]
    assert read_video(media / "clip.gif")[1]["fit"] is None  # no multiple: as it is


def test_huge_image_header_is_refused_by_its_size(media, tmp_path, capsys):
    for read in (probe, read_video):
        with pytest.raises(
            ValueError, match=r"image too large: 20000 x 20000 \(400 megapixels; the limit is 8192 x 8192"
        ):
            read(media / "huge.png")
    assert MAX_PIXELS == 8192 * 8192
    assert (
        main(["reconstruct", str(media / "huge.png"), "-o", str(tmp_path / "r.png"), "--model", "tiny"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image too large: 20000 x 20000" in err, err


def test_encode_takes_any_size_and_pad_decodes_back_to_it(media, tmp_path, tiny_vae):
    vae = tiny_vae
    clips = [media / n for n in ("photo.png", "odd.png", "portrait.png", "clip.gif")]
    report = encode_clips(clips, tmp_path / "crop", vae, progress=False)
    assert not report.failed and len(report.done) == 4
    shapes = {os.path.basename(src): load_latents(out)[0].shape[-2:] for src, out in report.done}
    assert shapes == {
        "photo.png": (18, 25),
        "odd.png": (7, 12),
        "portrait.png": (37, 12),
        "clip.gif": (11, 18),
    }

    report = encode_clips(clips, tmp_path / "pad", vae, size_policy="pad", progress=False)
    assert not report.failed
    videos = decode_latents([tmp_path / "pad"], tmp_path / "videos", vae, fmt="gif", progress=False)
    assert not videos.failed
    sizes = {
        os.path.basename(src).split("-")[0]: tuple(read_video(out)[0].shape[-2:]) for src, out in videos.done
    }
    assert sizes == {"photo": (150, 200), "odd": (61, 97), "portrait": (300, 100), "clip": (94, 150)}
    again = encode_clips(clips, tmp_path / "pad", vae, progress=False)  # crop now: the pad files differ
    assert len(again.failed) == 4 and "size_policy: 'pad' -> 'crop'" in again.failed[0][1]


def test_reconstruct_returns_the_input_size_with_pad(media, tmp_path, capsys, tiny_vae):
    vae = tiny_vae
    result = reconstruct(media / "odd.png", vae, size_policy="pad")
    assert result.recon.shape == result.video.shape == (3, 1, 61, 97)
    out = tmp_path / "r.png"
    assert (
        main(
            ["reconstruct", str(media / "odd.png"), "-o", str(out), "--model", "tiny", "--size-policy", "pad"]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "(1 frames, 97x61, wrote" in captured.out
    assert (
        f"note: {media / 'odd.png'}, read at 97x61, was padded (the output is cropped back) to 104x64"
        in captured.err
    )
    assert tuple(read_video(out)[0].shape[-2:]) == (61, 97)
    assert main(["reconstruct", str(media / "odd.png"), "-o", str(out), "--model", "tiny"]) == 0
    captured = capsys.readouterr()
    assert "96x56, wrote" in captured.out and "read at 97x61, was centre-cropped to 96x56" in captured.err


def test_pipeline_jobs_share_the_policy(media, tmp_path, capsys):
    out = tmp_path / "e.png"
    argv = ["edit", str(media / "odd.png"), "a box", "-o", str(out), "--model", "tiny", "-q", "steps=2"]
    assert main([*argv, "--size-policy", "pad", "--seed", "0"]) == 0
    assert "(1 frame, 97x61, seed 0)" in capsys.readouterr().out
    assert tuple(read_video(out)[0].shape[-2:]) == (61, 97)
    mp4 = tmp_path / "e.mp4"  # even sides only: the file is one row and column larger, and says so
    assert main([*argv[:4], str(mp4), *argv[5:], "--size-policy", "pad", "--seed", "0"]) == 0
    assert "(1 frame, 97x61, seed 0; stored 98x62: mp4 and webm need even sides" in capsys.readouterr().out
    assert tuple(read_video(mp4)[0].shape[-2:]) == (62, 98)
    assert main([*argv, "--size-policy", "resize", "--seed", "0"]) == 0
    captured = capsys.readouterr()
    assert (
        "(1 frame, 96x64, seed 0)" in captured.out and "read at 97x61, was resized to 96x64" in captured.err
    )
    assert main([*argv, "--seed", "0"]) == 0  # crop: the default
    assert "(1 frame, 96x48, seed 0)" in capsys.readouterr().out


def test_help_texts_say_the_real_multiple(capsys):
    for job, text in (("encode", "multiples of the model's (8, the VAE's)"),
                      ("edit", "(VAE 8 x patch: 8 for the default model, 16 for Wan)"),
                      ("generate", "a multiple of the model's (VAE 8 x patch: 8 for the default model, 16 for Wan)")):  # fmt: skip
        with pytest.raises(SystemExit):
            main([job, "--help"])
        assert text in re.sub(r"\s+", " ", capsys.readouterr().out)


def test_sizes_are_width_by_height_in_errors(tmp_path, capsys, tiny_pipe):
    pipe = tiny_pipe
    with pytest.raises(ValueError, match=r"got 24x32 \(width x height\)"):
        pipe.generate("a", frames=1, height=32, width=24, progress=False)


def test_a_looping_link_in_an_encode_folder_is_listed(media, tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    write_video(folder / "a.png", pattern(1, 16, 16))
    os.symlink(folder / "loop.mp4", folder / "loop.mp4")
    os.symlink(folder / "gone.mp4", folder / "broken.mp4")
    assert main(["encode", str(folder), "-o", str(tmp_path / "lat"), "--model", "tiny"]) == 1
    out = capsys.readouterr().out
    assert "1 done, 0 skipped (already done), 2 failed" in out
    assert re.search(r"failed: .*loop\.mp4: FileNotFoundError: a symbolic link that loops", out), out
    assert re.search(r"failed: .*broken\.mp4: FileNotFoundError: a broken symbolic link", out), out


def test_a_long_prompt_warning_stays_short():
    from vidlatent.models.text import load_text_encoder

    encoder = load_text_encoder("tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder.encode(["word " * 1000])
    text = next(str(w.message) for w in caught if "truncated" in str(w.message))
    assert "truncated" in text and "(5000 characters)" in text and len(text) < 200, text
