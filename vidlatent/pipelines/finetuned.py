"""A fine-tuned pipeline folder that names its base: ``base.json`` beside ``vae/``, ``text_encoder/`` and
``pipeline.json``.

A LoRA run's ``final/`` holds the adapter (``lora.safetensors``), not a copy of the denoiser it adapts (a Wan
2.1 14B transformer is 57 GB). ``base.json`` says where that denoiser is and which LoRA files go on it::

    {"dit": "/abs/path/Wan2.1-T2V-1.3B-Diffusers/transformer", "loras": [{"path": "lora.safetensors", "scale": 1.0}]}

``dit`` is absolute, or relative to the folder (``"dit"``: the folder's own ``dit/``); LoRA paths likewise.
``pipelines.loading.from_folder`` reads it: the base denoiser stands in for a missing ``dit/``, and the LoRAs
are applied through the inference loader (``VideoPipeline.load_lora``), as ``--lora`` would.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import atomic_write, read_json

__all__ = ["BASE_FILE", "BaseRef", "fuse_base", "read_base", "write_base"]

BASE_FILE = "base.json"


@dataclass
class BaseRef:
    """What ``base.json`` says: the base denoiser's folder and the LoRA files (path, scale) to apply."""

    dit: Path
    loras: list[tuple[Path, float]] = field(default_factory=list)


def _resolve(folder: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else folder / p


def read_base(folder: str | os.PathLike) -> BaseRef | None:
    """The ``base.json`` of a pipeline folder (paths resolved against it), or None when it has none.

    ValueError when the file is malformed; FileNotFoundError naming the missing base or LoRA file."""
    folder = Path(folder)
    file = folder / BASE_FILE
    if not file.is_file():
        return None
    data = read_json(file)
    loras = data.get("loras", [])
    if not isinstance(data.get("dit"), str) or not isinstance(loras, list):
        raise ValueError(f"{file}: needs a string 'dit' (the base denoiser's folder) and a list 'loras'")
    ref = BaseRef(_resolve(folder, data["dit"]))
    for item in loras:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise ValueError(f"{file}: each of 'loras' is {{'path': FILE, 'scale': NUMBER}}; got {item!r}")
        ref.loras.append((_resolve(folder, item["path"]), float(item.get("scale", 1.0))))
    missing = [str(p) for p in (ref.dit, *(p for p, _ in ref.loras)) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{file} names what is not there: {', '.join(missing)}")
    return ref


def write_base(folder: str | os.PathLike, dit: str | os.PathLike, loras: list[tuple[str, float]]) -> Path:
    """Write ``folder/base.json`` (atomically): the base denoiser ``dit`` and the LoRA files with scales."""
    folder = Path(folder)
    text = json.dumps({"dit": str(dit), "loras": [{"path": str(p), "scale": s} for p, s in loras]}, indent=2)
    atomic_write(folder / BASE_FILE, lambda p: Path(p).write_text(text))
    return folder / BASE_FILE


def fuse_base(folder: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """The denoiser a fine-tuned ``folder`` runs, written as a denoiser folder of its own at ``dest``: the base
    its ``base.json`` names with the LoRAs fused in at their scales, as ``from_folder`` applies them. A pipeline
    assembled from it needs neither the base's path nor the adapters (the shipped model is self-contained).

    FileNotFoundError when ``folder`` has no ``base.json`` (or what it names is missing)."""
    from ..models import lora
    from ..models.dit import VideoDiT

    ref = read_base(folder)
    if ref is None:
        raise FileNotFoundError(f"{folder}: no {BASE_FILE} naming a base denoiser and LoRAs to fuse")
    dit = VideoDiT.from_pretrained(ref.dit)
    for path, scale in ref.loras:
        lora.load_lora(dit, path, scale=scale)
    if ref.loras:
        lora.fuse_lora(dit, keep_originals=False)
    dit.save_pretrained(dest)
    return Path(dest)
