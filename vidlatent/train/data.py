"""Training data from the latent cache that ``encode_clips`` / ``vidlatent encode`` writes.

Letters: b batch, c channels, t latent frames, h height, w width.

``LatentDataset`` scans a folder of latent files (headers only), reports and skips the files it cannot use,
finds each clip's caption, and ``BucketSampler`` groups clips by latent shape so that every batch stacks
without padding. The order is a pure function of ``(seed, epoch)``, so a data position ``(epoch, batch)`` is
all a checkpoint needs to continue exactly.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.latents import (
    file_statistics,
    latent_file_metadata,
    load_latents,
    read_latent_metadata,
    write_latents,
)
from ..data.paths import expand_paths
from ..data.shapes import to_tensor

__all__ = ["LatentDataset", "LatentItem", "BucketSampler", "read_captions", "cache_world_latents"]


@dataclass
class LatentItem:
    """One usable latent file: its path, latent shape ``(c, t, h, w)`` and caption."""

    path: Path
    shape: tuple[int, int, int, int]
    caption: str


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """A ``metadata.jsonl`` (one ``{"path"|"file_name": ..., "caption"|"text": ...}`` per line) or a ``.csv``
    with a header holding the same column names -> {key: caption}.

    Keys are the path as written and its file name, so a row may name the source clip or the latent file.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out: dict[str, str] = {}
    for n, row in enumerate(rows, 1):
        key = row.get("path", row.get("file_name"))
        caption = row.get("caption", row.get("text"))
        if not isinstance(key, str) or not isinstance(caption, str):
            raise ValueError(
                f"{path}: row {n} needs a string 'path' (or 'file_name') and 'caption' (or 'text')"
            )
        out[key] = caption
        out.setdefault(Path(key).name, caption)
    return out


def _caption(path: Path, meta: dict, table: dict[str, str]) -> str | None:
    source = meta.get("source")
    for key in (str(path), path.name, source, Path(source).name if source else None):
        if key is not None and key in table:
            return table[key]
    if source:
        sidecar = Path(source).with_suffix(".txt")
        if sidecar.is_file():
            return sidecar.read_text().strip()
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text().strip()
    return None


class LatentDataset:
    """The latent files under ``root`` (a folder, searched recursively, or a list of files and folders).

    Captions come from ``captions`` (a metadata.jsonl or .csv, see ``read_captions``), else the source clip's
    sidecar ``.txt``, else a ``.txt`` next to the latent file; a clip without one trains on the empty
    caption and is counted in ``uncaptioned``. Files that are not readable latent files are listed in
    ``bad`` as ``(path, reason)`` and skipped. ``dataset[i]`` is ``(latents (c t h w) float32, caption)``,
    normalized latents (files stored raw are normalized with the statistics they carry). ``in_memory`` reads
    every file once here and serves batches from memory (a GPU step is quicker than reading its batch; a
    17-frame 64x64 clip of the default VAE takes 20 KB).
    """

    def __init__(self, root, captions: str | os.PathLike | None = None, in_memory: bool = False):
        roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
        files = expand_paths(roots, (".safetensors",))
        table = read_captions(captions) if captions else {}
        self.items: list[LatentItem] = []
        self.bad: list[tuple[str, str]] = []
        self.uncaptioned = 0
        for f in sorted(Path(p) for p in files):
            try:
                meta = read_latent_metadata(f)
                shape = tuple(int(s) for s in _shape(f))
                if len(shape) != 4:
                    raise ValueError(f"latents have shape {shape}; expected (c, t, h, w)")
                if not meta["normalized"] and ("latents_mean" not in meta or "latents_std" not in meta):
                    raise ValueError("raw latents without latents_mean / latents_std to normalize them")
            except Exception as err:  # noqa: BLE001 - any unreadable file is reported, never fatal
                self.bad.append((str(f), f"{type(err).__name__}: {err}"))
                continue
            caption = _caption(f, meta, table)
            if caption is None:
                self.uncaptioned += 1
            self.items.append(LatentItem(f, shape, caption or ""))  # type: ignore[arg-type]
        self._memory: list[torch.Tensor] | None = None
        if in_memory:  # read every file once now; a file that fails is reported and dropped like a bad one
            self._memory, kept = [], []
            for item in self.items:
                try:
                    self._memory.append(self._read(item))
                except Exception as err:  # noqa: BLE001 - as in the scan
                    self.bad.append((str(item.path), f"{type(err).__name__}: {err}"))
                    continue
                kept.append(item)
            self.items = kept

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        item = self.items[i]
        if self._memory is not None:
            return self._memory[i], item.caption
        return self._read(item), item.caption

    @staticmethod
    def _read(item: LatentItem) -> torch.Tensor:
        z, meta = load_latents(item.path, raw=False)
        if not meta["normalized"]:
            z = z.double()
            mean, std = file_statistics(z, meta)
            z = ((z - mean) / std).float()
        if tuple(z.shape) != item.shape:
            raise ValueError(f"{item.path}: latents changed shape since the scan")
        return z.float()

    def summary(self) -> str:
        """One line: clips, buckets, skipped files."""
        buckets = len({it.shape for it in self.items})
        text = f"{len(self.items)} latent clips in {buckets} shape bucket(s)"
        if self.uncaptioned:
            text += f", {self.uncaptioned} without caption"
        if self.bad:
            text += f"; skipped {len(self.bad)} bad file(s): " + "; ".join(f"{p} ({r})" for p, r in self.bad)
        return text


def _shape(path: Path) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if "latents" not in f.keys():
            raise ValueError("no 'latents' tensor")
        return f.get_slice("latents").get_shape()


class BucketSampler:
    """Batches of dataset indices that share a latent shape, in an order fixed by ``(seed, epoch)``.

    Each epoch shuffles the clips of every bucket, cuts them into batches of ``batch_size`` (a bucket's last
    batch may be smaller unless ``drop_last``), and shuffles the batches of all buckets together.
    """

    def __init__(self, dataset: LatentDataset, batch_size: int, seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.buckets: dict[tuple, list[int]] = {}
        for i, item in enumerate(dataset.items):
            self.buckets.setdefault(item.shape, []).append(i)
        if not self.epoch(0):
            raise ValueError(
                f"no batch of {batch_size} clips of one shape (buckets: "
                + ", ".join(f"{s}: {len(v)}" for s, v in self.buckets.items())
                + "); lower batch_size or allow smaller batches"
            )

    def epoch(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch (a pure function of seed and epoch)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for shape in sorted(self.buckets):
            idx = self.buckets[shape]
            perm = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
            for s in range(0, len(perm), self.batch_size):
                chunk = perm[s : s + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        order = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[j] for j in order]


def cache_world_latents(
    world,
    vae,
    count: int,
    folder: str | os.PathLike,
    batch_size: int = 16,
    start: int = 0,
    vae_src: str = "unknown",
    progress: bool = True,
    workers: int = 0,
) -> Path:
    """Encode clips ``start .. start+count-1`` of a ``ShapesWorld`` into a latent cache ``LatentDataset`` reads.

    Writes ``clip-XXXXXXX.safetensors`` (normalized posterior mode, the format of ``vidlatent encode``) and a
    ``metadata.jsonl`` of captions (pass it as ``captions``). Files already there are kept, so an interrupted
    run resumes (what a killed run left half-written is removed once, at the start); the caption table is
    rewritten atomically at the end. Returns the caption file's path.
    ``workers`` > 0 renders the clips in that many processes (a GPU encodes faster than one CPU core draws).
    """
    from tqdm.auto import tqdm

    from ..checkpoint import atomic_write, remove_temporaries, stale_temporaries

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    indices = range(start, start + count)
    remove_temporaries(stale_temporaries(folder, [*map(_clip_name, indices), "metadata.jsonl"]))
    settings = {
        "source": "shapes",
        "world": {"height": world.height, "width": world.width, "frames": world.frames},
        "split": world.split,
        "seed": world.seed,
        "latent": "mode",
        "normalized": True,
    }
    meta = latent_file_metadata(vae, vae_src, True, settings)
    if workers and world.crop:
        raise ValueError("workers render whole frames; a world with crop caches with workers=0")
    items, pool = _render(world, folder, indices, workers)
    bar = tqdm(total=count, desc="cache", unit="clip", disable=not progress)
    rows, batch = [], []
    try:
        for i, (caption, frames) in zip(indices, items):
            rows.append(json.dumps({"path": _clip_name(i), "caption": caption}))
            if frames is None:  # cached by an earlier run
                bar.update(1)
                continue
            batch.append((i, frames))
            if len(batch) == batch_size:
                bar.update(_encode_batch(vae, batch, folder, meta))
                batch = []
        if batch:
            bar.update(_encode_batch(vae, batch, folder, meta))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    captions = folder / "metadata.jsonl"
    atomic_write(captions, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))
    return captions


def _render(world, folder: Path, indices: range, workers: int):
    """(the (caption, frames or None when cached) of each clip in order, the worker pool or None): with
    ``workers``, rendered in that many processes ahead of the encoder."""
    if not workers:
        return (_item(world, folder, i) for i in indices), None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _set_job, (world, folder))
    return pool.map(_cached_item, indices, chunksize=32), pool


def _encode_batch(vae, batch: list[tuple[int, object]], folder: Path, meta: dict) -> int:
    """Encode ``batch`` ((clip index, frames) pairs) and write one latent file per clip; returns its size."""
    clips = [f if isinstance(f, torch.Tensor) else to_tensor(f) for _, f in batch]
    video = torch.stack(clips).to(vae.device, vae.dtype)
    with torch.inference_mode():
        z = vae.normalize(vae.encode(video).mode()).float().cpu()
    for (i, _), zi in zip(batch, z):  # the folder's leftovers were removed once, before the first batch
        write_latents(
            folder / _clip_name(i), {"latents": zi}, {**meta, "source": f"shapes:{i}"}, clean_stale=False
        )
    return len(batch)


def _clip_name(index: int) -> str:
    return f"clip-{index:07d}.safetensors"


_JOB: tuple = ()  # (world, folder) of a cache worker process


def _set_job(world, folder) -> None:
    global _JOB
    _JOB = (world, folder)


def _cached_item(index: int):
    return _item(*_JOB, index)


def _item(world, folder: Path, index: int):
    """(caption, uint8 (f, h, w, 3) frames) of clip ``index``; frames None when its file is already there, and
    the clip itself (``ShapesWorld.clip``: cropped) for a world with ``crop``."""
    scene = world.scene(index)
    if (folder / _clip_name(index)).is_file():
        return scene.caption, None
    return scene.caption, world.clip(index)[0] if world.crop else world.render(scene)
