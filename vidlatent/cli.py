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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidlatent", description="Video latent diffusion toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print versions, device and available presets", epilog=EXAMPLES["info"])
    p.set_defaults(func=cmd_info)
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
