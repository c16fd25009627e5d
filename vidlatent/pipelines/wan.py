"""Wan's conventions: how a diffusers Wan folder (Wan 2.1 or 2.2) and an original Wan 2.1 release folder become
a ``PipelineConfig`` (their sampler, schedule, text handling and call defaults), and the files a release holds."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import CONFIG_NAME, is_wan_release, read_json  # noqa: F401  (re-exported)
from ..config.pipeline import PipelineConfig
from ..models.text import WAN_T5_FILE, WAN_TOKENIZER

# the defaults of a diffusers Wan pipeline folder: WanPipeline's own call defaults (WanVACEPipeline's are the
# same), and its scheduler's shift
WAN_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline", "WanVACEPipeline")
WAN_DEFAULTS = dict(steps=50, guidance=5.0, frames=81, height=480, width=832, fps=16.0, negative_prompt="",
                    text_attention="all", timesteps="scheduler")  # fmt: skip
# Wan 2.2's own call defaults, by kind, from Wan-Video/Wan2.2: wan/configs/wan_ti2v_5B.py (sample_steps 50,
# sample_guide_scale 5.0, sample_shift 5.0, frame_num 121, sample_fps 24; size 1280*704, width x height, the
# default of wan/textimage2video.py and a SUPPORTED_SIZES entry of wan/configs/__init__.py), wan_t2v_A14B.py
# (40 steps, shift 12.0, sample_guide_scale (3.0, 4.0) = (low-noise, high-noise): guidance 4 for the
# high-noise expert, guidance_2 3 for the low-noise one), wan_i2v_A14B.py (40 steps, shift 5.0, (3.5, 3.5));
# the A14B pair's 81 frames at 16 fps from shared_config.py and generate.py's default --size 1280*720.
# A folder's own scheduler_config.json shift, where it has one, stays the shift (diffusers samples with it).
WAN22_DEFAULTS = {
    "ti2v-5B": dict(steps=50, guidance=5.0, shift=5.0, frames=121, fps=24.0, height=704, width=1280),
    "t2v-A14B": dict(steps=40, guidance=4.0, guidance_2=3.0, shift=12.0, frames=81, fps=16.0, height=720,
                     width=1280),
    "i2v-A14B": dict(steps=40, guidance=3.5, guidance_2=3.5, shift=5.0, frames=81, fps=16.0, height=720,
                     width=1280),
}  # fmt: skip
SCHEDULER_SAMPLERS = {"UniPCMultistepScheduler": "unipc", "FlowMatchEulerDiscreteScheduler": "euler",
                      "DPMSolverMultistepScheduler": "dpm"}  # fmt: skip


def wan22_kind(root: Path, index: dict) -> str | None:
    """Which Wan 2.2 model a diffusers Wan folder is (a key of ``WAN22_DEFAULTS``), or None for Wan 2.1.

    Two experts (``boundary_ratio``, or a ``transformer_2`` component or folder) make an A14B: I2V-A14B in a
    ``WanImageToVideoPipeline``, else T2V-A14B. ``expand_timesteps`` or a 48-channel VAE (``vae/config.json``
    ``z_dim``) make TI2V-5B.
    """
    second = index.get("transformer_2")
    if index.get("boundary_ratio") is not None or (second and second[0]) or (root / "transformer_2").is_dir():
        return "i2v-A14B" if index.get("_class_name") == "WanImageToVideoPipeline" else "t2v-A14B"
    vae = root / "vae" / CONFIG_NAME
    if index.get("expand_timesteps") or (vae.is_file() and read_json(vae).get("z_dim") == 48):
        return "ti2v-5B"
    return None


def diffusers_pipeline_config(root: Path) -> PipelineConfig:
    """The ``PipelineConfig`` of a diffusers Wan pipeline folder (``model_index.json``): Wan's conventions
    (all 512 text tokens attended, the scheduler's timesteps), WanPipeline's defaults (50 steps, guidance 5,
    81 frames of 480x832), and the sampler, shift and settings of ``scheduler/scheduler_config.json``. Wan 2.2:
    ``expand_timesteps`` (TI2V-5B) makes animate's first frame clean at noise level 0 (``first_frame:
    clean_sigma0``); ``boundary_ratio`` (A14B) is the two experts' ``boundary``; a folder recognisably Wan 2.2
    (``wan22_kind``) takes Wan 2.2's own defaults for its kind (``WAN22_DEFAULTS``) instead of WanPipeline's."""
    index = read_json(root / "model_index.json")
    name = index.get("_class_name")
    if name not in WAN_PIPELINES:
        raise ValueError(
            f"{root} holds a diffusers {name or 'pipeline'}; accepted: {', '.join(WAN_PIPELINES)} folders"
        )
    kind = wan22_kind(root, index)
    cfg = PipelineConfig(**{**WAN_DEFAULTS, **(WAN22_DEFAULTS[kind] if kind else {})})
    # Wan 2.2: TI2V-5B's per-token timesteps (the kept first frame at 0), A14B's two experts
    if index.get("expand_timesteps"):
        cfg.first_frame = "clean_sigma0"
    cfg.boundary = index.get("boundary_ratio")
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
