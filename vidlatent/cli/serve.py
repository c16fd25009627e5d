"""``vidlatent serve``: the web page (``vidlatent.serve``), a tab per job over the same commands."""

from __future__ import annotations

import argparse

from .jobs import add_runtime_flags, runtime_argv


def cmd_serve(args: argparse.Namespace) -> int:
    from ..runtime import check_runtime
    from ..serve import serve

    check_runtime(args.offload, args.weights_dtype, args.attention)  # one line now, not on every job
    serve(args.model, args.port, args.host, args.share, args.device, runtime=runtime_argv(args))
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web page with a tab per job (needs the ui extra: pip install -e '.[ui]')",
        epilog="example: vidlatent serve --port 7860   (then open http://127.0.0.1:7860)",
    )
    p.add_argument("--model", default="default", help="pipeline/model folder or preset name every job uses")
    p.add_argument("--port", type=int, default=7860, help="port (7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1: this machine only; 0.0.0.0 is public, with a warning)")  # fmt: skip
    p.add_argument("--share", action="store_true", help="a public gradio.live link too (with a warning)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_runtime_flags(p, torchrun=False)  # every pipeline job of the page runs so (e.g. --offload model)
    p.set_defaults(func=cmd_serve)
