"""The pipeline's configs and the options every job shares.

``PipelineConfig`` is a pipeline folder's defaults (``pipeline.json``); ``PipelinePreset`` assembles a random
pipeline from component presets (``configs/pipeline/<name>.yaml``). ``SamplingOptions`` is the keyword block
every sampling job takes (steps, guidance, sampler, shift, seed, negative prompt, output type, progress), and
``FrameSelection`` says which frames of an input file are read and how its size is fitted to the model. The
library jobs and the CLI build the same two dataclasses, so they check and mean the same thing.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from ..checks import check_option

OUTPUT_TYPES = ("video", "latent")
# animate: how the image's latent is given to the denoiser at each step ("clean_sigma0": clean, and its tokens told
# noise level 0 while the rest get the step's: Wan 2.2 TI2V's per-token timesteps)
FIRST_FRAME = ("noised", "clean", "clean_sigma0")
TEXT_ATTENTION = ("masked", "all")


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
    # two experts (Wan 2.2 A14B): the denoiser in dit/ takes the steps whose scheduler timestep is >= boundary *
    # 1000 (the noisy ones), the one in dit_2/ the rest (diffusers' boundary_ratio); None: one denoiser
    boundary: float | None = None
    guidance_2: float | None = None  # the second expert's guidance (None: guidance)
    # the control job's defaults, where its call gives none: the hints' weight (VACE's context scale), and its
    # guidance (None: guidance). A control branch trained for a model says how hard it is best followed.
    control_scale: float = 1.0
    control_guidance: float | None = None


def check_pipeline_config(cfg: PipelineConfig, source: str | os.PathLike | None = None) -> PipelineConfig:
    """Fail on a config value no job could use, naming the field, what is accepted and, when given, the file
    it came from (numbers: ``checks.OPTION_RANGES``)."""
    from ..diffusion.sampling import SAMPLERS, SIGMAS, TIMESTEPS

    choices = {"sampler": SAMPLERS, "first_frame": FIRST_FRAME, "text_attention": TEXT_ATTENTION,
               "timesteps": TIMESTEPS, "sigmas": SIGMAS}  # fmt: skip
    try:
        for name, accepted in choices.items():
            _check_choice(name, getattr(cfg, name), accepted)
        for name in ("steps", "guidance", "shift", "fps"):
            check_option(name, getattr(cfg, name))
        check_option("guidance_2", cfg.guidance_2)
        check_option("control_scale", cfg.control_scale)
        check_option("control_guidance", cfg.control_guidance)
        if cfg.boundary is not None and not 0 < cfg.boundary < 1:
            raise ValueError(
                f"boundary must be in (0, 1) (a fraction of the 1000 timesteps); got {cfg.boundary}"
            )
        for name in ("frames", "height", "width"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(cfg, name)}")
    except ValueError as err:
        if source is None:
            raise
        raise type(err)(f"{source}: {err}") from None
    return cfg


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


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def check_seed(seed) -> None:
    """ValueError unless ``seed`` is None or an integer ``torch.Generator`` takes (``SEED_RANGE``)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # numpy integers too
        raise ValueError(f"seed must be an integer; got {seed!r}")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1; got {seed}")


def _check_choice(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")


# ------------------------------------------------------------------------------------------ job options


@dataclass
class SamplingOptions:
    """The options every sampling job shares; ``None`` takes the pipeline config's value (``progress``: the
    pipeline's ``progress`` attribute). Values are checked as the options are made (``checks.OPTION_RANGES``).

    A job takes them as keywords (``pipe.generate(prompt, steps=20, seed=1)``), as ``options=`` or both (the
    keywords win); ``from_keywords`` is the one place that merges them.
    """

    steps: int | None = None
    guidance: float | None = None  # classifier-free guidance scale; 1 turns it off
    guidance_2: float | None = None  # two experts (Wan 2.2 A14B): the low-noise expert's guidance
    sampler: str | None = None  # euler | unipc | dpm
    shift: float | None = None  # sigma shift of the schedule
    seed: int | None = None  # None and none in the config: a fresh random seed per call
    negative_prompt: str | None = None  # what guidance steers away from
    output_type: str = "video"  # "video" (decoded, in [-1, 1]) or "latent" (normalized latents)
    progress: bool | None = None  # tqdm bars while sampling

    def __post_init__(self):
        from ..diffusion.sampling import SAMPLERS

        for name in ("steps", "guidance", "shift"):
            check_option(name, getattr(self, name))
        check_option("guidance_2", self.guidance_2)
        if self.sampler is not None:
            _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("output_type", self.output_type, OUTPUT_TYPES)
        check_seed(self.seed)
        if self.seed is not None:
            self.seed = int(self.seed)  # a numpy integer as torch.Generator takes it
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(
                f"negative_prompt must be one str (for the whole batch); got {type(self.negative_prompt).__name__}"
            )

    @classmethod
    def from_keywords(cls, options: SamplingOptions | None, keywords: dict, job: str) -> SamplingOptions:
        """``options`` (or the defaults) with the job's sampling ``keywords`` over them; a keyword that is no
        field is a TypeError naming the job, as Python names an unknown keyword."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in keywords if k not in names]
        if unknown:
            raise TypeError(f"{job}() got an unexpected keyword argument {unknown[0]!r}")
        return dataclasses.replace(options or cls(), **keywords)

    def resolve(
        self, config: PipelineConfig, progress: bool = True, guidance: float | None = None
    ) -> SamplingOptions:
        """Every ``None`` filled from ``config`` (``progress`` from the given default; ``guidance``, when given, is
        the job's own default guidance instead of ``config.guidance``, e.g. the control job's
        ``config.control_guidance``)."""
        default_guidance = config.guidance if guidance is None else guidance
        return dataclasses.replace(
            self,
            steps=config.steps if self.steps is None else self.steps,
            guidance=default_guidance if self.guidance is None else self.guidance,
            guidance_2=config.guidance_2 if self.guidance_2 is None else self.guidance_2,
            sampler=self.sampler or config.sampler,
            shift=config.shift if self.shift is None else self.shift,
            seed=config.seed if self.seed is None else self.seed,
            negative_prompt=config.negative_prompt if self.negative_prompt is None else self.negative_prompt,
            progress=progress if self.progress is None else self.progress,
        )

    def loop_keywords(self) -> dict:
        """The keywords of ``sampling.denoise`` these options set (after ``resolve``)."""
        return {"steps": self.steps, "guidance": self.guidance, "sampler": self.sampler, "shift": self.shift,
                "progress": self.progress}  # fmt: skip


@dataclass
class FrameSelection:
    """Which frames of an input file are read and how its size is fitted (``data.io.read_video``'s options).

    ``frames``: at most this many (after ``start`` and ``stride`` or ``fps``; None: all); ``frame_policy``
    makes the count 1 + 4k ("trim" drops trailing frames, "pad" repeats the last, "none" fails). ``size``
    (height, width): centre-crop to its aspect, then resize; None keeps the input's. ``size_policy``: sides
    that are not multiples of the model's are centre-cropped ("crop"), padded (edges repeated; the job's
    output is cropped back) or resized.
    """

    frames: int | None = None
    start: int = 0
    stride: int = 1
    fps: float | None = None
    size: tuple[int, int] | None = None
    frame_policy: str = "trim"
    size_policy: str = "crop"

    def __post_init__(self):  # the messages are data.io.read_video's, which checks the same when it reads
        from ..data.io import FRAME_POLICIES, SIZE_POLICIES

        if self.frame_policy not in FRAME_POLICIES:
            raise ValueError(f"frame_policy must be one of {FRAME_POLICIES}, got {self.frame_policy!r}")
        if self.frames is not None and self.frames < 1:
            raise ValueError(f"frames must be at least 1, got {self.frames}")
        if self.start < 0 or self.stride < 1:
            raise ValueError(f"need start >= 0, stride >= 1; got {self.start}, {self.stride}")
        if self.fps is not None and self.stride != 1:
            raise ValueError("give either stride or a positive fps, not both")
        check_option("fps", self.fps)
        if self.size is not None:
            if len(self.size) != 2 or min(self.size) < 1:
                raise ValueError(f"size must be (height, width) with positive sides, got {self.size}")
            self.size = (int(self.size[0]), int(self.size[1]))
        _check_choice("size policy", self.size_policy, SIZE_POLICIES)

    def read_keywords(self) -> dict:
        """The keywords of ``data.io.read_video`` this selection sets."""
        return dataclasses.asdict(self)
