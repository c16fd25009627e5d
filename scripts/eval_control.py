"""Does a silhouette control steer the default model? Held-out clips of the shapes world (combinations no
training clip shows), each giving a caption and its silhouette video (white shapes on black); the model makes a
video from both, and the oracle's object mask is compared with the silhouette frame by frame
(vidlatent.eval.control: IoU, colour).

    python scripts/eval_control.py [--model default] [--branch FOLDER] [--count 216] [--seeds 0]
                                   [--variants control none control@0.5 ...] [--batch 24] [--json out.json]

Variants: ``control`` (the branch with the model's control defaults: its pipeline.json's ``control_scale`` and
``control_guidance``, as ``vidlatent control`` runs it), ``control@S`` (scale ``S``, the same guidance) or
``control@S@G`` (scale ``S``, guidance ``G``); ``none``, the same captions made by text-to-video without the control
(the model's guidance), scored against the same silhouettes (where a prompt alone puts the object).
``--branch`` attaches a control branch folder (``ControlBranch.save_pretrained``'s, or a pipeline folder's
``control/``) to ``--model`` first. Seed ``s`` makes the batch starting at case ``i`` with seed ``s * 1000 + i``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vidlatent import VideoPipeline
from vidlatent.checkpoint import atomic_write
from vidlatent.eval.control import evaluate_control, heldout_controls, tally_control


def maker(pipe: VideoPipeline, variant: str):
    """``make(captions, controls, seed)`` for a variant name (see the module docstring)."""
    name, *levels = variant.split("@")
    if name == "none":
        if levels:
            raise SystemExit("variant 'none' takes no scale")
        return lambda captions, controls, seed: pipe.generate(
            captions, frames=controls.shape[2], height=controls.shape[3], width=controls.shape[4], seed=seed,
            progress=False,
        )  # fmt: skip
    if name != "control" or len(levels) > 2:
        raise SystemExit(f"unknown variant {variant!r}; accepted: control[@S[@G]], none")
    scale = float(levels[0]) if levels else None
    guidance = {"guidance": float(levels[1])} if len(levels) > 1 else {}
    return lambda captions, controls, seed: pipe.control(
        captions, controls, scale=scale, seed=seed, progress=False, **guidance
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--branch", default=None, help="a control branch folder to attach to --model")
    ap.add_argument("--count", type=int, default=216, help="held-out clips")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=["control", "none"])
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    pipe = VideoPipeline.from_pretrained(args.model)
    if args.branch:
        pipe.load_control(args.branch)
    cases = heldout_controls(args.count)
    results = {}
    for variant in args.variants:
        make = maker(pipe, variant)
        start, runs = time.time(), []
        for seed in args.seeds:
            runs.append(evaluate_control(make, cases, batch=args.batch, seed=seed * 1000))
            r = runs[-1]
            print(f"{variant} seed {seed}: IoU {r['iou']:.3f} (lowest {r['iou_min']:.3f}), colour "
                  f"{100 * r['colour']:.1f}%, nothing {100 * r['nothing']:.1f}%", flush=True)  # fmt: skip
        pooled = tally_control([row for r in runs for row in r["rows"]])
        results[variant] = {**pooled, "seconds": time.time() - start, "runs": runs}
    print(f"\n{args.count} held-out clips x {len(args.seeds)} seed(s), 64x64, 17 frames")
    print(
        "| variant | clips | mean IoU | lowest IoU | clips with IoU >= 0.5 | colour right | no object | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant, r in results.items():
        print(f"| {variant} | {r['clips']} | {r['iou']:.3f} | {r['iou_min']:.3f} | "
              f"{100 * r['iou_at_least_0.5']:.1f}% | {100 * r['colour']:.1f}% | {100 * r['nothing']:.1f}% | "
              f"{r['seconds']:.0f} |")  # fmt: skip
    if args.json:
        text = json.dumps({"args": vars(args), "results": results}, indent=1)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
