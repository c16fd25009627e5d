"""The ``vidlatent`` command: parse arguments, then call library functions (nothing else lives here)."""

from __future__ import annotations

import argparse
import re
import sys

from .checks import option_type

EXAMPLES = {
    "info": "example: vidlatent info",
}


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .config import list_presets

    device = "cuda (" + torch.cuda.get_device_name(0) + ")" if torch.cuda.is_available() else "cpu"
    print(f"vidlatent {__version__}")
    print(f"torch     {torch.__version__} (threads: {torch.get_num_threads()})")
    print(f"device    {device}")
    for kind in ("pipeline", "vae", "dit", "text"):
        print(f"{kind + ' presets':<18}{', '.join(list_presets(kind)) or '-'}")
    return 0


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    """Options every job shares: the model, yaml config files and ``key=value`` overrides (omegaconf)."""
    if model:
        p.add_argument("--model", default="default", help="pipeline/model folder or preset name")
    p.add_argument("--config", action="append", default=[], help="yaml file merged into the job's options")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. steps=20 guidance=4")


def add_info(sub) -> None:
    p = sub.add_parser("info", help="print versions, device and available presets", epilog=EXAMPLES["info"])
    p.set_defaults(func=cmd_info)


# ------------------------------------------------------------------ generate / edit / inpaint / animate / morph
# The VideoPipeline jobs (vidlatent.pipelines.video): read inputs, load the pipeline, call one job, write.

JOB_EXAMPLES = {
    "generate": """examples:
  vidlatent generate "a red ball bouncing" -o ball.mp4 --model my_pipeline --frames 17 --seed 1
  vidlatent generate "a red ball" -o ball.png --frames 1 --height 256 --width 256 steps=20 guidance=4""",
    "edit": """example:
  vidlatent edit clip.mp4 "a blue ball bouncing" --strength 0.6 -o edited.mp4 --model my_pipeline
  vidlatent edit clip.mp4 "a blue ball bouncing" --source-prompt "a red ball bouncing" -o edited.mp4""",
    "inpaint": """example:
  vidlatent inpaint clip.mp4 --mask mask.png "a green square" -o inpainted.mp4 --model my_pipeline
  (white mask pixels are regenerated; a mask video gives one mask per frame)""",
    "animate": """examples:
  vidlatent animate still.png "the ball rolls to the right" --frames 17 -o moving.mp4 --model my_pipeline
  vidlatent animate a.png "the ball rolls to the right" --last b.png -o a_to_b.mp4   (first and last frame)
  vidlatent animate still.png "a cat turns its head" --model Wan2.1-I2V-14B-480P-Diffusers""",
    "morph": """examples:
  vidlatent morph a.png b.png --frames 33 -o morph.mp4 --model my_pipeline
  vidlatent morph a.png b.png --mode noise --prompt-a "a red ball" --prompt-b "a blue box" -o morph.gif""",
}


def _job_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, epilog=JOB_EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _job_flags(p: argparse.ArgumentParser, sampling: bool = True, size: bool = True) -> None:
    """Options the pipeline jobs share; each given flag beats ``--config`` files and ``key=value`` overrides."""
    p.add_argument(
        "-o", "--output", required=True, help=".mp4, .webm, .gif, .png/.jpg (one frame) or a folder"
    )
    if size:
        p.add_argument(
            "--height", type=int, default=None, help="output height: a multiple of 16 (VAE 8 x patch 2)"
        )
        p.add_argument(
            "--width", type=int, default=None, help="output width: a multiple of 16 (VAE 8 x patch 2)"
        )
    if sampling:
        p.add_argument("--steps", type=option_type("steps"), default=None, help="sampling steps")
        p.add_argument(
            "--guidance",
            type=option_type("guidance"),
            default=None,
            help="classifier-free guidance, 0-100 (1 = off)",
        )
        p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
        p.add_argument("--sampler", default=None, help="euler, unipc or dpm")
        p.add_argument(
            "--shift", type=option_type("shift"), default=None, help="sigma shift of the schedule (> 0)"
        )
        p.add_argument("--negative-prompt", default=None, help="what to steer away from (with guidance > 1)")
    p.add_argument("--fps", type=option_type("fps"), default=None, help="frame rate of the output")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA file for the denoiser (any Wan 2.1 layout) at SCALE (1); repeat for several",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_common(p)


def _check_output(path: str, frames: int | None = None) -> None:
    """Fail before any work on an output ``write_video`` cannot write: its suffix, its frame count, and
    whether its folder can be written (``checkpoint.check_writable``)."""
    from pathlib import Path

    from .checkpoint import check_writable
    from .data.io import WRITE_EXTENSIONS

    suffix = Path(path).suffix.lower()
    if suffix and suffix not in WRITE_EXTENSIONS:
        raise ValueError(
            f"cannot write {path}: use one of {', '.join(WRITE_EXTENSIONS)} or no suffix (png folder)"
        )
    if suffix in (".png", ".jpg", ".jpeg") and frames is not None and frames > 1:
        raise ValueError(
            f"{path} holds one image but the output has {frames} frames; use .mp4, .gif or .webm"
        )
    check_writable(path, folder=not suffix)


def _check_inputs(*paths: str) -> None:
    import os

    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such file: {path}")


def _load_pipeline(args: argparse.Namespace):
    """The pipeline of ``--model`` on ``--device``, its config merged with ``--config`` files and overrides."""
    import torch
    from omegaconf import OmegaConf

    from .config import load_yaml, merge_config
    from .diffusion.sampling import SAMPLERS
    from .pipelines import VideoPipeline
    from .pipelines.video import check_pipeline_config

    sampler = getattr(args, "sampler", None)
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    bad = [x for x in args.overrides if "=" not in x]
    if bad:
        raise ValueError(f"unexpected argument {bad[0]!r}: options are key=value (e.g. steps=20)")
    loras = [parse_lora_spec(spec) for spec in getattr(args, "lora", [])]
    _check_inputs(*(path for path, _ in loras))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quiet:
        _silence_progress()
    pipe = VideoPipeline.from_pretrained(args.model, device=device, check_finite=_is_folder(args.model))
    parts = [load_yaml(f) for f in args.config]
    pipe.config = merge_config(pipe.config, *parts, OmegaConf.from_dotlist(list(args.overrides)))
    check_pipeline_config(pipe.config)
    pipe.progress = not args.quiet
    for path, scale in loras:
        pipe.load_lora(path, scale)
    if loras:  # folded into the weights for good: the same result without the adapters' cost at every step
        pipe.fuse_lora(keep_originals=False)
    return pipe


def _silence_progress() -> None:
    """``-q``: no progress bars from the libraries that load and write models either (transformers, diffusers)."""
    import importlib

    for name in ("transformers", "diffusers"):
        try:
            importlib.import_module(f"{name}.utils.logging").disable_progress_bar()
        except ImportError:  # transformers is optional
            pass


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``--lora PATH[:SCALE]`` -> (path, scale). The scale follows the last ':' when that part is a finite
    number, so ``C:\\loras\\a.safetensors`` stays a path; an existing file named ``spec`` is a path too."""
    import math
    import os

    path, sep, tail = spec.rpartition(":")
    if sep and path and not os.path.exists(spec):
        try:
            scale = float(tail)
        except ValueError:
            scale = None
        if scale is not None and math.isfinite(scale):
            return path, scale
    return spec, 1.0


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling flags given on the command line (the rest come from the pipeline's config)."""
    names = ("steps", "guidance", "sampler", "shift")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _seed(args: argparse.Namespace, pipe) -> int:
    """The seed to use: ``--seed``, else the config's, else a fresh random one (printed so it can be reused)."""
    import random

    seed = args.seed if args.seed is not None else pipe.config.seed
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    return seed


SIZE_POLICY_HELP = (
    "sides that are not multiples of the model's ({}): crop (centre, the default), pad (edges repeated; "
    "the output is cropped back to the input's size) or resize"
)


def _size_policy_flag(p: argparse.ArgumentParser, multiple: str) -> None:
    from .data.io import SIZE_POLICIES

    p.add_argument(
        "--size-policy", choices=SIZE_POLICIES, default=None, help=SIZE_POLICY_HELP.format(multiple)
    )


def _read_clip(pipe, path: str, args: argparse.Namespace, frames: int | None = None, image: bool = False):
    """Read an input (c, t, h, w) at ``--height/--width`` or its own size, fitted to the model's multiple
    (16 for VAE 8 x patch 2) by ``--size-policy`` (``data.io.fit_to_multiple``).

    Returns (video, info, note): ``info["fit"]`` is the fit's plan (``_write`` undoes a pad); ``note`` says what
    fitting did ("" if nothing): print it once all checks have passed, so that an error stays the only line."""
    from .data.io import read_video, size_note

    fit = dict(size=_size(args), multiple=pipe.size_multiple, size_policy=args.size_policy or "crop")
    if image:
        video, info = read_video(path, frames=1, frame_policy="none", **fit)
    else:
        policy = getattr(args, "frame_policy", "trim")
        video, info = read_video(path, frames=frames, frame_policy=policy, **fit)
    return video, info, size_note(path, info["fit"])


def _size(args: argparse.Namespace):
    if (args.height is None) != (args.width is None):
        raise ValueError("give both --height and --width, or neither")
    return None if args.height is None else (args.height, args.width)


def _notes(*notes: str) -> None:
    for note in dict.fromkeys(n for n in notes if n):
        print(note, file=sys.stderr)


def _write(
    pipe, video, path: str, fps: float | None, seed: int | None = None, fit: dict | None = None
) -> int:
    """Write the job's output (a padded input's output cropped back to its size); print paths, frames, W x H."""
    from .data.io import restore_size

    video = restore_size(video, fit)
    paths = pipe.save(video, path, fps=fps)
    b, _, t, h, w = video.shape
    extra = f", seed {seed}" if seed is not None else ""
    print(f"wrote {', '.join(map(str, paths))} ({t} frame{'s' * (t > 1)}, {w}x{h}{extra})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    _check_output(args.output, args.frames)
    pipe = _load_pipeline(args)
    _check_output(args.output, args.frames or pipe.config.frames)
    seed = _seed(args, pipe)
    video = pipe.generate(
        args.prompt,
        args.negative_prompt,
        frames=args.frames,
        height=args.height,
        width=args.width,
        seed=seed,
        **_sampling_kwargs(args),
    )
    return _write(pipe, video, args.output, args.fps, seed)


def add_generate(sub) -> None:
    p = _job_parser(sub, "generate", "text to video (--frames 1: text to image)")
    p.add_argument("prompt", help="what to show")
    p.add_argument("--frames", type=int, default=None, help="1 + 4k frames (1 = an image)")
    _job_flags(p)
    p.set_defaults(func=cmd_generate)


def _add_read_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=None, help="read at most this many frames of the input")
    p.add_argument(
        "--frame-policy",
        choices=["trim", "pad", "none"],
        default="trim",
        help="make the input 1+4k frames: drop trailing frames, repeat the last, or fail",
    )


def cmd_edit(args: argparse.Namespace) -> int:
    if args.source_guidance is not None and args.source_prompt is None:
        raise ValueError("--source-guidance is FlowEdit's: give --source-prompt (what the input shows) too")
    if args.source_prompt is not None and args.sampler not in (None, "euler"):  # before reading the input
        raise ValueError(f"an edit with --source-prompt runs on the euler grid; got --sampler {args.sampler}")
    _check_inputs(args.input)
    _check_output(args.output)
    pipe = _load_pipeline(args)
    seed = _seed(args, pipe)
    video, info, note = _read_clip(pipe, args.input, args, frames=args.frames)
    _check_output(args.output, video.shape[1])
    _notes(note)
    source = {"source_prompt": args.source_prompt}
    if args.source_guidance is not None:
        source["source_guidance"] = args.source_guidance
    out = pipe.edit(
        video, args.prompt, args.strength, args.negative_prompt, seed=seed, **source, **_sampling_kwargs(args)
    )
    return _write(pipe, out, args.output, args.fps or info["fps"], seed, info["fit"])


def add_edit(sub) -> None:
    p = _job_parser(sub, "edit", "re-draw a video or image after a prompt (SDEdit, or FlowEdit)")
    p.add_argument("input", help="video or image to edit")
    p.add_argument("prompt", help="what it should become")
    p.add_argument(
        "--strength",
        type=option_type("strength"),
        default=0.6,
        help="0 keeps the input, 1 ignores it (default 0.6)",
    )
    p.add_argument(
        "--source-prompt",
        default=None,
        help="what the input shows: edit by FlowEdit (keeps layout and motion better; twice the compute)",
    )
    p.add_argument(
        "--source-guidance",
        type=option_type("source_guidance"),
        default=None,
        help="FlowEdit: the source prompt's guidance (4)",
    )
    _add_read_flags(p)
    _job_flags(p)
    _size_policy_flag(p, "16: VAE 8 x patch 2")
    p.set_defaults(func=cmd_edit)


def cmd_inpaint(args: argparse.Namespace) -> int:
    from .data.io import probe, read_video

    _check_inputs(args.input, args.mask)
    _check_output(args.output)
    pipe = _load_pipeline(args)
    seed = _seed(args, pipe)
    video, info, note = _read_clip(pipe, args.input, args, frames=args.frames)
    _check_output(args.output, video.shape[1])
    mask_size = probe(args.mask)["size"]
    if tuple(mask_size) != tuple(info["source_size"]):
        (mh, mw), (h, w) = mask_size, info["source_size"]
        raise ValueError(f"mask {args.mask} is {mw}x{mh} but the input is {w}x{h}")
    fit = dict(size=_size(args), multiple=pipe.size_multiple, size_policy=info["fit"]["size_policy"])
    mask, _ = read_video(args.mask, frames=video.shape[1], temporal_factor=1, **fit)
    _notes(note)
    out = pipe.inpaint(
        video,
        (mask + 1) / 2,
        args.prompt,
        args.strength,
        args.negative_prompt,
        seed=seed,
        **_sampling_kwargs(args),
    )
    return _write(pipe, out, args.output, args.fps or info["fps"], seed, info["fit"])


def add_inpaint(sub) -> None:
    p = _job_parser(sub, "inpaint", "regenerate the masked part of a video or image")
    p.add_argument("input", help="video or image")
    p.add_argument("prompt", help="what to put in the masked region")
    p.add_argument("--mask", required=True, help="image or video of the input's size; white = regenerate")
    p.add_argument(
        "--strength",
        type=option_type("strength"),
        default=1.0,
        help="below 1 starts the masked region from the input",
    )
    _add_read_flags(p)
    _job_flags(p)
    _size_policy_flag(p, "16: VAE 8 x patch 2")
    p.set_defaults(func=cmd_inpaint)


def _check_same_size(*inputs: tuple[str, dict]) -> None:
    """Two stills read by ``_read_clip`` (path, info) must come in at one size (printed width x height)."""
    (a, info_a), (b, info_b) = inputs
    if info_a["fit"]["input_size"] != info_b["fit"]["input_size"]:
        (ha, wa), (hb, wb) = info_a["fit"]["input_size"], info_b["fit"]["input_size"]
        raise ValueError(
            f"{a} is {wa}x{ha} but {b} is {wb}x{hb}; give --height and --width to bring both to one size"
        )


def cmd_animate(args: argparse.Namespace) -> int:
    _check_inputs(args.image, *([args.last] if args.last else []))
    _check_output(args.output, args.frames)
    pipe = _load_pipeline(args)
    _check_output(args.output, args.frames or pipe.config.frames)
    seed = _seed(args, pipe)
    image, info, note = _read_clip(pipe, args.image, args, image=True)
    last, note_last = None, ""
    if args.last:
        last, info_last, note_last = _read_clip(pipe, args.last, args, image=True)
        _check_same_size((args.image, info), (args.last, info_last))
    _notes(note, note_last)
    out = pipe.animate(
        image,
        args.prompt,
        args.frames,
        args.negative_prompt,
        last_image=last,
        strength=args.strength,
        seed=seed,
        **_sampling_kwargs(args),
    )
    return _write(pipe, out, args.output, args.fps, seed, info["fit"])


def add_animate(sub) -> None:
    p = _job_parser(sub, "animate", "image to video: the image is the first frame (--last: and one the last)")
    p.add_argument("image", help="the first frame (an image, or a video's first frame)")
    p.add_argument("prompt", help="what happens next")
    p.add_argument("--last", default=None, metavar="IMAGE",
                   help="the last frame too: a generative morph from IMAGE to this one (Wan FLF2V needs it)")  # fmt: skip
    p.add_argument("--frames", type=int, default=None, help="1 + 4k frames")
    p.add_argument(
        "--strength",
        type=option_type("strength"),
        default=1.0,
        help="below 1: start from the still image (less motion)",
    )
    _job_flags(p)
    _size_policy_flag(p, "16: VAE 8 x patch 2")
    p.set_defaults(func=cmd_animate)


def cmd_morph(args: argparse.Namespace) -> int:
    _check_inputs(args.image_a, args.image_b)
    _check_output(args.output, args.frames or 2)
    pipe = _load_pipeline(args)
    a, info, note_a = _read_clip(pipe, args.image_a, args, image=True)
    b, info_b, note_b = _read_clip(pipe, args.image_b, args, image=True)
    _check_same_size((args.image_a, info), (args.image_b, info_b))
    _notes(note_a, note_b)
    kwargs = {} if args.steps is None else {"steps": args.steps}
    if args.guidance is not None:
        kwargs["guidance"] = args.guidance
    out = pipe.morph(
        a,
        b,
        args.frames,
        args.mode,
        args.prompt_a,
        args.prompt_b,
        easing=args.easing,
        shift=args.shift,
        refine=args.refine,
        respace=args.respace,
        **kwargs,
    )
    return _write(pipe, out, args.output, args.fps, fit=info["fit"])


def add_morph(sub) -> None:
    p = _job_parser(sub, "morph", "a morph video from image A to image B")
    p.add_argument("image_a", help="first image")
    p.add_argument("image_b", help="last image (the same size as A, or give --height/--width)")
    p.add_argument("--frames", type=int, default=None, help="frames of the morph (any count >= 2)")
    p.add_argument("--mode", choices=["latent", "noise"], default="latent",
                   help="latent: slerp the images' latents; noise: invert both to noise, slerp, regenerate")  # fmt: skip
    p.add_argument("--prompt-a", default=None, help="noise mode: a prompt describing A")
    p.add_argument("--prompt-b", default=None, help="noise mode: a prompt describing B")
    p.add_argument("--easing", choices=["linear", "cosine", "smoothstep"], default="linear",
                   help="spacing of the frames (cosine/smoothstep linger at A and B)")  # fmt: skip
    p.add_argument(
        "--refine",
        type=option_type("refine"),
        default=2,
        help="noise mode: fixed-point iterations per inversion step",
    )
    p.add_argument("--respace", action="store_true",
                   help="noise mode: regenerate at weights that make the steps even (twice the time)")  # fmt: skip
    p.add_argument(
        "--steps", type=option_type("steps"), default=None, help="noise mode: inversion / sampling steps"
    )
    p.add_argument(
        "--guidance",
        type=option_type("guidance"),
        default=None,
        help="noise mode: guidance (default 1 = off)",
    )
    p.add_argument("--shift", type=option_type("shift"), default=None, help="noise mode: sigma shift")
    _job_flags(p, sampling=False)
    _size_policy_flag(p, "16: VAE 8 x patch 2")
    p.set_defaults(func=cmd_morph)


JOB_SUBCOMMANDS = [add_generate, add_edit, add_inpaint, add_animate, add_morph]


# ------------------------------------------------------------------ encode / decode / reconstruct / convert
# Clips to latent files and back (vidlatent.pipelines.batch), and checkpoint conversion.

LATENT_EXAMPLES = {
    "encode": """examples:
  vidlatent encode clips/ -o latents/ --model my_pipeline --size 480 832 --frames 81
  vidlatent encode a.mp4 b.mp4 -o latents/ --model tiny --stats --stats-out stats.yaml
  torchrun --nproc_per_node 8 -m vidlatent.cli encode clips/ -o latents/ --model my_pipeline
    (each process takes every 8th clip; rerunning resumes, skipping clips already encoded)""",
    "decode": """example:
  vidlatent decode latents/ -o videos/ --model my_pipeline --format mp4""",
    "reconstruct": """example:
  vidlatent reconstruct clip.mp4 -o recon.mp4 --model my_pipeline --frames 17 --size 256 256""",
    "convert": """examples:
  vidlatent convert Wan2.1-T2V-1.3B-Diffusers -o wan/      (a whole pipeline folder: --model wan/)
  vidlatent convert Wan2.1-T2V-1.3B -o wan/                (the original release folder: the same)
  vidlatent convert Wan2.1-T2V-1.3B/Wan2.1_VAE.pth -o my_vae/ --kind vae""",
}


def _job_options(args: argparse.Namespace, defaults: dict, flags: dict) -> tuple[dict, dict]:
    """Merge job options: ``defaults`` < ``--config`` yaml files < ``key=value`` overrides < flags given.

    Keys under ``vae.`` are VAE config overrides (e.g. ``vae.chunk_size=2``). Returns (options, vae overrides).
    """
    from omegaconf import OmegaConf

    from .config import load_yaml

    conf = OmegaConf.create({**defaults, "vae": {}})
    for path in args.config:
        conf = OmegaConf.merge(conf, load_yaml(path))
    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
    conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(args.overrides)))
    options = OmegaConf.to_container(conf, resolve=True)
    unknown = sorted(set(options) - set(defaults) - {"vae"})
    if unknown:
        raise ValueError(
            f"unknown option {unknown[0]!r}; options: {', '.join(sorted(defaults))}, vae.<field>"
        )
    options.update({k: v for k, v in flags.items() if v is not None})
    return options, options.pop("vae") or {}


def _device(args: argparse.Namespace) -> str:
    """``--device``, else cuda (this process's ``LOCAL_RANK`` under torchrun) when available, else cpu."""
    import os

    import torch

    if args.device:
        return args.device
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments -> (paths, key=value overrides); an existing file named like key=value is a path."""
    import os
    import re

    overrides = [x for x in items if re.match(r"^[A-Za-z_][\w.]*=", x) and not os.path.exists(x)]
    return [x for x in items if x not in overrides], overrides


def _read_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=None, help="at most this many frames (then 1+4k per policy)")
    p.add_argument("--start", type=int, default=None, help="first source frame (default 0)")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--stride", type=int, default=None, help="take every n-th frame (default 1)")
    step.add_argument("--fps", type=option_type("fps"), default=None, help="resample to this frame rate")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="centre-crop to its aspect, resize",
    )
    p.add_argument("--frame-policy", choices=["trim", "pad", "none"], default=None, help="make 1+4k frames")
    _size_policy_flag(p, "8, the VAE's")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="VAE dtype")


_READ_DEFAULTS = {
    "frames": None,
    "start": 0,
    "stride": 1,
    "fps": None,
    "size": None,
    "frame_policy": "trim",
    "size_policy": "crop",
    "dtype": "float32",
}


def _read_args(args: argparse.Namespace) -> dict:
    return {
        "frames": args.frames,
        "start": args.start,
        "stride": args.stride,
        "fps": args.fps,
        "size": args.size,
        "frame_policy": args.frame_policy,
        "size_policy": args.size_policy,
        "dtype": args.dtype,
    }


def _load_vae(args: argparse.Namespace, options: dict, vae_overrides: dict):
    import torch

    from .pipelines.batch import load_vae

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[options["dtype"]]
    return load_vae(args.model, _device(args), dtype, _is_folder(args.model), **vae_overrides)


def _is_folder(model: str) -> bool:
    """Whether ``--model`` names files (a folder, a checkpoint, the default model), whose weights are checked
    for NaN/inf as they load (presets are random weights made here)."""
    import os

    return model == "default" or os.path.exists(model)


def cmd_encode(args: argparse.Namespace) -> int:
    import os

    from .checkpoint import check_writable
    from .data.paths import expand_paths
    from .pipelines.batch import encode_clips, latent_stats, write_stats

    paths, args.overrides = _split_overrides(args.clips + args.overrides)
    defaults = {
        **_READ_DEFAULTS,
        "batch_size": 4,
        "sample": False,
        "seed": 0,
        "normalized": True,
        "save_dtype": "float32",
        "save_logvar": False,
        "overwrite": False,
        "num_workers": 2,
    }
    flags = {
        **_read_args(args),
        "batch_size": args.batch_size,
        "sample": args.sample or None,
        "seed": args.seed,
        "normalized": False if args.raw else None,
        "overwrite": args.overwrite or None,
        "num_workers": args.workers,
    }
    options, vae_overrides = _job_options(args, defaults, flags)
    clips = expand_paths(paths)
    if not clips:
        raise ValueError(f"no video or image files in {', '.join(paths)}")
    if args.stats_out and not args.stats:
        raise ValueError("--stats-out needs --stats")
    check_writable(args.output, folder=True)
    if args.stats_out:
        check_writable(args.stats_out)
    vae, src = _load_vae(args, options, vae_overrides)
    options.pop("dtype")
    size = options.pop("size")
    report = encode_clips(clips, args.output, vae, size=tuple(size) if size else None, vae_src=src, **options)
    print(report.summary())
    if args.stats:
        mean, std = latent_stats(report.outputs, all_ranks=True)
        if int(os.environ.get("RANK", 0)) == 0:
            print("latents_mean: [" + ", ".join(f"{v:.6f}" for v in mean) + "]")
            print("latents_std: [" + ", ".join(f"{v:.6f}" for v in std) + "]")
            if args.stats_out:
                print(f"wrote {write_stats(args.stats_out, mean, std)}")
    return 1 if report.failed else 0


def add_encode(sub) -> None:
    p = sub.add_parser(
        "encode",
        help="encode videos / images into latent files (one safetensors file per clip)",
        description="Encode clips with the model's VAE into <output>/<name>-<hash>.safetensors with their "
        "metadata. Batched, resumable (existing outputs are skipped), sharded under torchrun. Exits 1 when "
        "some clips failed (listed), 2 on bad arguments.",
        epilog=LATENT_EXAMPLES["encode"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "clips", nargs="+", metavar="CLIPS", help="video/image files or folders (searched recursively)"
    )
    p.add_argument("-o", "--output", required=True, help="output folder for the latent files")
    _read_flags(p)
    p.add_argument("--batch-size", type=int, default=None, help="clips of one shape encoded together (4)")
    p.add_argument("--sample", action="store_true", help="store a posterior sample, not the mean")
    p.add_argument("--seed", type=int, default=None, help="seed of --sample (per clip, stable)")
    p.add_argument("--raw", action="store_true", help="store raw latents instead of normalized ones")
    p.add_argument("--overwrite", action="store_true", help="re-encode clips that already have outputs")
    p.add_argument("--workers", type=int, default=None, help="threads decoding clips ahead (2)")
    p.add_argument("--stats", action="store_true", help="print per-channel mean/std of the raw latents")
    p.add_argument("--stats-out", default=None, help="write them to this .yaml/.json (VAE config fields)")
    add_common(p)
    p.set_defaults(func=cmd_encode)


def cmd_decode(args: argparse.Namespace) -> int:
    from .checkpoint import check_writable
    from .data.paths import expand_paths
    from .pipelines.batch import decode_latents

    paths, args.overrides = _split_overrides(args.latents + args.overrides)
    defaults = {"dtype": "float32", "fps": None, "format": "mp4", "overwrite": False}
    flags = {"dtype": args.dtype, "fps": args.fps, "format": args.format, "overwrite": args.overwrite or None}
    options, vae_overrides = _job_options(args, defaults, flags)
    files = expand_paths(paths, (".safetensors",))
    if not files:
        raise ValueError(f"no latent files (.safetensors) in {', '.join(paths)}")
    check_writable(args.output, folder=True)
    vae, _ = _load_vae(args, options, vae_overrides)
    report = decode_latents(
        files, args.output, vae, options["fps"], options["format"], overwrite=options["overwrite"]
    )
    print(report.summary())
    return 1 if report.failed else 0


def add_decode(sub) -> None:
    p = sub.add_parser(
        "decode",
        help="decode latent files back into videos",
        description="Decode latent files (as `vidlatent encode` writes them) into <output>/<name>.<format>. "
        "Exits 1 when some files failed (listed), 2 on bad arguments.",
        epilog=LATENT_EXAMPLES["decode"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("latents", nargs="+", metavar="LATENTS", help="latent files or folders of them")
    p.add_argument("-o", "--output", required=True, help="output folder for the videos")
    p.add_argument(
        "--fps", type=option_type("fps"), default=None, help="frame rate (default: the clip's own, else 16)"
    )
    p.add_argument("--format", choices=["mp4", "webm", "gif", "png", "frames"], default=None, help="(mp4)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="VAE dtype")
    p.add_argument("--overwrite", action="store_true", help="replace videos that already exist")
    add_common(p)
    p.set_defaults(func=cmd_decode)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from .data.io import fit_to_multiple, read_video, size_note, write_video
    from .pipelines.batch import reconstruct

    defaults = {**_READ_DEFAULTS, "sample": False, "seed": 0}
    flags = {**_read_args(args), "sample": args.sample or None, "seed": args.seed}
    options, vae_overrides = _job_options(args, defaults, flags)
    _check_inputs(args.input)
    _check_output(args.output, options["frames"])
    vae, _ = _load_vae(args, options, vae_overrides)
    size = tuple(options["size"]) if options["size"] is not None else None
    read = {k: options[k] for k in ("frames", "start", "stride", "fps", "frame_policy")}
    video, info = read_video(args.input, size=size, temporal_factor=vae.temporal_factor, **read)
    policy = options["size_policy"]
    _, plan = fit_to_multiple(
        video[:, :1], vae.spatial_factor, policy, args.input
    )  # fails before the VAE runs
    _check_output(args.output, video.shape[1])
    _notes(size_note(args.input, plan))
    result = reconstruct(video, vae, sample=options["sample"], seed=options["seed"], size_policy=policy)
    write_video(args.output, result.recon, fps=info["fps"] or 16)
    t, h, w = result.recon.shape[1:]
    print(f"PSNR {result.psnr:.2f} dB  SSIM {result.ssim:.4f}  ({t} frames, {w}x{h}, wrote {args.output})")
    return 0


def add_reconstruct(sub) -> None:
    p = sub.add_parser(
        "reconstruct",
        help="encode + decode a clip, write the result, print PSNR and SSIM",
        description="Round-trip a clip through the model's VAE; prints PSNR (dB) and SSIM (RGB, 11x11 "
        "gaussian window) against the input as read.",
        epilog=LATENT_EXAMPLES["reconstruct"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="video or image file")
    p.add_argument(
        "-o", "--output", required=True, help="output video (.mp4, .webm, .gif, or .png for one frame)"
    )
    _read_flags(p)
    p.add_argument("--sample", action="store_true", help="decode a posterior sample, not the mean")
    p.add_argument("--seed", type=int, default=None, help="seed of --sample")
    add_common(p)
    p.set_defaults(func=cmd_reconstruct)


def cmd_convert(args: argparse.Namespace) -> int:
    import os

    from .checkpoint import check_writable
    from .convert import convert_checkpoint

    if args.quiet:
        _silence_progress()
    if not os.path.exists(args.src):
        raise FileNotFoundError(f"nothing to convert at {args.src}")
    check_writable(args.output, folder=True)
    converted = convert_checkpoint(
        args.src, args.output, args.kind, copy_text_encoder=not args.link_text_encoder
    )
    for kind, folder in converted.items():
        print(f"wrote {kind} to {folder}")
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert diffusers or original Wan 2.1 checkpoints into vidlatent folders",
        description="Load with from_pretrained, write with save_pretrained: what converts is what loads. "
        "A pipeline root with a text encoder (an original Wan folder: with its T5 and tokenizer) gives a whole "
        "pipeline folder; a folder with the two models only gives <output>/vae and <output>/dit.",
        epilog=LATENT_EXAMPLES["convert"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src", metavar="SRC", help="diffusers folder, pipeline root, Wan folder or checkpoint file"
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--kind", choices=["auto", "pipeline", "vae", "dit"], default="auto",
                   help="what SRC holds (auto: a root with text_encoder/ is a whole pipeline)")  # fmt: skip
    p.add_argument("--link-text-encoder", action="store_true",
                   help="pipeline: record where the text encoder is instead of copying its weights")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_convert)


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import check_writable
    from .train import NonFiniteLossError, load_train_config, train

    cfg = load_train_config(args.config_file, *args.config, overrides=args.overrides)
    if args.device is not None:
        cfg.device = args.device
    if cfg.output:
        check_writable(cfg.output, folder=True)
    try:
        trainer = train(cfg)
    except NonFiniteLossError as err:
        print(f"vidlatent train: stopped: {err}", file=sys.stderr)
        return 1
    finally:  # under torchrun: leave the process group the trainer joined
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.dist.main:
        print(f"trained {trainer.step} steps; last checkpoint {trainer.last_checkpoint}")
    return 0


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the denoiser on latent files (flow matching)",
        description="Train a VideoDiT on the latent files `vidlatent encode` writes, as CONFIG (a yaml file "
        "or a train preset such as 'tiny') and key=value overrides say. resume=auto continues the latest "
        "checkpoint under output=. Exits 1 when the loss became NaN/inf (the last good checkpoint is kept).",
        epilog="examples:\n  vidlatent train tiny data=latents/ output=runs/tiny steps=500 resume=auto\n"
        "  torchrun --nproc_per_node=8 -m vidlatent.cli train CONFIG parallel=ddp|fsdp  "
        "(global batch = batch_size x ranks x grad_accum)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config_file", metavar="CONFIG", help="train yaml file or preset name (tiny)")
    add_common(p, model=False)
    p.set_defaults(func=cmd_train)


# Each subcommand is an ``add_<name>(sub)`` function that registers its parser and handler.
SUBCOMMANDS = [add_info, add_encode, add_decode, add_reconstruct, add_convert, add_train, *JOB_SUBCOMMANDS]


class UsageError(Exception):
    """A command line argparse refused: ``prog`` and the message, printed as one line by ``main``."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block); ``--help`` shows the usage."""

    def error(self, message: str):
        raise UsageError(self.prog, f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vidlatent", description="Video latent diffusion toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    for p in sub.choices.values():
        p.add_argument(
            "--debug", action="store_true", help="show the traceback of an error (or set VIDLATENT_DEBUG=1)"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        # key=value overrides may also follow options ("generate 'a ball' -o x.mp4 steps=20"): argparse leaves
        # such trailing positionals over, so they are collected here
        args, extra = parser.parse_known_args(argv)
        overrides = [x for x in extra if re.match(r"^[A-Za-z_][\w.]*=", x)]
        if len(overrides) != len(extra) or (extra and not isinstance(getattr(args, "overrides", None), list)):
            parser._subparsers._group_actions[0].choices[args.command].error(
                f"unrecognized arguments: {' '.join(extra)}"
            )
    except UsageError as err:
        print(f"{err.prog}: error: {err}", file=sys.stderr)
        return 2
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command: a user's error (``errors.user_error``) is one line on stderr and exit status 2,
    Ctrl-C is "interrupted" and 130; ``--debug`` / ``VIDLATENT_DEBUG=1`` shows tracebacks instead."""
    from .errors import debug_wanted, user_error

    debug = debug_wanted(getattr(args, "debug", False))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"vidlatent {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = None if debug else user_error(err)
        if message is None:
            raise
        print(f"vidlatent {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
