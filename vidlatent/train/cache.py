"""The disk cache of a fine-tuning run: a pipeline folder's VAE latents and text embeddings of a captioned
video folder, computed once so that training loads neither the VAE nor the text encoder.

``prepare_cache(cfg, parts, dist, device)`` (the denoiser task calls it when ``cfg.pipeline`` names a folder
and ``cfg.data`` a folder of clips) fills ``cfg.cache`` (default ``<output>/cache``)::

    cache.json            which VAE and text encoder made it (folder fingerprints), the text layout, the
                          frame options; a cache made otherwise is refused naming both
    latents/              one latent file per clip (``vidlatent encode``'s format: ``pipelines.batch.encode_clips``)
    metadata.jsonl        latent file -> caption, for the clips that made it in
    text/<hash>.safetensors   one caption's real tokens (k d) and the padded length the pipeline gives them
    text_encoder/         the text encoder as a pointer (Hugging Face encoders) or a copy (built-in ones), for
                          the exported pipeline folder

Each part is resumable (a rerun skips clips and captions already there; files are written atomically) and
sharded by rank under torchrun (clips and captions ``[rank::world_size]``, then a barrier). Clips that cannot
be used (no caption, fewer frames than asked, unreadable) are listed once and skipped; so are caption rows
that name no clip.

Letters: n text tokens, k real text tokens, d text width.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import atomic_write, files_fingerprint, named_part, read_json
from ..config import load_config
from ..config.pipeline import PipelineConfig, check_pipeline_config
from ..config.train import TrainConfig
from ..data.io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, probe
from ..data.latents import LATENT_SUFFIX, latent_name
from ..data.paths import expand_paths, shard
from . import distributed
from .data import read_captions
from .distributed import Dist

__all__ = [
    "CACHE_FILE",
    "DATA_OPTIONS",
    "CachePlan",
    "PipelineParts",
    "TextStore",
    "is_clip_folder",
    "prepare_cache",
]

CACHE_FILE = "cache.json"
CACHE_FORMAT = "vidlatent.finetune-cache"
# data_options a fine-tuning run passes to encode_clips (frame selection and size), and their defaults
DATA_OPTIONS = {"frames": None, "size": None, "fps": None, "stride": 1, "start": 0, "size_policy": "crop"}
_TEXT_BATCH = 8


# --------------------------------------------------------------------------------------- the pipeline


@dataclass
class PipelineParts:
    """Where a pipeline folder (ours, or a diffusers Wan root) keeps each model, and its config: what a
    fine-tuning run loads one at a time, never all together."""

    folder: Path
    dit: Path
    vae: Path
    text: list[Path]  # the text encoder's folder(s): model (and a diffusers root's tokenizer/)
    text_overrides: list[str]
    config: PipelineConfig

    @classmethod
    def of(cls, src: str | os.PathLike) -> PipelineParts:
        """The parts of the pipeline folder ``src`` ("default": the shipped model); ValueError naming what a
        pipeline folder holds when it is not one."""
        src = named_part(src, "pipeline")  # a shipped model's name: its pipeline folder
        folder = Path(src)
        if not folder.is_dir():
            raise ValueError(
                f"pipeline={src}: not a folder; give a pipeline folder (ours: vae/, dit/, text_encoder/, "
                "pipeline.json; or a diffusers Wan root: model_index.json, transformer/, vae/, text_encoder/)"
            )
        from ..pipelines.loading import PIPELINE_FILES
        from ..pipelines.wan import diffusers_pipeline_config

        dits = [folder / n for n in ("dit", "transformer") if (folder / n).is_dir()]
        missing = [n for n, ok in (("vae/", (folder / "vae").is_dir()), ("dit/ or transformer/", bool(dits)),
                                   ("text_encoder/", (folder / "text_encoder").is_dir())) if not ok]  # fmt: skip
        if missing:
            raise ValueError(
                f"pipeline={src} is not a pipeline folder to fine-tune: it lacks {', '.join(missing)} (an "
                "original Wan 2.1 release folder: convert it first with `vidlatent convert`)"
            )
        experts = [n for n in ("dit_2", "transformer_2") if (folder / n).is_dir()]
        if experts:
            raise ValueError(
                f"pipeline={src} is a two-expert model (Wan 2.2 A14B: {experts[0]}/): fine-tuning trains one "
                "denoiser; two experts are not supported"
            )
        text = [folder / "text_encoder"]
        if (folder / "model_index.json").is_file():
            config, overrides = diffusers_pipeline_config(folder), ["clean=wan"]
            text += [folder / "tokenizer"] if (folder / "tokenizer").is_dir() else []
        else:
            files = [folder / n for n in PIPELINE_FILES if (folder / n).is_file()]
            config, overrides = load_config(PipelineConfig, "pipeline", None, *files[:1]), []
            check_pipeline_config(config, files[0] if files else None)
        return cls(folder, dits[0], folder / "vae", text, overrides, config)

    @property
    def image_conditioned(self) -> bool:
        """Whether the denoiser is Wan's image-to-video one (CLIP tokens and condition latents beside x)."""
        return read_json(self.dit / "config.json").get("image_dim") is not None

    @property
    def masked(self) -> bool:
        """Whether the denoiser reads the text with its mask (ours) or every padded token (Wan)."""
        return self.config.text_attention == "masked"


def is_clip_folder(data: str | os.PathLike) -> bool:
    """Whether ``data`` is a folder of videos / images (to cache) rather than of latent files."""
    path = Path(data)
    if not path.is_dir():
        return False
    return bool(expand_paths([path], VIDEO_EXTENSIONS + IMAGE_EXTENSIONS))


# ----------------------------------------------------------------------------------------- text store


def caption_key(caption: str) -> str:
    """A caption's file stem in ``text/``."""
    return hashlib.sha256(caption.encode()).hexdigest()[:24]


@dataclass
class TextStore:
    """Cached text embeddings as the pipeline's denoiser reads them: ``encode(captions)`` -> ``(context
    (b n d), mask (b n) or None)``, zero-padded to the length the pipeline's encoder pads to (``length``,
    or the batch's longest when it pads to the longest), with the mask when the pipeline reads it
    (``masked``) and None when its denoiser attends to every token (Wan)."""

    folder: Path
    masked: bool
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # caption -> (k d), read on first use
    lengths: dict[str, int] = field(default_factory=dict)  # caption -> n (0: padded to the longest)

    def __len__(self) -> int:
        return len(self.tokens)

    def has(self, caption: str) -> bool:
        return (self.folder / f"{caption_key(caption)}{LATENT_SUFFIX}").is_file()

    def _load(self, caption: str) -> torch.Tensor:
        if caption not in self.tokens:
            path = self.folder / f"{caption_key(caption)}{LATENT_SUFFIX}"
            if not path.is_file():
                raise KeyError(f"caption {caption!r} is not in the text cache {self.folder}")
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("caption") != caption:  # a hash collision or a foreign file
                    raise ValueError(f"{path} holds caption {meta.get('caption')!r}, not {caption!r}")
                self.tokens[caption] = f.get_tensor("tokens").float()
                self.lengths[caption] = int(meta.get("length", 0))
        return self.tokens[caption]

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The captions' tokens, padded as the pipeline pads them, and their mask (None: every token read)."""
        rows = [self._load(c) for c in captions]
        n = max([r.shape[0] for r in rows] + [self.lengths[c] for c in captions])
        context = torch.zeros(len(rows), n, rows[0].shape[1])
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, r in enumerate(rows):
            context[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
        return context, (mask if self.masked else None)


def _write_text(folder: Path, captions: list[str], encoder) -> None:
    """Encode ``captions`` in batches and write one file each: the real tokens and the padded length."""
    for s in range(0, len(captions), _TEXT_BATCH):
        chunk = captions[s : s + _TEXT_BATCH]
        with torch.no_grad():
            tokens, mask = encoder.encode(chunk)
        length = tokens.shape[1] if getattr(encoder.config, "padding", "longest") == "max_length" else 0
        for c, t, m in zip(chunk, tokens, mask):
            meta = {"caption": c, "length": str(length)}
            real = {"tokens": t[m].float().cpu().contiguous()}
            path = folder / f"{caption_key(c)}{LATENT_SUFFIX}"
            atomic_write(path, lambda p, real=real, meta=meta: save_file(real, p, metadata=meta))


# ----------------------------------------------------------------------------------------- the clips


@dataclass
class CachePlan:
    """What a fine-tuning run trains on after ``prepare_cache``: the latent folder and caption table for
    ``LatentDataset``, the text embeddings, and the clips left out with why."""

    root: Path
    latents: Path
    captions: Path
    text: TextStore
    bad: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line per skipped clip after a count line (empty when nothing was skipped)."""
        if not self.bad:
            return ""
        lines = [f"skipped {len(self.bad)} item(s) of the training data:"]
        return "\n".join(lines + [f"  {p}: {why}" for p, why in self.bad])


def data_options(cfg: TrainConfig) -> dict:
    """The frame options of ``cfg.data_options`` for ``encode_clips``, defaults filled in; ValueError naming
    the accepted keys otherwise."""
    unknown = sorted(set(cfg.data_options) - set(DATA_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown data_options {', '.join(unknown)} for fine-tuning on clips; accepted: "
            + ", ".join(DATA_OPTIONS)
        )
    opts = {**DATA_OPTIONS, **cfg.data_options}
    frames = opts["frames"]
    if frames is not None and (int(frames) < 1 or (int(frames) - 1) % 4):
        raise ValueError(f"data_options.frames must be 1 + 4k (1, 5, 9, 17, ...); got {frames}")
    if opts["size"] is not None:
        opts["size"] = [int(s) for s in opts["size"]]
    return opts


def _frames_available(info: dict, opts: dict) -> int:
    """How many frames ``read_video`` would select from a clip ``probe`` described, before trimming."""
    count, start = info["frames"], opts["start"]
    if opts["fps"] is None or info["fps"] is None:
        return len(range(start, count, opts["stride"]))
    ratio, n = info["fps"] / opts["fps"], 0
    while start + int(n * ratio + 0.5) < count:
        n += 1
    return n


def _clip_captions(clips: list[Path], cfg: TrainConfig) -> tuple[dict[Path, str], list[tuple[str, str]]]:
    """({clip: caption}, [(clip or caption row, why it is left out)]): captions from ``cfg.captions`` (a
    metadata.jsonl / .csv naming clips by path or file name), else a ``.txt`` beside each clip."""
    table = read_captions(cfg.captions) if cfg.captions else {}
    found, bad, used = {}, [], set()
    for clip in clips:
        keys = [
            str(clip),
            clip.name,
            str(clip.relative_to(cfg.data)) if clip.is_relative_to(cfg.data) else None,
        ]
        key = next((k for k in keys if k is not None and k in table), None)
        if key is not None:
            found[clip] = table[key]
            used.add(Path(key).name)
        elif clip.with_suffix(".txt").is_file():
            found[clip] = clip.with_suffix(".txt").read_text().strip()
        else:
            where = f"not in {cfg.captions} and " if cfg.captions else ""
            bad.append((str(clip), f"no caption ({where}no {clip.with_suffix('.txt').name} beside it)"))
    unused = sorted({Path(k).name for k in table} - used)  # rows whose file name is no clip's
    if unused:
        shown = ", ".join(unused[:10]) + (", ..." if len(unused) > 10 else "")
        bad.append((str(cfg.captions), f"{len(unused)} caption row(s) name no clip in {cfg.data}: {shown}"))
    return found, bad


def _manifest(parts: PipelineParts, opts: dict) -> dict:
    return {
        "format": CACHE_FORMAT,
        "vae": {"src": str(parts.vae.resolve()), "fingerprint": files_fingerprint(parts.vae)},
        "text_encoder": {
            "src": str(parts.text[0].resolve()),
            "fingerprint": files_fingerprint(*parts.text),
            "overrides": parts.text_overrides,
        },
        "data_options": opts,
    }


def _check_manifest(root: Path, want: dict) -> None:
    """Refuse a cache made with another VAE, text encoder or frame options, naming both."""
    file = root / CACHE_FILE
    if not file.is_file():
        return
    have = read_json(file)
    for part, name in (("vae", "VAE"), ("text_encoder", "text encoder")):
        old, new = have.get(part, {}), want[part]
        if old.get("fingerprint") != new["fingerprint"] or old.get("overrides", []) != new.get(
            "overrides", []
        ):
            raise ValueError(
                f"the cache {root} was made with the {name} {old.get('src')} (fingerprint {old.get('fingerprint')}); "
                f"this run's is {new['src']} (fingerprint {new['fingerprint']}): delete {root} or set cache= to "
                "another folder"
            )
    if have.get("data_options") != want["data_options"]:
        raise ValueError(
            f"the cache {root} was made with data_options {have.get('data_options')}; this run asks "
            f"{want['data_options']}: delete {root} or set cache= to another folder"
        )


def prepare_cache(cfg: TrainConfig, parts: PipelineParts, dist: Dist, device: torch.device) -> CachePlan:
    """Fill the cache of a fine-tuning run (see the module docstring) and return what to train on.

    Loads the VAE only when a clip's latents are missing and the text encoder only when a caption's
    embeddings (or the pointer folder) are missing, one after the other, and frees each before going on.
    ValueError when the cache was made with another VAE or text encoder, or no clip is usable."""
    from ..models.text import load_text_encoder
    from ..models.vae import CausalVAE
    from ..pipelines.batch import encode_clips

    root = Path(cfg.cache) if cfg.cache else Path(cfg.output) / "cache"
    latents, text_dir = root / "latents", root / "text"
    opts = data_options(cfg)
    want = _manifest(parts, opts)
    _check_manifest(root, want)
    distributed.barrier()  # every rank has checked before rank 0 writes the manifest
    if dist.main:
        for d in (latents, text_dir):
            d.mkdir(parents=True, exist_ok=True)
        if not (root / CACHE_FILE).is_file():
            atomic_write(root / CACHE_FILE, lambda p: Path(p).write_text(json.dumps(want, indent=2)))
    distributed.barrier()

    clips = expand_paths([cfg.data])
    captions, bad = _clip_captions(clips, cfg)
    usable = []
    for clip in captions:
        try:
            have = _frames_available(probe(clip), opts)
        except Exception as err:  # noqa: BLE001 - an unreadable clip is listed and skipped
            bad.append((str(clip), f"unreadable: {err}"))
            continue
        if opts["frames"] is not None and have < opts["frames"]:
            bad.append(
                (str(clip), f"{have} frames, fewer than the {opts['frames']} asked (data_options.frames)")
            )
            continue
        usable.append(clip)

    todo = [c for c in usable if not (latents / latent_name(c)).is_file()]
    if shard(todo, dist.rank, dist.world_size)[0]:
        vae = CausalVAE.from_pretrained(parts.vae, device=device).eval()
        report = encode_clips(todo, latents, vae, vae_src=str(parts.vae.resolve()), rank=dist.rank,
                              world_size=dist.world_size, progress=cfg.progress and dist.main, num_workers=0,
                              frame_policy="trim", **{**opts, "size": opts["size"] and tuple(opts["size"])})  # fmt: skip
        bad += report.failed
        if report.failed and not dist.main:  # rank 0 lists what it knows; each other rank its own failures
            print(report.summary(), file=sys.stderr)
        del vae
        gc.collect()
    distributed.barrier()
    failed = {p for p, _ in bad}
    for c in todo:  # another rank's failure: its file is not there
        if not (latents / latent_name(c)).is_file() and str(c) not in failed:
            bad.append((str(c), "not encoded (see the encode report of its rank)"))
    usable = [c for c in usable if (latents / latent_name(c)).is_file()]
    if not usable:
        raise ValueError(
            f"no usable clips in {cfg.data}"
            + (": " + "; ".join(f"{p} ({why})" for p, why in bad) if bad else " (no video or image files)")
        )

    if parts.image_conditioned:
        _cache_image_conditions(usable, root, parts, opts, dist, device, cfg.progress)
    store = TextStore(text_dir, parts.masked)
    needed = sorted({captions[c] for c in usable} | {""} | set(cfg.sample_prompts))
    missing = [c for c in needed if not store.has(c)]
    pointer = root / "text_encoder"
    mine = shard(missing, dist.rank, dist.world_size)[0]
    if mine or (dist.main and not (pointer / "config.json").is_file()):
        encoder = load_text_encoder(parts.text[0], device=device, overrides=parts.text_overrides).eval()
        _write_text(text_dir, mine, encoder)
        if dist.main and not (pointer / "config.json").is_file():
            _save_pointer(encoder, pointer)
        del encoder
        gc.collect()
    distributed.barrier()

    table = root / "metadata.jsonl"
    if dist.main:
        rows = "".join(json.dumps({"path": latent_name(c), "caption": captions[c]}) + "\n" for c in usable)
        atomic_write(table, lambda p: Path(p).write_text(rows))
        if bad:
            print(CachePlan(root, latents, table, store, bad).summary(), file=sys.stderr)
    distributed.barrier()
    return CachePlan(root, latents, table, store, bad)


def _cache_image_conditions(clips, root, parts, opts, dist, device, progress) -> None:
    """For an image-conditioned denoiser (Wan 2.1 I2V), each clip's first-frame conditioning as Wan builds it
    at inference (``VideoPipeline._wan_image_condition``): ``condition``, the normalized latents (posterior mode)
    of the clip [first frame, zeros, ...], and ``image``, the first frame's CLIP tokens; one file per clip in
    ``image/``, named as its latent file (the frame mask follows from the shape and is built when training)."""
    from tqdm.auto import tqdm

    from ..data.io import read_video
    from ..models.image import load_image_encoder
    from ..models.vae import CausalVAE

    folder = root / "image"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [c for c in clips if not (folder / latent_name(c)).is_file()]
    mine = shard(todo, dist.rank, dist.world_size)[0]
    if mine:
        vae = CausalVAE.from_pretrained(parts.vae, device=device).eval()
        encoder = load_image_encoder(parts.folder, device=device)
        read = {k: v for k, v in opts.items() if k != "size"}
        read["size"] = tuple(opts["size"]) if opts["size"] else None
        for clip in tqdm(mine, desc="image conditions", disable=not (progress and dist.main)):
            video, _ = read_video(clip, temporal_factor=vae.temporal_factor, multiple=vae.spatial_factor,
                                  frame_policy="trim", **read)  # fmt: skip
            first = video[:, :1].to(device)
            given = torch.cat([first, torch.zeros_like(video[:, 1:]).to(device)], dim=1)
            with torch.inference_mode():
                condition = vae.normalize(vae.encode(given[None].to(vae.dtype)).mode())[0].float().cpu()
                tokens = encoder.encode(first[:, 0][None])[0].float().cpu()
            tensors = {"condition": condition.contiguous(), "image": tokens.contiguous()}
            atomic_write(folder / latent_name(clip), lambda p, t=tensors: save_file(t, p))
        del vae, encoder
        gc.collect()
    distributed.barrier()


def _save_pointer(encoder, folder: Path) -> None:
    """The text encoder for an exported pipeline folder: where it was loaded from (a Hugging Face encoder,
    multi-GB) or a copy (a built-in one, small)."""
    from ..models.text import HFTextEncoder

    if isinstance(encoder, HFTextEncoder):
        encoder.save_pretrained(folder, copy=False)
    else:
        encoder.save_pretrained(folder)
