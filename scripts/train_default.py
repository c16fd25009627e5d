"""Reproduce the shipped default model from nothing: the shapes world, our trainer, the default recipe.

    python scripts/train_default.py [--out runs/default] [--stages vae cache dit refine joint polish joint2 polish3
                                                            i2v gpu redraw redraw2 carry gpu2 redraw3 ship eval]
                                                           [--adopt-ship]

The recipe is data: vidlatent/configs/recipes/default/ (recipe.yaml names the stages in order; <stage>.yaml holds
each stage's runs, cache and lanes, with why it was run). Each stage resumes where an interrupted run stopped;
rerunning a finished stage costs next to nothing. After the stages:
  ship   assemble the pipeline folder (vae/, dit/, text_encoder/, pipeline.json, runs.json) at --ship, each part
         from the latest stage that trains it and whose lanes all finished (``--from-stages``: those stages first,
         even ones marked ``ship: false``; a stage with ``experts`` adds its low-noise expert as dit_2/)
  eval   scripts/eval_default.py on it, then write MODEL_CARD.md beside the weights

``--adopt-ship`` starts from the shipped model where the working folder lacks the runs it came from (a fresh
machine): its parts are copied to ``<out>/<run>/final`` as its ``runs.json`` names them. On a GPU machine with this
repository and nothing else, ``python scripts/train_default.py --adopt-ship --stages gpu2`` is stage 13 whole.

Extra ``key=value`` arguments after ``--vae-args`` / ``--dit-args`` go to the runs of stages vae / dit,
``--refine-args`` to every run of the later stages. Wall times of the stages are kept in ``<out>/timings.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from vidlatent.checkpoint import atomic_write
from vidlatent.eval.card import model_card
from vidlatent.recipes import adopt_ship, load_recipe, run_stage, ship
from vidlatent.recipes.runner import run_command

ROOT = Path(__file__).resolve().parent.parent
SHIP = ROOT / "vidlatent" / "weights" / "default"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/default", help="working folder (checkpoints, latents, logs)")
    ap.add_argument("--ship", default=str(SHIP), help="where the pipeline folder goes")
    stages = [*load_recipe("default").stages, "ship", "eval"]
    ap.add_argument("--stages", nargs="+", default=stages, choices=stages)
    ap.add_argument(
        "--clips", type=int, help="training clips cached for the denoiser (default: the recipe's)"
    )
    ap.add_argument("--joint-clips", type=int, help="training clips cached again in stages 4 and 6")
    ap.add_argument("--gpu-clips", type=int, help="training clips cached for stage 9 (gpu)")
    ap.add_argument("--gpu2-clips", type=int, help="training clips cached for stage 13 (gpu2)")
    ap.add_argument("--wide-gpu-clips", type=int, help="training clips cached for stage 18 (wide-gpu)")
    ap.add_argument("--cache-clips", type=int, help="training clips cached by any stage given here that caches "
                    "(default: each stage's own; the flags above win for their stages)")  # fmt: skip
    ap.add_argument(
        "--device", help="where stages gpu, gpu2 and wide-gpu run (default: cuda; cpu only to try them out)"
    )
    ap.add_argument("--adopt-ship", action="store_true", help="start from the shipped model: copy the --ship "
                    "folder's parts to the runs its runs.json names, where the working folder lacks them")  # fmt: skip
    ap.add_argument("--vae-args", nargs="*", default=[])
    ap.add_argument("--dit-args", nargs="*", default=[])
    ap.add_argument(
        "--refine-args", nargs="*", default=[], help="key=value for every run of the later stages"
    )
    ap.add_argument("--eval-args", nargs="*", default=[])
    ap.add_argument("--from-stages", nargs="+", default=[], metavar="STAGE", help="ship takes these stages' "
                    "lanes first, ship: false or not (a candidate to score: give --ship another folder)")  # fmt: skip
    args = ap.parse_args()
    recipe = load_recipe("default", args.out)
    clips = {"cache": args.clips, "joint": args.joint_clips, "joint2": args.joint_clips, "gpu": args.gpu_clips,
             "gpu2": args.gpu2_clips, "wide-gpu": args.wide_gpu_clips}  # fmt: skip
    out, folder = Path(args.out), Path(args.ship)
    if args.from_stages and "ship" in args.stages and folder.resolve() == SHIP.resolve():
        ap.error("--from-stages assembles a candidate: give it its own --ship folder (the shipped model changes "
                 "when a stage's yaml says ship: true)")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if args.adopt_ship:
        adopt_ship(recipe, folder)
    for stage in recipe.stages:
        if stage in args.stages:
            extra = {"vae": args.vae_args, "dit": args.dit_args}.get(stage, args.refine_args)
            count = clips.get(stage) or args.cache_clips
            run_stage(recipe, stage, extra, clips=count, device=args.device)
    if "ship" in args.stages:
        ship(recipe, folder, args.from_stages)
    if "eval" in args.stages:
        results_file = out / "eval.json"
        run_command([sys.executable, str(ROOT / "scripts" / "eval_default.py"), "--model", str(folder),
                     "--json", str(results_file), *args.eval_args])  # fmt: skip
        card = model_card(recipe, folder, json.loads(results_file.read_text()))
        atomic_write(folder / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(card))
        print(card)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, RuntimeError, ValueError, subprocess.CalledProcessError) as err:
        raise SystemExit(str(err)) from None
