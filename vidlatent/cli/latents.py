"""Clips to latent files and back (``pipelines.batch``), the VAE round trip, and checkpoint conversion."""

from __future__ import annotations

import argparse

from ..checks import option_type
from .common import (
    _check_inputs,
    _check_output,
    _device,
    _is_folder,
    _notes,
    _silence_progress,
    add_common,
    add_frame_flags,
)

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

    from ..config import load_yaml

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


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments -> (paths, key=value overrides); an existing file named like key=value is a path."""
    import os
    import re

    overrides = [x for x in items if re.match(r"^[A-Za-z_][\w.]*=", x) and not os.path.exists(x)]
    return [x for x in items if x not in overrides], overrides


def _read_flags(p: argparse.ArgumentParser) -> None:
    add_frame_flags(p, "8, the VAE's", clip_range=True, policy_default=None)
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

    from ..pipelines.batch import load_vae

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[options["dtype"]]
    return load_vae(args.model, _device(args), dtype, _is_folder(args.model), **vae_overrides)


def cmd_encode(args: argparse.Namespace) -> int:
    import os

    from ..checkpoint import check_writable
    from ..data.paths import expand_paths
    from ..pipelines.batch import encode_clips, first_frame_stats, latent_stats, write_stats

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
    if (args.stats_out or args.first_frame_stats) and not args.stats:
        raise ValueError(f"{'--stats-out' if args.stats_out else '--first-frame-stats'} needs --stats")
    check_writable(args.output, folder=True)
    if args.stats_out:
        check_writable(args.stats_out)
    vae, src = _load_vae(args, options, vae_overrides)
    options.pop("dtype")
    size = options.pop("size")
    report = encode_clips(clips, args.output, vae, size=tuple(size) if size else None, vae_src=src, **options)
    print(report.summary())
    if args.stats:
        if args.first_frame_stats:  # the later frames' then, as VAE export calibrates such a VAE
            first, (mean, std) = first_frame_stats(report.outputs, all_ranks=True)
        else:
            first, (mean, std) = None, latent_stats(report.outputs, all_ranks=True)
        if int(os.environ.get("RANK", 0)) == 0:
            named = {"latents_mean": mean, "latents_std": std}
            if first is not None:
                named.update(first_latents_mean=first[0], first_latents_std=first[1])
            for name, values in named.items():
                print(f"{name}: [" + ", ".join(f"{v:.6f}" for v in values) + "]")
            if args.stats_out:
                print(f"wrote {write_stats(args.stats_out, mean, std, first)}")
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
    p.add_argument(
        "--first-frame-stats",
        action="store_true",
        help="with --stats: also those of each clip's first latent frame alone (first_latents_mean / _std); "
        "latents_mean / _std are then the later frames' (as VAE export calibrates such a VAE)",
    )
    add_common(p)
    p.set_defaults(func=cmd_encode)


def cmd_decode(args: argparse.Namespace) -> int:
    from ..checkpoint import check_writable
    from ..data.paths import expand_paths
    from ..pipelines.batch import decode_latents

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
    from ..data.io import fit_to_multiple, read_video, size_note, write_video
    from ..pipelines.batch import reconstruct

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

    from ..checkpoint import check_writable
    from ..convert import convert_checkpoint

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
