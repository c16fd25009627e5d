"""Loading typed configs: yaml presets, files and ``key=value`` overrides merged into dataclasses.

Every component takes one dataclass config. Presets are yaml files under ``vidlatent/configs/<kind>/``
(shipped inside the package so ``from_pretrained("tiny")`` works after ``pip install``); omegaconf merges
a preset, further yaml files and ``key=value`` dotlist overrides into the dataclass, checking types.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

PRESET_DIR = Path(__file__).parent.parent / "configs"

T = TypeVar("T")


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
    """A yaml (or JSON) file as an OmegaConf node; ValueError naming the file when it cannot be parsed (a .json
    file in JSON's words: its line and what JSON expected there)."""
    if str(path).lower().endswith(".json"):
        from ..checkpoint import read_json  # its errors are ValueErrors (ModelLoadError)

        return OmegaConf.create(read_json(path))
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
            arch = f"{preset}-arch"
            hint = (  # "default" names the shipped model's trained weights; its architecture is "default-arch"
                f" ({preset!r} names the shipped model's trained weights: load them with from_pretrained or "
                f"give their folder; the random-weight preset of its architecture is {arch!r})"
                if (PRESET_DIR / kind / f"{arch}.yaml").is_file()
                else ""
            )
            raise ValueError(
                f"unknown {kind} preset {preset!r}; available: {', '.join(list_presets(kind))}{hint}"
            )
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
