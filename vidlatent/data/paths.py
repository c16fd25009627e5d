"""Which files a job works on: path expansion (files, folders) and sharding across ``torchrun`` ranks."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

__all__ = ["expand_paths", "shard"]


def expand_paths(
    paths: Iterable[str | os.PathLike], extensions: Sequence[str] = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
) -> list[Path]:
    """Files named in ``paths``, with folders replaced by the files inside them (recursively) whose suffix
    is in ``extensions``, in sorted order; hidden files and folders are left out. Paths that do not exist
    are kept (the jobs report them as failures), and so are broken or looping links found in folders;
    repeats (the same file by another path or link) are dropped."""
    out, seen = [], set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.suffix.lower() in extensions
                and (f.is_file() or (f.is_symlink() and not f.exists()))
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        else:
            found = [p]
        for f in found:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def shard(items: Sequence, rank: int | None = None, world_size: int | None = None) -> tuple[list, int, int]:
    """This process's share ``items[rank::world_size]``; rank and world size default to the ``RANK`` and
    ``WORLD_SIZE`` environment variables that ``torchrun`` sets (0 and 1 without them).

    Returns ``(share, rank, world_size)``. Every process must pass the same ``items`` in the same order.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(items)[rank::world_size], rank, world_size
