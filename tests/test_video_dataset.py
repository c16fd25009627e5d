"""vidlatent.train.video_data on tiny real files: scanning, captions, frame sampling, buckets, batch sizes,
bad files, deterministic order, rank shares and the DataLoader.

Shapes: b batch, c colour channels (3), f frames, h height, w width.
"""

from __future__ import annotations

import json

import pytest
import torch
from media import pattern

from vidlatent.data import VideoReadError, probe, write_video
from vidlatent.train.video_data import VideoBucketSampler, VideoFolderDataset, make_loader

STEP = 12  # grey level step per frame of a counter video: frame i is grey i * STEP


def clip(path, frames: int, h: int = 32, w: int = 32, fps: float = 16):
    write_video(path, pattern(frames, h, w), fps=fps)
    return path


def counter(path, frames: int = 16, fps: float = 16):
    """A grey video whose frame i has level i * STEP (0..255 scale)."""
    levels = (torch.arange(frames) * STEP).to(torch.uint8)
    write_video(path, levels.view(1, frames, 1, 1).expand(3, frames, 32, 32).contiguous(), fps=fps)
    return path


def read_counter(video: torch.Tensor) -> list[int]:
    """The frame numbers of a clip of a counter video."""
    levels = ((video + 1) * 127.5).mean(dim=(0, 2, 3))
    return [round(v / STEP) for v in levels.tolist()]


def garbage(path):
    path.write_bytes(
        torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    return path


class Stub:
    """What the sampler needs from a dataset: {bucket: indices}."""

    def __init__(self, sizes: dict):
        self._buckets, n = {}, 0
        for shape, count in sizes.items():
            self._buckets[shape] = list(range(n, n + count))
            n += count

    def buckets(self):
        return self._buckets


def test_probe_reads_headers(tmp_path):
    assert probe(clip(tmp_path / "a.mp4", 6, 32, 48, fps=8)) == {"frames": 6, "fps": 8.0, "size": (32, 48)}
    write_video(tmp_path / "i.png", pattern(1, 40, 24))
    assert probe(tmp_path / "i.png") == {"frames": 1, "fps": None, "size": (40, 24)}
    with pytest.raises(VideoReadError):
        probe(garbage(tmp_path / "bad.mp4"))


def test_captions_and_images_in_one_run(tmp_path):
    clip(tmp_path / "a.mp4", 6)
    (tmp_path / "a.txt").write_text("sidecar caption\n")
    (tmp_path / "sub").mkdir()
    clip(tmp_path / "sub" / "b.mp4", 6)
    clip(tmp_path / "c.mp4", 6)  # no caption anywhere
    write_video(tmp_path / "img.png", pattern(1, 40, 40))
    rows = [{"file_name": "sub/b.mp4", "caption": "from jsonl"}, {"file_name": "img.png", "text": "an image"}]
    meta = tmp_path / "metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))

    ds = VideoFolderDataset(tmp_path, captions=meta, frames=5, size=(32, 32))
    by_name = {it.path.name: it for it in ds.items}
    assert sorted(by_name) == ["a.mp4", "b.mp4", "c.mp4", "img.png"] and ds.bad == []
    assert by_name["a.mp4"].caption == "sidecar caption"
    assert by_name["b.mp4"].caption == "from jsonl"
    assert by_name["img.png"].caption == "an image"
    assert by_name["c.mp4"].caption == "" and ds.uncaptioned == 1
    assert by_name["img.png"].shape == (1, 32, 32) and by_name["a.mp4"].shape == (5, 32, 32)
    for i, it in enumerate(ds.items):
        video, caption = ds[i]
        assert video.shape == (3, *it.shape) and video.dtype == torch.float32
        assert -1 <= video.min() and video.max() <= 1 and caption == it.caption
    assert "4 files (3 videos, 1 images) in 2 bucket(s), 1 without caption" in ds.summary()

    no_images = VideoFolderDataset(tmp_path, frames=5, size=(32, 32), images=False)
    assert len(no_images) == 3


def test_stride_and_fps_pick_the_right_frames(tmp_path):
    counter(tmp_path / "count.mp4", frames=16, fps=16)
    by_stride = VideoFolderDataset(tmp_path, frames=5, stride=3, size=(32, 32), seed=1)
    by_fps = VideoFolderDataset(tmp_path, frames=5, fps=8, size=(32, 32), seed=1)
    for ds, step in [(by_stride, 3), (by_fps, 2)]:
        starts = set()
        for epoch in range(6):
            start = ds.clip_start(0, epoch)
            video, _ = ds.clip(0, epoch)
            assert read_counter(video) == [start + step * k for k in range(5)]
            assert torch.equal(video, ds.clip(0, epoch)[0])  # the same (seed, epoch, index): the same clip
            starts.add(start)
        assert len(starts) > 1 and max(starts) <= 15 - 4 * step
    # native size (no size, no buckets): cropped down to multiples of 16, longest clip that fits
    counter(tmp_path / "count.mp4", frames=8)
    native = VideoFolderDataset(tmp_path, frames=17)
    assert native.items[0].shape == (5, 32, 32) and native[0][0].shape == (3, 5, 32, 32)


BUCKETS = [(9, 32, 32), (5, 32, 32), (1, 32, 32), (5, 32, 64), (1, 32, 64)]


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    """Files whose buckets are known, with the bucket each must get."""
    d = tmp_path_factory.mktemp("bucketed")
    expect = {
        "square.mp4": ((12, 48, 48), (9, 32, 32)),  # fills the longest square bucket
        "square_6.mp4": ((6, 32, 32), (5, 32, 32)),  # too short for 9: the longest that fits
        "tall.mp4": ((12, 64, 32), (9, 32, 32)),  # aspect 1/2: nearer 1 than 2
        "wide.mp4": ((12, 32, 64), (5, 32, 64)),  # aspect 2 has no 9-frame bucket
        "wide_3.mp4": ((3, 32, 64), (1, 32, 64)),
        "wideish.mp4": ((12, 32, 48), (5, 32, 64)),  # aspect 1.5: nearer 2 than 1 in log space
        "image.png": ((1, 40, 40), (1, 32, 32)),
        "image_wide.png": ((1, 32, 70), (1, 32, 64)),
    }
    for name, ((f, h, w), _) in expect.items():
        if name.endswith(".png"):
            write_video(d / name, pattern(1, h, w))
        else:
            clip(d / name, f, h, w)
    return d, {name: bucket for name, (_, bucket) in expect.items()}


def test_buckets_by_aspect_and_duration(bucketed):
    root, expect = bucketed
    ds = VideoFolderDataset(root, buckets=BUCKETS)
    assert ds.bad == []
    assert {it.path.name: it.shape for it in ds.items} == expect
    sampler = VideoBucketSampler(ds, batch_size=2, seed=0)
    seen = []
    for videos, captions in make_loader(ds, sampler, epoch=0):
        assert videos.ndim == 5 and len(captions) == len(videos)
        seen.append(len(videos))
    assert sum(seen) == len(ds)
    for batch in sampler.epoch(0):  # every batch is one bucket
        assert len({ds.items[i].shape for i in batch}) == 1


def test_bad_bucket_and_shape_arguments(tmp_path):
    clip(tmp_path / "short.mp4", 3)
    ds = VideoFolderDataset(tmp_path, buckets=[(5, 32, 32)])
    assert len(ds) == 0 and "fill no bucket" in ds.bad[0][1]
    for bad in [[(4, 32, 32)], [(5, 30, 32)], []]:
        with pytest.raises(ValueError):
            VideoFolderDataset(tmp_path, buckets=bad)
    with pytest.raises(ValueError):
        VideoFolderDataset(tmp_path, stride=2, fps=8)


def test_per_bucket_batch_sizes():
    stub = Stub({(9, 32, 32): 7, (1, 32, 32): 40, (5, 32, 64): 5})
    by_dict = VideoBucketSampler(stub, {(9, 32, 32): 2, (1, 32, 32): 16, (5, 32, 64): 3}, seed=0)
    by_budget = VideoBucketSampler(stub, budget=2 * 9 * 32 * 32, seed=0)
    assert by_budget.batch_sizes == {(1, 32, 32): 18, (5, 32, 64): 1, (9, 32, 32): 2}
    for sampler in (by_dict, by_budget):
        for batch in sampler.epoch(3):
            shape = next(s for s, idx in stub.buckets().items() if batch[0] in idx)
            assert all(i in stub.buckets()[shape] for i in batch)
            assert len(batch) <= sampler.batch_sizes[shape]
        assert sorted(i for b in sampler.epoch(3) for i in b) == list(range(52))
    assert sorted(len(b) for b in by_dict.epoch(0)) == [1, 2, 2, 2, 2, 3, 8, 16, 16]
    with pytest.raises(ValueError, match="names no size"):
        VideoBucketSampler(stub, {(9, 32, 32): 2})
    with pytest.raises(ValueError):
        VideoBucketSampler(stub, 2, budget=100)
    dropped = VideoBucketSampler(stub, 4, drop_last=True)
    assert all(len(b) == 4 for b in dropped.epoch(0))


def test_order_is_a_pure_function_of_seed_and_epoch():
    stub = Stub({(9, 32, 32): 20, (1, 32, 32): 30})
    a, b, other = (VideoBucketSampler(stub, 3, seed=s) for s in (5, 5, 6))
    assert a.epoch(2) == b.epoch(2) and a.epoch(0) == b.epoch(0)
    assert a.epoch(0) != a.epoch(1) and a.epoch(0) != other.epoch(0)
    a.set_epoch(2)
    assert list(a) == b.epoch(2) and len(a) == len(b.epoch(2))


def test_rank_shares_are_disjoint_equal_and_cover_the_epoch():
    stub = Stub({(9, 32, 32): 20, (1, 32, 32): 31, (5, 32, 64): 4})  # 7 + 11 + 2 = 20 batches of 3
    world = 3
    for epoch in range(3):
        full = VideoBucketSampler(stub, 3, seed=1).global_batches(epoch)
        assert sorted(i for b in full for i in b) == list(range(55))  # the epoch holds every item once
        shares = [
            VideoBucketSampler(stub, 3, seed=1, rank=r, world_size=world).epoch(epoch) for r in range(world)
        ]
        assert len({len(s) for s in shares}) == 1 and len(shares[0]) == len(full) // world
        flat = [tuple(b) for s in shares for b in s]
        assert len(set(flat)) == len(flat)  # no batch on two ranks
        assert sorted(flat) == sorted(tuple(b) for b in full[: len(full) // world * world])
    with pytest.raises(ValueError):
        VideoBucketSampler(stub, 3, rank=3, world_size=3)


def test_corrupt_files_at_scan_and_at_load(tmp_path):
    for name in ["a.mp4", "b.mp4", "c.mp4"]:
        clip(tmp_path / name, 6)
    garbage(tmp_path / "garbage.mp4")
    (tmp_path / "notes.mp4").write_text("not a video")
    ds = VideoFolderDataset(tmp_path, frames=5, size=(32, 32))
    assert sorted(p.split("/")[-1] for p, _ in ds.bad) == ["garbage.mp4", "notes.mp4"] and len(ds) == 3
    garbage(tmp_path / "b.mp4")  # breaks after the scan

    sampler = VideoBucketSampler(ds, 1, seed=0)
    got = [c for epoch in range(2) for _, captions in make_loader(ds, sampler, epoch) for c in captions]
    assert len(got) == 4  # 2 good clips in each of 2 epochs; the broken batch is skipped
    at_load = [p for p, r in ds.bad if r.startswith("at load")]
    assert len(at_load) == 1 and at_load[0].endswith("b.mp4")  # reported once

    ranks = VideoBucketSampler(ds, 1, seed=0, world_size=3)  # several ranks: empty batches keep step counts
    sizes = [len(v) for v, _ in make_loader(ds, ranks, 0)]
    assert sizes in ([1], [0])


def test_dataloader_with_two_workers(tmp_path):
    for i in range(5):
        clip(tmp_path / f"v{i}.mp4", 6)
        (tmp_path / f"v{i}.txt").write_text(f"clip {i}")
    write_video(tmp_path / "img.png", pattern(1, 32, 32))
    ds = VideoFolderDataset(tmp_path, frames=5, size=(32, 32))
    garbage(tmp_path / "v3.mp4")
    sampler = VideoBucketSampler(ds, batch_size=2, seed=3)
    loader = make_loader(ds, sampler, epoch=1, num_workers=2)
    assert len(loader) == len(sampler.epoch(1))
    batches = list(loader)
    captions = sorted(c for _, cs in batches for c in cs)
    assert captions == ["", "clip 0", "clip 1", "clip 2", "clip 4"]
    assert {tuple(v.shape[1:]) for v, _ in batches} == {(3, 5, 32, 32), (3, 1, 32, 32)}
    assert any(p.endswith("v3.mp4") and r.startswith("at load") for p, r in ds.bad)
    # the same epoch again, in this process: the same clips
    again = list(make_loader(ds, sampler, epoch=1, num_workers=0))
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(batches, again))
    # resume from the second batch
    rest = list(make_loader(ds, sampler, epoch=1, start=1))
    first_broken = all(ds.items[i].path.name == "v3.mp4" for i in sampler.epoch(1)[0])
    expected = again if first_broken else again[1:]  # a batch holding only the broken file is not yielded
    assert [c for _, c in rest] == [c for _, c in expected]
