"""Typed configs and their yaml presets.

Every component takes one dataclass config. Presets are yaml files under ``vidlatent/configs/<kind>/``
(shipped inside the package so ``from_pretrained("tiny")`` works after ``pip install``); omegaconf merges
a preset, further yaml files and ``key=value`` dotlist overrides into the dataclass, checking types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

PRESET_DIR = Path(__file__).parent / "configs"

T = TypeVar("T")

# Wan 2.1 VAE latent statistics (per channel), as published with the model.
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip


@dataclass
class VAEConfig:
    """The Wan 2.1 causal VAE family. Defaults are the Wan 2.1 VAE itself."""

    in_channels: int = 3
    base_channels: int = 96
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    # one entry per downsampling stage (len(channel_mult) - 1); True = that stage also halves time
    temporal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    latent_channels: int = 16
    dropout: float = 0.0
    latents_mean: list[float] = field(default_factory=lambda: list(WAN21_LATENTS_MEAN))
    latents_std: list[float] = field(default_factory=lambda: list(WAN21_LATENTS_STD))
    # streaming: latent frames per chunk after the first (the first frame is always its own chunk)
    chunk_size: int = 1
    # spatial tiling, in pixels; tiling switches on automatically when h or w exceeds auto_tile_above
    tile_size: int = 256
    tile_overlap: int = 64
    auto_tile_above: int = 1024

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)


def merge_config(base: Any, *parts: Any) -> Any:
    """``base`` (a config dataclass or an instance of one) with ``parts`` (dicts / OmegaConf nodes) merged over it
    in order, as the dataclass. An unknown key or a value of the wrong type raises ``ValueError`` naming it (and,
    for an unknown key, the accepted ones) instead of OmegaConf's traceback."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), *parts))
    except ConfigKeyError as err:
        names = ", ".join(f.name for f in dataclasses.fields(base))
        raise ValueError(f"bad option: {str(err).splitlines()[0]}; accepted: {names}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ValueError(f"bad option{f' {key}' if key else ''}: {str(err).splitlines()[0]}") from None


def load_yaml(path: str | Path) -> Any:
    """A yaml (or JSON) file as an OmegaConf node; ValueError naming the file when it cannot be parsed."""
    try:
        return OmegaConf.load(path)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except UnicodeDecodeError:
        raise ValueError(f"cannot read {path}: not a text file") from None
    except Exception as err:  # yaml.YAMLError: its message names the file, line and column
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise ValueError(text if str(path) in text else f"cannot read {path}: {text}") from None


def _structured(cls: type[T], data: Any) -> T:
    return merge_config(cls, data)


def list_presets(kind: str) -> list[str]:
    """Names of the shipped presets of one kind (``vae``, ``dit``, ...)."""
    folder = PRESET_DIR / kind
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_config(cls: type[T], kind: str, preset: str | None = None, *files: str | Path, overrides=()) -> T:
    """Build a ``cls`` config from a preset name, extra yaml files and ``key=value`` overrides (in order)."""
    parts = []
    if preset is not None:
        path = PRESET_DIR / kind / f"{preset}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown {kind} preset {preset!r}; available: {', '.join(list_presets(kind))}")
        parts.append(OmegaConf.load(path))
    parts += [load_yaml(f) for f in files]
    if overrides:
        parts.append(OmegaConf.from_dotlist(list(overrides)))
    return merge_config(cls, *parts)


def config_from_dict(cls: type[T], data: dict) -> T:
    """Typed config from a plain dict (as stored in a vidlatent folder's config.json); unknown keys fail."""
    return _structured(cls, data)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


@dataclass
class DiTConfig:
    """The Wan 2.1 transformer family: text-to-video, and by ``image_dim`` the image-conditioned I2V / FLF2V
    variant. Defaults are Wan 2.1 T2V-1.3B."""

    in_channels: int = 16
    out_channels: int = 16
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (t, h, w)
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256  # sinusoidal timestep embedding width
    text_dim: int = 4096
    text_len: int = 512  # text tokens the model was trained with (context is padded to this)
    num_heads: int = 12
    num_layers: int = 30
    qk_norm: str = "rms_across_heads"  # "rms_across_heads" | "none"
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # Image conditioning (Wan 2.1 I2V / FLF2V): the width of the CLIP image tokens the model cross-attends to
    # (1280), through its own key/value projections; None = a text-to-video model. Such a model also takes
    # in_channels - out_channels condition channels (Wan: 4 mask + 16 image latents = 36 in, 16 out).
    image_dim: int | None = None
    # FLF2V: a learned position embedding over the image tokens of both frames (2 x 257 = 514); None = none
    image_pos_len: int | None = None
    attention: str = "sdpa"  # the attention kernel used by models.layers.attention
    gradient_checkpointing: bool = False

    @property
    def condition_channels(self) -> int:
        """Channels concatenated to the noisy latents before the patch embedding (0 for text-to-video)."""
        return self.in_channels - self.out_channels
