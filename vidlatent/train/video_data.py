"""Training data from raw videos and images: for training the VAE, or a denoiser with an on-the-fly VAE.

Letters: b batch, c colour channels (3), f frames, h height, w width.

``VideoFolderDataset`` scans a folder (or a list of files and folders) of videos and images, reading headers
only (``vidlatent.data.probe``), finds each file's caption, and assigns it to a bucket: a clip shape
``(f, h, w)``. ``VideoBucketSampler`` batches clips of one bucket together, in an order that is a pure
function of ``(seed, epoch)``, and gives every rank of a distributed run a disjoint, equal-length share of
each epoch: whole batches (``split="batches"``) or its share of every batch (``split="clips"``, what one
process with the global batch would read). ``make_loader`` runs one epoch (or the rest of one) through a torch DataLoader; a file that has
broken since the scan is reported and dropped from its batch, so it never stops an epoch.

Buckets. Each bucket is ``(f, h, w)`` with f = 1 + 4k (the causal VAE's frame counts) and h, w multiples of 16.
A file goes to the bucket with the nearest aspect ratio (in log space) among the buckets whose frame count it
can fill at the chosen ``stride`` / ``fps``; among those, the longest; then the one nearest its area. Its clip
is centre-cropped to the bucket's aspect ratio and resized to the bucket's size. An image (or any one-frame
file) can only fill f = 1 buckets, so images and videos mix in one run. Without ``buckets``: with ``size``,
the buckets are ``(1 + 4k, *size)`` for every 1 + 4k <= ``frames``; without ``size`` each file keeps its own
size, centre-cropped down to multiples of 16, and files of one exact shape are batched together.

Clip start. A clip of f frames starts at a random source frame drawn from a generator seeded by
``(seed, epoch, index)``: reruns read the same frames, and each epoch sees other parts of long videos.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, probe, read_video
from ..data.paths import expand_paths
from .data import read_captions
from .distributed import share

__all__ = ["SPLITS", "VideoFolderDataset", "VideoItem", "VideoBucketSampler", "folder_dataset", "make_loader"]

log = logging.getLogger(__name__)

TEMPORAL_FACTOR = 4  # clips have 1 + 4k frames
SPATIAL_MULTIPLE = 16  # clip heights and widths are multiples of this
VIDEO_SUFFIXES = (*VIDEO_EXTENSIONS, ".gif")
IMAGE_SUFFIXES = tuple(s for s in IMAGE_EXTENSIONS if s != ".gif")  # multi-frame png / webp are clips too
SPLITS = ("batches", "clips")  # how VideoBucketSampler shares an epoch among ranks


@dataclass
class VideoItem:
    """One usable file: its path, what its header says (frame count, rate, size), caption and bucket."""

    path: Path
    frames: int  # source frames
    fps: float | None  # source frame rate; None for images and frame folders
    size: tuple[int, int]  # source (h, w)
    caption: str
    shape: tuple[int, int, int]  # (f, h, w) of the clips read from it: its bucket


@dataclass
class _Failed:
    """A clip that could not be read at load time (picklable: it travels back from DataLoader workers)."""

    index: int
    path: str
    reason: str
    shape: tuple[int, int, int]


def _check_bucket(bucket) -> tuple[int, int, int]:
    f, h, w = (int(v) for v in bucket)
    if f < 1 or (f - 1) % TEMPORAL_FACTOR or h < 1 or w < 1 or h % SPATIAL_MULTIPLE or w % SPATIAL_MULTIPLE:
        raise ValueError(
            f"bucket {tuple(bucket)} must be (frames, height, width) with frames = 1 + {TEMPORAL_FACTOR}k "
            f"and height, width positive multiples of {SPATIAL_MULTIPLE}"
        )
    return f, h, w


def _caption(path: Path, table: dict[str, str], bases: list[Path]) -> str | None:
    """From the captions table (by path as given, file name, or path relative to a base), else a sidecar .txt."""
    keys = [str(path), path.as_posix(), path.name]
    for base in bases:
        try:
            keys.append(path.relative_to(base).as_posix())
        except ValueError:
            pass
    for key in keys:
        if key in table:
            return table[key]
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text().strip()
    return None


def _centre_crop(video: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(c f H W) -> (c f h w), the centre h x w region."""
    H, W = video.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    return video[..., top : top + h, left : left + w]


class VideoFolderDataset:
    """The videos and images under ``root`` (a folder, searched recursively, or a list of files and folders).

    Args:
        root: a folder or a list of files and folders.
        captions: a metadata.jsonl or .csv (see ``read_captions``; rows may name a file by path, path relative
            to the captions file's folder or to a root folder, or file name); files it does not name use a
            sidecar ``.txt`` (``clip.mp4`` -> ``clip.txt``), else the empty caption (counted in ``uncaptioned``).
        frames: the longest clip when ``buckets`` is None (1 + 4k).
        stride: take every stride-th source frame. Exclusive with ``fps``.
        fps: resample to this frame rate (nearest source frame to each tick) instead of ``stride``.
        size: (h, w), multiples of 16, of every clip when ``buckets`` is None; None keeps each file's size,
            centre-cropped down to multiples of 16.
        buckets: list of clip shapes (f, h, w); see the module docstring for how a file picks one.
        images: also scan image files (png, jpg, webp, ...) as one-frame clips.
        seed: seeds the clip starts, with the epoch and the index.

    Files that cannot be read, or fit no bucket (too short, too small), are listed in ``bad`` as
    ``(path, reason)`` and skipped; ``make_loader`` adds the files that fail later, at load time.
    ``dataset[i]`` is ``(video (c f h w) float32 in [-1, 1], caption)`` for epoch 0; ``clip(i, epoch)`` for
    another epoch.
    """

    def __init__(
        self,
        root: str | os.PathLike | Sequence[str | os.PathLike],
        captions: str | os.PathLike | None = None,
        frames: int = 17,
        stride: int = 1,
        fps: float | None = None,
        size: tuple[int, int] | None = None,
        buckets: Sequence[tuple[int, int, int]] | None = None,
        images: bool = True,
        seed: int = 0,
    ):
        if stride < 1 or (fps is not None and (fps <= 0 or stride != 1)):
            raise ValueError(
                f"give a stride >= 1 or a positive fps, not both; got stride={stride}, fps={fps}"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if buckets is not None:
            buckets = sorted({_check_bucket(b) for b in buckets})
            if not buckets:
                raise ValueError("buckets is empty")
        elif size is not None:
            _check_bucket((frames, *size))
            buckets = [(f, int(size[0]), int(size[1])) for f in range(1, frames + 1, TEMPORAL_FACTOR)]
        elif frames < 1 or (frames - 1) % TEMPORAL_FACTOR:
            raise ValueError(f"frames must be 1 + {TEMPORAL_FACTOR}k, got {frames}")
        self.frames, self.stride, self.fps, self.seed = frames, stride, fps, seed
        self.bucket_shapes: list[tuple[int, int, int]] | None = buckets  # None: each file's own size

        roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
        suffixes = VIDEO_SUFFIXES + (IMAGE_SUFFIXES if images else ())
        table = read_captions(captions) if captions else {}
        bases = [Path(r) for r in roots if Path(r).is_dir()]
        if captions:
            bases.insert(0, Path(captions).parent)
        self.items: list[VideoItem] = []
        self.bad: list[tuple[str, str]] = []
        self.uncaptioned = 0
        for f in expand_paths(roots, suffixes):
            try:
                if f.suffix.lower() not in suffixes:
                    raise ValueError(f"unsupported file type {f.suffix!r}; accepted: {', '.join(suffixes)}")
                header = probe(f)
                shape = self._assign(header)
            except Exception as err:  # noqa: BLE001 - any unusable file is reported, never fatal
                self.bad.append((str(f), f"{type(err).__name__}: {err}"))
                continue
            caption = _caption(f, table, bases)
            if caption is None:
                self.uncaptioned += 1
            self.items.append(
                VideoItem(f, header["frames"], header["fps"], header["size"], caption or "", shape)
            )

    # ---------------------------------------------------------------------------------------- buckets

    def _span(self, f: int, src_fps: float | None) -> int:
        """Source frames from the first to the last of an f-frame clip (as read_video selects them)."""
        if f == 1:
            return 0
        if self.fps is None:
            return (f - 1) * self.stride
        return math.floor((f - 1) * (src_fps / self.fps) + 0.5)

    def _assign(self, header: dict) -> tuple[int, int, int]:
        """The bucket of a file with this header; ValueError if it fits none."""
        n, src_fps, (H, W) = header["frames"], header["fps"], header["size"]
        if self.fps is not None and src_fps is None and n > 1:
            raise ValueError(f"{n} frames without a frame rate; fps= cannot resample it (use stride=)")
        longest = [f for f in range(1, self.frames + 1, TEMPORAL_FACTOR) if self._span(f, src_fps) < n]
        if self.bucket_shapes is None:
            h, w = H // SPATIAL_MULTIPLE * SPATIAL_MULTIPLE, W // SPATIAL_MULTIPLE * SPATIAL_MULTIPLE
            if not h or not w:
                raise ValueError(
                    f"{W}x{H} pixels (width x height) is smaller than {SPATIAL_MULTIPLE}x{SPATIAL_MULTIPLE}"
                )
            return longest[-1], h, w
        fillable = [b for b in self.bucket_shapes if self._span(b[0], src_fps) < n]
        if not fillable:
            raise ValueError(
                f"{n} source frames fill no bucket (the shortest needs {min(b[0] for b in self.bucket_shapes)} "
                f"frames at stride={self.stride}, fps={self.fps})"
            )
        aspect, area = math.log(W / H), math.log(W * H)

        def distance(bucket):
            f, h, w = bucket
            return (round(abs(aspect - math.log(w / h)), 9), -f, abs(area - math.log(w * h)))

        return min(fillable, key=distance)

    def buckets(self) -> dict[tuple[int, int, int], list[int]]:
        """{clip shape (f, h, w): indices of the items in it}, shapes sorted."""
        out: dict[tuple[int, int, int], list[int]] = {}
        for i, item in enumerate(self.items):
            out.setdefault(item.shape, []).append(i)
        return dict(sorted(out.items()))

    # ----------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.clip(i, 0)

    def clip_start(self, i: int, epoch: int) -> int:
        """The source frame index where item i's clip starts in this epoch (a pure function of seed, epoch, i)."""
        item = self.items[i]
        last_start = item.frames - 1 - self._span(item.shape[0], item.fps)
        return int(np.random.default_rng([self.seed, epoch, i]).integers(0, last_start + 1))

    def clip(self, i: int, epoch: int) -> tuple[torch.Tensor, str]:
        """Item i's clip for this epoch: ``(video (c f h w) float32 in [-1, 1], caption)``.

        Raises VideoReadError (a ValueError) or ValueError when the file no longer reads as it did at the scan.
        """
        item = self.items[i]
        f, h, w = item.shape
        resample = self.fps is not None and f > 1
        video, _ = read_video(
            item.path,
            frames=f,
            start=self.clip_start(i, epoch),
            stride=1 if resample else self.stride,
            fps=self.fps if resample else None,
            size=None if self.bucket_shapes is None else (h, w),
            frame_policy="none",
            temporal_factor=TEMPORAL_FACTOR,
        )
        if self.bucket_shapes is None:
            video = _centre_crop(video, h, w)
        if tuple(video.shape) != (3, f, h, w):
            raise ValueError(
                f"{item.path}: read a clip of shape {tuple(video.shape)}, expected {(3, f, h, w)}"
            )
        return video, item.caption

    def summary(self) -> str:
        """One line: files, videos / images, buckets, skipped files."""
        images = sum(1 for it in self.items if it.frames == 1)
        text = (
            f"{len(self.items)} files ({len(self.items) - images} videos, {images} images) "
            f"in {len(self.buckets())} bucket(s)"
        )
        if self.uncaptioned:
            text += f", {self.uncaptioned} without caption"
        if self.bad:
            text += f"; skipped {len(self.bad)} bad file(s): " + "; ".join(f"{p} ({r})" for p, r in self.bad)
        return text


def folder_dataset(cfg) -> VideoFolderDataset:
    """The ``VideoFolderDataset`` a train config names: ``cfg.data`` with ``cfg.captions``, seeded by ``cfg.seed``,
    ``cfg.data_options`` as its arguments (yaml lists made the tuples it takes)."""
    opts = dict(cfg.data_options)
    if opts.get("size") is not None:
        opts["size"] = tuple(opts["size"])
    if opts.get("buckets") is not None:
        opts["buckets"] = [tuple(b) for b in opts["buckets"]]
    return VideoFolderDataset(cfg.data, cfg.captions, seed=cfg.seed, **opts)


class VideoBucketSampler:
    """Batches of dataset indices from one bucket each, in an order fixed by ``(seed, epoch)``.

    Each epoch shuffles the items of every bucket, cuts them into batches of that bucket's batch size (the
    last batch of a bucket may be smaller unless ``drop_last``), and shuffles the batches of all buckets
    together. With ``world_size`` > 1 and ``split="batches"`` the epoch's batches are dealt round-robin to the
    ranks, and the last ``len % world_size`` batches (a different few each epoch) are left out, so every rank
    gets the same number of batches and no two ranks share one. With ``split="clips"`` every rank gets every
    batch, cut to its share (``distributed.share``: the batch sizes are then global batch sizes), so the ranks
    together read what one process reads; a rank whose share of a batch is empty (a bucket's last, smaller
    batch) reads the batch's first clip, which ``in_share`` tells apart, to join the step with weight 0.

    Args:
        dataset: a ``VideoFolderDataset`` (anything with ``buckets()`` -> {shape: indices}).
        batch_size: one size for all buckets, or a dict {(f, h, w): size} naming every bucket.
        budget: instead of batch_size, pixels per batch: a bucket's batch size is max(1, budget // (f*h*w)).
        seed: seeds the order, with the epoch.
        rank, world_size: this process's share of a distributed run.
        drop_last: drop each bucket's last batch when it is smaller than the bucket's batch size.
        split: ``"batches"`` or ``"clips"``: how ranks share an epoch (above).
    """

    def __init__(
        self,
        dataset,
        batch_size: int | dict[tuple[int, int, int], int] | None = None,
        *,
        budget: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        split: str = "batches",
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
        if (batch_size is None) == (budget is None):
            raise ValueError("give either batch_size or budget")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self.split = split
        self.buckets = dataset.buckets()
        self.batch_sizes: dict[tuple[int, int, int], int] = {}
        for shape in self.buckets:
            if budget is not None:
                size = max(1, int(budget) // math.prod(shape))
            elif isinstance(batch_size, dict):
                if tuple(shape) not in batch_size:
                    raise ValueError(f"batch_size names no size for bucket {shape}")
                size = int(batch_size[tuple(shape)])
            else:
                size = int(batch_size)
            if size < 1:
                raise ValueError(f"batch size for bucket {shape} must be >= 1, got {size}")
            self.batch_sizes[shape] = size
        self._epoch = 0
        if not self.epoch(0):
            raise ValueError(
                f"no batch for rank {rank} of {world_size} (buckets: "
                + ", ".join(
                    f"{s}: {len(v)} items, batch {self.batch_sizes[s]}" for s, v in self.buckets.items()
                )
                + "); lower the batch sizes, allow smaller batches or use fewer ranks"
            )

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch, every rank's, in order (a pure function of seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for shape, idx in self.buckets.items():
            size = self.batch_sizes[shape]
            perm = [idx[j] for j in rng.permutation(len(idx))]
            for s in range(0, len(perm), size):
                chunk = perm[s : s + size]
                if len(chunk) == size or not self.drop_last:
                    batches.append(chunk)
        return [batches[j] for j in rng.permutation(len(batches))]

    def epoch(self, epoch: int) -> list[list[int]]:
        """This rank's batches of one epoch."""
        batches = self.global_batches(epoch)
        if self.split == "clips":
            shares = [[b[j] for j in share(len(b), self.rank, self.world_size)] for b in batches]
            return [s or b[:1] for s, b in zip(shares, batches)]
        usable = len(batches) // self.world_size * self.world_size
        return batches[self.rank : usable : self.world_size]

    def in_share(self, batch: list[int]) -> list[int]:
        """Positions in the global ``batch`` that are this rank's share of it (``split="clips"``)."""
        return list(share(len(batch), self.rank, self.world_size))

    def set_epoch(self, epoch: int) -> None:
        """The epoch ``iter(sampler)`` runs (for use as a DataLoader ``batch_sampler``)."""
        self._epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.epoch(self._epoch))

    def __len__(self) -> int:
        return len(self.epoch(0))  # the same every epoch


# ------------------------------------------------------------------------------------------- loading


class _EpochView(torch.utils.data.Dataset):
    """The dataset's clips of one epoch; a clip that fails to load becomes a ``_Failed`` record."""

    def __init__(self, dataset: VideoFolderDataset, epoch: int):
        self.dataset, self.epoch = dataset, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return (*self.dataset.clip(i, self.epoch), i)
        except Exception as err:  # noqa: BLE001 - a file broken since the scan is dropped from its batch
            item = self.dataset.items[i]
            return _Failed(i, str(item.path), f"{type(err).__name__}: {err}", item.shape)


def _collate(samples: list) -> tuple[torch.Tensor, list[str], list[_Failed], list[int]]:
    """Stack the clips that loaded into (b c f h w), their captions, the failures (b may be 0), and the
    dataset indices of the clips that loaded."""
    good = [s for s in samples if not isinstance(s, _Failed)]
    failed = [s for s in samples if isinstance(s, _Failed)]
    if good:
        videos = torch.stack([v for v, _, _ in good])
    else:
        f, h, w = failed[0].shape
        videos = torch.zeros(0, 3, f, h, w)
    return videos, [c for _, c, _ in good], failed, [i for _, _, i in good]


class _Loader:
    """One epoch's batches ``(videos (b c f h w), captions[, indices])``; see ``make_loader``."""

    def __init__(self, loader: DataLoader, dataset: VideoFolderDataset, keep_empty: bool, indices: bool):
        self.loader, self.dataset, self.keep_empty, self.indices = loader, dataset, keep_empty, indices

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple]:
        reported = {path for path, _ in self.dataset.bad}
        for videos, captions, failed, indices in self.loader:
            for fail in failed:
                log.warning("skipping %s: %s", fail.path, fail.reason)
                if fail.path not in reported:
                    reported.add(fail.path)
                    self.dataset.bad.append((fail.path, f"at load: {fail.reason}"))
            if len(videos) or self.keep_empty:
                yield (videos, captions, indices) if self.indices else (videos, captions)


def make_loader(
    dataset: VideoFolderDataset,
    sampler: VideoBucketSampler,
    epoch: int,
    num_workers: int = 0,
    start: int = 0,
    indices: bool = False,
    **loader_kwargs,
) -> _Loader:
    """One epoch of collated batches ``(videos (b c f h w) float32, captions list[str])``, from batch ``start``
    of this rank's share (to resume mid-epoch).

    A torch DataLoader with ``batch_sampler`` reads the clips (``num_workers`` > 0 reads them in worker
    processes; ``loader_kwargs`` go to the DataLoader, e.g. ``pin_memory=True``). A clip that fails to load is
    logged, added once to ``dataset.bad`` and dropped from its batch; a batch left with no clip is skipped in
    a single-process run, and yielded empty (b = 0) when ``sampler.world_size`` > 1, so that every rank runs
    the same number of steps. ``indices``: each batch also gives the dataset indices of its clips.
    """
    batches = sampler.epoch(epoch)[start:]
    loader = DataLoader(
        _EpochView(dataset, epoch),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        **loader_kwargs,
    )
    return _Loader(loader, dataset, keep_empty=sampler.world_size > 1, indices=indices)
