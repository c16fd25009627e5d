"""The ``VideoPipeline`` jobs (generate, edit, inpaint, animate, morph, control): read inputs through
``pipelines.inputs`` as the library does, load the pipeline, call one job with ``SamplingOptions``, write."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..checks import option_type
from .common import (
    SIZE_POLICY_HELP,
    _check_inputs,
    _check_output,
    _is_folder,
    _notes,
    _silence_progress,
    add_common,
    add_frame_flags,
    add_sampling_flags,
    frame_selection,
    parse_lora_spec,
    sampling_options,
)

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
    "control": """examples:
  vidlatent control pose.mp4 "a dancer on a beach" -o dancer.mp4 --model Wan2.1-VACE-1.3B-diffusers
  vidlatent control clip.mp4 "a red car" --mask car_mask.mp4 --reference car.png -o car.mp4 --scale 0.8
  (white mask pixels are generated, black ones keep the control's; --scale S or one S per hint: S,S,...)
  vidlatent control depth.mp4 "a robot walks" --reference first.png -o robot.mp4 --model Wan2.1-Fun-1.3B-Control-Diffusers
  (Wan Fun-Control: one --reference, the first frame; no --mask, --scale or --control-branch)""",
}


MULTIPLE_HELP = "VAE 8 x patch: 8 for the default model, 16 for Wan"


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
            "--height",
            type=int,
            default=None,
            help=f"output height: a multiple of the model's ({MULTIPLE_HELP})",
        )
        p.add_argument(
            "--width",
            type=int,
            default=None,
            help=f"output width: a multiple of the model's ({MULTIPLE_HELP})",
        )
    if sampling:
        add_sampling_flags(p)
    p.add_argument("--fps", type=option_type("fps"), default=None, help="frame rate of the output")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA file for the denoiser (any Wan 2.1 layout) at SCALE (1); repeat for several",
    )
    p.add_argument("--lora-2", action="append", default=[], metavar="PATH[:SCALE]",
                   help="two experts (Wan 2.2 A14B): a LoRA file for the low-noise expert (--lora: the "
                   "high-noise one); repeat for several")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_runtime_flags(p)
    add_common(p)


def add_runtime_flags(p: argparse.ArgumentParser, torchrun: bool = True) -> None:
    """How a pipeline job runs, not what it computes (``torchrun``: and ``--cfg-parallel``,
    which only a job launched by torchrun uses). ``vidlatent serve`` takes them too, for every job it runs."""
    g = p.add_argument_group("runtime (how it runs, not what it computes)")
    g.add_argument("--offload", default="none", help="none, model (each part on the accelerator only while "
                   "it runs) or blocks (the denoiser's blocks streamed through it)")  # fmt: skip
    g.add_argument("--weights-dtype", default=None, help="fp8: the denoiser's block linears stored as float8")
    g.add_argument("--attention", default=None, help="sdpa, cudnn, flash, efficient, math, flash_attn, sage")
    g.add_argument("--compile", action="store_true", help="compile the denoiser's block (torch.compile)")
    g.add_argument("--split-guidance", action="store_true", help="guidance's two halves as two denoiser calls, "
                   "not one batch: half the activation memory, a little slower on a GPU")  # fmt: skip
    if torchrun:
        g.add_argument("--cfg-parallel", action="store_true", help="under torchrun: guidance's two halves on "
                       "two rank groups (the tokens are split across the ranks of each)")  # fmt: skip
    g.add_argument("--cache", default=None, metavar="THRESHOLD|PATH[:LEVEL]", help="step caching: skip the "
                   "blocks after the first where the first's residual changed less than THRESHOLD (e.g. 0.1), "
                   "or a file of vidlatent calibrate-cache (its default level, or LEVEL)")  # fmt: skip


def runtime_argv(args: argparse.Namespace) -> list[str]:
    """The runtime flags of ``add_runtime_flags`` (less ``--cfg-parallel``) that ``args`` sets away from their
    defaults, as command-line arguments again (``vidlatent serve`` hands them to every pipeline job)."""
    flags = argparse.ArgumentParser(add_help=False)
    add_runtime_flags(flags, torchrun=False)
    argv = []
    for dest, default in vars(flags.parse_args([])).items():
        value = getattr(args, dest)
        if value != default:
            flag = "--" + dest.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
    return argv


class PipelineReuse:
    """The last pipeline a job loaded, kept for the next job of the same process (the web page's ``JobRunner``):
    a job whose loading options (model, device, offload, fp8, compile, attention, step cache, LoRAs, control
    branch) are the last one's reuses its weights instead of reading them again; its config starts from the
    loaded one, then takes the job's ``--config`` files and overrides. One pipeline is kept, so memory stays
    that of one job. A model folder, LoRA file or control branch changed on disk since (a file's size or
    first or last MiB, a file added or removed) is read again (``checkpoint.files_fingerprint``)."""

    def __init__(self):
        self.key, self.pipe, self.config = None, None, None

    def get(self, key: tuple, load):
        """The kept pipeline when ``key`` is the last one's, else ``load()``'s (kept in its place)."""
        if key != self.key:
            self.key, self.pipe, self.config = None, None, None  # the old weights go before the new ones load
            pipe = load()
            self.key, self.pipe, self.config = key, pipe, pipe.config
        self.pipe.config = self.config
        return self.pipe


def _load_pipeline(args: argparse.Namespace):
    """The pipeline of ``--model`` on ``--device``, its config merged with ``--config`` files and overrides
    (``args.reuse``, a ``PipelineReuse``: the last job's pipeline when it loaded the same way)."""
    from omegaconf import OmegaConf

    from ..checkpoint import files_fingerprint
    from ..config import load_yaml, merge_config
    from ..diffusion.sampling import SAMPLERS
    from ..pipelines.video import check_pipeline_config
    from ..runtime import parallel

    sampler = getattr(args, "sampler", None)
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    bad = [x for x in args.overrides if "=" not in x]
    if bad:
        raise ValueError(f"unexpected argument {bad[0]!r}: options are key=value (e.g. steps=20)")
    loras = [(*parse_lora_spec(spec), 1) for spec in getattr(args, "lora", [])]
    loras += [(*parse_lora_spec(spec), 2) for spec in getattr(args, "lora_2", [])]
    _check_inputs(*(path for path, _, _ in loras))
    if args.quiet:
        _silence_progress()
    reuse = getattr(args, "reuse", None)
    if reuse is None or parallel.launched():
        pipe = _read_pipeline(args, loras)
    else:
        files = (args.model, getattr(args, "control_branch", None), *(path for path, _, _ in loras))
        # weights changed on disk since (a retrained folder, a rewritten LoRA) are read again
        on_disk = files_fingerprint(*(p for p in files if p and os.path.exists(p)))
        options = (getattr(args, k, None) for k in LOAD_OPTIONS)
        key = (args.model, args.device, *options, tuple(loras), on_disk)
        pipe = reuse.get(key, lambda: _read_pipeline(args, loras))
    parts = [load_yaml(f) for f in args.config]
    pipe.config = merge_config(pipe.config, *parts, OmegaConf.from_dotlist(list(args.overrides)))
    check_pipeline_config(pipe.config)
    pipe.progress = not args.quiet
    pipe.split_guidance = getattr(args, "split_guidance", False)
    return pipe


# the job flags that change how a pipeline loads (beside --model and --device): a reused pipeline needs the same
LOAD_OPTIONS = ("offload", "weights_dtype", "compile", "attention", "cache", "control_branch")


def _read_pipeline(args: argparse.Namespace, loras: list):
    """``--model`` read and set up as the job's loading flags say (LoRAs fused, runtime options, control branch)."""
    import warnings

    import torch

    from .. import runtime
    from ..pipelines import VideoPipeline
    from ..runtime import parallel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if parallel.launched():  # torchrun: this rank's device; every denoiser call is spread over the ranks
        device = str(parallel.join(args.device))
    offload = getattr(args, "offload", "none")
    load_on = runtime.load_device(offload, device)  # offloaded weights are read to the host
    pipe = VideoPipeline.from_pretrained(args.model, device=load_on, check_finite=_is_folder(args.model))
    for path, scale, expert in loras:
        pipe.load_lora(path, scale, expert=expert)
    if loras:  # folded into the weights for good: the same result without the adapters' cost at every step
        pipe.fuse_lora(keep_originals=False)
    # no accelerator to offload to: one line, then it runs plainly
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.weights_placement = runtime.configure(pipe, offload, getattr(args, "weights_dtype", None),
                                           getattr(args, "compile", False), getattr(args, "attention", None),
                                           device=device, cache=getattr(args, "cache", None))  # fmt: skip
    _notes(*(str(w.message) for w in caught))
    if getattr(args, "control_branch", None):
        pipe.load_control(args.control_branch)
    if parallel.launched():
        parallel.context_parallel(pipe, cfg=getattr(args, "cfg_parallel", False))
    return pipe


def _seed(args: argparse.Namespace, pipe) -> int:
    """The seed to use: ``--seed``, else the config's, else a fresh random one (printed so it can be reused)."""
    import random

    from ..runtime import parallel

    seed = args.seed if args.seed is not None else pipe.config.seed
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    return parallel.broadcast_seed(seed)  # under torchrun every rank takes rank 0's


def _read_clip(pipe, path: str, args: argparse.Namespace, image: bool = False):
    """Read an input (c, t, h, w) as the library reads a file (``pipelines.inputs.read_clip``), with the job's
    frame selection (``--frames``, ``--frame-policy``, ``--height/--width``, ``--size-policy``).

    Returns (video, info, note): ``info["fit"]`` is the fit's plan (``_write`` undoes a pad); ``note`` says what
    fitting did ("" if nothing): print it once all checks have passed, so that an error stays the only line."""
    from ..data.io import frames_note, size_note
    from ..pipelines.inputs import read_clip

    video, info = read_clip(
        path, frame_selection(args, image), pipe.size_multiple, pipe.vae.temporal_factor, image
    )
    notes = (frames_note(path, info), size_note(path, info["fit"]))
    return video, info, "\n".join(n for n in notes if n)


def _write(
    pipe, video, path: str, fps: float | None, seed: int | None = None, fit: dict | None = None
) -> int:
    """Write the job's output (a padded input's output cropped back to its size); print paths, frames, W x H."""
    from ..data.io import restore_size
    from ..runtime import parallel

    if not parallel.is_main():  # under torchrun rank 0 alone writes (every rank holds the output)
        return 0
    video = restore_size(video, fit)
    paths = pipe.save(video, path, fps=fps)
    b, _, t, h, w = video.shape
    extra = f", seed {seed}" if seed is not None else ""
    if (h % 2 or w % 2) and any(Path(p).suffix.lower() in (".mp4", ".webm") for p in paths):
        extra += (
            f"; stored {w + w % 2}x{h + h % 2}: mp4 and webm need even sides, the last row / column repeated"
        )
    print(f"wrote {', '.join(map(str, paths))} ({t} frame{'s' * (t > 1)}, {w}x{h}{extra})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    _check_output(args.output, args.frames)
    pipe = _load_pipeline(args)
    _check_output(args.output, args.frames or pipe.config.frames)
    seed = _seed(args, pipe)
    video = pipe.generate(
        args.prompt,
        frames=args.frames,
        height=args.height,
        width=args.width,
        options=sampling_options(args, seed),
    )
    return _write(pipe, video, args.output, args.fps, seed)


def add_generate(sub) -> None:
    p = _job_parser(sub, "generate", "text to video (--frames 1: text to image)")
    p.add_argument("prompt", help="what to show")
    p.add_argument("--frames", type=int, default=None, help="1 + 4k frames (1 = an image)")
    _job_flags(p)
    p.set_defaults(func=cmd_generate)


def cmd_edit(args: argparse.Namespace) -> int:
    if args.source_guidance is not None and args.source_prompt is None:
        raise ValueError("--source-guidance is FlowEdit's: give --source-prompt (what the input shows) too")
    if args.source_prompt is not None and args.sampler not in (None, "euler"):  # before reading the input
        raise ValueError(f"an edit with --source-prompt runs on the euler grid; got --sampler {args.sampler}")
    _check_inputs(args.input)
    _check_output(args.output)
    pipe = _load_pipeline(args)
    seed = _seed(args, pipe)
    video, info, note = _read_clip(pipe, args.input, args)
    _check_output(args.output, video.shape[1])
    _notes(note)
    source = {"source_prompt": args.source_prompt}
    if args.source_guidance is not None:
        source["source_guidance"] = args.source_guidance
    out = pipe.edit(video, args.prompt, args.strength, **source, options=sampling_options(args, seed))
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
    _job_flags(p)
    add_frame_flags(p, MULTIPLE_HELP)
    p.set_defaults(func=cmd_edit)


def cmd_inpaint(args: argparse.Namespace) -> int:
    from ..pipelines.inputs import read_mask

    _check_inputs(args.input, args.mask)
    _check_output(args.output)
    pipe = _load_pipeline(args)
    seed = _seed(args, pipe)
    video, info, note = _read_clip(pipe, args.input, args)
    _check_output(args.output, video.shape[1])
    selection = frame_selection(args)
    mask = read_mask(args.mask, selection, pipe.size_multiple, video.shape[1], info["source_size"])
    _notes(note)
    out = pipe.inpaint(video, mask, args.prompt, args.strength, options=sampling_options(args, seed))
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
    _job_flags(p)
    add_frame_flags(p, MULTIPLE_HELP)
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
        last_image=last,
        strength=args.strength,
        options=sampling_options(args, seed),
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
    _size_policy_flag(p)
    p.set_defaults(func=cmd_animate)


def cmd_morph(args: argparse.Namespace) -> int:
    _check_inputs(args.image_a, args.image_b)
    _check_output(args.output, args.frames or 2)
    pipe = _load_pipeline(args)
    a, info, note_a = _read_clip(pipe, args.image_a, args, image=True)
    b, info_b, note_b = _read_clip(pipe, args.image_b, args, image=True)
    _check_same_size((args.image_a, info), (args.image_b, info_b))
    _notes(note_a, note_b)
    kwargs = {k: getattr(args, k) for k in ("steps", "guidance", "shift") if getattr(args, k) is not None}
    out = pipe.morph(
        a,
        b,
        args.frames,
        args.mode,
        args.prompt_a,
        args.prompt_b,
        easing=args.easing,
        strength=args.strength,
        stagger=args.stagger,
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
        "--strength",
        type=option_type("strength"),
        default=None,
        help="noise mode: how far A and B are inverted towards noise (1: all the way; default: the "
        "pipeline's NOISE_MORPH_STRENGTH)",
    )
    p.add_argument(
        "--stagger",
        type=option_type("stagger"),
        default=None,
        help="in [0, 1): each position switches from A to B at its own time, B's content coming in before A's "
        "goes (0: all at once, a plain slerp; default 0 for latent, the pipeline's NOISE_MORPH_STAGGER for noise)",
    )
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
    _size_policy_flag(p)
    p.set_defaults(func=cmd_morph)


def _size_policy_flag(p: argparse.ArgumentParser) -> None:
    """``--size-policy`` alone (the jobs that read stills: their frames are not selected)."""
    from ..data.io import SIZE_POLICIES

    p.add_argument(
        "--size-policy",
        choices=SIZE_POLICIES,
        default=None,
        help=SIZE_POLICY_HELP.format(MULTIPLE_HELP),
    )


def _scales(text: str) -> float | list[float]:
    """``--scale S`` or ``S,S,...`` (one per hint) -> a float or a list."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or numbers joined by commas; got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def cmd_control(args: argparse.Namespace) -> int:
    from ..pipelines.inputs import read_mask

    _check_inputs(args.control, *([args.mask] if args.mask else []), *args.reference)
    _check_inputs(*([args.control_branch] if args.control_branch else []))
    _check_output(args.output)
    pipe = _load_pipeline(args)  # with --control-branch's branch
    seed = _seed(args, pipe)
    video, info, note = _read_clip(pipe, args.control, args)
    _check_output(args.output, video.shape[1])
    mask = None
    if args.mask:  # fitted as the control was; the files' own sizes must agree
        mask = read_mask(
            args.mask, frame_selection(args), pipe.size_multiple, video.shape[1], info["source_size"]
        )
    _notes(note)
    out = pipe.control(
        args.prompt,
        video,
        mask=mask,
        reference=args.reference,
        scale=args.scale,
        options=sampling_options(args, seed),
    )
    return _write(pipe, out, args.output, args.fps or info["fps"], seed, info["fit"])


def add_control(sub) -> None:
    p = _job_parser(
        sub, "control", "a video that follows a control video (pose, edges, silhouettes; VACE, Fun-Control)"
    )
    p.add_argument("control", help="the control video (or image): the output has its frames and size")
    p.add_argument("prompt", help="what to show")
    p.add_argument("--mask", default=None,
                   help="black-and-white image or video of the control's size: white = generate, black = keep (VACE)")  # fmt: skip
    p.add_argument("--reference", action="append", default=[], metavar="IMAGE",
                   help="an image of what to show (any size); repeat for several (Wan Fun-Control: one, the first frame)")  # fmt: skip
    p.add_argument("--scale", type=_scales, default=None, metavar="S[,S...]",
                   help="the control's weight: one number, or one per hint (default: the model's control_scale, "
                        "1 unless its pipeline.json says; 0 = no control; VACE)")  # fmt: skip
    p.add_argument("--control-branch", default=None, metavar="FOLDER",
                   help="a control branch folder (ControlBranch.save_pretrained) for --model's denoiser")  # fmt: skip
    _job_flags(p)
    add_frame_flags(p, MULTIPLE_HELP)
    p.set_defaults(func=cmd_control)


JOB_SUBCOMMANDS = [add_generate, add_edit, add_inpaint, add_animate, add_morph, add_control]
