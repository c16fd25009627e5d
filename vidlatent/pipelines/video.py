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

Control (control). A VACE branch beside the denoiser (``control_branch``), or a Wan Fun-Control denoiser, which
reads the control video's latents on its own input channels (``pipelines.control``). What a denoiser takes
beside its noisy latents, and so which jobs it runs, is ``denoiser_input`` (``pipelines.denoisers``).

Letters: b batch, c channels, t frames, h height, w width, n text tokens, d text width,
k pixel frames per latent frame (the VAE's temporal factor), p q pixels per latent pixel (spatial factor).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from einops import rearrange, reduce, repeat

from .. import runtime
from ..checkpoint import is_wan_release, override_items, resolve_source
from ..checks import check_finite, check_option, check_weights_finite, model_cause
from ..config import list_presets, load_config, merge_config
from ..config.pipeline import (
    FIRST_FRAME,
    OUTPUT_TYPES,
    TEXT_ATTENTION,
    FrameSelection,
    PipelineConfig,
    PipelinePreset,
    SamplingOptions,
    check_pipeline_config,
)
from ..data.io import restore_size, write_video
from ..diffusion.flow import add_noise
from ..diffusion.sampling import SecondExpert, denoise, flow_edit, invert
from ..models import lora
from ..models.control import ControlBranch, ControlledDiT, Scale, check_fits
from ..models.dit import VideoDiT
from ..models.image import ENCODER_DIR, ImageEncoder
from ..models.text import TextEncoder, check_prompts
from ..models.vae import CausalVAE
from ..runtime import parallel
from . import loading
from .control import fun_control_inputs, sample_control
from .denoisers import CleanFrames, ExpertPlacement, check_experts, denoiser_input
from .inputs import Media, as_mask, as_video, check_pixels, is_file_input, read_clip, read_mask
from .interpolate import arc_length_weights, content_order, lerp, morph_weights, staggered_slerp
from .loading import PIPELINE_FILES
from .wan import (
    SCHEDULER_SAMPLERS,
    WAN_DEFAULTS,
    WAN_DIT_FILE,
    WAN_NEGATIVE_PROMPT,
    WAN_PIPELINES,
    WAN_RELEASE_DEFAULTS,
    WAN_VAE_FILE,
    diffusers_pipeline_config,
    wan_release_config,
    wan_release_missing,
)

MORPH_MODES = ("latent", "noise")
# the jobs a denoiser that takes more than text runs (``denoiser_input``); a text-to-video one runs every job
JOBS_BY_INPUT = {"image": ("animate",), "fun_control": ("control",)}
# how far a noise morph inverts its stills by default; deeper, its middle frames lose the object (default model,
# 72 pairs of stills, stagger 0.3: 100% of the middle frames hold one at 0.1, 99.4% at 0.2, 81.9% at 1;
# scripts/eval_morph.py)
NOISE_MORPH_STRENGTH = 0.1
# how much a noise morph staggers its positions' switch from A to B (``staggered_slerp``); with 0 (a plain slerp)
# two nearby objects of complementary colours fade to grey half way (default model, 72 pairs: 99.7% of the
# middle frames hold an object, 2 morphs lose it; 0.3: 100%, every morph keeps one; on 288 further pairs 99.0%
# and 99.9%; scripts/eval_morph.py)
NOISE_MORPH_STAGGER = 0.3
SOURCE_GUIDANCE = 4.0  # FlowEdit's default source-side guidance (the best of 1.5-4 on the default model)

__all__ = [  # the names this module has always offered (the configs and Wan's conventions live next door now)
    "FIRST_FRAME", "MORPH_MODES", "NOISE_MORPH_STAGGER", "NOISE_MORPH_STRENGTH", "OUTPUT_TYPES", "PIPELINE_FILES", "SCHEDULER_SAMPLERS", "SOURCE_GUIDANCE",
    "TEXT_ATTENTION", "WAN_DEFAULTS", "WAN_DIT_FILE", "WAN_NEGATIVE_PROMPT", "WAN_PIPELINES",
    "WAN_RELEASE_DEFAULTS", "WAN_VAE_FILE", "FrameSelection", "Media", "PipelineConfig",
    "PipelinePreset", "SamplingOptions", "VideoPipeline", "check_pipeline_config",
    "diffusers_pipeline_config", "is_wan_release", "latent_mask", "wan_release_config", "wan_release_missing",
]  # fmt: skip


def _check_control_scale(scale: Scale) -> None:
    """ValueError unless every hint weight (one number, one per hint or (b, hints)) is a finite number in the range
    a pipeline.json's ``control_scale`` accepts (``checks.OPTION_RANGES``)."""
    try:
        values = torch.as_tensor(scale, dtype=torch.float32).flatten().tolist()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(  # noqa: B904 (the value says it)
            f"the control scale must be one number, one per hint or a (b, hints) tensor; got {scale!r}"
        )
    for value in values:
        check_option("control_scale", value)


def _check_fun_control_options(mask, reference, scale) -> None:
    """ValueError for control options a Wan Fun-Control denoiser has no use for (VACE's mask and hint scale, a
    second reference image)."""
    if mask is not None:
        raise ValueError(
            "a Wan Fun-Control denoiser takes no mask (VACE's keep/generate mask): it follows the whole control "
            "video; drop mask (--mask)"
        )
    if scale is not None and not (isinstance(scale, (int, float)) and scale == 1):
        raise ValueError(
            "a Wan Fun-Control denoiser takes no control scale (VACE's hint weight): its control is part of its "
            f"input; drop scale (--scale); got {scale!r}"
        )
    count = len(VideoPipeline._as_list(reference))
    if count > 1:
        raise ValueError(
            f"a Wan Fun-Control denoiser takes one reference image (the first frame to show); got {count}"
        )


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
    ``animate``, ``morph``, and ``control`` where the denoiser has a control branch (``control_branch``, a
    ``models.control.ControlBranch`` beside ``dit``: a VACE folder's, ``control/`` in a folder of ours, or
    ``load_control``) or is a Wan Fun-Control one (control latents on its input channels). Which jobs a denoiser
    runs follows from what it takes beside its latents (``denoiser_input``). Videos are (b, 3, t, h, w) floats in
    [-1, 1]; an image is a one-frame video.

    Random draws come from CPU generators seeded per call, so a seed gives the same noise on every device.
    Arguments left ``None`` take the value in ``config``.

    Every sampling job takes the ``SamplingOptions`` fields (``steps``, ``guidance``, ``sampler``, ``shift``,
    ``seed``, ``negative_prompt``, ``output_type``, ``progress``) as keywords or as ``options=`` (keywords win);
    ``_options`` reads them once. Jobs that read files take ``selection=`` (``FrameSelection``) and read them
    through ``pipelines.inputs`` as the CLI does. A new job is a method here: check and read its inputs
    (``_video_input`` / ``_image_input``), ``opts = self._options(options, sampling, "job")``, draw
    ``_noise``, build a hook or model keywords if it keeps or conditions on something, call ``_sample`` once,
    return ``_output``.

    Keywords ``offload`` ("none", "model", "blocks"), ``weights_dtype`` (None, "fp8"), ``compile``,
    ``attention`` and ``split_guidance`` (guidance's halves as two calls: half the activation memory) choose how
    it runs, not what it computes (``vidlatent.runtime.configure``); ``cache`` (step caching: a threshold or a
    settings file) trades a little of what it computes for speed.
    """

    def __init__(
        self,
        vae: CausalVAE,
        dit: VideoDiT,
        text_encoder: TextEncoder,
        config: PipelineConfig,
        image_encoder: ImageEncoder | None = None,
        control_branch: ControlBranch | None = None,
        dit_2: VideoDiT | None = None,
        **runtime_options,
    ):
        c, tf, dcfg = vae.config.latent_channels, vae.temporal_factor, dit.config
        image_conditioned = dcfg.image_dim is not None
        kind = denoiser_input(dcfg, c, tf)  # "image" without CLIP tokens: Wan 2.2 I2V-A14B
        if kind is None or (image_conditioned and kind == "text"):
            raise ValueError(
                f"the denoiser takes {dcfg.in_channels} and returns {dcfg.out_channels} latent channels, but the "
                f"VAE makes {c}: a text-to-video denoiser takes and returns {c}, an image-conditioned one (Wan "
                f"I2V) takes {2 * c + tf} (noise, a {tf}-channel frame mask, image latents) and a Wan Fun-Control "
                f"one {3 * c} (noise, control latents, first-frame latents), and both return {c} (Wan 2.2 "
                "TI2V-5B's denoiser works on the 48 channels of the Wan 2.2 VAE, the others on the 16 of Wan "
                "2.1's)"
            )
        if dit_2 is not None:
            check_experts(dit, dit_2)
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
        self.dit_2 = dit_2  # two experts (Wan 2.2 A14B): the low-noise one; dit is the high-noise one
        self.control_branch, self.weights_placement = None, None
        self._cache, self.cache_states = None, []  # step caching (see the cache property)
        self.expert_placement: ExpertPlacement | None = None  # see offload_experts
        if control_branch is not None:
            self.load_control(control_branch)
        self.config = check_pipeline_config(config)
        self._check_boundary()
        self.progress = True  # tqdm bars during sampling; each job's progress= overrides it
        # guidance's two halves one after the other (half the activations held; see runtime.configure)
        self.split_guidance = False
        # offload, weights_dtype, compile, attention: how it runs, not what it computes
        self.weights_placement = runtime.configure(self, **runtime_options)

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        device=None,
        dtype=None,
        overrides=None,
        check_finite: bool = False,
        **runtime_options,
    ) -> VideoPipeline:
        """Load from a pipeline folder, a preset name (``tiny``: random weights, for tests) or ``"default"``.

        A folder holds ``vae/``, ``dit/`` (or diffusers' ``transformer/``), ``text_encoder/`` and
        ``pipeline.json`` or ``pipeline.yaml`` (``PipelineConfig`` fields; defaults where absent), as written by
        ``save_pretrained``. A diffusers Wan folder (``model_index.json``) and an original Wan 2.1 release folder
        (config.json of a ``WanModel``, ``Wan2.1_VAE.pth``, Wan's T5 checkpoint and ``google/umt5-xxl/``) load
        with Wan's conventions and defaults. ``dtype`` applies to all three models (default: as stored, fp32 for
        presets). ``overrides``: ``PipelineConfig`` fields (a dict or ``key=value`` strings) over the folder's.
        ``check_finite``: scan a folder's weights for NaN/inf (``NonFiniteError`` naming the tensors).
        ``runtime_options`` (``offload``, ``weights_dtype``, ``compile``, ``attention``, ``cache``,
        ``split_guidance``): see ``runtime.configure``; with offload the weights are read to the host and
        ``device`` is where the parts run.
        """
        run_on, device = device, runtime.load_device(runtime_options.get("offload", "none"), device)
        source = resolve_source(src, "pipeline", presets=["default", *list_presets("pipeline")])
        if source.kind == "preset":
            pipe = cls.from_preset(load_config(PipelinePreset, "pipeline", source.name), device, dtype)
        elif source.kind == "file":
            raise FileNotFoundError(
                f"no pipeline at {source.name!r}: not a folder, and not a preset "
                f"({', '.join(['default', *list_presets('pipeline')])})"
            )
        else:
            pipe = loading.from_folder(cls, source.path, device, dtype)
            if check_finite:
                for name, model in (
                    ("VAE", pipe.vae),
                    ("denoiser", pipe.dit),
                    ("text encoder", pipe.text_encoder),
                    ("control branch", pipe.control_branch),
                ):
                    if model is not None:
                        check_weights_finite(model, f"the {name} of {src}")
        if overrides:
            pipe.config = check_pipeline_config(merge_config(pipe.config, override_items(overrides)))
        if runtime_options:
            pipe.weights_placement = runtime.configure(pipe, **runtime_options, device=run_on)
        return pipe

    @classmethod
    def from_preset(cls, preset: PipelinePreset, device=None, dtype=None) -> VideoPipeline:
        """Random-weight pipeline from component presets; the same preset gives the same weights."""
        return loading.from_preset(cls, preset, device, dtype)

    def save_pretrained(self, folder: str | os.PathLike, copy_text_encoder: bool = True) -> None:
        """Write ``vae/``, ``dit/``, ``text_encoder/``, ``pipeline.json`` (each file atomically), for an
        image-conditioned denoiser ``image_encoder/`` (with its image processor), and ``control/`` for a
        control branch.

        ``copy_text_encoder=False`` (Hugging Face encoders only) records where the encoder was loaded from
        instead of copying its weights (UMT5-XXL is 11 GB).
        """
        loading.save_pipeline(self, folder, copy_text_encoder)

    def load_control(self, branch: ControlBranch | str | os.PathLike) -> None:
        """Attach a control branch (a ``ControlBranch``, or a folder its ``save_pretrained`` wrote) for the
        ``control`` job, replacing any; ``save_pretrained`` writes it to ``control/``. ValueError naming both
        shapes when it was made for another denoiser (width, heads, blocks) or reads control latents this VAE
        does not make; nothing is attached then."""
        if self.denoiser_input == "fun_control":
            raise ValueError(
                "this denoiser is Wan Fun-Control: it reads its control video on its input channels and takes no "
                "control branch (VACE); run control(prompt, control=video) on it as it is"
            )
        if not isinstance(branch, ControlBranch):
            dtype = self.dit.patch_embed.weight.dtype
            branch = ControlBranch.from_pretrained(branch, device=self.device, dtype=dtype).eval()
        check_fits(branch.config, self.dit.config)
        sf, c = self.vae.spatial_factor, self.vae.config.latent_channels
        if branch.config.in_channels != 2 * c + sf * sf:
            raise ValueError(
                f"the control branch reads control latents of {branch.config.in_channels} channels; this VAE "
                f"makes {2 * c + sf * sf} (2 x {c} latent channels + a {sf} x {sf} mask folded to {sf * sf})"
            )
        self.control_branch = branch

    # ------------------------------------------------------------------------------------ LoRAs

    def load_lora(
        self, path: str | os.PathLike, scale: float = 1.0, name: str | None = None, expert: int = 1
    ) -> str:
        """Add a LoRA to the denoiser for every job from now on; returns its name (default: the file's stem).

        Reads every published Wan 2.1 / 2.2 layout (diffusers/peft, Kohya/ComfyUI, musubi-tuner, full-rank
        ``.diff``/``.diff_b`` step-distillation LoRAs; see ``vidlatent.models.lora``). Several LoRAs add up,
        each at its own ``scale``. A file that does not fit the denoiser (keys naming no layer, shapes of
        another model) raises one error listing what is wrong, and nothing is applied. ``expert``: 1, the
        denoiser (a two-expert pipeline's high-noise one), or 2, a two-expert pipeline's low-noise one (a
        Wan 2.2 A14B LoRA pair is one file for each; diffusers' ``load_into_transformer_2=True``).
        """
        return lora.load_lora(self._expert(expert), path, scale=scale, name=name)

    def _expert(self, expert: int) -> VideoDiT:
        if expert == 1:
            return self.dit
        if expert == 2 and self.dit_2 is not None:
            return self.dit_2
        accepted = (
            "1 (the denoiser)" if self.dit_2 is None else "1 (the high-noise expert) or 2 (the low-noise one)"
        )
        raise ValueError(f"no expert {expert!r} in this pipeline; accepted: {accepted}")

    def _experts(self) -> list[VideoDiT]:
        return [self.dit] if self.dit_2 is None else [self.dit, self.dit_2]

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change a loaded LoRA's scale (0 switches it off, exactly), in each expert that holds one so named."""
        for dit, own in self._holders(name) or [(self.dit, name)]:
            lora.set_lora_scale(dit, own, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove the LoRA ``name`` (all of them when None); the denoiser is as it was before loading."""
        if name is None:
            for dit in self._experts():
                lora.unload_lora(dit)
            return
        for dit, own in self._holders(name) or [(self.dit, name)]:
            lora.unload_lora(dit, own)

    def _holders(self, name: str) -> list[tuple[VideoDiT, str]]:
        """(expert, its name for the LoRA) of each expert holding ``name`` (``NAME@2``: the second's only)."""
        if self.dit_2 is not None and name.endswith("@2"):
            return [(self.dit_2, name[:-2])] if name[:-2] in lora.lora_scales(self.dit_2) else []
        return [(dit, name) for dit in self._experts() if name in lora.lora_scales(dit)]

    def fuse_lora(self, keep_originals: bool = True) -> None:
        """Fold the loaded LoRAs, at their scales, into the denoiser's weights: same results, no extra cost
        per step. Until ``unfuse_lora``, LoRAs cannot be loaded, unloaded or rescaled; ``save_pretrained``
        writes the fused weights. ``keep_originals=False``: bf16/fp16 weights are not copied to the CPU
        first, which saves memory but makes ``unfuse_lora`` inexact by a rounding step per weight."""
        holders = [dit for dit in self._experts() if lora.lora_scales(dit)] or [self.dit]
        for dit in holders:
            lora.fuse_lora(dit, keep_originals)

    def unfuse_lora(self) -> None:
        """Take fused LoRAs out of the weights again (see ``fuse_lora``); they stay loaded."""
        for dit in self._experts():
            lora.unfuse_lora(dit)

    @property
    def loras(self) -> dict[str, float]:
        """{name: scale} of the loaded LoRAs (of both experts: the second's names end in ``@2``)."""
        scales = lora.lora_scales(self.dit)
        if self.dit_2 is not None:
            scales.update({f"{n}@2": v for n, v in lora.lora_scales(self.dit_2).items()})
        return scales

    @property
    def cache(self) -> runtime.StepCache | None:
        """Step caching for every job (``runtime.cache``): set a threshold, a settings file (``PATH[:LEVEL]``),
        a ``StepCache`` or None (off). After a job, ``cache_states`` holds each denoiser's ``CacheState``."""
        return self._cache

    @cache.setter
    def cache(self, spec) -> None:
        self._cache = runtime.cache_settings(spec, self.dit)

    @property
    def denoiser_input(self) -> str:
        """What the denoiser takes beside its noisy latents (``denoisers.DENOISER_INPUTS``): ``"text"`` (every
        job), ``"image"`` (Wan I2V: animate) or ``"fun_control"`` (Wan2.1-Fun Control: control)."""
        return denoiser_input(self.dit.config, self.vae.config.latent_channels, self.vae.temporal_factor)

    @property
    def device(self) -> torch.device:
        """Where the jobs run (with ``offload_experts``, the active expert's device; with ``offload``, the
        accelerator, while the weights wait on the host)."""
        placement = self.weights_placement or self.expert_placement
        return placement.device if placement is not None else next(self.dit.parameters()).device

    # ------------------------------------------------------------------------------------ two experts

    def offload_experts(self, device: torch.device | str | None = None) -> None:
        """Two experts (Wan 2.2 A14B): keep only the active one on ``device`` (default: where the denoiser is
        now); the other waits in CPU memory. Each run starts with the high-noise expert on the device and swaps
        the two once, at the boundary (``denoisers.ExpertPlacement``): one expert's memory on the accelerator
        instead of two, for two host-device copies of an expert per run. The results are the same."""
        if self.dit_2 is None:
            raise ValueError("offload_experts applies to a pipeline with two experts (Wan 2.2 A14B: dit_2)")
        self.expert_placement = ExpertPlacement(self.dit, self.dit_2, device or self.device)
        self.expert_placement.start()

    def _check_boundary(self) -> None:
        """Two experts need a boundary, a boundary needs two experts."""
        if self.dit_2 is not None and self.config.boundary is None:
            raise ValueError(
                "this pipeline has two experts (dit and dit_2) but no boundary: set the config's boundary (the "
                "timestep fraction where dit_2 takes over, e.g. 0.875 for Wan 2.2 T2V-A14B, 0.9 for I2V-A14B)"
            )
        if self.dit_2 is None and self.config.boundary is not None:
            raise ValueError(
                f"the config's boundary ({self.config.boundary}) hands the low-noise steps to a second expert, "
                "but this pipeline has one denoiser (no dit_2/, or transformer_2/ in a diffusers folder)"
            )

    def _check_one_expert(self, job: str) -> None:
        if self.dit_2 is not None:
            raise ValueError(
                f"{job} runs one denoiser; this pipeline has two experts (Wan 2.2 A14B): use generate, edit "
                "(without a source prompt), inpaint or animate"
            )

    @property
    def size_multiple(self) -> tuple[int, int]:
        """Heights and widths must be multiples of these: the VAE's spatial factor times the patch size."""
        _, ph, pw = self.dit.config.patch_size
        return self.vae.spatial_factor * ph, self.vae.spatial_factor * pw

    # ------------------------------------------------------------------------------------ pixels <-> latents

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video (b, 3, t, h, w) in [-1, 1] -> normalized latents (fp32): the posterior mean, normalized.

        ValueError for anything but a float tensor in [-1, 1] (``inputs.check_pixels``); NonFiniteError when the
        input or the latents hold NaN/inf (the error says which and why)."""
        check_pixels(video)
        check_finite(video, "the input video", "the frames given hold NaN/inf values")
        z = self.vae.normalize(self.vae.encode(video).mode().float())
        return check_finite(z, "VAE encoding", lambda: model_cause("VAE", self.vae))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents (b, c, t', h', w') -> video (b, 3, 1 + 4(t'-1), 8h', 8w') fp32 in [-1, 1].

        NonFiniteError when the latents or the decoded frames hold NaN/inf."""
        check_finite(latents, "the latents to decode", "they hold NaN/inf values")
        z = self.vae.denormalize(latents.float())
        par = parallel.active(self)  # under torchrun: the VAE's tiles shared among the ranks
        video = (self.vae.decode(z) if par is None else par.decode(self.vae, z)).float()
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
        noise: torch.Tensor | None = None,
        options: SamplingOptions | None = None,
        **sampling,
    ) -> torch.Tensor:
        """Text to video: (b, 3, frames, height, width) in [-1, 1], one video per prompt; ``frames=1`` is
        text-to-image. ``output_type="latent"`` returns the normalized latents instead.

        frames must be 1 + 4k and height, width multiples of ``size_multiple`` (VAE 8 x the denoiser's patch: 8
        for the default model, 16 for Wan): ValueError otherwise.
        ``noise``: the start noise (b, c, t', h', w') instead of one drawn from ``seed`` (the sizes left unset
        follow its shape); every job that samples takes it, shaped like its latents.
        """
        opts = self._options(options, sampling, "generate", negative_prompt)
        cfg = self.config
        prompts = check_prompts(prompt, "prompt")
        if noise is not None:  # the given start noise sets the size the user left out
            frames, height, width = self._pixel_size(noise, frames, height, width)
        frames = cfg.frames if frames is None else frames
        height, width = cfg.height if height is None else height, cfg.width if width is None else width
        self._check_size(frames, height, width)
        noise, generator = self._noise(
            self._latent_shape(len(prompts), frames, height, width), opts.seed, noise
        )
        z = self._sample(noise, prompts, opts, generator)
        return self._output(z, opts.output_type)

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
        selection: FrameSelection | None = None,
        noise: torch.Tensor | None = None,
        options: SamplingOptions | None = None,
        **sampling,
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
        given = SamplingOptions.from_keywords(options, sampling, "edit")
        if source_prompt is not None and given.sampler not in (None, "euler"):
            raise ValueError(
                f"an edit with source_prompt runs on the euler grid; got sampler {given.sampler!r}"
            )
        if source_guidance is not None and source_prompt is None:
            raise ValueError("source_guidance is FlowEdit's: give source_prompt (what the input shows) too")
        opts = self._options(given, {}, "edit", negative_prompt)
        video, fit = self._video_input(video, selection)
        z0 = self.encode(video)
        if source_prompt is None or strength == 0:
            z = self.edit_latents(
                z0, prompt, strength, noise=noise, options=replace(opts, output_type="latent")
            )
            return self._output(z, opts.output_type, fit)
        self._check_job()
        self._check_one_expert("an edit with source_prompt (FlowEdit)")
        # the start noise is drawn (and left unused) as SDEdit draws it, so a seed gives the generator the same state
        _, generator = self._noise(z0.shape, opts.seed, noise)
        source_guidance = check_option(
            "source_guidance", SOURCE_GUIDANCE if source_guidance is None else source_guidance
        )
        context, mask = self.encode_text(self._prompts(prompt, len(z0)))
        source, source_mask = self.encode_text(self._prompts(source_prompt, len(z0), "source_prompt"))
        negative = self._negative(opts.negative_prompt, opts.guidance != 1 or source_guidance != 1)
        target, source_model = self._cached([self.dit, self.dit])  # a step cache: one state per side
        z = flow_edit(target, z0, context, mask, source, source_mask, **negative, guidance=opts.guidance,
                      source_guidance=source_guidance, steps=opts.steps, shift=opts.shift,
                      strength=strength, generator=generator, progress=opts.progress,
                      source_model=source_model, **self._split_guidance())  # fmt: skip
        return self._output(z, opts.output_type, fit)

    @torch.no_grad()
    def edit_latents(
        self,
        latents: torch.Tensor,
        prompt: str | Sequence[str],
        strength: float = 0.6,
        negative_prompt: str | None = None,
        *,
        noise: torch.Tensor | None = None,
        options: SamplingOptions | None = None,
        **sampling,
    ) -> torch.Tensor:
        """SDEdit on normalized latents (b, c, t', h', w') (what ``encode`` returns) -> normalized latents: the
        same as ``edit(..., output_type="latent")`` without its encoding (``edit`` calls it after encoding).
        """
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1]; got {strength}")
        opts = self._options(options, sampling, "edit_latents", negative_prompt)
        z0 = latents.to(self.device, torch.float32)
        if strength == 0:
            return z0.clone()
        noise, generator = self._noise(z0.shape, opts.seed, noise)
        init = z0 if strength < 1 else None
        return self._sample(noise, self._prompts(prompt, len(z0)), opts, generator, init, strength)

    @torch.no_grad()
    def inpaint(
        self,
        video: Media,
        mask: Media,
        prompt: str | Sequence[str],
        strength: float = 1.0,
        negative_prompt: str | None = None,
        *,
        selection: FrameSelection | None = None,
        noise: torch.Tensor | None = None,
        options: SamplingOptions | None = None,
        **sampling,
    ) -> torch.Tensor:
        """Regenerate the masked part of ``video`` (tensor or file) and keep the rest.

        mask: white / True / > 0.5 = regenerate; values in [0, 1] (a file's pixels are mapped there). A
        one-frame mask, (h, w), (1, h, w), (c, 1, h, w) or an image file, applies to every frame; a per-frame
        mask, (t, h, w), (c, t, h, w) or a video file (its frames selected as the input's), has the input's
        frame count. A tensor's colour channels c are averaged; a file must be black and white and opaque
        (``inputs.read_mask``). Its height and width must be the input's. A mask that selects nothing warns:
        the output is then the input's reconstruction. It is taken to latent resolution by ``latent_mask`` (a latent is regenerated if any of
        its pixels is); the kept latents are pasted at every step (see the module docstring), so the kept
        region of the output latents equals the input's latents exactly, and decoded pixels away from the
        mask equal the input's VAE reconstruction up to the decoder's reach. strength < 1 starts the
        regenerated region from the noised input (SDEdit inside the mask).
        """
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1]; got {strength}")
        opts = self._options(options, sampling, "inpaint", negative_prompt)
        source = video
        video, fit = self._video_input(video, selection)
        b, _, t, h, w = video.shape
        if is_file_input(mask):  # fitted as the input was; a file input's own size must be the mask's
            size = fit["source_size"] if is_file_input(source) else None
            mask = read_mask(mask, selection, self.size_multiple, t, size)
        regenerate = as_mask(mask, t, h, w)
        if not regenerate.any():
            warnings.warn(
                "the inpainting mask selects nothing (no pixel above 0.5): the output is the input's reconstruction",
                stacklevel=2,
            )
        keep = ~latent_mask(regenerate, self.vae.temporal_factor, self.vae.spatial_factor)
        z0 = self.encode(video)
        noise, generator = self._noise(z0.shape, opts.seed, noise)
        hook = self._keep_hook(z0, keep.to(z0.device), noise)
        init = z0 if strength < 1 else None
        z = self._sample(noise, self._prompts(prompt, b), opts, generator, init, strength, hook)
        return self._output(z, opts.output_type, fit)

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
        selection: FrameSelection | None = None,
        noise: torch.Tensor | None = None,
        options: SamplingOptions | None = None,
        **sampling,
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
        self._check_job("animate")
        first_frame = self.config.first_frame if first_frame is None else first_frame
        if first_frame not in FIRST_FRAME:
            raise ValueError(f"unknown first_frame {first_frame!r}; accepted: {', '.join(FIRST_FRAME)}")
        opts = self._options(options, sampling, "animate", negative_prompt)
        image, fit = self._image_input(image, "image", selection)
        b, _, _, h, w = image.shape
        last = None if last_image is None else self._image_input(last_image, "last_image", selection)[0]
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
        noise, generator = self._noise(shape, opts.seed, noise)
        clean_frames = None
        if self.denoiser_input == "text":
            start, hook, model_kwargs = self._keep_frames(image, last, noise, first_frame != "noised")
            if first_frame == "clean_sigma0":
                clean_frames = torch.zeros(shape[2], dtype=torch.bool)
                clean_frames[0] = True
        else:
            start, hook, model_kwargs = self._wan_image_condition(image, last, shape)
        init = start if strength < 1 else None
        z = self._sample(noise, self._prompts(prompt, b), opts, generator, init, strength, hook, model_kwargs,
                         clean_frames)  # fmt: skip
        return self._output(z, opts.output_type, fit)

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
        kwargs = {"condition": torch.cat([mask, latents], dim=1)}
        if self.image_encoder is not None:  # Wan 2.1 I2V / FLF2V (Wan 2.2 I2V-A14B has no CLIP)
            tokens = self.image_encoder.encode(rearrange(torch.cat(stills), "b c 1 h w -> b c h w"))
            kwargs["image"] = rearrange(tokens, "(n b) i d -> b (n i) d", b=b)
        # the image's own latent: the causal VAE encodes frame 0 alone
        start = latents[:, :, :1].expand(shape)
        return start, None, kwargs

    @torch.no_grad()
    def control(
        self,
        prompt: str | Sequence[str],
        control: Media,
        mask: Media | None = None,
        reference: Media | Sequence[Media] | None = None,
        scale: Scale | None = None,
        negative_prompt: str | None = None,
        *,
        frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        selection: FrameSelection | None = None,
        noise: torch.Tensor | None = None,
        options: SamplingOptions | None = None,
        **sampling,
    ) -> torch.Tensor:
        """A video steered by a ``control`` video (tensor or file), through the pipeline's control branch
        (VACE's inputs, built by ``pipelines.control``): (b, 3, t, h, w) in [-1, 1] at the control's size.

        ``control``: the signal to follow (a pose, depth, edge or silhouette video; with a ``mask``, a video
        whose unmasked part is kept). ``mask``: white / > 0.5 = generate, black = keep the control's pixels; a
        one-channel tensor (b or 1, 1, t or 1, h, w), (t, h, w) or (h, w), or a black-and-white image or video
        file of the control's size; one frame applies to every frame. ``reference``: images (tensors (3, h, w)
        or (b, 3, h, w), or files; any size) the video should show, each put in front as a latent frame of its
        own and dropped from the output. ``scale``: the hints' weight, one float or one per hint (0: the
        denoiser alone, exactly; None: the pipeline's ``control_scale``, 1 unless its folder says otherwise).
        Without a guidance given (keyword or ``options``) the job guides by the pipeline's ``control_guidance``
        where it has one (the default model's control is followed best unguided: its pipeline.json says 1).
        ``frames``, ``height``, ``width``: the output's, which is the control's: a file is read to them
        (``selection`` says how, as for ``edit``), a tensor must have them. ``noise``: the start noise
        (b, c, references + t', h', w'). LoRAs, negative prompts, seeds and the sampler options
        apply as in every job.

        A Wan Fun-Control denoiser (``denoiser_input == "fun_control"``) needs no branch: it reads the control
        video's latents on its input channels (``pipelines.control.fun_control_inputs``). Its ``reference`` is
        one image, the first frame to show (stretched to the control's size; its CLIP tokens too); it takes no
        ``mask`` and no ``scale``, and its ``noise`` is (b, c, t', h', w').
        """
        fun = self.denoiser_input == "fun_control"
        if self.control_branch is None and not fun:
            raise ValueError(
                "this pipeline has no control branch: load a VACE model (a diffusers WanVACEPipeline folder, "
                "e.g. Wan2.1-VACE-1.3B-diffusers), a pipeline folder with control/, or attach one with "
                "pipe.load_control(folder) (on the command line: --control-branch FOLDER)"
            )
        self._check_job("control")
        if fun:
            _check_fun_control_options(mask, reference, scale)
        scale = self.config.control_scale if scale is None else scale
        _check_control_scale(scale)
        opts = self._options(options, sampling, "control", negative_prompt, self.config.control_guidance)
        source = control
        if is_file_input(control):  # read to the output's size where one is asked
            if (height is None) != (width is None):
                raise ValueError("give both height and width, or neither (the control video's size)")
            sel = selection or FrameSelection()
            selection = replace(sel, frames=sel.frames if frames is None else frames,
                                size=sel.size if height is None else (height, width))  # fmt: skip
        video, fit = self._video_input(control, selection)
        b, _, t, h, w = video.shape
        want = (frames or t, height or h, width or w)
        if want != (t, h, w):
            raise ValueError(
                f"the control video is {t} frames of {w}x{h} (width x height); the output asked for is "
                f"{want[0]} frames of {want[2]}x{want[1]}: give a control of the output's size"
            )
        references = [self._control_reference(r) for r in self._as_list(reference)]
        if fun:
            z = self._fun_control(prompt, video, references[0] if references else None, noise, opts)
            return self._output(z, opts.output_type, fit)
        mask = self._control_mask(
            mask, video, selection, fit["source_size"] if is_file_input(source) else None
        )
        shape = self._latent_shape(b, t, h, w)
        shape = (b, shape[1], len(references) + shape[2], *shape[3:])
        noise, generator = self._noise(shape, opts.seed, noise)
        self._check_one_expert("control")
        context, context_mask = self.encode_text(self._prompts(prompt, b))
        negative = self._negative(opts.negative_prompt, opts.guidance != 1)
        model = ControlledDiT(self.dit, self.control_branch)
        z = sample_control(self.vae, model, context, context_mask, control=video, mask=mask,
                           reference=references or None, scale=scale, noise=noise, generator=generator,
                           output_type="latent", cache=self._cache_state(), **negative,
                           timesteps=self.config.timesteps,
                           scheduler_config=self.config.scheduler_config, sigmas=self.config.sigmas,
                           **self._split_guidance(), **opts.loop_keywords())  # fmt: skip
        return self._output(z, opts.output_type, fit)

    def _fun_control(self, prompt, video, reference, noise, opts: SamplingOptions) -> torch.Tensor:
        """Wan Fun-Control's run: the control video's (and the first frame's) latents joined to the noisy ones,
        and the first frame's CLIP tokens, at every step (``pipelines.control.fun_control_inputs``); returns
        the latents."""
        b, _, t, h, w = video.shape
        noise, generator = self._noise(self._latent_shape(b, t, h, w), opts.seed, noise)
        self._check_one_expert("control")
        kwargs = fun_control_inputs(self.vae, video, reference, self.image_encoder)
        return self._sample(noise, self._prompts(prompt, b), opts, generator, model_kwargs=kwargs)

    def _control_mask(self, mask, video, selection, source_size) -> torch.Tensor | None:
        """A control job's mask (tensor or file) -> (b, 1, t, h, w) float in [0, 1] on the video's device;
        ValueError unless it is one channel (a file: black and white) of the control's size."""
        if mask is None:
            return None
        b, _, t, h, w = video.shape
        if is_file_input(mask):
            mask = read_mask(mask, selection, self.size_multiple, t, source_size)
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a tensor or an image/video file; got {type(mask).__name__}")
        m = mask.float()
        m = m[None] if m.ndim == 2 else m  # (h, w) -> (1, h, w): one frame
        m = m[None] if m.ndim == 3 else m  # (t, h, w) -> (1, t, h, w)
        m = m[None] if m.ndim == 4 else m  # (1, t, h, w) -> (1, 1, t, h, w)
        if m.ndim != 5 or m.shape[1] != 1 or m.shape[0] not in (1, b) or m.shape[2] not in (1, t):
            raise ValueError(
                f"the mask must be one channel, (b, 1, t, h, w) = {(b, 1, t, h, w)} (b and t may be 1), "
                f"(t, h, w) or (h, w); got {tuple(mask.shape)}"
            )
        if tuple(m.shape[-2:]) != (h, w):
            raise ValueError(
                f"the mask is {m.shape[-1]}x{m.shape[-2]} but the control video is {w}x{h} (width x height)"
            )
        return m.expand(b, 1, t, h, w).to(video.device)

    def _control_reference(self, image: Media) -> torch.Tensor:
        """A reference image (file, or tensor (3, h, w) / (b, 3, h, w), any size) -> a tensor on the VAE's
        device (``pipelines.control.as_images`` checks its shape)."""
        if is_file_input(image):
            image = read_clip(image, None, None, self.vae.temporal_factor, image=True)[0][:, 0]
        if not isinstance(image, torch.Tensor):
            raise ValueError(
                f"a reference image must be a tensor or an image file; got {type(image).__name__}"
            )
        return image.float().to(self.vae.device)

    @staticmethod
    def _as_list(media) -> list:
        """None, one input or a sequence of inputs -> a list."""
        if media is None:
            return []
        return [media] if isinstance(media, (torch.Tensor, str, os.PathLike)) else list(media)

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
        strength: float | None = None,
        stagger: float | None = None,
        refine: int = 2,
        respace: bool = False,
        batch_size: int = 8,
        selection: FrameSelection | None = None,
        options: SamplingOptions | None = None,
        **sampling,
    ) -> torch.Tensor:
        """A morph video (1, 3, frames, h, w) from image A to image B (same size); each frame is an image.

        ``mode="latent"``: slerp between the images' normalized latents (direction along the great circle,
        norm linear), each frame decoded on its own; frames 0 and -1 are exactly the VAE reconstructions of
        A and B. No prompts, no sampling. ``mode="noise"``: invert A and B towards noise along the flow ODE
        (``sampling.invert``: Euler on the sampler's sigma grid, ``refine`` fixed-point iterations per step),
        ``strength`` of the way (the share of the steps, as an edit's; default ``NOISE_MORPH_STRENGTH``, 1: to
        pure noise), slerp the two, interpolate the prompts' token embeddings linearly (both prompts padded to
        one length, with the union of their masks, so inversion and regeneration see the same context), and
        regenerate every frame from there deterministically with the Euler sampler; the endpoints reconstruct
        A and B up to the inversion error (first order in 1/steps with ``refine=0``; each refinement shrinks it
        ~10x). A deeper inversion leaves more of each frame to the denoiser, and on the default model loses
        the object in the middle of the path: of the middle frames of 72 morphs (stagger 0.3), 81.9% hold one
        at strength 1, 99.4% at 0.2, 100% at 0.1 (the latent morph: 99.9%);
        ``scripts/eval_morph.py`` measures it, docs/pipelines.md and README.md have the figures.
        ``stagger`` in [0, 1) (either mode; default 0 for ``latent``, ``NOISE_MORPH_STAGGER`` for ``noise``):
        each latent position switches from A to B at its own time (``staggered_slerp`` ordered by
        ``content_order`` of the two latents): what only B holds comes in before what only A holds goes, so
        the middle frames show both objects instead of two half-faded ones (which blend to grey where their
        colours are complementary). 0 is the plain slerp. With 0.3 every middle frame of the 72 noise morphs
        holds an object (100%, against 99.7% with 0; on 288 more pairs 99.9% against 99.0%); the price is a
        less even change (the largest step ~20% larger).
        ``guidance`` 1 by default (the round trip is exact only without guidance). The denoiser may answer
        unevenly along the path (two prompts: fast near one end); ``respace=True`` measures the latent steps
        and regenerates once more at weights that make them equal (``arc_length_weights``; twice the cost).
        ``easing``: "linear", "cosine" or "smoothstep" spacing of the frames. ``batch_size``: frames per
        denoiser / decoder batch. ``output_type="latent"`` returns the frames' latents (frames, c, 1, h', w').
        Sampling options: ``steps``, ``guidance``, ``shift``, ``output_type``, ``progress`` (the sampler is
        Euler, and nothing is drawn at random).
        """
        if mode not in MORPH_MODES:
            raise ValueError(f"unknown morph mode {mode!r}; accepted: {', '.join(MORPH_MODES)}")
        given = SamplingOptions.from_keywords(options, {"guidance": 1.0, **sampling}, "morph")
        for name in ("seed", "sampler", "negative_prompt"):
            if getattr(given, name) is not None:
                raise TypeError(f"morph() got an unexpected keyword argument {name!r}")
        opts = self._options(replace(given, sampler="euler"), {}, "morph")
        (a, fit), (b, _) = self._video_input(image_a, selection), self._video_input(image_b, selection)
        for name, x in (("image_a", a), ("image_b", b)):
            if x.shape[0] != 1 or x.shape[2] != 1:
                raise ValueError(f"{name} must be one image; got shape {tuple(x.shape)}")
        if a.shape != b.shape:
            raise ValueError(f"morph images must have one size; got {a.shape[-1]}x{a.shape[-2]} and "
                             f"{b.shape[-1]}x{b.shape[-2]} (width x height)")  # fmt: skip
        if mode == "latent" and (prompt_a is not None or prompt_b is not None or strength is not None):
            what = "prompts apply" if strength is None else "strength applies"
            raise ValueError(f"{what} to mode='noise' only; a latent morph does not sample")
        strength = NOISE_MORPH_STRENGTH if strength is None else strength
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1]; got {strength}")
        stagger = (0.0 if mode == "latent" else NOISE_MORPH_STAGGER) if stagger is None else stagger
        for name, value in (("stagger", stagger), ("refine", refine), ("batch_size", batch_size)):
            check_option(name, value)
        weights = morph_weights(self.config.frames if frames is None else frames, easing)
        z = self.encode(torch.cat([a, b]))
        order = content_order(z[0], z[1]) if stagger else None
        path = partial(staggered_slerp, order=order, stagger=stagger)  # path(x, y, weights)
        if mode == "latent":
            latents = path(z[0], z[1], weights)
        else:
            latents = self._noise_morph(
                z, weights, prompt_a or "", prompt_b or "", opts, strength, path, refine, respace, batch_size
            )
        if opts.output_type == "latent":
            return latents
        return restore_size(self.decode_images(latents, batch_size), fit)

    def _noise_morph(
        self,
        z,
        weights,
        prompt_a,
        prompt_b,
        opts: SamplingOptions,
        strength,
        path,
        refine,
        respace,
        batch_size,
    ):
        """Invert both images to noise (``strength`` of the way), interpolate the noises along ``path(x, y, w)``
        (the morph's slerp), lerp prompt tokens, regenerate with Euler; with ``respace``, regenerate once more
        at the weights that make the latent steps equal."""
        self._check_job()
        self._check_one_expert("a noise morph")
        self._uncached("a noise morph")  # its inversion is a fixed-point walk: skipped steps would bend it
        tokens, mask = self.encode_text([prompt_a, prompt_b])
        if mask is not None:  # the union: one context layout for every frame
            mask = mask.any(dim=0, keepdim=True).expand(2, -1)
        negative = self._negative(opts.negative_prompt, opts.guidance != 1)
        kw = dict(guidance=opts.guidance, steps=opts.steps, shift=opts.shift, progress=opts.progress,
                  **self._split_guidance())  # fmt: skip
        noise = invert(self.dit, z, tokens, mask, refine=refine, strength=strength, **negative, **kw)

        def regenerate(w: torch.Tensor) -> torch.Tensor:
            noises, contexts = path(noise[0], noise[1], w), lerp(tokens[0], tokens[1], w)
            masks = None if mask is None else mask[:1].expand(len(w), -1)
            parts = [slice(i, i + batch_size) for i in range(0, len(w), batch_size)]
            return torch.cat([denoise(self.dit, noises[p], contexts[p], None if masks is None else masks[p],
                                      sampler="euler", strength=strength, noised=True, **negative, **kw)
                              for p in parts])  # fmt: skip

        latents = regenerate(weights)
        return regenerate(arc_length_weights(weights, latents, weights)) if respace else latents

    # ------------------------------------------------------------------------------------ helpers

    def _cached(self, models: list) -> list:
        """``models`` each with a fresh step-cache state (kept in ``cache_states``), or as they are with no
        cache: every sampling run starts its cache afresh."""
        self.cache_states = [] if self.cache is None else [runtime.CacheState(self.cache) for _ in models]
        return [runtime.Cached(m, st) for m, st in zip(models, self.cache_states)] or models

    def _cache_state(self) -> runtime.CacheState | None:
        """One fresh step-cache state for a job that wraps its own denoiser (control), or None."""
        self.cache_states = [] if self.cache is None else [runtime.CacheState(self.cache)]
        return self.cache_states[0] if self.cache_states else None

    def _uncached(self, job: str) -> None:
        """``job`` runs without the step cache (say so in one line when one is set)."""
        if self.cache is not None:
            warnings.warn(f"step caching is not applied to {job}: it runs uncached", stacklevel=3)
            self.cache_states = []

    def _sample(self, noise, prompts, opts: SamplingOptions, generator, init=None, strength=1.0, hook=None,
                model_kwargs=None, clean_frames=None):  # fmt: skip
        """The one call to the sampling loop that every job makes. ``clean_frames`` (a (t,) bool): latent frames
        the denoiser is told are clean (noise level 0 at their tokens: Wan 2.2 TI2V)."""
        if model_kwargs is None:
            self._check_job()
        self._check_boundary()
        context, context_mask = self.encode_text(prompts)
        models = self._experts()
        if clean_frames is not None:
            models = [CleanFrames(dit, clean_frames) for dit in models]
        models = self._cached(models)
        second = None
        if self.dit_2 is None and opts.guidance_2 is not None:
            raise ValueError(
                "guidance_2 is the low-noise expert's guidance; this pipeline has one denoiser (two experts: "
                "Wan 2.2 A14B)"
            )
        if self.dit_2 is not None:
            switch = None if self.expert_placement is None else self.expert_placement.switch
            second = SecondExpert(models[1], self.config.boundary, opts.guidance_2, on_switch=switch)
            if self.expert_placement is not None:
                self.expert_placement.start()
        guided = opts.guidance != 1 or (second is not None and opts.guidance_2 not in (None, 1))
        negative = self._negative(opts.negative_prompt, guided)
        return denoise(models[0], noise, context, context_mask, **negative, init=init, strength=strength,
                       hook=hook, generator=generator, timesteps=self.config.timesteps,
                       scheduler_config=self.config.scheduler_config, sigmas=self.config.sigmas,
                       model_kwargs=model_kwargs, second=second, **self._split_guidance(),
                       **opts.loop_keywords())  # fmt: skip

    def _split_guidance(self) -> dict:
        """The sampling loops' ``split_guidance`` keyword when ``split_guidance`` is set; ValueError where it
        cannot run: a step cache (one state per denoiser would see the two halves as alternate steps) or cfg
        parallel (which already runs the halves on two rank groups)."""
        if not self.split_guidance:
            return {}
        if self.cache is not None:
            raise ValueError(
                "split_guidance runs guidance's halves as two denoiser calls, which a step cache would take for "
                "two steps: use one of them (cache=None or split_guidance=False)"
            )
        if (par := parallel.active(self)) is not None and par.cfg > 1:
            raise ValueError(
                "split_guidance and cfg parallel both divide guidance's halves: use one of them (under torchrun, "
                "cfg parallel runs them on two rank groups at once)"
            )
        return {"split_guidance": True}

    def _check_job(self, job: str | None = None) -> None:
        """ValueError unless the denoiser can run ``job`` (None: a job that samples from text alone): a
        text-to-video denoiser runs every job, an image-conditioned one (Wan I2V) animate alone, and a Wan
        Fun-Control one control alone (``JOBS_BY_INPUT``)."""
        kind = self.denoiser_input
        if kind == "text" or job in JOBS_BY_INPUT[kind]:
            return
        if kind == "image":
            raise ValueError(
                "this job needs a text-to-video denoiser; this pipeline's is image-conditioned (Wan I2V / FLF2V / "
                "2.2 I2V-A14B: it takes a still's latents, and CLIP tokens, at every step): use animate(image, prompt) "
                "(vidlatent animate IMAGE PROMPT [--last IMAGE])"
            )
        raise ValueError(
            "this job does not run on this pipeline's denoiser, a Wan Fun-Control one (it takes a control "
            "video's latents at every step): use control(prompt, control=video, reference=first_frame) (vidlatent "
            "control CONTROL PROMPT [--reference IMAGE])"
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

    def _options(
        self, options, sampling: dict, job: str, negative_prompt=None, guidance=None
    ) -> SamplingOptions:
        """A job's sampling options, the one place they are read: ``options`` with the job's keywords (and its
        positional ``negative_prompt``) over them, checked, every ``None`` taken from the pipeline's config
        (``guidance``: the job's own default guidance instead of the config's, where it has one)."""
        if negative_prompt is not None:
            sampling = {**sampling, "negative_prompt": negative_prompt}
        opts = SamplingOptions.from_keywords(options, sampling, job)
        return opts.resolve(self.config, self.progress, guidance)

    def _noise(self, shape, seed, given: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Generator]:
        """Start noise drawn on a CPU generator (the same on every device), then moved to the model's device;
        ``given`` (a job's ``noise=``) is used instead when it has the latents' shape. The generator, seeded
        either way, also serves the samplers that draw noise at each step."""
        seed = self.config.seed if seed is None else seed
        generator = torch.Generator()
        if seed is None and parallel.active(self) is not None:  # every rank samples with rank 0's fresh seed
            seed = parallel.broadcast_seed(generator.seed())
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

    def _output(self, z: torch.Tensor, output_type: str, fit: dict | None = None) -> torch.Tensor:
        """The job's latents as asked: decoded (a padded file input's output cropped back to its size) or not."""
        if output_type == "latent":
            return z
        if output_type == "video":
            return restore_size(self.decode(z), fit)
        raise ValueError(f"unknown output_type {output_type!r}; accepted: {', '.join(OUTPUT_TYPES)}")

    def _prompts(self, prompt: str | Sequence[str], b: int, name: str = "prompt") -> list[str]:
        prompts = [prompt] * b if isinstance(prompt, str) else check_prompts(prompt, name)
        if len(prompts) != b:
            raise ValueError(f"{name}: {len(prompts)} prompts for a batch of {b} inputs")
        return prompts

    def _latent_shape(self, b: int, frames: int, height: int, width: int) -> tuple[int, ...]:
        tf, sf = self.vae.temporal_factor, self.vae.spatial_factor
        return (b, self.vae.config.latent_channels, 1 + (frames - 1) // tf, height // sf, width // sf)

    def _check_size(self, frames: int, height: int, width: int) -> None:
        for name, value in (("frames", frames), ("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer; got {value!r}")
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

    def _video_input(
        self, video: Media, selection: FrameSelection | None = None
    ) -> tuple[torch.Tensor, dict | None]:
        """A file path or a tensor (3, h, w), (3, t, h, w) or (b, 3, t, h, w) -> ((b, 3, t, h, w), fit plan),
        checked. A file is read by ``inputs.read_clip`` as ``selection`` says (default: all frames, centre-cropped
        to the size multiple); a tensor must fit already (its plan is None)."""
        fit = None
        if is_file_input(video):
            video, info = read_clip(video, selection, self.size_multiple, self.vae.temporal_factor)
            fit = {**info["fit"], "source_size": info["source_size"]}
        video = as_video(video)
        self._check_size(*video.shape[2:])
        return video.to(self.vae.device), fit

    def _image_input(self, image: Media, name: str, selection: FrameSelection | None = None):
        """An image file or tensor -> ((b, 3, 1, h, w), fit plan), checked (a video gives an error, not its
        first frame)."""
        image, fit = self._video_input(image, selection)
        if image.shape[2] != 1:
            raise ValueError(f"animate takes an image (one frame) as {name}; got {image.shape[2]} frames")
        return image, fit
