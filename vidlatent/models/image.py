"""The image encoder of image-conditioned denoisers (Wan 2.1 I2V / FLF2V): a CLIP vision tower from local files.

``ImageEncoder.encode(images) -> (b, i, d)`` float32: the hidden states of the vision transformer's penultimate
layer, every token (class token and patches; 257 x 1280 for Wan's ViT-H/14 at 224 px). That is what Wan's
``clip.visual(..., use_31_block=True)`` returns and what diffusers' ``WanImageToVideoPipeline`` feeds its
transformer (``hidden_states[-2]``). Images are prepared by the folder's ``CLIPImageProcessor``, as diffusers does
(resize of the short side, centre crop, CLIP's mean/std); original Wan instead squeezes the whole image to 224 x
224, which differs for images that are not square.

``load_image_encoder(src)`` takes a transformers CLIP vision folder (``CLIPVisionModel``, or a whole ``CLIPModel``
whose vision tower is used) with its ``preprocessor_config.json`` beside it or in a sibling ``image_processor/``,
or a pipeline root holding ``image_encoder/`` (+ ``image_processor/``), as diffusers' Wan I2V folders do. Needs
``pip install vidlatent[text]`` (transformers); reads local files only and never runs remote code.

Letters: b batch, i image tokens, d token width, h w pixels.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange

from ..checkpoint import CONFIG_NAME, named_part, read_json
from .text import _dtype_kwarg, _import_transformers, _replace_dir

ENCODER_DIR, PROCESSOR_DIR = "image_encoder", "image_processor"  # diffusers' pipeline layout, and ours
PROCESSOR_CONFIG = "preprocessor_config.json"
CLIP_MODEL_TYPES = ("clip_vision_model", "clip")


class ImageEncoder(nn.Module):
    """A CLIP vision tower and its image processor: ``encode(images) -> (b, tokens, dim)`` float32."""

    def __init__(self, model: nn.Module, processor):
        super().__init__()
        self.model, self.processor = model, processor

    @property
    def dim(self) -> int:
        """Width of the tokens (1280 for Wan's ViT-H/14)."""
        return int(self.model.config.hidden_size)

    @property
    def tokens(self) -> int:
        """Tokens per image: one per patch of the processed image, plus the class token (257 for Wan)."""
        cfg = self.model.config
        return (cfg.image_size // cfg.patch_size) ** 2 + 1

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(b, 3, h, w)`` in [-1, 1], any size -> penultimate-layer tokens ``(b, tokens, dim)`` float32.

        The images go to the processor as 8-bit pixels (what it would read from a file), so an image read from
        a PNG gives exactly what diffusers gets from the same PNG opened with Pillow.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (b, 3, h, w) in [-1, 1]; got shape {tuple(images.shape)}")
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        batch = self.processor(
            images=list(rearrange(pixels, "b c h w -> b h w c").numpy()), return_tensors="pt"
        )
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=batch["pixel_values"].to(self.device, dtype), output_hidden_states=True)
        return out.hidden_states[-2].float()

    @classmethod
    def from_pretrained(cls, src: str | Path, device=None, dtype=None, overrides=None) -> ImageEncoder:
        """``load_image_encoder`` under the loaders' common signature. The CLIP model's own config is read as
        stored: ``overrides`` must be empty (a ValueError says so otherwise)."""
        if overrides:
            raise ValueError(
                f"the image encoder takes no config overrides (its config is the CLIP model's); got {overrides}"
            )
        return load_image_encoder(src, device=device, dtype=dtype)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the CLIP vision folder (config, safetensors and ``preprocessor_config.json``) that
        ``load_image_encoder`` reads back; written beside it and renamed into place (a whole folder or none)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            self.model.save_pretrained(str(tmp))
            self.processor.save_pretrained(str(tmp))
            _replace_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def load_image_encoder(src: str | Path, device=None, dtype=None) -> ImageEncoder:
    """Load an ``ImageEncoder`` from a CLIP vision folder or a pipeline root with ``image_encoder/`` (see the module
    docstring), or a shipped model's name (its ``image_encoder/``). ``dtype`` defaults to the checkpoint's. A clear
    ``FileNotFoundError`` names what is missing."""
    transformers = _import_transformers()
    path = Path(named_part(src, "image"))
    if (path / ENCODER_DIR / CONFIG_NAME).is_file():
        path = path / ENCODER_DIR
    accepted = (
        "a transformers CLIP vision folder (config.json with model_type clip_vision_model or clip, weights, and "
        f"{PROCESSOR_CONFIG}) or a pipeline root with {ENCODER_DIR}/ and {PROCESSOR_DIR}/"
    )
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no image encoder at {src}: expected {accepted}")
    model_type = read_json(path / CONFIG_NAME).get("model_type")
    if model_type not in CLIP_MODEL_TYPES:
        raise ValueError(
            f"{path} holds a {model_type!r} model, not a CLIP vision encoder; expected {accepted}"
        )
    processor_dir = next(
        (p for p in (path, path.parent / PROCESSOR_DIR) if (p / PROCESSOR_CONFIG).is_file()), None
    )
    if processor_dir is None:
        raise FileNotFoundError(
            f"the image encoder at {path} has no {PROCESSOR_CONFIG} (looked in it and in "
            f"{path.parent / PROCESSOR_DIR}); expected {accepted}"
        )
    has_safetensors = any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
    model = transformers.CLIPVisionModel.from_pretrained(
        str(path), local_files_only=True, use_safetensors=has_safetensors, **_dtype_kwarg(transformers, dtype)
    )
    processor = transformers.CLIPImageProcessor.from_pretrained(str(processor_dir), local_files_only=True)
    return ImageEncoder(model.requires_grad_(False).eval(), processor).to(device)
