"""What every subcommand shares: the model/config/override arguments, the sampling and frame-selection groups
(building the library's ``SamplingOptions`` and ``FrameSelection``), input and output checks, devices."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from ..checks import option_type


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    """Options every job shares: the model, yaml config files and ``key=value`` overrides (omegaconf)."""
    if model:
        p.add_argument("--model", default="default", help="pipeline/model folder or preset name")
    p.add_argument("--config", action="append", default=[], help="yaml file merged into the job's options")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. steps=20 guidance=4")


def _check_output(path: str, frames: int | None = None) -> None:
    """Fail before any work on an output ``write_video`` cannot write: its suffix, its frame count, and
    whether its folder can be written (``checkpoint.check_writable``)."""
    from pathlib import Path

    from ..checkpoint import check_writable
    from ..data.io import WRITE_EXTENSIONS

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
    number, so ``C:\\loras\\a.safetensors`` stays a path; an existing file named ``spec`` is a path too.
    ValueError when the part before the last ':' is a file and the rest is no finite number ("a.safetensors:abc")."""
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
        if os.path.isfile(path):  # the file exists: what follows it was meant as a scale
            raise ValueError(f"--lora {spec}: {tail!r} is not a scale; give a finite number, e.g. {path}:0.8")
    return spec, 1.0


SIZE_POLICY_HELP = (
    "sides that are not multiples of the model's ({}): crop (centre, the default), pad (edges repeated; "
    "the output is cropped back to the input's size) or resize"
)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling group (``SamplingOptions``): each given flag beats ``--config`` files and overrides."""
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=option_type("steps"), default=None, help="sampling steps")
    g.add_argument("--guidance", type=option_type("guidance"), default=None,
                   help="classifier-free guidance, 0-100 (1 = off)")  # fmt: skip
    g.add_argument("--guidance-2", type=option_type("guidance_2"), default=None,
                   help="two experts (Wan 2.2 A14B): the low-noise expert's guidance (default: --guidance)")  # fmt: skip
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    g.add_argument("--sampler", default=None, help="euler, unipc or dpm")
    g.add_argument(
        "--shift", type=option_type("shift"), default=None, help="sigma shift of the schedule (> 0)"
    )
    g.add_argument("--negative-prompt", default=None, help="what to steer away from (with guidance > 1)")


def sampling_options(args: argparse.Namespace, seed: int | None = None):
    """The sampling flags given on the command line as ``SamplingOptions`` (the rest: the pipeline's config)."""
    from ..config.pipeline import SamplingOptions

    names = ("steps", "guidance", "guidance_2", "sampler", "shift", "negative_prompt")
    return SamplingOptions(seed=seed, **{k: getattr(args, k, None) for k in names})


def add_frame_flags(
    p: argparse.ArgumentParser, multiple: str, clip_range: bool = False, policy_default="trim"
):
    """The frame-selection group (``FrameSelection``): which frames of an input are read and how its sides are
    fitted. ``clip_range``: also ``--start``, ``--stride`` / ``--fps`` and ``--size`` (the batch jobs')."""
    from ..data.io import FRAME_POLICIES, SIZE_POLICIES

    g = p.add_argument_group("frame selection")
    if clip_range:
        g.add_argument(
            "--frames", type=int, default=None, help="at most this many frames (then 1+4k per policy)"
        )
        g.add_argument("--start", type=int, default=None, help="first source frame (default 0)")
        step = g.add_mutually_exclusive_group()
        step.add_argument("--stride", type=int, default=None, help="take every n-th frame (default 1)")
        step.add_argument("--fps", type=option_type("fps"), default=None, help="resample to this frame rate")
        g.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                       help="centre-crop to its aspect, resize")  # fmt: skip
        g.add_argument("--frame-policy", choices=list(FRAME_POLICIES), default=policy_default,
                       help="make 1+4k frames")  # fmt: skip
    else:
        g.add_argument("--frames", type=int, default=None, help="read at most this many frames of the input")
        g.add_argument("--frame-policy", choices=list(FRAME_POLICIES), default=policy_default,
                       help="make the input 1+4k frames: drop trailing frames, repeat the last, or fail")  # fmt: skip
    g.add_argument(
        "--size-policy", choices=SIZE_POLICIES, default=None, help=SIZE_POLICY_HELP.format(multiple)
    )


def frame_selection(args: argparse.Namespace, image: bool = False):
    """A job's frame flags (``--frames``, ``--frame-policy``, ``--height/--width``, ``--size-policy``) as the
    ``FrameSelection`` its input files are read with (``pipelines.inputs.read_clip``)."""
    from ..config.pipeline import FrameSelection

    if image:  # a still: only its size is fitted (``--frames`` is the output's)
        return FrameSelection(size=output_size(args), size_policy=args.size_policy or "crop")
    return FrameSelection(frames=getattr(args, "frames", None), size=output_size(args),
                          frame_policy=getattr(args, "frame_policy", "trim"),
                          size_policy=args.size_policy or "crop")  # fmt: skip


def output_size(args: argparse.Namespace):
    """``--height`` and ``--width`` as (h, w), or None; both or neither."""
    if (args.height is None) != (args.width is None):
        raise ValueError("give both --height and --width, or neither")
    return None if args.height is None else (args.height, args.width)


def _notes(*notes: str) -> None:
    for note in dict.fromkeys(n for n in notes if n):
        print(note, file=sys.stderr)


@contextlib.contextmanager
def warning_lines(command: str):
    """While a command runs, a warning that vidlatent issues (an unknown word of a prompt, a truncated prompt,
    ...) is one line on stderr, ``vidlatent <command>: warning: <message>``; others keep Python's format."""
    package = str(Path(__file__).resolve().parent.parent)
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not str(Path(filename).resolve()).startswith(package):
                return shown(message, category, filename, lineno, file, line)
            print(f"vidlatent {command}: warning: {message}", file=sys.stderr)

        warnings.showwarning = show
        yield


def _device(args: argparse.Namespace) -> str:
    """``--device``, else cuda (this process's ``LOCAL_RANK`` under torchrun) when available, else cpu."""
    import os

    import torch

    if args.device:
        return args.device
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"


def _is_folder(model: str) -> bool:
    """Whether ``--model`` names files (a folder, a checkpoint, the default model), whose weights are checked
    for NaN/inf as they load (presets are random weights made here)."""
    import os

    return model == "default" or os.path.exists(model)
