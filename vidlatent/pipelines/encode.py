"""Clips to latent files and back: ``encode_clips``, ``decode_latents``, ``latent_stats``, ``reconstruct``.

Letters: b batch, c channels, t frames, h height, w width.

A latent file is one safetensors file per clip, named ``<stem>-<12 hex of the source's absolute path>``
(stable across runs, distinct for same-named clips in different folders). It holds

* tensors: ``latents`` (c t h w), float32 unless asked otherwise; ``logvar`` (raw, same shape) on request;
* metadata (safetensors string metadata; structured values are JSON):
  ``format`` = "vidlatent.latents", ``format_version``, ``vidlatent_version``, ``source`` (absolute path),
  ``source_info`` (what ``read_video`` did: ``frame_indices``, ``fps``, ``size``, ``crop``, ``frame_policy``,
  ``frames_trimmed``, ``frames_padded``, source frame count / fps / size, backend), ``normalized``
  ("true": ``(raw - latents_mean) / latents_std``; "false": raw), ``latents_mean`` / ``latents_std`` (the
  statistics that normalize, so a file denormalizes without its VAE), ``latent`` ("mode" = posterior mean,
  or "sample"), ``vae`` (``fingerprint``, ``src``, ``config``) and ``settings`` (every option that shaped
  the file; resuming compares them).

Writes are atomic (a temporary name in the output folder, then a rename), so an output that exists is
complete: a rerun skips it, and a leftover temporary file from a killed run is removed. Under ``torchrun``
(``WORLD_SIZE`` / ``RANK`` set) each process takes every world_size-th clip; no process group is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..checkpoint import atomic_write, is_disk_full
from ..checks import check_finite, check_weights_finite, model_cause
from ..config import config_to_dict, list_presets, load_config
from ..data.io import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    fit_to_multiple,
    read_video,
    restore_size,
    write_video,
)
from ..models.vae import CausalVAE, DiagonalGaussian

__all__ = [
    "ChannelStats",
    "JobReport",
    "Reconstruction",
    "decode_latents",
    "encode_clips",
    "expand_paths",
    "latent_name",
    "latent_stats",
    "load_latents",
    "load_vae",
    "psnr",
    "read_latent_metadata",
    "reconstruct",
    "shard",
    "ssim",
    "vae_fingerprint",
    "write_stats",
]

FORMAT = "vidlatent.latents"
FORMAT_VERSION = "1"
LATENT_SUFFIX = ".safetensors"
DECODE_FORMATS = ("mp4", "webm", "gif", "png", "frames")
_TMP_SUFFIX = ".tmp" + LATENT_SUFFIX  # what checkpoint.atomic_write appends to its temporary names
_RUNTIME_FIELDS = ("chunk_size", "tile_size", "tile_overlap", "auto_tile_above")  # not part of identity
# settings added after files were written: what a file without them was made with
LATER_SETTINGS = {"size_policy": "crop"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LUMA = (0.299, 0.587, 0.114)  # BT.601


# ----------------------------------------------------------------------------------------------- helpers


def _reason(err: BaseException) -> str:
    """``Type: first line of the message`` for a report."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _version() -> str:
    from .. import __version__

    return __version__


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[value]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def latent_name(source: str | os.PathLike) -> str:
    """Output file name of a clip: ``<stem>-<first 12 hex of sha256(absolute path)>.safetensors``."""
    path = Path(os.path.realpath(Path(source).expanduser()))  # a looping link resolves (to itself) too
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._")[:64] or "clip"
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return f"{stem}-{digest}{LATENT_SUFFIX}"


def vae_fingerprint(vae: CausalVAE) -> str:
    """16 hex digits identifying a VAE by value: its config (minus runtime fields such as chunk and tile
    sizes, which do not change what it computes) and every weight, hashed as float32 in key order."""
    cfg = {k: v for k, v in config_to_dict(vae.config).items() if k not in _RUNTIME_FIELDS}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


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
    if str(model) == "default" and not Path(model).exists():
        from .video import default_model_folder

        model = default_model_folder()
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


# --------------------------------------------------------------------------------------- latent file IO


def read_latent_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a latent file, JSON fields decoded (reads the header only).

    Raises ValueError when the file is not a vidlatent latent file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no latent file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file ({_reason(err)})") from err
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vidlatent latent file (format {raw.get('format')!r})")
    meta = dict(raw)
    for key in ("source_info", "latents_mean", "latents_std", "vae", "settings"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    meta["normalized"] = raw.get("normalized") == "true"
    return meta


def load_latents(path: str | os.PathLike, raw: bool = True) -> tuple[torch.Tensor, dict]:
    """Read a latent file: ``(latents (c t h w) float32, metadata)``.

    ``raw=True`` undoes the normalization of normalized files with the statistics stored in the file, so
    the result is what ``vae.encode`` gave; ``raw=False`` returns the stored tensor as it is.
    """
    meta = read_latent_metadata(path)
    try:
        z = load_file(str(path))["latents"].float()
    except Exception as err:
        raise ValueError(f"cannot read the latents in {path} ({_reason(err)})") from err
    if raw and meta["normalized"]:
        shape = (-1,) + (1,) * (z.dim() - 1)
        mean = torch.tensor(meta["latents_mean"], dtype=torch.float64).view(shape)
        std = torch.tensor(meta["latents_std"], dtype=torch.float64).view(shape)
        z = (z.double() * std + mean).float()
    return z, meta


def latent_file_metadata(vae: CausalVAE, vae_src: str, normalized: bool, settings: dict) -> dict:
    """The metadata every latent file of one job shares (format, statistics, VAE identity, settings)."""
    cfg = vae.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vidlatent_version": _version(),
        "normalized": "true" if normalized else "false",
        "latents_mean": list(cfg.latents_mean),
        "latents_std": list(cfg.latents_std),
        "latent": settings.get("latent", "mode"),
        "vae": {
            "fingerprint": vae_fingerprint(vae),
            "src": vae_src or "unknown",
            "config": config_to_dict(cfg),
        },
        "settings": settings,
    }


def _write_latents(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=strings))


def _stale_temporaries(folder: Path, names: set[str]) -> list[Path]:
    """Temporary files that ``atomic_write`` left behind for outputs named in ``names`` (a killed run)."""
    if not folder.is_dir():
        return []
    out = []
    for entry in os.scandir(folder):
        if entry.name.startswith(".") and entry.name.endswith(_TMP_SUFFIX):
            target = entry.name[1 : -len(_TMP_SUFFIX)].rsplit(".", 1)[0]
            if target in names:
                out.append(Path(entry.path))
    return out


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
        overwrite: re-encode clips whose output exists; without it a matching output is skipped and one made
            with other settings (or from another source) is reported as failed.
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
    for tmp in _stale_temporaries(out_dir, set(names.values())):
        tmp.unlink(missing_ok=True)
    todo, done_before = [], set()
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
        meta = {**common_meta, "source": str(p.resolve()), "source_info": info}
        _write_latents(out_dir / names[p], tensors, meta)
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


def _all_ranks(stats: ChannelStats) -> ChannelStats:
    """Merge every rank's statistics under torchrun (gloo process group made for it if there is none)."""
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    try:
        parts = [None] * dist.get_world_size()
        state = (stats.count, stats.mean, stats.m2)
        dist.all_gather_object(parts, state)
    finally:
        if own:
            dist.destroy_process_group()
    total = ChannelStats()
    for count, mean, m2 in parts:
        if count:
            total.merge_moments(count, mean, m2)
    return total


def latent_stats(
    latent_files: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    all_ranks: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of the RAW latents in a set of latent files or folders.

    Normalized files are denormalized first, so the result is what ``latents_mean`` / ``latents_std`` of a
    VAE config should hold for that VAE on such data. Values accumulate in float64 (``ChannelStats``).
    ``all_ranks=True`` (under torchrun) merges every rank's files and returns the same result on each.
    Returns float64 tensors (c,). Raises ValueError on an unreadable file or when there are no files.
    """
    if isinstance(latent_files, (str, os.PathLike)):
        latent_files = [latent_files]
    stats = ChannelStats()
    files = expand_paths(latent_files, (LATENT_SUFFIX,))
    for f in tqdm(files, desc="stats", unit="clip", disable=not progress, dynamic_ncols=True):
        z, _ = load_latents(f, raw=True)
        stats.update(z)
    if all_ranks and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        stats = _all_ranks(stats)
    if not stats.count:
        raise ValueError("no latent files to compute statistics over")
    return stats.mean, stats.std


def write_stats(path: str | os.PathLike, mean: torch.Tensor, std: torch.Tensor) -> Path:
    """Write ``latents_mean`` / ``latents_std`` as .yaml/.yml or .json (atomically), in the form of the
    VAE config fields, ready to merge into a VAE's config. Returns the path."""
    path = Path(path)
    data = {
        "latents_mean": [round(float(v), 6) for v in mean],
        "latents_std": [round(float(v), 6) for v in std],
    }
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


# ----------------------------------------------------------------------------------------------- metrics


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all values: ``10 log10(data_range^2 / MSE)``; inf when equal."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, c1: float, c2: float) -> torch.Tensor:
    """Per-window SSIM of single-channel images (n, 1, h, w) with the separable window ``g`` (1D, sums to
    1) and the stability constants ``c1``, ``c2`` ("valid" windows only); differentiable."""
    gh, gw = g.view(1, 1, -1, 1).to(x), g.view(1, 1, 1, -1).to(x)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, gh), gw)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    channels: str = "rgb",
    window: int = 11,
    sigma: float = 1.5,
) -> float:
    """Structural similarity (Wang et al. 2004) of two clips (c t h w) or images (c h w) in [0, data_range].

    The standard form: an 11x11 gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, statistics over the
    windows that fit inside the frame ("valid", as the reference MATLAB code). ``channels="rgb"`` averages
    the per-channel SSIM (as torchmetrics / pytorch-msssim do); ``"luma"`` uses BT.601 luma only. The
    result is the mean over frames (every frame has the same number of windows). 1.0 for equal inputs.
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 3:
        a, b = a[:, None], b[:, None]
    if a.dim() != 4:
        raise ValueError(f"ssim takes (c, t, h, w) or (c, h, w), got {tuple(a.shape)}")
    if channels not in ("rgb", "luma"):
        raise ValueError(f"channels must be 'rgb' or 'luma', got {channels!r}")
    if min(a.shape[-2:]) < window:
        raise ValueError(
            f"ssim needs frames of at least {window}x{window} pixels, got {a.shape[-1]}x{a.shape[-2]}"
        )
    if channels == "luma":
        if a.shape[0] != 3:
            raise ValueError(f"luma needs 3 (RGB) channels, got {a.shape[0]}")
        w = torch.tensor(_LUMA, dtype=torch.float64).view(3, 1, 1, 1)
        a, b = (a.double() * w).sum(0, keepdim=True), (b.double() * w).sum(0, keepdim=True)
    g = gaussian_window(window, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    total, count = 0.0, 0
    for i in range(0, a.shape[1], 8):  # a few frames at a time bounds the float64 working memory
        x = rearrange(a[:, i : i + 8].double(), "c t h w -> (t c) 1 h w")
        y = rearrange(b[:, i : i + 8].double(), "c t h w -> (t c) 1 h w")
        smap = ssim_map(x, y, g, c1, c2)
        total += smap.sum().item()
        count += smap.numel()
    return total / count


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
    quality = ssim(a, b) if min(video.shape[-2:]) >= 11 else math.nan
    return Reconstruction(video, recon, psnr(a, b), quality)
