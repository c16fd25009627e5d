"""Batch jobs over many clips: ``encode_clips`` (clips to latent files), ``decode_latents`` (back to videos),
``latent_stats`` (per-channel statistics) and ``reconstruct`` (one clip through the VAE, measured).

Letters: b batch, c channels, t frames, h height, w width.

The files these jobs write and read are described in ``vidlatent.data.latents``. Outputs that exist are
complete (atomic writes): a rerun skips them, and a leftover temporary file from a killed run is removed.
Under ``torchrun`` (``WORLD_SIZE`` / ``RANK`` set) each process takes every world_size-th clip
(``data.paths.shard``); no process group is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ..checkpoint import (
    atomic_write,
    is_disk_full,
    named_part,
    remove_temporaries,
    stale_temporaries,
)
from ..checks import check_finite, check_weights_finite, model_cause
from ..config import list_presets, load_config
from ..data.io import fit_to_multiple, read_video, restore_size, write_video
from ..data.latents import (
    LATENT_SUFFIX,
    LATER_SETTINGS,
    latent_file_metadata,
    latent_name,
    load_latents,
    read_latent_metadata,
    vae_fingerprint,
    write_latents,
)
from ..data.paths import expand_paths, shard
from ..errors import error_reason as _reason
from ..metrics import psnr, ssim
from ..models.vae import CausalVAE, DiagonalGaussian

__all__ = [
    "ChannelStats",
    "JobReport",
    "Reconstruction",
    "decode_latents",
    "encode_clips",
    "latent_stats",
    "first_frame_stats",
    "load_vae",
    "reconstruct",
    "write_stats",
]

DECODE_FORMATS = ("mp4", "webm", "gif", "png", "frames")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- helpers


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[value]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_vae(
    model: str | os.PathLike = "default", device=None, dtype=None, check_finite: bool = False, **overrides
) -> tuple[CausalVAE, str]:
    """Load the VAE named by ``model`` and return ``(vae, src)``, ``src`` being what latent files record.

    ``model``: a pipeline folder holding ``vae/`` (vidlatent or diffusers), a vidlatent or diffusers VAE folder,
    an original Wan 2.1 VAE checkpoint, a pipeline preset (its VAE, with the weights ``VideoPipeline`` gives
    it) or a VAE preset. Presets have random weights, seeded so that every process gets the same ones.
    ``overrides`` replace VAE config fields (e.g. ``chunk_size=2``). ``check_finite``: scan the weights of a
    file or folder for NaN/inf (``NonFiniteError`` naming the tensors).
    """
    model = named_part(model, "pipeline")  # a shipped model's name: its pipeline folder
    path = Path(model)
    if path.exists():
        if path.is_dir() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        vae = CausalVAE.from_pretrained(path, device, dtype, **overrides).eval()
        if check_finite:
            check_weights_finite(vae, f"the VAE at {path}")
        return vae, str(path.resolve())
    name = str(model)
    if name in list_presets("pipeline"):
        from .video import PipelinePreset

        preset = load_config(PipelinePreset, "pipeline", name)
        vae_name, seed = preset.vae, preset.seed
    elif name in list_presets("vae"):
        vae_name, seed = name, 0
    else:
        presets = sorted(set(list_presets("pipeline")) | set(list_presets("vae")))
        raise FileNotFoundError(
            f"no model at {name!r}: not a file or folder, and not a preset ({', '.join(presets)})"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = CausalVAE.from_pretrained(vae_name, device, dtype, **overrides)
    return vae.eval(), f"preset:{name}"


# ------------------------------------------------------------------------------------------------ reports


@dataclass
class JobReport:
    """What a batch job did: ``done`` and ``skipped`` as (source, output) pairs, ``failed`` as
    (source, reason); ``notes`` are warnings that did not stop anything."""

    job: str
    done: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1

    @property
    def outputs(self) -> list[Path]:
        """Every output this job stands behind: written now or already there."""
        return [Path(out) for _, out in self.done + self.skipped]

    def summary(self) -> str:
        """Human-readable report: one count line, then one line per failure and note."""
        where = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        lines = [
            f"{self.job}{where}: {len(self.done)} done, {len(self.skipped)} skipped (already done), "
            f"{len(self.failed)} failed"
        ]
        lines += [f"  failed: {src}: {why}" for src, why in self.failed]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return {
            "job": self.job,
            "rank": self.rank,
            "world_size": self.world_size,
            "done": [list(p) for p in self.done],
            "skipped": [list(p) for p in self.skipped],
            "failed": [list(p) for p in self.failed],
            "notes": list(self.notes),
        }


def source_stamp(path: Path) -> str:
    """Size and modification time of a source file (of every file of a folder of frames): a clip re-rendered or
    replaced since its latents were written has another stamp, so a resumed job encodes it again."""
    files = [path] if not path.is_dir() else sorted(f for f in path.iterdir() if f.is_file())
    try:
        stats = [f.stat() for f in files]
        return ";".join(f"{st.st_size}:{st.st_mtime_ns}" for st in stats)
    except OSError:  # unreadable: the reader reports it
        return ""


def _settings_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


# ----------------------------------------------------------------------------------------------- encode


def _try_read(path: Path, read_kwargs: dict):
    try:
        video, info = read_video(path, **read_kwargs)
        return video, info, None
    except Exception as err:  # a bad file is reported and skipped; the batch goes on
        return None, None, _reason(err)


def _read_ahead(paths: list[Path], read_kwargs: dict, workers: int) -> Iterator[tuple]:
    """Yield ``(path, video, info, error)`` in order, decoding up to ``2 * workers`` clips ahead in threads."""
    if workers <= 0:
        for p in paths:
            yield (p, *_try_read(p, read_kwargs))
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="vidlatent-read")
    try:
        pending, it = deque(), iter(paths)
        for p in it:
            pending.append((p, pool.submit(_try_read, p, read_kwargs)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            p, future = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_try_read, nxt, read_kwargs)))
            yield (p, *future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _clip_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def encode_clips(
    paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    vae: CausalVAE | str | os.PathLike,
    *,
    frames: int | None = None,
    start: int = 0,
    stride: int = 1,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    frame_policy: str = "trim",
    size_policy: str = "crop",
    normalized: bool = True,
    sample: bool = False,
    seed: int = 0,
    batch_size: int = 4,
    save_dtype: torch.dtype | str = torch.float32,
    save_logvar: bool = False,
    overwrite: bool = False,
    num_workers: int = 2,
    vae_src: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> JobReport:
    """Encode video / image files into one latent file each in ``out_dir`` (format: see the module docstring).

    Args:
        paths: files, or folders (expanded to the video and image files inside, see ``expand_paths``).
        vae: a loaded ``CausalVAE``, or anything ``load_vae`` takes (then its source is recorded).
        frames, start, stride, fps, size, frame_policy: frame selection, as in ``read_video``; the VAE's
            temporal factor decides what 1 + k*factor means.
        size_policy: how sides that are not multiples of the VAE's spatial factor (8) are fitted: "crop",
            "pad" (``decode_latents`` crops the padding away again) or "resize" (``data.io.fit_to_multiple``).
        normalized: store ``vae.normalize(z)`` (what a denoiser trains on) instead of raw latents.
        sample: store a posterior sample instead of the mean; the noise of each clip is seeded from
            ``seed`` and the clip's name, so it does not depend on batching, sharding or device.
        batch_size: clips are taken in windows of this many (in sorted order); those of one shape in a window
            are encoded together. (Windows do not depend on what is done, so a resumed run gives the same bits.)
        save_dtype: dtype of the stored tensors (float32, bfloat16 or float16).
        save_logvar: also store the posterior's raw ``logvar``.
        overwrite: re-encode clips whose output exists; without it a matching output is skipped (encoded again,
            with a note, when its source's size or modification time changed since) and one made with other
            settings (or from another source) is reported as failed.
        num_workers: threads decoding clips ahead of the VAE (0: decode in the calling thread).
        vae_src: source string recorded in the files when ``vae`` is a model (default: "unknown").
        rank, world_size: this process's share (default: ``RANK`` / ``WORLD_SIZE`` from the environment).
        progress: show a tqdm bar.

    Returns:
        A ``JobReport``: done, skipped (already done), failed with reasons. Nothing is raised for bad clips.
    """
    if not isinstance(vae, CausalVAE):
        vae, vae_src = load_vae(vae)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    save_dtype = _dtype(save_dtype)
    out_dir = Path(out_dir)
    sources, rank, world_size = shard(expand_paths(paths), rank, world_size)
    report = JobReport("encode", rank=rank, world_size=world_size)

    fingerprint = vae_fingerprint(vae)
    settings = {
        "frames": frames,
        "start": start,
        "stride": stride,
        "fps": fps,
        "size": list(size) if size is not None else None,
        "frame_policy": frame_policy,
        "size_policy": size_policy,
        "latent": "sample" if sample else "mode",
        "seed": seed if sample else None,
        "normalized": bool(normalized),
        "save_dtype": _dtype_name(save_dtype),
        "save_logvar": bool(save_logvar),
        "vae": fingerprint,
    }
    common_meta = latent_file_metadata(vae, vae_src, normalized, settings)

    # Decide per clip: skip (done before), fail (conflict), or encode.
    names = {p: latent_name(p) for p in sources}
    clashes: dict[str, Path] = {}
    for p, name in names.items():
        if name in clashes:  # distinct real paths with the same 48-bit digest and stem
            raise ValueError(f"{p} and {clashes[name]} map to the same output name {name}")
        clashes[name] = p
    remove_temporaries(stale_temporaries(out_dir, names.values()))  # what killed runs left, of any clip
    todo, done_before = [], set()
    stamps = {p: source_stamp(p) for p in sources}
    for p in sources:
        out = out_dir / names[p]
        if out.exists() and not overwrite:
            try:
                old = read_latent_metadata(out)
            except ValueError:
                old = None  # not ours or unreadable: replace it
            if old is not None:
                if old.get("source") != str(p.resolve()):
                    report.failed.append((str(p), f"{out} holds latents of {old.get('source')}"))
                    continue
                old_settings = {**LATER_SETTINGS, **(old.get("settings") or {})}
                if old_settings != settings:
                    diff = _settings_diff(old_settings, settings)
                    report.failed.append(
                        (str(p), f"{out} was made with other settings ({diff}); pass overwrite")
                    )
                    continue
                if old.get("source_stamp", stamps[p]) != stamps[p]:  # files from before stamps: taken as done
                    report.notes.append(f"{p} changed since {out} was written: encoded again")
                    todo.append(p)
                    continue
                report.skipped.append((str(p), str(out)))
                done_before.add(p)
                continue
        todo.append(p)

    read_kwargs = dict(
        frames=frames,
        start=start,
        stride=stride,
        fps=fps,
        size=size,
        frame_policy=frame_policy,
        temporal_factor=vae.temporal_factor,
        multiple=vae.spatial_factor,
        size_policy=size_policy,
    )
    bar = tqdm(
        total=len(sources),
        initial=len(sources) - len(todo),
        desc="encode" + (f" [rank {rank}/{world_size}]" if world_size > 1 else ""),
        unit="clip",
        disable=not progress,
        dynamic_ncols=True,
    )

    def write(p: Path, info: dict, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        post = DiagonalGaussian(mean[None], logvar[None])
        if sample:
            z = post.sample(torch.Generator().manual_seed(_clip_seed(seed, names[p])))[0]
        else:
            z = post.mode()[0]
        if normalized:
            z = vae.normalize(z[None])[0]
        tensors = {"latents": z.to(save_dtype)}
        if save_logvar:
            tensors["logvar"] = post.logvar[0].to(save_dtype)
        meta = {**common_meta, "source": str(p.resolve()), "source_stamp": stamps[p], "source_info": info}
        write_latents(out_dir / names[p], tensors, meta, clean_stale=False)  # cleaned once at the start
        report.done.append((str(p), str(out_dir / names[p])))

    def encode(items: list) -> tuple[list, torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            post = vae.encode(torch.stack([video for _, video, _ in items]))
        for x in (post.mean, post.logvar):
            check_finite(x, "VAE encoding", lambda: model_cause("VAE", vae))
        return items, post.mean, post.logvar

    def flush(batch: list[tuple[Path, torch.Tensor, dict]]) -> None:
        """Encode clips of one shape together and write the outputs still to do."""
        try:
            encoded = [encode(batch)]
        except Exception as err:
            if len(batch) == 1:
                fail(batch[0][0], _reason(err))
                return
            encoded = []
            for item in batch:  # find out which clip fails, one at a time
                try:
                    encoded.append(encode([item]))
                except Exception as one:
                    fail(item[0], _reason(one))
        for items, mean, logvar in encoded:
            for i, (p, _, info) in enumerate(items):
                if p not in wanted:
                    continue  # done before: encoded again only so that its batch is the same
                try:
                    write(p, info, mean[i], logvar[i])
                except Exception as err:
                    if is_disk_full(err):  # every later clip would fail too: stop (a rerun resumes)
                        raise
                    report.failed.append((str(p), _reason(err)))
                bar.update(1)

    def fail(p: Path, reason: str) -> None:
        if p in wanted:
            report.failed.append((str(p), reason))
            bar.update(1)

    # Batches are windows of batch_size consecutive clips (in sorted order), each encoded as sub-batches of one
    # shape: a clip's batch never depends on which clips are done already, so a rerun after a kill encodes
    # the window it stopped in again (written outputs stay as they are) and every output has the bits of an
    # uninterrupted run (batched convolutions differ from unbatched ones in the last bits).
    wanted = set(todo)
    windows = [sources[i : i + batch_size] for i in range(0, len(sources), batch_size)]
    windows = [[p for p in w if p in wanted or p in done_before] for w in windows if wanted.intersection(w)]
    sizes = {p: len(w) for w in windows for p in w}
    window: list = []
    try:
        for p, video, info, error in _read_ahead([p for w in windows for p in w], read_kwargs, num_workers):
            window.append((p, video, info, error))
            if len(window) < sizes[p]:
                continue
            groups: dict[tuple, list] = {}
            for q, v, i, e in window:
                if e is not None:
                    fail(q, e)
                else:
                    groups.setdefault(tuple(v.shape), []).append((q, v, i))
            for group in groups.values():
                flush(group)
            window = []
    finally:
        bar.close()
    return report


# ----------------------------------------------------------------------------------------------- decode


def decode_latents(
    latent_files: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    vae: CausalVAE | str | os.PathLike,
    fps: float | None = None,
    fmt: str = "mp4",
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> JobReport:
    """Decode latent files (or folders of them) back to videos ``<out_dir>/<file stem>.<fmt>``.

    Normalized files are denormalized with the statistics stored in them. ``fps`` defaults to the frame rate
    stored with the clip (16 when it had none). ``fmt``: mp4, webm, gif, png (one-frame clips) or "frames"
    (a folder of numbered pngs). Outputs that exist are skipped unless ``overwrite``. Bad files are reported
    and skipped; a file made by another VAE (different fingerprint) is decoded with a note in the report.
    """
    if fmt not in DECODE_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(DECODE_FORMATS)}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not isinstance(vae, CausalVAE):
        vae, _ = load_vae(vae)
    out_dir = Path(out_dir)
    files = expand_paths(latent_files, (LATENT_SUFFIX,))
    report = JobReport("decode")
    fingerprint, claimed = None, {}
    for f in tqdm(files, desc="decode", unit="clip", disable=not progress, dynamic_ncols=True):
        out = out_dir / (f.stem if fmt == "frames" else f"{f.stem}.{fmt}")
        if out in claimed:  # same file name in two input folders
            report.failed.append((str(f), f"{claimed[out]} is decoded to {out} already in this run"))
            continue
        claimed[out] = f
        if out.exists() and not overwrite:
            report.skipped.append((str(f), str(out)))
            continue
        try:
            z, meta = load_latents(f, raw=True)
            made_by = meta.get("vae", {}).get("fingerprint")
            if made_by is not None:
                fingerprint = fingerprint or vae_fingerprint(vae)
                if made_by != fingerprint:
                    report.notes.append(f"{f} was encoded by VAE {made_by}, decoded with {fingerprint}")
            check_finite(z, "the latents", "the file holds NaN/inf values")
            with torch.inference_mode():
                video = check_finite(vae.decode(z[None])[0], "VAE decoding", lambda: model_cause("VAE", vae))
            video = restore_size(video, (meta.get("source_info") or {}).get("fit"))  # a padded clip: its size
            rate = fps or (meta.get("source_info") or {}).get("fps") or 16
            write_video(out, video, fps=rate)
            report.done.append((str(f), str(out)))
        except Exception as err:
            if is_disk_full(err):  # every later file would fail too: stop (a rerun resumes)
                raise
            report.failed.append((str(f), _reason(err)))
    return report


# ------------------------------------------------------------------------------------------------ stats


class ChannelStats:
    """Per-channel count, mean and sum of squared deviations, accumulated in float64 chunk by chunk.

    Each chunk's own mean and M2 are exact two-pass values; chunks combine with Chan et al.'s pairwise
    update, so the result does not drift with the number of chunks or an offset in the data.
    """

    def __init__(self, channels: int | None = None):
        self.count = 0
        self.mean = None if channels is None else torch.zeros(channels, dtype=torch.float64)
        self.m2 = None if channels is None else torch.zeros(channels, dtype=torch.float64)

    def update(self, z: torch.Tensor) -> ChannelStats:
        """Add a tensor whose first dimension is the channel (c, ...)."""
        x = z.detach().to("cpu", torch.float64).flatten(1)
        n = x.shape[1]
        if n == 0:
            return self
        mean = x.mean(1)
        m2 = (x - mean[:, None]).square().sum(1)
        return self.merge_moments(n, mean, m2)

    def merge_moments(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> ChannelStats:
        """Combine with another set's (count, mean, M2)."""
        if self.mean is None or self.count == 0:
            self.count, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return self
        if mean.shape != self.mean.shape:
            raise ValueError(f"channel count changes from {self.mean.numel()} to {mean.numel()}")
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total
        return self

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Combine with the statistics of another set (e.g. another rank's)."""
        if other.count:
            self.merge_moments(other.count, other.mean, other.m2)
        return self

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation (divides by the count)."""
        if not self.count:
            raise ValueError("no values accumulated")
        return (self.m2 / self.count).sqrt()


def _all_ranks(stats: dict[str, ChannelStats]) -> dict[str, ChannelStats]:
    """Merge every rank's statistics (each entry of ``stats``) under torchrun, in one gather (a gloo process
    group made for it if there is none)."""
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    try:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, {name: (s.count, s.mean, s.m2) for name, s in stats.items()})
    finally:
        if own:
            dist.destroy_process_group()
    total = {name: ChannelStats() for name in stats}
    for rank in parts:
        for name, (count, mean, m2) in rank.items():
            if count:
                total[name].merge_moments(count, mean, m2)
    return total


FRAME_PARTS = ("all", "first", "later")  # which latent frames of each clip ``latent_stats`` reads


def add_clip(stats: dict[str, ChannelStats], z: torch.Tensor) -> None:
    """Add one clip's raw latents (c, t, h, w) to each part's statistics (``stats`` keyed by FRAME_PARTS)."""
    for part, acc in stats.items():
        acc.update(z if part == "all" else z[:, :1] if part == "first" else z[:, 1:])


def first_and_later(stats: dict[str, ChannelStats]) -> tuple[ChannelStats, ChannelStats]:
    """The "first" and "later" parts of ``stats`` as a VAE with first-frame statistics is calibrated: the later
    frames' are the first frames' when no clip has a frame after the first (images only). ValueError when
    nothing was accumulated."""
    first, later = stats["first"], stats["later"]
    if not first.count:
        raise ValueError("no latent files to compute statistics over")
    return first, later if later.count else first


def _frame_stats(files, parts: tuple[str, ...], all_ranks: bool, progress: bool) -> dict[str, ChannelStats]:
    """One pass over the latent files: the raw latents' ``ChannelStats`` of each of ``parts`` (FRAME_PARTS)."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    stats = {part: ChannelStats() for part in parts}
    for f in tqdm(expand_paths(files, (LATENT_SUFFIX,)), desc="stats", unit="clip", disable=not progress,
                  dynamic_ncols=True):  # fmt: skip
        add_clip(stats, load_latents(f, raw=True)[0])
    if all_ranks and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        stats = _all_ranks(stats)
    return stats


def latent_stats(
    latent_files: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    frames: str = "all",
    all_ranks: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of the RAW latents in a set of latent files or folders.

    Normalized files are denormalized first, so the result is what ``latents_mean`` / ``latents_std`` of a
    VAE config should hold for that VAE on such data. ``frames``: every latent frame of each clip (``"all"``),
    the first alone (``"first"``: ``first_latents_mean`` / ``first_latents_std``) or the ones after it
    (``"later"``); ``first_frame_stats`` gives a VAE with first-frame statistics both in one pass. Values
    accumulate in float64 (``ChannelStats``). ``all_ranks=True`` (under torchrun) merges every rank's files
    and returns the same result on each. Returns float64 tensors (c,). Raises ValueError on an unreadable file,
    an unknown ``frames``, or when there are no such frames.
    """
    if frames not in FRAME_PARTS:
        raise ValueError(f"frames must be one of {', '.join(FRAME_PARTS)}; got {frames!r}")
    stats = _frame_stats(latent_files, (frames,), all_ranks, progress)[frames]
    if not stats.count:
        if frames == "later":
            raise ValueError("no latent file has a frame after the first (one-frame images only)")
        raise ValueError("no latent files to compute statistics over")
    return stats.mean, stats.std


def first_frame_stats(
    latent_files: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    all_ranks: bool = False,
    progress: bool = False,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The statistics of a VAE that normalizes frame 0 on its own, read in one pass over the latent files, as
    VAE export calibrates them: ``((first_latents_mean, first_latents_std), (latents_mean, latents_std))``,
    the second of the later frames (of every frame when no clip has a frame after the first). Options and
    errors as ``latent_stats``'."""
    first, later = first_and_later(_frame_stats(latent_files, ("first", "later"), all_ranks, progress))
    return (first.mean, first.std), (later.mean, later.std)


def write_stats(
    path: str | os.PathLike,
    mean: torch.Tensor,
    std: torch.Tensor,
    first: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Path:
    """Write ``latents_mean`` / ``latents_std`` (and ``first_latents_mean`` / ``first_latents_std`` from
    ``first``) as .yaml/.yml or .json (atomically), in the form of the VAE config fields, ready to merge into a
    VAE's config. Returns the path."""
    path = Path(path)
    data = {
        "latents_mean": [round(float(v), 6) for v in mean],
        "latents_std": [round(float(v), 6) for v in std],
    }
    if first is not None:
        data["first_latents_mean"] = [round(float(v), 6) for v in first[0]]
        data["first_latents_std"] = [round(float(v), 6) for v in first[1]]
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    elif suffix in (".yaml", ".yml"):
        from omegaconf import OmegaConf

        text = OmegaConf.to_yaml(OmegaConf.create(data))
    else:
        raise ValueError(f"statistics are written as .yaml, .yml or .json, not {path.name!r}")
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


class Reconstruction(NamedTuple):
    """``reconstruct``'s result: input and reconstruction (c t h w) in [-1, 1], PSNR (dB) and SSIM on [0, 1]."""

    video: torch.Tensor
    recon: torch.Tensor
    psnr: float
    ssim: float


def reconstruct(
    src: str | os.PathLike | torch.Tensor,
    vae: CausalVAE,
    *,
    sample: bool = False,
    seed: int = 0,
    size_policy: str = "crop",
    **read_kwargs,
) -> Reconstruction:
    """Encode and decode a clip; measure how much survives.

    ``src`` is a file (read with ``read_video(src, **read_kwargs)``, e.g. ``frames=``, ``size=``) or a
    (c t h w) tensor in [-1, 1]. Sides that are not multiples of the VAE's spatial factor are fitted by
    ``size_policy`` (``data.io.fit_to_multiple``): "crop" and "resize" give both clips the fitted size, "pad"
    crops the reconstruction back to the input's size. Uses the posterior mean, or a seeded sample with
    ``sample=True``. PSNR and SSIM (RGB, see ``ssim``) compare the two on [0, 1]; SSIM is nan for frames
    under 11x11 pixels.
    """
    if isinstance(src, torch.Tensor):
        video = src
    else:
        read_kwargs.setdefault("temporal_factor", vae.temporal_factor)
        video, _ = read_video(src, **read_kwargs)
    video, plan = fit_to_multiple(video, vae.spatial_factor, size_policy, "the input")
    cause = lambda: model_cause("VAE", vae)  # noqa: E731
    with torch.inference_mode():
        post = vae.encode(check_finite(video[None], "the input video", "the frames hold NaN/inf values"))
        z = check_finite(
            post.sample(torch.Generator().manual_seed(seed)) if sample else post.mode(), "VAE encoding", cause
        )
        recon = check_finite(vae.decode(z)[0].float().cpu(), "VAE decoding", cause)
    video, recon = restore_size(video.float().cpu(), plan), restore_size(recon, plan)
    a, b = (video + 1) / 2, (recon + 1) / 2
    quality = float(ssim(a.double(), b.double())) if min(video.shape[-2:]) >= 11 else math.nan
    return Reconstruction(video, recon, psnr(a, b), quality)
