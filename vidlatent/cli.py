"""The ``vidlatent`` command: parse arguments, then call library functions (nothing else lives here)."""

from __future__ import annotations

import argparse
import sys

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
    for kind in ("vae", "dit"):
        print(f"{kind + ' presets':<12}{', '.join(list_presets(kind)) or '-'}")
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


# Each subcommand is an ``add_<name>(sub)`` function that registers its parser and handler.
SUBCOMMANDS = [add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidlatent", description="Video latent diffusion toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"vidlatent {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
