"""Score a shapes-world pipeline (the shipped default model by default) with the world's oracle.

    python scripts/eval_default.py [--model FOLDER] [--count 216] [--seeds 0 1 2] [--json results.json]

Prints and writes (``--json``):
* text-to-video on held-out prompts (colour/shape/motion combinations no training clip shows) and on prompts
  seen in training: how often the largest object the oracle finds has the asked colour, shape and motion;
* for those two splits, the rates by asked colour, by asked shape and the shape rate by asked (colour, shape)
  pair (``by_colour``, ``by_shape``, ``by_pair`` in the JSON; also for ``image``), and the share of clips
  whose first frame is malformed (frame 0's object fits its best circle / square / triangle template with IoU
  < 0.75, or is over 1.5x its median area over the clip) and of clips with a ghost object (a second region of
  the asked colour in 3+ frames, or a colour not asked in half the frames) (``frames``;
  ``vidlatent.eval.frames``), and which prompts were flagged so (``frame_items``, per seed
  ``frame_items_by_seed``: indices into the split's prompts; the shares by asked colour: ``frames_by_colour``);
* text-to-image (split ``image``: the held-out prompts generated as one frame): colour and shape, as above
  (one frame shows no motion, so "all" means colour and shape);
* image-to-video (split ``animate``): the first frames of held-out clips of the world animated with their
  captions, scored as above, and the PSNR of the first output frame against the still (``first_psnr``);
* video-to-video (splits ``edit-shape`` and ``edit-colour``, ``--edit-strength`` 0.5): the same held-out clips
  edited with a caption that asks for the next shape (circle -> square -> triangle) or another colour and the
  clip's own motion; scored as above against what the caption asks;
* VAE reconstruction PSNR on held-out clips of the world (17 frames, 64x64), and how often the oracle still reads
  their object's colour, shape and motion right through the VAE (roughly a ceiling for the denoiser's scores);
* wall time of ``vidlatent generate "a red circle moving right" -o out.mp4`` in a fresh process (best and
  worst of ``--cli-runs``), model loading and imports included.

With several ``--seeds`` every split runs once per sampling seed on the same prompts / clips and reports the
rates pooled over all of them (``per_seed`` holds each seed's): 216 prompts score a rate to within about +-2.8
points (one standard error at 80%), three seeds narrow the sampling part of that.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from vidlatent import VideoPipeline
from vidlatent.checkpoint import atomic_write
from vidlatent.eval import SPLITS, evaluate
from vidlatent.pipelines.video import SOURCE_GUIDANCE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped default model)")
    ap.add_argument("--count", type=int, default=216, help="prompts per split")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0],
                    help="sampling seeds: each split runs once per seed and its rates are pooled (per seed too)")  # fmt: skip
    ap.add_argument("--vae-clips", type=int, default=64)
    ap.add_argument("--cli-runs", type=int, default=3)
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    ap.add_argument("--edit-count", type=int, default=72, help="clips per edit split")
    ap.add_argument("--edit-strength", type=float, default=0.5)
    ap.add_argument("--edit-source", action="store_true", help="edit by FlowEdit from each clip's caption")
    ap.add_argument("--source-guidance", type=float, default=None, help="FlowEdit's source guidance")
    ap.add_argument("--device", default=None, help="run the pipeline here (default: the CPU); the CLI timing "
                    "always runs the CLI as a user would")  # fmt: skip
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("overrides", nargs="*", help="job options, e.g. steps=20 guidance=4")
    args = ap.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds repeats a seed ({' '.join(map(str, args.seeds))}): each seed samples once")
    if args.source_guidance is not None and not args.edit_source:
        ap.error("--source-guidance is FlowEdit's: add --edit-source")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    pipe = VideoPipeline.from_pretrained(args.model or "default", device=args.device)
    job = {}
    for kv in args.overrides:
        k, _, v = kv.partition("=")
        if not v or not hasattr(pipe.config, k):
            ap.error(
                f"bad job option {kv!r}: expected key=value with key one of {', '.join(vars(pipe.config))}"
            )
        if k == "seed":
            ap.error("the seed of each batch comes from --seeds; it is not a job option")
        job[k] = type(getattr(pipe.config, k))(v)
    pipe.config = dataclasses.replace(pipe.config, **job)  # every job takes them, first_frame (animate) too
    flow = None
    if args.edit_source:
        flow = {"source_guidance": SOURCE_GUIDANCE if args.source_guidance is None else args.source_guidance}
    results = evaluate(pipe, args.splits, args.count, args.batch, args.seeds, args.edit_count, args.edit_strength,
                       flow, args.vae_clips, args.cli_runs, args.model)  # fmt: skip
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2, default=str)))


if __name__ == "__main__":
    main()
