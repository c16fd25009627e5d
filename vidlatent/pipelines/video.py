"""``VideoPipeline``: text-to-video, edit, inpaint, animate and morph, all on the one sampling loop.

Every job prepares latents, noise, text tokens and (for the jobs that keep part of an input) a paste hook,
calls ``sampling.denoise`` once through ``VideoPipeline._sample``, and decodes. The denoiser sees the VAE's
normalized latents; ``encode`` / ``decode`` convert between pixels and those.

Keeping known latents (inpaint, animate). The denoiser takes one noise level per sample, so a clean known
region next to a noisy unknown one is a state it has never seen. At every step the hook therefore replaces
the known region with the input's latents noised to the current sigma with the *same* noise the sampler
started from (``x = (1 - sigma) z0 + sigma * noise``: what that region would be if the sampler had
reconstructed it perfectly), and the final call at sigma 0 pastes the clean latents, so the known region of
the result is the input's latents exactly.

Conditioning on stills (animate, with a last image too). Chosen once by the denoiser's config: a text-to-video
denoiser (ours, Wan T2V) gets the stills' latents kept in place by that hook (``_keep_frames``); an
image-conditioned one (Wan 2.1 I2V / FLF2V, ``DiTConfig.image_dim``) gets, at every call, the stills' CLIP tokens
and a video of condition latents with a frame mask, as Wan builds them (``_wan_image_condition``).

Letters: b batch, c channels, t frames, h height, w width, n text tokens, d text width,
k pixel frames per latent frame (the VAE's temporal factor), p q pixels per latent pixel (spatial factor).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange, reduce, repeat

from ..checkpoint import CONFIG_NAME, atomic_write, read_json
from ..checks import check_finite, check_option, check_weights_finite, model_cause
from ..config import DiTConfig, config_to_dict, list_presets, load_config
from ..data.io import read_video, write_video
from ..diffusion.flow import add_noise
from ..diffusion.sampling import SAMPLERS, SIGMAS, TIMESTEPS, denoise, flow_edit, invert
from ..models import lora
from ..models.dit import VideoDiT
from ..models.image import ENCODER_DIR, ImageEncoder, load_image_encoder
from ..models.text import WAN_T5_FILE, WAN_TOKENIZER, HFTextEncoder, TextEncoder, load_text_encoder
from ..models.vae import CausalVAE
from .interpolate import arc_length_weights, lerp, morph_weights, slerp

PIPELINE_FILES = ("pipeline.json", "pipeline.yaml")
MORPH_MODES = ("latent", "noise")
OUTPUT_TYPES = ("video", "latent")
FIRST_FRAME = ("noised", "clean")  # animate: how the image's latent is given to the denoiser at each step
Media = torch.Tensor | str | os.PathLike


SOURCE_GUIDANCE = 4.0  # FlowEdit's default source-side guidance (the best of 1.5-4 on the default model)


@dataclass
class PipelineConfig:
    """A pipeline's defaults for every job (``pipeline.json`` in a pipeline folder); each job can override."""

    sampler: str = "unipc"  # euler | unipc | dpm (diffusers schedulers on flow sigmas)
    steps: int = 30
    guidance: float = 5.0  # classifier-free guidance scale; 1 turns it off (no negative pass)
    shift: float = 3.0  # sigma shift of the schedule (Wan 2.1: 3 at 480p, 5 at 720p)
    frames: int = 17  # 1 + 4k; 1 is an image
    height: int = 256
    width: int = 256
    fps: float = 16.0
    negative_prompt: str = ""
    seed: int | None = None  # None: a fresh random seed per call
    # animate: the image's latent as the denoiser sees it at each step, "noised" to the step's sigma (right for any
    # text-to-video model) or "clean" (how a denoiser trained with first_frame_dropout < 1 saw it)
    first_frame: str = "noised"
    # how the denoiser reads the text: "masked" (padding tokens are ignored: our models) or "all" (it attends to
    # every token, the zero padding too, with no mask: Wan, whose prompts are zero-padded to 512 UMT5 tokens)
    text_attention: str = "masked"
    # the noise level the denoiser is given (sampling.TIMESTEPS): "continuous" sigma (our models) or the
    # scheduler's own timesteps ("scheduler": whole numbers for UniPC, as Wan's and diffusers' pipelines give)
    timesteps: str = "continuous"
    # the noise levels the sampler walks (sampling.SIGMAS): the diffusers scheduler's own ("scheduler"), or those
    # of Wan 2.1's own UniPC sampler ("wan": an original Wan folder's, see sampling.SIGMAS for the difference)
    sigmas: str = "scheduler"
    # a diffusers scheduler config (a Wan folder's scheduler/scheduler_config.json): the sampler it names is
    # built from it (solver settings), with this config's shift; empty for our models
    scheduler_config: dict[str, Any] = field(default_factory=dict)


TEXT_ATTENTION = ("masked", "all")
# the defaults of a diffusers Wan pipeline folder: WanPipeline's own call defaults, and its scheduler's shift
WAN_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")
WAN_DEFAULTS = dict(steps=50, guidance=5.0, frames=81, height=480, width=832, fps=16.0, negative_prompt="",
                    text_attention="all", timesteps="scheduler")  # fmt: skip
SCHEDULER_SAMPLERS = {"UniPCMultistepScheduler": "unipc", "FlowMatchEulerDiscreteScheduler": "euler",
                      "DPMSolverMultistepScheduler": "dpm"}  # fmt: skip


def check_pipeline_config(cfg: PipelineConfig, source: str | os.PathLike | None = None) -> PipelineConfig:
    """Fail on a config value no job could use, naming the field, what is accepted and, when given, the file
    it came from (numbers: ``checks.OPTION_RANGES``)."""
    choices = {"sampler": SAMPLERS, "first_frame": FIRST_FRAME, "text_attention": TEXT_ATTENTION,
               "timesteps": TIMESTEPS, "sigmas": SIGMAS}  # fmt: skip
    try:
        for name, accepted in choices.items():
            if getattr(cfg, name) not in accepted:
                raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; accepted: {', '.join(accepted)}")
        for name in ("steps", "guidance", "shift", "fps"):
            check_option(name, getattr(cfg, name))
        for name in ("frames", "height", "width"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(cfg, name)}")
    except ValueError as err:
        if source is None:
            raise
        raise type(err)(f"{source}: {err}") from None
    return cfg


def diffusers_pipeline_config(root: Path) -> PipelineConfig:
    """The ``PipelineConfig`` of a diffusers Wan pipeline folder (``model_index.json``): Wan's conventions
    (all 512 text tokens attended, the scheduler's timesteps), WanPipeline's defaults (50 steps, guidance 5,
    81 frames of 480x832), and the sampler, shift and settings of ``scheduler/scheduler_config.json``."""
    index = read_json(root / "model_index.json")
    name = index.get("_class_name")
    if name not in WAN_PIPELINES:
        raise ValueError(
            f"{root} holds a diffusers {name or 'pipeline'}; accepted: {', '.join(WAN_PIPELINES)} folders"
        )
    cfg = PipelineConfig(**WAN_DEFAULTS)
    path = root / "scheduler" / "scheduler_config.json"
    if path.is_file():
        sched = read_json(path)
        kind = sched.get("_class_name")
        if kind not in SCHEDULER_SAMPLERS:
            raise ValueError(f"{path} names scheduler {kind!r}; accepted: {', '.join(SCHEDULER_SAMPLERS)}")
        cfg.sampler, cfg.scheduler_config = SCHEDULER_SAMPLERS[kind], sched
        cfg.shift = float(sched.get("flow_shift") or sched.get("shift") or cfg.shift)
    return cfg


# An original Wan 2.1 release folder (Wan-Video/Wan2.1 layout; wan/configs/wan_t2v_*.py names the files): the
# WanModel config.json and weights, the VAE and Wan's own T5 checkpoint, and the T5 tokenizer folder.
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_DIT_FILE = "diffusion_pytorch_model.safetensors"
# Wan's default negative prompt (wan/configs/shared_config.py sample_neg_prompt; wan/text2video.py uses it whenever
# the negative prompt is "")
WAN_NEGATIVE_PROMPT = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
# Wan 2.1's own text-to-video defaults, from Wan-Video/Wan2.1: generate.py (_validate_args: 50 steps and shift 5.0
# for t2v at every size, 81 frames; --sample_guide_scale 5.0, --sample_solver unipc), shared_config.py (16 fps,
# the negative prompt above, 512 text tokens) and text2video.py (UniPC's integer timesteps go to the model; its
# scheduler is fm_solvers_unipc.py, on its own levels: sigmas "wan"). Wan's README suggests guidance 6 and shift
# 8-12 for the 1.3B; these are its code's defaults. The size is in wan_release_config.
WAN_RELEASE_DEFAULTS = dict(sampler="unipc", steps=50, guidance=5.0, shift=5.0, frames=81, fps=16.0,
                            negative_prompt=WAN_NEGATIVE_PROMPT, text_attention="all", timesteps="scheduler",
                            sigmas="wan")  # fmt: skip


def is_wan_release(folder: Path) -> bool:
    """Whether ``folder`` is an original Wan 2.1 release folder: its config.json is a ``WanModel``'s."""
    if not (folder / CONFIG_NAME).is_file():
        return False
    raw = read_json(folder / CONFIG_NAME)
    wan_model = raw.get("_class_name") == "WanModel" or {"dim", "num_heads"} <= set(raw)
    return wan_model and "_vidlatent_kind" not in raw


def wan_release_missing(folder: Path) -> list[str]:
    """The files of an original Wan 2.1 T2V folder that ``folder`` lacks (those wan/text2video.py loads)."""
    tokenizer = folder / WAN_TOKENIZER
    present = {
        "diffusion_pytorch_model.safetensors (or its .index.json)": any(
            (folder / n).is_file() for n in (WAN_DIT_FILE, f"{WAN_DIT_FILE}.index.json")
        ),
        WAN_VAE_FILE: (folder / WAN_VAE_FILE).is_file(),
        WAN_T5_FILE: (folder / WAN_T5_FILE).is_file(),
        f"{WAN_TOKENIZER}/ (its tokenizer)": any(
            (tokenizer / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "spiece.model")
        ),
    }
    return [name for name, ok in present.items() if not ok]


def wan_release_config(folder: Path) -> PipelineConfig:
    """The ``PipelineConfig`` of an original Wan 2.1 folder: Wan's conventions and its generate.py defaults
    (``WAN_RELEASE_DEFAULTS``), at 832x480 (the 1.3B runs 480p only) or, for the 14B (dim 5120), generate.py's
    default 1280x720."""
    raw = read_json(folder / CONFIG_NAME)
    height, width = (720, 1280) if raw.get("dim") == 5120 else (480, 832)
    return PipelineConfig(**WAN_RELEASE_DEFAULTS, height=height, width=width)


@dataclass
class PipelinePreset:
    """A pipeline assembled from component presets (``configs/pipeline/<name>.yaml``), with random weights.

    The denoiser's latent channels and text width are set from the VAE and the text encoder, so the parts
    always fit. ``init_noise``: std of Gaussian noise added to every denoiser weight after initialization, so
    that a random model (zero-initialized output head) computes a non-trivial velocity. ``seed`` makes the
    denoiser's random weights the same on every load (the VAE and text presets are seeded by their configs
    or by this seed too).
    """

    vae: str = "tiny"
    dit: str = "tiny"
    text_encoder: str = "tiny"
    init_noise: float = 0.0
    seed: int = 0
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "default"


def default_model_folder() -> Path:
    """The shipped default model's pipeline folder (inside the package); a clear error if it is missing."""
    if not (DEFAULT_MODEL / "dit").is_dir():
        raise FileNotFoundError(
            f"the default model is not installed (no weights at {DEFAULT_MODEL}); reinstall vidlatent, or give "
            "a pipeline folder (vae/, dit/, text_encoder/, pipeline.json) or the preset 'tiny' (random weights)"
        )
    return DEFAULT_MODEL


def latent_mask(mask: torch.Tensor, temporal_factor: int, spatial_factor: int) -> torch.Tensor:
    """A per-pixel mask (b, t, h, w) bool (True = regenerate) -> latent mask (b, 1, t', h', w') bool.

    A latent is regenerated when any pixel it encodes is (max-pooling). In time the groups follow the causal
    VAE: latent frame 0 holds pixel frame 0 alone, latent frame i >= 1 holds pixel frames 4(i-1)+1 ... 4i.
    A one-frame mask stays one frame (it applies to every latent frame).
    """
    b, t, h, w = mask.shape
    if (t - 1) % temporal_factor or h % spatial_factor or w % spatial_factor:
        raise ValueError(
            f"mask of {t} frames of {w}x{h} (width x height) does not map onto latents: frames must be 1+{temporal_factor}k "
            f"and sides multiples of {spatial_factor}"
        )
    m = mask.float()
    rest = reduce(m[:, 1:], "b (t k) h w -> b t h w", "max", k=temporal_factor)
    m = torch.cat([m[:, :1], rest], dim=1)
    m = reduce(m, "b t (h p) (w q) -> b t h w", "max", p=spatial_factor, q=spatial_factor)
    return rearrange(m > 0.5, "b t h w -> b 1 t h w")


class VideoPipeline:
    """VAE + denoiser + text encoder, and the jobs built on them: ``generate``, ``edit``, ``inpaint``,
    ``animate``, ``morph``. Videos are (b, 3, t, h, w) floats in [-1, 1]; an image is a one-frame video.

    Random draws come from CPU generators seeded per call, so a seed gives the same noise on every device.
    Arguments left ``None`` take the value in ``config``.
    """

    def __init__(
        self,
        vae: CausalVAE,
        dit: VideoDiT,
        text_encoder: TextEncoder,
        config: PipelineConfig,
        image_encoder: ImageEncoder | None = None,
    ):
        c, tf, dcfg = vae.config.latent_channels, vae.temporal_factor, dit.config
        image_conditioned = dcfg.image_dim is not None
        if dcfg.out_channels != c or dcfg.condition_channels != (c + tf if image_conditioned else 0):
            raise ValueError(
                f"the denoiser takes {dcfg.in_channels} and returns {dcfg.out_channels} latent channels, but the "
                f"VAE makes {c}: a text-to-video denoiser takes and returns {c}, an image-conditioned one (Wan "
                f"I2V) takes {2 * c + tf} (noise, a {tf}-channel frame mask, image latents) and returns {c}"
            )
        if dcfg.text_dim != text_encoder.dim:
            raise ValueError(
                f"the denoiser takes text tokens of width {dcfg.text_dim}, "
                f"the text encoder makes {text_encoder.dim}"
            )
        if image_conditioned and image_encoder is None:
            raise ValueError(
                f"the denoiser is image-conditioned (Wan I2V / FLF2V): it needs an image encoder, a CLIP vision "
                f"model with tokens of width {dcfg.image_dim}; pass image_encoder=load_image_encoder(folder) (a "
                f"diffusers Wan I2V root holds it in {ENCODER_DIR}/ and image_processor/)"
            )
        if not image_conditioned and image_encoder is not None:
            raise ValueError(
                "the denoiser is text-to-video (its config has no image_dim): it takes no image encoder; animate "
                "conditions it on an image by keeping the image's latent as the first frame"
            )
        if image_conditioned and image_encoder.dim != dcfg.image_dim:
            raise ValueError(
                f"the denoiser takes image tokens of width {dcfg.image_dim}, the image encoder makes "
                f"{image_encoder.dim}"
            )
        self.vae, self.dit, self.text_encoder, self.image_encoder = vae, dit, text_encoder, image_encoder
        self.config = check_pipeline_config(config)
        self.progress = True  # tqdm bars during sampling; each job's progress= overrides it

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls, src: str | os.PathLike, device=None, dtype=None, check_finite: bool = False
    ) -> VideoPipeline:
        """Load from a pipeline folder, a preset name (``tiny``: random weights, for tests) or ``"default"``.

        A folder holds ``vae/``, ``dit/`` (or diffusers' ``transformer/``), ``text_encoder/`` and
        ``pipeline.json`` or ``pipeline.yaml`` (``PipelineConfig`` fields; defaults where absent), as written by
        ``save_pretrained``. A diffusers Wan folder (``model_index.json``) and an original Wan 2.1 release folder
        (config.json of a ``WanModel``, ``Wan2.1_VAE.pth``, Wan's T5 checkpoint and ``google/umt5-xxl/``) load
        with Wan's conventions and defaults. ``dtype`` applies to all three models (default: as stored, fp32 for
        presets). ``check_finite``: scan a folder's weights for NaN/inf (``NonFiniteError`` naming the tensors).
        """
        path = Path(src)
        if path.is_dir() or str(src) == "default":
            pipe = cls._from_folder(path if path.is_dir() else default_model_folder(), device, dtype)
            if check_finite:
                for name, model in (
                    ("VAE", pipe.vae),
                    ("denoiser", pipe.dit),
                    ("text encoder", pipe.text_encoder),
                ):
                    check_weights_finite(model, f"the {name} of {src}")
            return pipe
        if str(src) in list_presets("pipeline"):
            return cls.from_preset(load_config(PipelinePreset, "pipeline", str(src)), device, dtype)
        raise FileNotFoundError(
            f"no pipeline at {str(src)!r}: not a folder, and not a preset "
            f"({', '.join(['default', *list_presets('pipeline')])})"
        )

    @classmethod
    def from_preset(cls, preset: PipelinePreset, device=None, dtype=None) -> VideoPipeline:
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

    @classmethod
    def _from_folder(cls, folder: Path, device, dtype) -> VideoPipeline:
        dits = [folder / n for n in ("dit", "transformer") if (folder / n).is_dir()]
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
            return cls._from_wan_release(folder, device, dtype)
        if len(dits) > 1 or (diffusers_root and config_file is not None):
            mixed = [p.name + "/" for p in dits] if len(dits) > 1 else ["model_index.json", config_file.name]
            raise ValueError(
                f"{folder} mixes layouts ({' and '.join(mixed)}); a pipeline folder is either ours (dit/, "
                "pipeline.json) or a diffusers one (transformer/, model_index.json)"
            )
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
                config = load_config(
                    PipelineConfig, "pipeline", None, *([config_file] if config_file else [])
                )
                check_pipeline_config(config, config_file)
            except Exception as err:  # yaml / json syntax, unknown keys, wrong types, values out of range
                if config_file is None or str(config_file) in str(err):
                    raise
                raise ValueError(f"cannot read {config_file}: {str(err).splitlines()[0]}") from err
        vae = CausalVAE.from_pretrained(folder / "vae", device=device, dtype=dtype)
        dit = VideoDiT.from_pretrained(dits[0], device=device, dtype=dtype).eval()
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
        return cls(vae, dit, text_encoder, config, image_encoder)

    @classmethod
    def _from_wan_release(cls, folder: Path, device, dtype) -> VideoPipeline:
        model_type = read_json(folder / CONFIG_NAME).get("model_type", "t2v")
        if model_type != "t2v":
            raise ValueError(
                f"{folder} is an original Wan 2.1 {model_type} folder: its CLIP checkpoint (open-clip XLM-RoBERTa "
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

    def save_pretrained(self, folder: str | os.PathLike, copy_text_encoder: bool = True) -> None:
        """Write ``vae/``, ``dit/``, ``text_encoder/``, ``pipeline.json`` (each file atomically) and, for an
        image-conditioned denoiser, ``image_encoder/`` (with its image processor).

        ``copy_text_encoder=False`` (Hugging Face encoders only) records where the encoder was loaded from
        instead of copying its weights (UMT5-XXL is 11 GB).
        """
        folder = Path(folder)
        if not copy_text_encoder and not isinstance(self.text_encoder, HFTextEncoder):
            raise ValueError("copy_text_encoder=False applies to Hugging Face text encoders only")
        self.vae.save_pretrained(folder / "vae")
        self.dit.save_pretrained(folder / "dit")
        kwargs = {} if copy_text_encoder else {"copy": False}
        self.text_encoder.save_pretrained(folder / "text_encoder", **kwargs)
        if self.image_encoder is not None:
            self.image_encoder.save_pretrained(folder / ENCODER_DIR)
        text = json.dumps(config_to_dict(self.config), indent=2)
        atomic_write(folder / "pipeline.json", lambda p: Path(p).write_text(text))

    # ------------------------------------------------------------------------------------ LoRAs

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, name: str | None = None) -> str:
        """Add a LoRA to the denoiser for every job from now on; returns its name (default: the file's stem).

        Reads every published Wan 2.1 layout (diffusers/peft, Kohya/ComfyUI, musubi-tuner, full-rank
        ``.diff``/``.diff_b`` step-distillation LoRAs; see ``vidlatent.models.lora``). Several LoRAs add up,
        each at its own ``scale``. A file that does not fit the denoiser (keys naming no layer, shapes of
        another model) raises one error listing what is wrong, and nothing is applied.
        """
        return lora.load_lora(self.dit, path, scale=scale, name=name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change a loaded LoRA's scale (0 switches it off, exactly)."""
        lora.set_lora_scale(self.dit, name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove the LoRA ``name`` (all of them when None); the denoiser is as it was before loading."""
        lora.unload_lora(self.dit, name)

    def fuse_lora(self, keep_originals: bool = True) -> None:
        """Fold the loaded LoRAs, at their scales, into the denoiser's weights: same results, no extra cost
        per step. Until ``unfuse_lora``, LoRAs cannot be loaded, unloaded or rescaled; ``save_pretrained``
        writes the fused weights. ``keep_originals=False``: bf16/fp16 weights are not copied to the CPU
        first, which saves memory but makes ``unfuse_lora`` inexact by a rounding step per weight."""
        lora.fuse_lora(self.dit, keep_originals)

    def unfuse_lora(self) -> None:
        """Take fused LoRAs out of the weights again (see ``fuse_lora``); they stay loaded."""
        lora.unfuse_lora(self.dit)

    @property
    def loras(self) -> dict[str, float]:
        """{name: scale} of the loaded LoRAs."""
        return lora.lora_scales(self.dit)

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def size_multiple(self) -> tuple[int, int]:
        """Heights and widths must be multiples of these: the VAE's spatial factor times the patch size."""
        _, ph, pw = self.dit.config.patch_size
        return self.vae.spatial_factor * ph, self.vae.spatial_factor * pw

    # ------------------------------------------------------------------------------------ pixels <-> latents

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video (b, 3, t, h, w) in [-1, 1] -> normalized latents (fp32): the posterior mean, normalized.

        NonFiniteError when the input or the latents hold NaN/inf (the error says which and why)."""
        check_finite(video, "the input video", "the frames given hold NaN/inf values")
        z = self.vae.normalize(self.vae.encode(video).mode().float())
        return check_finite(z, "VAE encoding", lambda: model_cause("VAE", self.vae))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents (b, c, t', h', w') -> video (b, 3, 1 + 4(t'-1), 8h', 8w') fp32 in [-1, 1].

        NonFiniteError when the latents or the decoded frames hold NaN/inf."""
        check_finite(latents, "the latents to decode", "they hold NaN/inf values")
        video = self.vae.decode(self.vae.denormalize(latents.float())).float()
        return check_finite(video, "VAE decoding", lambda: model_cause("VAE", self.vae))

    def decode_images(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """One-frame latents (n, c, 1, h', w') -> one video (1, 3, n, h, w), decoding ``batch_size`` at a time."""
        frames = [self.decode(latents[i : i + batch_size]) for i in range(0, latents.shape[0], batch_size)]
        return rearrange(torch.cat(frames), "n c 1 h w -> 1 c n h w")

    def save(self, video: torch.Tensor, path: str | os.PathLike, fps: float | None = None) -> list[Path]:
        """Write a video (b, 3, t, h, w) with ``write_video`` (atomic; mp4, webm, gif, png, frame folder).

        One file for b = 1; ``name-0.mp4``, ``name-1.mp4``, ... for a batch. Returns the paths written.
        """
        path = Path(path)
        paths = (
            [path] if video.shape[0] == 1 else [path.with_stem(f"{path.stem}-{i}") for i in range(len(video))]
        )
        for p, v in zip(paths, video):
            write_video(p, v.cpu(), fps=fps or self.config.fps)
        return paths

    # ------------------------------------------------------------------------------------ jobs

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | None = None,
        *,
        frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        output_type: str = "video",
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Text to video: (b, 3, frames, height, width) in [-1, 1], one video per prompt; ``frames=1`` is
        text-to-image. ``output_type="latent"`` returns the normalized latents instead.

        frames must be 1 + 4k and height, width multiples of 16 (VAE 8 x patch 2): ValueError otherwise.
        ``noise``: the start noise (b, c, t', h', w') instead of one drawn from ``seed`` (the sizes left unset
        follow its shape); every job that samples takes it, shaped like its latents.
        """
        cfg = self.config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if noise is not None:  # the given start noise sets the size the user left out
            frames, height, width = self._pixel_size(noise, frames, height, width)
        frames = cfg.frames if frames is None else frames
        height, width = cfg.height if height is None else height, cfg.width if width is None else width
        self._check_size(frames, height, width)
        noise, generator = self._noise(self._latent_shape(len(prompts), frames, height, width), seed, noise)
        opts = self._options(steps, guidance, sampler, shift, progress)
        z = self._sample(noise, prompts, negative_prompt, opts, generator)
        return self._output(z, output_type)

    @torch.no_grad()
    def edit(
        self,
        video: Media,
        prompt: str | Sequence[str],
        strength: float = 0.6,
        negative_prompt: str | None = None,
        *,
        source_prompt: str | Sequence[str] | None = None,
        source_guidance: float | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        output_type: str = "video",
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Re-draw ``video`` (tensor or file) after ``prompt``, keeping as much of it as ``strength`` says.

        strength in [0, 1]: the fraction of the schedule re-run. 0 returns the input's VAE reconstruction
        exactly (nothing is sampled); near 0 only the last small-sigma steps run, so the result stays close to
        it.

        Without ``source_prompt`` this is SDEdit: the input is noised to the strength's sigma and denoised with
        ``prompt`` (at 1 the same as ``generate`` with that seed and size). What the noise has not hidden yet
        (layout, then colours) stays, so small changes need little strength and big ones much; 1 starts from
        pure noise and ignores the input.
        With ``source_prompt`` (what the input shows) it is FlowEdit (``diffusion.sampling.flow_edit``): the
        edit follows the difference between the two prompts' velocities, so what they share (layout, motion)
        is kept at strengths where SDEdit loses it; each step runs the denoiser on both prompts (twice
        SDEdit's cost), on the Euler sampler's grid (``sampler`` must be unset or ``euler``).
        Even at strength 1 it keeps what the prompts share. ``source_guidance``: the source side's
        classifier-free guidance (``guidance`` is the target's; default 4, which did best on the default model).
        """
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1]; got {strength}")
        if source_prompt is not None and sampler not in (None, "euler"):
            raise ValueError(f"an edit with source_prompt runs on the euler grid; got sampler {sampler!r}")
        if source_guidance is not None and source_prompt is None:
            raise ValueError("source_guidance is FlowEdit's: give source_prompt (what the input shows) too")
        video = self._video_input(video)
        z0 = self.encode(video)
        if source_prompt is None or strength == 0:
            z = self.edit_latents(z0, prompt, strength, negative_prompt, steps=steps, guidance=guidance, seed=seed,
                                  noise=noise, sampler=sampler, shift=shift, progress=progress)  # fmt: skip
            return self._output(z, output_type)
        self._check_text_to_video()
        # the start noise is drawn (and left unused) as SDEdit draws it, so a seed gives the generator the same state
        _, generator = self._noise(z0.shape, seed, noise)
        opts = self._options(steps, guidance, sampler, shift, progress)
        source_guidance = check_option(
            "source_guidance", SOURCE_GUIDANCE if source_guidance is None else source_guidance
        )
        context, mask = self.encode_text(self._prompts(prompt, len(z0)))
        source, source_mask = self.encode_text(self._prompts(source_prompt, len(z0), "source_prompt"))
        negative = self._negative(negative_prompt, opts["guidance"] != 1 or source_guidance != 1)
        z = flow_edit(self.dit, z0, context, mask, source, source_mask, **negative, guidance=opts["guidance"],
                      source_guidance=source_guidance, steps=opts["steps"], shift=opts["shift"],
                      strength=strength, generator=generator, progress=opts["progress"])  # fmt: skip
        return self._output(z, output_type)

    @torch.no_grad()
    def edit_latents(
        self,
        latents: torch.Tensor,
        prompt: str | Sequence[str],
        strength: float = 0.6,
        negative_prompt: str | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """SDEdit on normalized latents (b, c, t', h', w') (what ``encode`` returns) -> normalized latents: the
        same as ``edit(..., output_type="latent")`` without its encoding (``edit`` calls it after encoding).
        """
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1]; got {strength}")
        z0 = latents.to(self.device, torch.float32)
        if strength == 0:
            return z0.clone()
        noise, generator = self._noise(z0.shape, seed, noise)
        opts = self._options(steps, guidance, sampler, shift, progress)
        init = z0 if strength < 1 else None
        return self._sample(
            noise, self._prompts(prompt, len(z0)), negative_prompt, opts, generator, init, strength
        )

    @torch.no_grad()
    def inpaint(
        self,
        video: Media,
        mask: Media,
        prompt: str | Sequence[str],
        strength: float = 1.0,
        negative_prompt: str | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        output_type: str = "video",
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Regenerate the masked part of ``video`` (tensor or file) and keep the rest.

        mask: white / True / > 0.5 = regenerate; values in [0, 1] (a file's pixels are mapped there). A
        one-frame mask, (h, w), (1, h, w), (c, 1, h, w) or an image file, applies to every frame; a per-frame
        mask, (t, h, w), (c, t, h, w) or a video file, has the input's frame count. Colour channels c are
        averaged. Its height and width must be the input's. It is taken to latent resolution by ``latent_mask`` (a latent is regenerated if any of
        its pixels is); the kept latents are pasted at every step (see the module docstring), so the kept
        region of the output latents equals the input's latents exactly, and decoded pixels away from the
        mask equal the input's VAE reconstruction up to the decoder's reach. strength < 1 starts the
        regenerated region from the noised input (SDEdit inside the mask).
        """
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1]; got {strength}")
        video = self._video_input(video)
        b, _, t, h, w = video.shape
        regen = latent_mask(
            self._mask_input(mask, t, h, w), self.vae.temporal_factor, self.vae.spatial_factor
        )
        z0 = self.encode(video)
        noise, generator = self._noise(z0.shape, seed, noise)
        opts = self._options(steps, guidance, sampler, shift, progress)
        hook = self._keep_hook(z0, ~regen.to(z0.device), noise)
        init = z0 if strength < 1 else None
        z = self._sample(
            noise, self._prompts(prompt, b), negative_prompt, opts, generator, init, strength, hook
        )
        return self._output(z, output_type)

    @torch.no_grad()
    def animate(
        self,
        image: Media,
        prompt: str | Sequence[str],
        frames: int | None = None,
        negative_prompt: str | None = None,
        *,
        last_image: Media | None = None,
        strength: float = 1.0,
        first_frame: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        output_type: str = "video",
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Image to video: ``image`` is the first frame, and ``last_image`` (same size), if given, the last; the
        rest is generated (with both, a generative morph between two stills).

        How the stills reach the denoiser depends on it (see the module docstring). A text-to-video denoiser:
        the image's latent is pasted as the first latent frame before every call, with ``first_frame="noised"``
        (the config's default) like inpaint's known region, noised to each step's sigma, which suits any
        text-to-video model; with ``"clean"`` as it is, which is what a denoiser trained with
        ``first_frame_dropout < 1`` saw. The first latent frame of the result is the image's latent exactly; the
        causal decoder decodes frame 0 from latent frame 0 alone, so the first output frame is the image's VAE
        reconstruction. A last image is kept the same way as the last latent frame (always noised: no model
        here was trained with a clean last frame), encoded as the last of a clip that holds the first image
        and then the last one (``_keep_frames``). An image-conditioned denoiser (Wan 2.1 I2V / FLF2V) is given
        the stills as Wan and diffusers' ``WanImageToVideoPipeline`` give them (an FLF2V model needs both).
        strength < 1 starts from the stills' latents noised to that level (less motion, more likeness).
        """
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1]; got {strength}")
        first_frame = self.config.first_frame if first_frame is None else first_frame
        if first_frame not in FIRST_FRAME:
            raise ValueError(f"unknown first_frame {first_frame!r}; accepted: {', '.join(FIRST_FRAME)}")
        image = self._image_input(image, "image")
        b, _, _, h, w = image.shape
        last = None if last_image is None else self._image_input(last_image, "last_image")
        if last is not None and last.shape != image.shape:
            raise ValueError(
                f"last_image must have image's shape {tuple(image.shape)}; got {tuple(last.shape)}"
            )
        if self.dit.config.image_pos_len is not None and last is None:
            raise ValueError(
                "this denoiser is Wan's first-last-frame model (FLF2V: CLIP tokens of two stills): give "
                "last_image too (on the command line, --last IMAGE)"
            )
        if noise is not None and frames is None:  # the given start noise sets the frame count
            frames = self._pixel_size(noise, None, h, w)[0]
        frames = self.config.frames if frames is None else frames
        self._check_size(frames, h, w)
        if last is not None and frames < 1 + self.vae.temporal_factor:
            raise ValueError(
                f"a first and a last image need frames >= {1 + self.vae.temporal_factor}; got {frames}"
            )
        shape = self._latent_shape(b, frames, h, w)
        noise, generator = self._noise(shape, seed, noise)
        if self.dit.config.image_dim is None:
            start, hook, model_kwargs = self._keep_frames(image, last, noise, first_frame == "clean")
        else:
            start, hook, model_kwargs = self._wan_image_condition(image, last, shape)
        opts = self._options(steps, guidance, sampler, shift, progress)
        init = start if strength < 1 else None
        z = self._sample(noise, self._prompts(prompt, b), negative_prompt, opts, generator, init, strength, hook,
                         model_kwargs)  # fmt: skip
        return self._output(z, output_type)

    def _keep_frames(self, image, last, noise, clean_first: bool):
        """Stills -> (start latents, hook, model keywords) for a text-to-video denoiser: the hook keeps the
        image's latent as the first latent frame and, with ``last``, a latent of the last image as the last one.

        The image alone encodes to exactly the first latent frame of any clip that starts with it (causal VAE).
        A last latent frame holds the last 4 pixel frames and depends on all before it, so the last image is
        encoded as the last frames of the clip [image, last, last, ...]: its encoder has seen a clip start
        from the first image, then settle on the last one (on the default model this decoded the last frame
        at 29.9 dB against the still, the VAE's own image round trip being 30.3 dB; 28.3 dB for a clip of the
        last image alone, 21.4 dB for its one-frame image latent).
        """
        shape = noise.shape
        keep = torch.zeros(1, 1, shape[2], 1, 1, dtype=torch.bool, device=noise.device)
        keep[:, :, 0] = True
        clean = keep.clone() if clean_first else torch.zeros_like(keep)  # the last frame is always noised
        if last is None:
            known = self.encode(image).expand(shape)
        else:
            frames = 1 + (shape[2] - 1) * self.vae.temporal_factor
            known = self.encode(torch.cat([image, last.expand(-1, -1, frames - 1, -1, -1)], dim=2))
            keep[:, :, -1] = True
        return known, self._keep_hook(known, keep, noise, clean=clean), None

    def _wan_image_condition(self, image, last, shape):
        """Stills -> (start latents, hook, model keywords) for Wan 2.1 I2V / FLF2V, as Wan builds them:
        ``image`` = the CLIP tokens of the stills (penultimate layer; first then last, joined along the tokens),
        ``condition`` = a 4-channel frame mask, then the normalized latents of the clip [image, zeros, ...,
        (last)] (VAE posterior mode). The mask marks the pixel frames given (the first; the last too), with the
        first frame counted 4 times so that every latent frame covers 4 mask values, one per channel.
        """
        b, _, t, h, w = shape
        tf, frames = self.vae.temporal_factor, 1 + (shape[2] - 1) * self.vae.temporal_factor
        stills = [image] if last is None else [image, last]
        gap = image.new_zeros(b, 3, frames - len(stills), *image.shape[3:])
        latents = self.encode(torch.cat([image, gap, *stills[1:]], dim=2))
        given = torch.zeros(frames, device=latents.device)
        given[0] = 1.0
        if last is not None:
            given[-1] = 1.0
        given = torch.cat([given[:1].expand(tf - 1), given])
        mask = repeat(given, "(t k) -> b k t h w", k=tf, b=b, h=h, w=w)
        tokens = self.image_encoder.encode(rearrange(torch.cat(stills), "b c 1 h w -> b c h w"))
        tokens = rearrange(tokens, "(n b) i d -> b (n i) d", b=b)
        start = latents[:, :, :1].expand(
            shape
        )  # the image's own latent: the causal VAE encodes frame 0 alone
        return start, None, {"image": tokens, "condition": torch.cat([mask, latents], dim=1)}

    @torch.no_grad()
    def morph(
        self,
        image_a: Media,
        image_b: Media,
        frames: int | None = None,
        mode: str = "latent",
        prompt_a: str | None = None,
        prompt_b: str | None = None,
        *,
        easing: str = "linear",
        steps: int | None = None,
        guidance: float = 1.0,
        shift: float | None = None,
        refine: int = 2,
        respace: bool = False,
        batch_size: int = 8,
        output_type: str = "video",
        progress: bool | None = None,
    ) -> torch.Tensor:
        """A morph video (1, 3, frames, h, w) from image A to image B (same size); each frame is an image.

        ``mode="latent"``: slerp between the images' normalized latents (direction along the great circle,
        norm linear), each frame decoded on its own; frames 0 and -1 are exactly the VAE reconstructions of
        A and B. No prompts, no sampling. ``mode="noise"``: invert A and B to noise along the flow ODE
        (``sampling.invert``: Euler on the sampler's sigma grid, ``refine`` fixed-point iterations per step),
        slerp the two noises, interpolate the prompts' token embeddings linearly (both prompts padded to one
        length, with the union of their masks, so inversion and regeneration see the same context), and
        regenerate every frame deterministically with the Euler sampler; the endpoints reconstruct A and B up
        to the inversion error (first order in 1/steps with ``refine=0``; each refinement shrinks it ~10x).
        ``guidance`` 1 by default (the round trip is exact only without guidance). The denoiser may answer
        unevenly along the path (two prompts: fast near one end); ``respace=True`` measures the latent steps
        and regenerates once more at weights that make them equal (``arc_length_weights``; twice the cost).
        ``easing``: "linear", "cosine" or "smoothstep" spacing of the frames. ``batch_size``: frames per
        denoiser / decoder batch. ``output_type="latent"`` returns the frames' latents (frames, c, 1, h', w').
        """
        if mode not in MORPH_MODES:
            raise ValueError(f"unknown morph mode {mode!r}; accepted: {', '.join(MORPH_MODES)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; accepted: {', '.join(OUTPUT_TYPES)}")
        a, b = self._video_input(image_a), self._video_input(image_b)
        for name, x in (("image_a", a), ("image_b", b)):
            if x.shape[0] != 1 or x.shape[2] != 1:
                raise ValueError(f"{name} must be one image; got shape {tuple(x.shape)}")
        if a.shape != b.shape:
            raise ValueError(f"morph images must have one size; got {a.shape[-1]}x{a.shape[-2]} and "
                             f"{b.shape[-1]}x{b.shape[-2]} (width x height)")  # fmt: skip
        weights = morph_weights(self.config.frames if frames is None else frames, easing)
        z = self.encode(torch.cat([a, b]))
        if mode == "latent":
            if prompt_a is not None or prompt_b is not None:
                raise ValueError("prompts apply to mode='noise' only; a latent morph does not sample")
            latents = slerp(z[0], z[1], weights)
        else:
            latents = self._noise_morph(z, weights, prompt_a or "", prompt_b or "", steps, guidance, shift,
                                        refine, respace, batch_size, progress)  # fmt: skip
        if output_type == "latent":
            return latents
        return self.decode_images(latents, batch_size)

    def _noise_morph(
        self, z, weights, prompt_a, prompt_b, steps, guidance, shift, refine, respace, batch_size, progress
    ):
        """Invert both images to noise, slerp noises, lerp prompt tokens, regenerate with Euler; with
        ``respace``, regenerate once more at the weights that make the latent steps equal."""
        self._check_text_to_video()
        opts = self._options(steps, guidance, "euler", shift, progress)
        tokens, mask = self.encode_text([prompt_a, prompt_b])
        if mask is not None:  # the union: one context layout for every frame
            mask = mask.any(dim=0, keepdim=True).expand(2, -1)
        negative = self._negative(None, guidance != 1)
        kw = dict(guidance=guidance, steps=opts["steps"], shift=opts["shift"], progress=opts["progress"])
        noise = invert(self.dit, z, tokens, mask, refine=refine, **negative, **kw)

        def regenerate(w: torch.Tensor) -> torch.Tensor:
            noises, contexts = slerp(noise[0], noise[1], w), lerp(tokens[0], tokens[1], w)
            masks = None if mask is None else mask[:1].expand(len(w), -1)
            parts = [slice(i, i + batch_size) for i in range(0, len(w), batch_size)]
            return torch.cat([denoise(self.dit, noises[p], contexts[p], None if masks is None else masks[p],
                                      sampler="euler", **negative, **kw) for p in parts])  # fmt: skip

        latents = regenerate(weights)
        return regenerate(arc_length_weights(weights, latents, weights)) if respace else latents

    # ------------------------------------------------------------------------------------ helpers

    def _sample(
        self,
        noise,
        prompts,
        negative_prompt,
        opts,
        generator,
        init=None,
        strength=1.0,
        hook=None,
        model_kwargs=None,
    ):
        """The one call to the sampling loop that every job makes."""
        if model_kwargs is None:
            self._check_text_to_video()
        context, context_mask = self.encode_text(prompts)
        negative = self._negative(negative_prompt, opts["guidance"] != 1)
        return denoise(
            self.dit,
            noise,
            context,
            context_mask,
            **negative,
            init=init,
            strength=strength,
            hook=hook,
            generator=generator,
            timesteps=self.config.timesteps,
            scheduler_config=self.config.scheduler_config,
            sigmas=self.config.sigmas,
            model_kwargs=model_kwargs,
            **opts,
        )

    def _check_text_to_video(self) -> None:
        """Jobs other than animate sample from text alone: an image-conditioned denoiser cannot run them."""
        if self.dit.config.image_dim is not None:
            raise ValueError(
                "this job needs a text-to-video denoiser; this pipeline's is image-conditioned (Wan I2V / FLF2V: "
                "it takes a still's CLIP tokens and latents at every step): use animate(image, prompt) "
                "(vidlatent animate IMAGE PROMPT [--last IMAGE])"
            )

    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> (tokens (b, n, d), mask (b, n) or None) as this pipeline's denoiser reads them: with the
        mask (``text_attention="masked"``), or with none, every token attended (``"all"``, as Wan)."""
        tokens, mask = self.text_encoder.encode(prompts)
        return tokens, (mask if self.config.text_attention == "masked" else None)

    def _negative(self, negative_prompt: str | None, guided: bool) -> dict:
        """The unconditional tokens as ``negative``/``negative_mask`` keywords (none when nothing is guided)."""
        if not guided:
            return {}
        neg = self.config.negative_prompt if negative_prompt is None else negative_prompt
        tokens, mask = self.encode_text([neg])
        return {"negative": tokens, "negative_mask": mask}

    def _options(self, steps, guidance, sampler, shift, progress) -> dict:
        cfg = self.config
        sampler = sampler or cfg.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
        steps = cfg.steps if steps is None else steps
        guidance, shift = (
            cfg.guidance if guidance is None else guidance,
            cfg.shift if shift is None else shift,
        )
        for name, value in (("steps", steps), ("guidance", guidance), ("shift", shift)):
            check_option(name, value)
        return {
            "steps": steps,
            "guidance": guidance,
            "sampler": sampler,
            "shift": shift,
            "progress": self.progress if progress is None else progress,
        }

    def _noise(self, shape, seed, given: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Generator]:
        """Start noise drawn on a CPU generator (the same on every device), then moved to the model's device;
        ``given`` (a job's ``noise=``) is used instead when it has the latents' shape. The generator, seeded
        either way, also serves the samplers that draw noise at each step."""
        seed = self.config.seed if seed is None else seed
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        if given is None:
            noise = torch.randn(tuple(shape), generator=generator)
        elif tuple(given.shape) == tuple(shape) and given.is_floating_point():
            noise = given.float()
        else:
            what = (
                f"shape {tuple(given.shape)}, dtype {given.dtype}"
                if isinstance(given, torch.Tensor)
                else given
            )
            raise ValueError(
                f"noise must be float latents of shape {tuple(shape)} (b, c, t', h', w'); got {what}"
            )
        return noise.to(self.device), generator

    def _pixel_size(self, noise, frames, height, width) -> tuple[int, int, int]:
        """(frames, height, width) of the video whose latents have ``noise``'s shape, where not given."""
        if not isinstance(noise, torch.Tensor) or noise.ndim != 5:
            what = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must be latents (b, c, t', h', w'); got {what}")
        t, h, w = noise.shape[2:]
        sf = self.vae.spatial_factor
        own = (1 + (t - 1) * self.vae.temporal_factor, h * sf, w * sf)
        return tuple(own[i] if v is None else v for i, v in enumerate((frames, height, width)))

    @staticmethod
    def _keep_hook(
        known: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor, clean: bool | torch.Tensor = False
    ) -> Callable:
        """Sampling hook: where ``keep``, replace the latents by ``known`` noised to the step's sigma with the
        sampler's start noise (``known`` itself at the final sigma 0, and at every step where ``clean``: a bool,
        or a mask shaped like ``keep``)."""

        def hook(step: int, sigma: float, x: torch.Tensor) -> torch.Tensor:
            noised = add_noise(known, noise, torch.full((x.shape[0],), sigma, device=x.device))
            return torch.where(keep, torch.where(torch.as_tensor(clean, device=x.device), known, noised), x)

        return hook

    def _output(self, z: torch.Tensor, output_type: str) -> torch.Tensor:
        if output_type == "latent":
            return z
        if output_type == "video":
            return self.decode(z)
        raise ValueError(f"unknown output_type {output_type!r}; accepted: {', '.join(OUTPUT_TYPES)}")

    def _prompts(self, prompt: str | Sequence[str], b: int, name: str = "prompt") -> list[str]:
        prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
        if len(prompts) != b:
            raise ValueError(f"{name}: {len(prompts)} prompts for a batch of {b} inputs")
        return prompts

    def _latent_shape(self, b: int, frames: int, height: int, width: int) -> tuple[int, ...]:
        tf, sf = self.vae.temporal_factor, self.vae.spatial_factor
        return (b, self.vae.config.latent_channels, 1 + (frames - 1) // tf, height // sf, width // sf)

    def _check_size(self, frames: int, height: int, width: int) -> None:
        tf = self.vae.temporal_factor
        pt, ph, pw = self.dit.config.patch_size
        if frames < 1 or (frames - 1) % tf or (1 + (frames - 1) // tf) % pt:
            raise ValueError(
                f"frames must be 1 + {tf}k (1, {1 + tf}, {1 + 2 * tf}, {1 + 3 * tf}, ...); got {frames}"
            )
        mh, mw = self.size_multiple
        if height < mh or width < mw or height % mh or width % mw:
            raise ValueError(
                f"height and width must be positive multiples of {mh} and {mw} (VAE {self.vae.spatial_factor} x "
                f"patch {ph}x{pw}); got {width}x{height} (width x height)"
            )

    def _video_input(self, video: Media) -> torch.Tensor:
        """A file path or a tensor (3, h, w), (3, t, h, w) or (b, 3, t, h, w) -> (b, 3, t, h, w), checked. A
        file is centre-cropped to the size multiple (``data.io.fit_to_multiple``); a tensor must fit already."""
        if isinstance(video, (str, os.PathLike)):
            video = read_video(video, temporal_factor=self.vae.temporal_factor, multiple=self.size_multiple)[
                0
            ]
        ok = isinstance(video, torch.Tensor) and video.ndim in (3, 4, 5)
        if not ok or video.shape[1 if video.ndim == 5 else 0] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(
                f"expected a video (b, 3, t, h, w), (3, t, h, w) or an image (3, h, w); got {shape}"
            )
        if not video.is_floating_point():
            raise ValueError(f"expected a float video in [-1, 1]; got dtype {video.dtype} (use read_video)")
        if video.ndim == 3:
            video = video[:, None]
        if video.ndim == 4:
            video = video[None]
        self._check_size(*video.shape[2:])
        return video.float().to(self.vae.device)

    def _image_input(self, image: Media, name: str) -> torch.Tensor:
        """An image file or tensor -> (b, 3, 1, h, w), checked (a video gives an error, not its first frame)."""
        image = self._video_input(image)
        if image.shape[2] != 1:
            raise ValueError(f"animate takes an image (one frame) as {name}; got {image.shape[2]} frames")
        return image

    def _mask_input(self, mask: Media, t: int, h: int, w: int) -> torch.Tensor:
        """A mask file or tensor -> (1, t or 1, h, w) bool (True = regenerate), checked against the input."""
        if isinstance(mask, (str, os.PathLike)):
            mask = (read_video(mask, temporal_factor=1, multiple=self.size_multiple)[0] + 1) / 2  # -> [0, 1]
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a tensor or an image/video file; got {type(mask).__name__}")
        m = mask.float()
        if m.ndim == 5:
            m = m[0]
        if m.ndim == 4:  # (c, t, h, w): average the colour channels
            m = m.mean(dim=0)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3:
            raise ValueError(f"mask must be (h, w), (t, h, w) or (c, t, h, w); got {tuple(mask.shape)}")
        if tuple(m.shape[-2:]) != (h, w):
            raise ValueError(
                f"mask is {m.shape[-1]}x{m.shape[-2]} but the input is {w}x{h} (width x height); they must match"
            )
        if m.shape[0] not in (1, t):
            raise ValueError(f"mask has {m.shape[0]} frames but the input has {t}; give 1 (an image) or {t}")
        return (m > 0.5)[None].to(self.vae.device)
