"""Rotated phone videos: a clip stored landscape with a display matrix turning it 90 degrees is scanned,
bucketed and read as it is shown (portrait), by both video backends; and the video sampler's split of every
global batch among ranks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import av
import pytest
import torch
from media import pattern

from vidlatent.data.io import VideoReadError, probe, read_video, write_video
from vidlatent.train.video_data import VideoBucketSampler, VideoFolderDataset


def rotated(src: Path, dst: Path, degrees: int) -> Path:
    """``src`` with a display matrix turning it ``degrees`` counter-clockwise (what a phone writes), streams
    copied, made by imageio-ffmpeg's ffmpeg. (Its ``-metadata:s:v rotate=90`` no longer writes a matrix.)"""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-display_rotation", str(degrees),
           "-i", str(src), "-c", "copy", str(dst)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return dst


def first_frame_rotation(path: Path) -> float:
    with av.open(str(path)) as c:
        return next(c.decode(video=0)).rotation


@pytest.mark.parametrize("h, w", [(32, 48), (48, 80)])
@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_rotated_video_is_scanned_and_read_as_shown(tmp_path, h, w, degrees):
    stored = write_video(tmp_path / "stored.mp4", pattern(9, h=h, w=w), fps=8)
    phone = rotated(stored, tmp_path / "phone.mp4", degrees)
    assert first_frame_rotation(stored) == 0 and first_frame_rotation(phone) % 360 == degrees % 360
    shown = (w, h) if degrees % 180 else (h, w)
    assert probe(stored)["size"] == (h, w)
    assert probe(phone)["size"] == shown
    plain = read_video(stored)[0]
    turns = (degrees // 90) % 4  # counter-clockwise quarter turns: as players show it
    expected = torch.rot90(plain, turns, dims=(-2, -1))
    for backend in ("auto", "pyav"):
        got = read_video(phone, backend=backend)[0]
        assert got.shape[-2:] == shown, backend
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    try:  # decord turns frames itself, but fails on some sizes (48x80: a copy of the wrong size); "auto" then
        got = read_video(phone, backend="decord")[0]  # falls back to pyav (above)
    except VideoReadError as err:
        assert "DECORDError" in str(err)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_rotated_phone_clips_go_to_portrait_buckets(tmp_path):
    """Stored 48x32 (w x h) landscape with rotate=90: the portrait bucket; an unrotated copy: landscape."""
    folder = tmp_path / "clips"
    folder.mkdir()
    stored = write_video(folder / "landscape.mp4", pattern(9, h=32, w=48), fps=8)
    rotated(stored, folder / "phone.mp4", 90)
    ds = VideoFolderDataset(folder, frames=5, buckets=[(5, 32, 48), (5, 48, 32)])
    by_name = {it.path.name: it for it in ds.items}
    assert by_name["phone.mp4"].size == (48, 32) and by_name["phone.mp4"].shape == (5, 48, 32)
    assert by_name["landscape.mp4"].size == (32, 48) and by_name["landscape.mp4"].shape == (5, 32, 48)
    i = [it.path.name for it in ds.items].index("phone.mp4")
    video, _ = ds[i]
    assert video.shape == (3, 5, 48, 32)
    own = VideoFolderDataset(folder, frames=5)  # each file's own size, multiples of 16
    assert {it.path.name: it.shape for it in own.items} == {
        "landscape.mp4": (5, 32, 48),
        "phone.mp4": (5, 48, 32),
    }


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("batch", [2, 3, 5])
def test_clip_split_gives_each_rank_its_share_of_every_global_batch(batch, world):
    class Items:
        def buckets(self):
            return {(5, 32, 32): list(range(7)), (1, 32, 32): list(range(7, 10))}

    one = VideoBucketSampler(Items(), batch, seed=3)
    ranks = [
        VideoBucketSampler(Items(), batch, seed=3, rank=r, world_size=world, split="clips")
        for r in range(world)
    ]
    for epoch in range(2):
        whole = one.global_batches(epoch)
        assert all(len(r.epoch(epoch)) == len(whole) for r in ranks)  # every rank every batch
        for k, b in enumerate(whole):
            shares = [[b[j] for j in r.in_share(b)] for r in ranks]
            assert sum(shares, []) == b  # the shares, in rank order, are the batch
            for r, s in zip(ranks, shares):
                assert r.epoch(epoch)[k] == (s or b[:1])  # an empty share reads the batch's first clip
    with pytest.raises(ValueError, match="unknown split 'x'; accepted: batches, clips"):
        VideoBucketSampler(Items(), 2, split="x")
