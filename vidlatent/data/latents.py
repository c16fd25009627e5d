"""The latent file format: what ``vidlatent encode`` writes and the trainer and ``vidlatent decode`` read.

A latent file is one safetensors file per clip, named ``<stem>-<12 hex of the source's absolute path>``
(stable across runs, distinct for same-named clips in different folders). It holds

* tensors: ``latents`` (c t h w), float32 unless asked otherwise; ``logvar`` (raw, same shape) on request;
* metadata (safetensors string metadata; structured values are JSON):
  ``format`` = "vidlatent.latents", ``format_version``, ``vidlatent_version``, ``source`` (absolute path),
  ``source_stamp`` (its size and modification time when encoded: a resumed job encodes a changed source again),
  ``source_info`` (what ``read_video`` did: ``frame_indices``, ``fps``, ``size``, ``crop``, ``frame_policy``,
  ``frames_trimmed``, ``frames_padded``, source frame count / fps / size, backend), ``normalized``
  ("true": ``(raw - latents_mean) / latents_std``; "false": raw), ``latents_mean`` / ``latents_std`` (the
  statistics that normalize, so a file denormalizes without its VAE), ``latent`` ("mode" = posterior mean,
  or "sample"), ``vae`` (``fingerprint``, ``src``, ``config``) and ``settings`` (every option that shaped
  the file; resuming compares them).

Writes are atomic (``checkpoint.atomic_write``: a temporary name in the output folder, then a rename), so a
file that exists is complete.

Letters: c channels, t frames, h height, w width.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_write
from ..config import config_to_dict
from ..errors import error_reason

if TYPE_CHECKING:
    from ..models.vae import CausalVAE

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LATENT_SUFFIX",
    "LATER_SETTINGS",
    "latent_file_metadata",
    "latent_name",
    "load_latents",
    "read_latent_metadata",
    "vae_fingerprint",
    "write_latents",
]

FORMAT = "vidlatent.latents"
FORMAT_VERSION = "1"
LATENT_SUFFIX = ".safetensors"
# settings added after files were written: what a file without them was made with
LATER_SETTINGS = {"size_policy": "crop"}
_RUNTIME_FIELDS = ("chunk_size", "tile_size", "tile_overlap", "auto_tile_above")  # not part of identity
_JSON_FIELDS = (
    "source_info", "latents_mean", "latents_std", "first_latents_mean", "first_latents_std", "vae", "settings"
)  # fmt: skip


def _version() -> str:
    from .. import __version__

    return __version__


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
        raise ValueError(f"{path} is not a readable safetensors file ({error_reason(err)})") from err
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vidlatent latent file (format {raw.get('format')!r})")
    meta = dict(raw)
    for key in _JSON_FIELDS:
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
        raise ValueError(f"cannot read the latents in {path} ({error_reason(err)})") from err
    if raw and meta["normalized"]:
        z = z.double()
        mean, std = file_statistics(z, meta)
        z = (z * std + mean).float()
    return z, meta


def file_statistics(z: torch.Tensor, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalization statistics a latent file's metadata stores, shaped for its latents ``z`` (c, t, h, w):
    ``latents_mean`` / ``latents_std`` per channel, and the first frame's own when the VAE had them."""
    from ..models.vae import latent_statistics

    return latent_statistics(
        z, meta["latents_mean"], meta["latents_std"], meta.get("first_latents_mean"), meta.get("first_latents_std"),
        channel_dim=0,
    )  # fmt: skip


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
        **(
            {
                "first_latents_mean": list(cfg.first_latents_mean),
                "first_latents_std": list(cfg.first_latents_std),
            }
            if cfg.first_latents_mean is not None
            else {}
        ),
        "latent": settings.get("latent", "mode"),
        "vae": {
            "fingerprint": vae_fingerprint(vae),
            "src": vae_src or "unknown",
            "config": config_to_dict(cfg),
        },
        "settings": settings,
    }


def write_latents(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict, clean_stale: bool = True
) -> None:
    """Write one latent file atomically: ``tensors`` (``latents``, optionally ``logvar``) and ``metadata``
    (``latent_file_metadata`` plus the clip's ``source`` and ``source_info``; non-strings stored as JSON).
    ``clean_stale``: as ``atomic_write``'s (False where the caller cleaned the folder once before)."""
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=strings), clean_stale)
