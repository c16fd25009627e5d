"""Loading and saving a pipeline folder: the three (or four) models and the ``PipelineConfig`` beside them.

``VideoPipeline.from_pretrained`` tells what its source is (``checkpoint.resolve_source``) and calls one of
these: ``from_preset`` (random weights from component presets), ``from_folder`` (ours, or a diffusers Wan
root) or ``from_wan_release`` (an original Wan 2.1 folder). ``save_pipeline`` writes the folder they read.

A control branch (``models.control.ControlBranch``) comes with the denoiser where the folder has one: a
diffusers ``WanVACEPipeline`` root holds it inside its transformer (split off by
``ControlledDiT.from_pretrained``), a folder of ours in ``control/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoint import CONFIG_NAME, atomic_write, is_wan_release, read_json
from ..config import DiTConfig, config_to_dict, load_config
from ..config.pipeline import PipelineConfig, PipelinePreset, check_pipeline_config
from ..models.control import ControlBranch, ControlledDiT
from ..models.dit import VideoDiT
from ..models.image import ENCODER_DIR, load_image_encoder
from ..models.text import WAN_T5_FILE, WAN_TOKENIZER, HFTextEncoder, load_text_encoder
from ..models.vae import CausalVAE
from .finetuned import read_base
from .wan import (
    WAN_DIT_FILE,
    WAN_VAE_FILE,
    diffusers_pipeline_config,
    wan_release_config,
    wan_release_missing,
)

PIPELINE_FILES = ("pipeline.json", "pipeline.yaml")
SECOND_EXPERT = ("dit_2", "transformer_2")  # a two-expert folder's low-noise expert (ours, diffusers')
CONTROL_DIR = "control"  # a pipeline folder's control branch (ControlBranch.save_pretrained)
VACE_TRANSFORMER = "WanVACETransformer3DModel"


def from_preset(cls, preset: PipelinePreset, device=None, dtype=None):
    """Random-weight pipeline from component presets; the same preset gives the same weights."""
    text_encoder = load_text_encoder(preset.text_encoder, device=device, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        vae = CausalVAE.from_pretrained(preset.vae, device=device, dtype=dtype)
        c = vae.config.latent_channels
        overrides = [f"in_channels={c}", f"out_channels={c}", f"text_dim={text_encoder.dim}"]
        dit = VideoDiT(load_config(DiTConfig, "dit", preset.dit, overrides=overrides)).eval()
        if preset.init_noise:
            with torch.no_grad():
                for p in dit.parameters():
                    p.add_(preset.init_noise * torch.randn_like(p))
    dit = dit.to(device=device, dtype=dtype) if dtype is not None else dit.to(device)
    return cls(vae.eval(), dit, text_encoder, preset.pipeline)


def from_folder(cls, folder: Path, device=None, dtype=None):
    """A pipeline folder of ours (vae/, dit/, text_encoder/, pipeline.json or .yaml), a diffusers Wan root
    (model_index.json, transformer/, ...) or an original Wan 2.1 folder, as ``cls``."""
    dits = [folder / n for n in ("dit", "transformer") if (folder / n).is_dir()]
    base = read_base(folder)  # a fine-tuned folder naming its base denoiser and LoRAs (finetuned.py)
    dits = dits or ([base.dit] if base else [])
    diffusers_root = (folder / "model_index.json").is_file()
    config_file = next((folder / n for n in PIPELINE_FILES if (folder / n).is_file()), None)
    if is_wan_release(folder):
        others = [p.name + "/" for p in dits]
        others += [n for n in ("model_index.json", *PIPELINE_FILES) if (folder / n).is_file()]
        if others:
            raise ValueError(
                f"{folder} mixes layouts (an original Wan config.json with {' and '.join(others)}); a "
                "pipeline folder is ours (dit/, pipeline.json), a diffusers one (transformer/, "
                "model_index.json) or an original Wan 2.1 one (config.json of a WanModel, Wan2.1_VAE.pth, ...)"
            )
        return from_wan_release(cls, folder, device, dtype)
    if len(dits) > 1 or (diffusers_root and config_file is not None):
        mixed = [p.name + "/" for p in dits] if len(dits) > 1 else ["model_index.json", config_file.name]
        raise ValueError(
            f"{folder} mixes layouts ({' and '.join(mixed)}); a pipeline folder is either ours (dit/, "
            "pipeline.json) or a diffusers one (transformer/, model_index.json)"
        )
    check_experts_present(folder, diffusers_root, bool(dits))
    missing = [n for n, ok in (("vae/", (folder / "vae").is_dir()), ("dit/", bool(dits)),
                               ("text_encoder/", (folder / "text_encoder").is_dir())) if not ok]  # fmt: skip
    if missing:
        raise FileNotFoundError(f"{folder} is not a pipeline folder: it lacks {', '.join(missing)}")
    text_overrides: list[str] = []
    if diffusers_root:
        config = diffusers_pipeline_config(folder)
        text_overrides = ["clean=wan"]  # Wan's prompt clean-up (html entities, runs of white space)
    else:
        try:
            config = load_config(PipelineConfig, "pipeline", None, *([config_file] if config_file else []))
            check_pipeline_config(config, config_file)
        except Exception as err:  # yaml / json syntax, unknown keys, wrong types, values out of range
            if config_file is None or str(config_file) in str(err):
                raise
            raise ValueError(f"cannot read {config_file}: {str(err).splitlines()[0]}") from err
    vae = CausalVAE.from_pretrained(folder / "vae", device=device, dtype=dtype)
    dit, control = load_denoiser(dits[0], device, dtype)
    second = folder / (SECOND_EXPERT[1] if diffusers_root else SECOND_EXPERT[0])
    dit_2 = VideoDiT.from_pretrained(second, device=device, dtype=dtype).eval() if second.is_dir() else None
    text_encoder = load_text_encoder(folder / "text_encoder", device=device, dtype=dtype,
                                     overrides=text_overrides)  # fmt: skip
    image_encoder = None
    if dit.config.image_dim is not None:  # Wan I2V / FLF2V: a CLIP vision encoder beside the denoiser
        if not (folder / ENCODER_DIR).is_dir():
            raise FileNotFoundError(
                f"{folder} holds an image-conditioned denoiser (Wan I2V / FLF2V) but no {ENCODER_DIR}/: it "
                f"needs the CLIP vision encoder (transformers CLIPVisionModel, tokens of width "
                f"{dit.config.image_dim}) in {ENCODER_DIR}/ and its processor in image_processor/ (as in "
                "diffusers' Wan I2V folders) or beside it"
            )
        image_encoder = load_image_encoder(folder, device=device, dtype=dtype)
    pipe = cls(vae, dit, text_encoder, config, image_encoder, control_branch=control, dit_2=dit_2)
    for path, scale in base.loras if base else []:  # a fine-tuned folder's LoRAs (finetuned.py)
        pipe.load_lora(path, scale=scale)
    return pipe


def check_experts_present(folder: Path, diffusers_root: bool, has_first: bool) -> None:
    """A two-expert folder (Wan 2.2 A14B) holds both experts: ``dit/`` and ``dit_2/`` with a ``boundary`` in
    pipeline.json (ours), ``transformer/`` and ``transformer_2/`` with a ``boundary_ratio`` in
    model_index.json (diffusers). FileNotFoundError naming the expert that is missing."""
    first, second = ("transformer", "transformer_2") if diffusers_root else ("dit", "dit_2")
    has_second = (folder / second).is_dir()
    if diffusers_root:
        index = read_json(folder / "model_index.json")
        wants_second = index.get("boundary_ratio") is not None or (index.get(second) or [None])[0] is not None
    else:
        config_file = next((folder / n for n in PIPELINE_FILES if (folder / n).is_file()), None)
        try:
            wants_second = config_file is not None and (
                load_config(PipelineConfig, "pipeline", None, config_file).boundary is not None
            )
        except Exception:  # a file that does not read is reported where the config is loaded
            wants_second = False
    if has_second and not has_first:
        raise FileNotFoundError(
            f"{folder} holds {second}/ (the low-noise expert of a two-expert model, Wan 2.2 A14B) but no {first}/ "
            "(the high-noise expert): a two-expert folder holds both"
        )
    if wants_second and not has_second:
        where = "model_index.json names transformer_2 / a boundary_ratio" if diffusers_root else (
            "pipeline.json sets a boundary")  # fmt: skip
        raise FileNotFoundError(
            f"{folder} is a two-expert folder ({where}) but lacks {second}/, the low-noise expert (Wan 2.2 "
            f"A14B: {first}/ takes the noisy steps, {second}/ the rest)"
        )


def load_denoiser(folder: Path, device=None, dtype=None) -> tuple[VideoDiT, ControlBranch | None]:
    """A pipeline folder's denoiser and its control branch (None where it has none): a diffusers VACE
    transformer is split in two, a branch of ours is read from the pipeline folder's ``control/``."""
    meta = read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else {}
    if meta.get("_class_name") == VACE_TRANSFORMER:
        both = ControlledDiT.from_pretrained(folder, device=device, dtype=dtype)
        return both.dit.eval(), both.control.eval()
    dit = VideoDiT.from_pretrained(folder, device=device, dtype=dtype).eval()
    control_dir = folder.parent / CONTROL_DIR
    if not control_dir.is_dir():
        return dit, None
    return dit, ControlBranch.from_pretrained(control_dir, device=device, dtype=dtype).eval()


def from_wan_release(cls, folder: Path, device=None, dtype=None):
    """An original Wan 2.1 T2V release folder as ``cls``, with Wan's conventions and defaults."""
    raw = read_json(folder / CONFIG_NAME)
    model_type = raw.get("model_type", "t2v")
    if model_type != "t2v":
        # alibaba-pai's Wan2.1-Fun Control: 48 in, 16 out
        fun = raw.get("in_dim") == 3 * raw.get("out_dim", 16)
        what = f"Wan2.1-Fun Control (in_dim {raw['in_dim']})" if fun else f"Wan 2.1 {model_type}"
        raise ValueError(
            f"{folder} is an original {what} folder: its CLIP checkpoint (open-clip XLM-RoBERTa "
            "ViT-H/14 .pth) is not read here; use the diffusers folder of the same model (its image_encoder/ "
            "is a transformers CLIPVisionModel), or VideoPipeline(vae, VideoDiT.from_pretrained(folder), "
            "text_encoder, config, image_encoder=load_image_encoder(diffusers_root))"
        )
    missing = wan_release_missing(folder)
    if missing:
        raise FileNotFoundError(
            f"{folder} is an original Wan 2.1 folder (its config.json is a WanModel's) but lacks "
            f"{', '.join(missing)}; such a folder holds config.json, {WAN_DIT_FILE} (or its .index.json), "
            f"{WAN_VAE_FILE}, {WAN_T5_FILE} and {WAN_TOKENIZER}/ (a tokenizer folder)"
        )
    vae = CausalVAE.from_pretrained(folder / WAN_VAE_FILE, device=device, dtype=dtype)
    dit = VideoDiT.from_pretrained(folder, device=device, dtype=dtype).eval()
    text_encoder = load_text_encoder(folder / WAN_T5_FILE, device=device, dtype=dtype)
    return cls(vae, dit, text_encoder, wan_release_config(folder))


def save_pipeline(pipe, folder: str | os.PathLike, copy_text_encoder: bool = True) -> None:
    """Write ``vae/``, ``dit/``, ``text_encoder/``, ``pipeline.json`` (each file atomically), for an
    image-conditioned denoiser ``image_encoder/`` (with its image processor), and ``control/`` for a control
    branch.

    ``copy_text_encoder=False`` (Hugging Face encoders only) records where the encoder was loaded from
    instead of copying its weights (UMT5-XXL is 11 GB).
    """
    folder = Path(folder)
    if not copy_text_encoder and not isinstance(pipe.text_encoder, HFTextEncoder):
        raise ValueError("copy_text_encoder=False applies to Hugging Face text encoders only")
    for dit in (pipe.dit, pipe.dit_2):  # before any file is written: no half-saved folder
        if dit is not None:
            dit.check_saveable()
    pipe.vae.save_pretrained(folder / "vae")
    pipe.dit.save_pretrained(folder / "dit")
    if pipe.dit_2 is not None:
        pipe.dit_2.save_pretrained(folder / SECOND_EXPERT[0])
    if pipe.control_branch is not None:
        pipe.control_branch.save_pretrained(folder / CONTROL_DIR)
    kwargs = {} if copy_text_encoder else {"copy": False}
    pipe.text_encoder.save_pretrained(folder / "text_encoder", **kwargs)
    if pipe.image_encoder is not None:
        pipe.image_encoder.save_pretrained(folder / ENCODER_DIR)
    text = json.dumps(config_to_dict(pipe.config), indent=2)
    atomic_write(folder / "pipeline.json", lambda p: Path(p).write_text(text))
