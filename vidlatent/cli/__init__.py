"""The ``vidlatent`` command: parse arguments, then call library functions (nothing else lives here).

One module per group of subcommands: ``jobs`` (generate, edit, inpaint, animate, morph), ``latents`` (encode,
decode, reconstruct, convert), ``train``; ``common`` holds what they share (the sampling and frame-selection
argument groups, input and output checks). Each subcommand is an ``add_<name>(sub)`` that registers its parser
and handler; ``SUBCOMMANDS`` lists them.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys

from .cache import add_calibrate_cache
from .common import add_common, parse_lora_spec, warning_lines
from .jobs import JOB_SUBCOMMANDS
from .latents import add_convert, add_decode, add_encode, add_reconstruct
from .serve import add_serve
from .train import add_train

__all__ = ["SUBCOMMANDS", "add_common", "build_parser", "main", "parse_lora_spec", "run"]

EXAMPLES = {
    "info": "example: vidlatent info",
}


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__
    from ..config import list_presets

    device = "cuda (" + torch.cuda.get_device_name(0) + ")" if torch.cuda.is_available() else "cpu"
    print(f"vidlatent {__version__}")
    print(f"torch     {torch.__version__} (threads: {torch.get_num_threads()})")
    print(f"device    {device}")
    from ..checkpoint import SHIPPED_MODELS

    print(f"{'shipped models':<18}{', '.join(SHIPPED_MODELS)} (trained weights, for every part)")
    for kind in ("pipeline", "vae", "dit", "text"):
        print(f"{kind + ' presets':<18}{', '.join(list_presets(kind)) or '-'} (random weights)")
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="print versions, device and available presets", epilog=EXAMPLES["info"])
    p.set_defaults(func=cmd_info)


SUBCOMMANDS = [
    add_info,
    add_encode,
    add_decode,
    add_reconstruct,
    add_convert,
    add_train,
    *JOB_SUBCOMMANDS,
    add_calibrate_cache,
    add_serve,
]


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
    from ..errors import debug_wanted, user_error

    debug = debug_wanted(getattr(args, "debug", False))
    finished, grouped = False, _in_process_group()
    try:
        with contextlib.nullcontext() if debug else warning_lines(args.command):
            status = args.func(args)
        finished = True
        return status
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
    finally:
        if not grouped and _in_process_group():  # under torchrun: the group the command joined
            from ..runtime import parallel

            parallel.leave(wait=finished)  # a finished command waits for the other ranks, a failed one not


def _in_process_group() -> bool:
    """Whether this process is in a torch.distributed process group (without importing torch for it)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
