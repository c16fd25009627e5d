"""Whole-checkpoint conversion: diffusers and original Wan folders into vidlatent folders.

What converts is what loads: each part goes through its model's ``from_pretrained`` and ``save_pretrained``
(a pipeline through ``VideoPipeline``'s), so a converted folder runs exactly as its source does. This module
imports the models; nothing in the library imports it back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .checkpoint import CONFIG_NAME, load_state_dict, read_json

CONVERT_KINDS = ("auto", "pipeline", "vae", "dit")


def _keys(path: Path) -> list[str]:
    """Tensor names of a checkpoint file (safetensors: header only)."""
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(load_state_dict(path))


def _file_kind(path: Path) -> str:
    keys = _keys(path)
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys):
        return "vae"
    return "dit"


def _folder_parts(src: Path) -> dict[str, Path]:
    """What a folder holds: {"vae": path, "dit": path}, one or both (pipeline roots, original Wan folders)."""
    parts: dict[str, Path] = {}
    for sub, kind in (("vae", "vae"), ("dit", "dit"), ("transformer", "dit")):
        if (src / sub / CONFIG_NAME).is_file() and kind not in parts:
            parts[kind] = src / sub
    if parts:
        return parts
    if (src / CONFIG_NAME).is_file():
        raw = read_json(src / CONFIG_NAME)
        declared = raw.get("_vidlatent_kind")
        name = raw.get("_class_name")
        if declared in ("vae", "dit"):
            return {declared: src}
        if name == "AutoencoderKLWan":
            return {"vae": src}
        if name in ("WanTransformer3DModel", "WanModel") or {"dim", "num_heads"} <= set(raw):
            parts = {"dit": src}
            if (src / "Wan2.1_VAE.pth").is_file():  # an original Wan 2.1 release folder
                parts["vae"] = src / "Wan2.1_VAE.pth"
            return parts
        raise ValueError(f"{src / CONFIG_NAME} describes a {name or 'model'} that vidlatent cannot convert")
    raise ValueError(
        f"{src} is not a model folder: no config.json, and no vae/, dit/ or transformer/ subfolder"
    )


def is_pipeline_root(src: Path) -> bool:
    """A folder holding a whole pipeline: VAE, denoiser and text encoder (ours, or a diffusers root), or an
    original Wan 2.1 folder with its text encoder (Wan's T5 checkpoint or its tokenizer folder; loading then names
    any part it lacks)."""
    from .models.text import WAN_T5_FILE, WAN_TOKENIZER
    from .pipelines.video import is_wan_release

    if not src.is_dir():
        return False
    if is_wan_release(src):
        return (src / WAN_T5_FILE).is_file() or (src / WAN_TOKENIZER).is_dir()
    has_dit = any((src / n).is_dir() for n in ("dit", "transformer"))
    return has_dit and (src / "vae").is_dir() and (src / "text_encoder").is_dir()


def convert_pipeline(src: str | Path, out_dir: str | Path, copy_text_encoder: bool = True) -> Path:
    """A pipeline root (a diffusers Wan folder, an original Wan 2.1 folder, or ours) -> a complete vidlatent
    pipeline folder: ``vae/``, ``dit/``, ``text_encoder/`` (with its tokenizer) and ``pipeline.json`` holding the
    source's conventions and sampler settings, so that the folder generates exactly what the source does.

    ``copy_text_encoder=False`` writes no text-encoder weights and records where they are (for multi-GB
    encoders such as UMT5-XXL; the folder then needs the source to stay where it is).
    """
    from .pipelines.video import VideoPipeline

    src, out_dir = Path(src), Path(out_dir)
    if not is_pipeline_root(src):
        raise ValueError(
            f"{src} is not a pipeline folder: it needs vae/, transformer/ (or dit/) and text_encoder/, or is "
            "an original Wan 2.1 folder (config.json, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, "
            "google/umt5-xxl/)"
        )
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} exists and is not an empty folder; choose another output")
    pipe = VideoPipeline.from_pretrained(src)
    # written beside the output and renamed into place, so an interrupted run leaves no folder that looks whole
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pipe.save_pretrained(tmp, copy_text_encoder=copy_text_encoder)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def convert_checkpoint(
    src: str | Path, out_dir: str | Path, kind: str = "auto", copy_text_encoder: bool = True
) -> dict[str, Path]:
    """Convert a diffusers folder or original Wan 2.1 checkpoint into vidlatent folders, via each model's
    ``from_pretrained`` and ``save_pretrained`` (so what converts is exactly what loads).

    ``src``: a diffusers ``AutoencoderKLWan`` / ``WanTransformer3DModel`` folder, a diffusers pipeline root
    (``vae/`` + ``transformer/``), an original Wan 2.1 folder or checkpoint file (``Wan2.1_VAE.pth``,
    ``diffusion_pytorch_model.safetensors``), or a vidlatent folder. ``kind``: "pipeline", "vae", "dit" or
    "auto" (a root with a text encoder is a pipeline, an original Wan folder with its T5 checkpoint and tokenizer
    too, see ``convert_pipeline``; otherwise told from the folder's config or the file's tensor names). One model
    is written into ``out_dir`` itself; when ``kind="auto"`` finds both models and no text encoder, they go to
    ``out_dir/vae`` and ``out_dir/dit``.
    ``copy_text_encoder``: see ``convert_pipeline``. Returns {kind: folder written}.
    """
    from .models.dit import VideoDiT
    from .models.vae import CausalVAE

    if kind not in CONVERT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(CONVERT_KINDS)}, got {kind!r}")
    src, out_dir = Path(src), Path(out_dir)
    if not src.exists():
        raise FileNotFoundError(f"nothing to convert at {src}")
    if kind == "pipeline" or (kind == "auto" and is_pipeline_root(src)):
        return {"pipeline": convert_pipeline(src, out_dir, copy_text_encoder)}
    parts = _folder_parts(src) if src.is_dir() else {_file_kind(src): src}
    if kind != "auto":
        if kind not in parts:
            if src.is_dir() and len(parts) == 1:  # e.g. kind=vae on a folder that looks like a dit
                raise ValueError(f"{src} holds a {next(iter(parts))}, not a {kind}")
            parts = {kind: src}
        parts = {kind: parts[kind]}
    if out_dir.resolve() in {p.resolve() for p in parts.values()}:
        raise ValueError(f"the output folder {out_dir} is the source; choose another")
    written = {}
    for part, path in parts.items():
        folder = out_dir / part if len(parts) > 1 else out_dir
        model = CausalVAE.from_pretrained(path) if part == "vae" else VideoDiT.from_pretrained(path)
        model.save_pretrained(folder)
        written[part] = folder
    return written
