"""``vidlatent calibrate-cache``: step caching thresholds for a model, written to a settings file."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import _check_inputs, _device, add_common

SETTINGS_FILE = "step_cache.json"
EXAMPLE = (
    "example: vidlatent calibrate-cache --model default --prompts 4 -o cache.json\n"
    "then:    vidlatent generate 'a red circle moving right' --cache cache.json:fast -o out.gif"
)


def cmd_calibrate_cache(args: argparse.Namespace) -> int:
    from ..eval.shapes import split_items
    from ..pipelines import VideoPipeline
    from ..runtime.cache import calibrate, write_settings

    if args.prompts_file:
        _check_inputs(args.prompts_file)
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompts_file} holds no prompts (one a line)")
    else:  # simple captions of the shapes world's training split: not the held-out ones the oracle scores
        prompts = [prompt for prompt, _ in split_items("train", args.prompts, seed=0)]
    output = args.output or (str(Path(args.model) / SETTINGS_FILE) if Path(args.model).is_dir() else None)
    if output is None:
        raise ValueError(f"--model {args.model!r} is not a folder: say where the settings go with -o PATH")
    pipe = VideoPipeline.from_pretrained(args.model, device=_device(args), overrides=args.overrides or None)
    pipe.progress = not args.quiet
    job = {"steps": args.steps} if args.steps else {}
    levels, rows = calibrate(pipe, prompts, seeds=args.seeds, **job)
    for r in rows:
        print(f"threshold {r['threshold']:.3g}: relative latent error {r['error']:.4f}, "
              f"block evaluations {r['block_evals']:.1%} of uncached")  # fmt: skip
    path = write_settings(output, pipe.dit, Path(args.model).name, levels, rows)
    print(f"{path}: " + ", ".join(f"{k} {v:.3g}" for k, v in levels.items()))
    return 0


def add_calibrate_cache(sub) -> None:
    p = sub.add_parser(
        "calibrate-cache",
        help="step caching thresholds for a model (quality, balanced, fast), written to a settings file",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompts", type=int, default=4, help="how many built-in prompts to run (4)")
    p.add_argument("--prompts-file", default=None, help="a text file of prompts, one a line, instead")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds (0)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (the model's own)")
    p.add_argument("-o", "--output", default=None, help=f"the settings file (default: MODEL/{SETTINGS_FILE})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_common(p)
    p.set_defaults(func=cmd_calibrate_cache)
