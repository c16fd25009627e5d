"""Do morphs keep an object? Pairs of one-object stills from held-out clips of the shapes world (different colour,
shape and position), morphed into each other in each mode, every middle frame read back by the world's oracle
(vidlatent.eval.morph: what counts as an object, and the smoothness figures).

    python scripts/eval_morph.py [--model default] [--pairs 24] [--seeds 0 1 2] [--frames 17]
                                 [--variants latent noise noise@0.2 noise~0 bare-noise animate ...]
                                 [--json out.json]

Variants: ``latent``; ``noise`` (the noise mode's default strength) or ``noise@S`` (inverted ``S`` of the way to
noise), with the stills' descriptions as prompts ("a red circle"); ``bare-noise``/``bare-noise@S``, the same
without prompts; ``animate``, the first-and-last-frame job (``animate`` with ``last_image``, A's description as
the prompt) for comparison. A ``~X`` suffix on a morph variant sets its ``stagger`` (``latent~0.3``,
``noise@0.2~0``; without it, the mode's default). Seed ``s`` takes its pairs from another held-out world
(``MORPH_SEED + s``) and is ``animate``'s sampling seed; latent and noise morphs draw nothing at random.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vidlatent import VideoPipeline
from vidlatent.checkpoint import atomic_write
from vidlatent.eval.morph import morph_scores


def maker(pipe: VideoPipeline, variant: str, frames: int):
    """``make(pair, seed)`` for a variant name (see the module docstring)."""
    variant, _, spread = variant.partition("~")
    name, _, level = variant.partition("@")
    stagger = {"stagger": float(spread)} if spread else {}
    if name == "latent":
        return lambda p, seed: pipe.morph(p["a"][None], p["b"][None], frames, **stagger)
    if name == "animate":
        if stagger:
            raise SystemExit("animate is not a morph: it takes no ~stagger")
        return lambda p, seed: pipe.animate(
            p["a"][None], p["prompt_a"], frames, last_image=p["b"][None], seed=seed, progress=False
        )
    if name not in ("noise", "bare-noise"):
        raise SystemExit(
            f"unknown variant {variant!r}; accepted: latent[~X], noise[@S][~X], bare-noise[@S][~X], animate"
        )
    strength = {"strength": float(level)} if level else {}

    def make(p, seed):
        prompts = (p["prompt_a"], p["prompt_b"]) if name == "noise" else (None, None)
        return pipe.morph(
            p["a"][None], p["b"][None], frames, "noise", *prompts, progress=False, **strength, **stagger
        )

    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--pairs", type=int, default=24, help="pairs of stills per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["latent", "latent~0.3", "noise~0", "noise", "bare-noise", "noise@0.2", "noise@1", "animate"],
    )
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    pipe = VideoPipeline.from_pretrained(args.model)
    results = {}
    for variant in args.variants:
        start = time.time()
        print(f"{variant}:", flush=True)
        results[variant] = morph_scores(maker(pipe, variant, args.frames), args.pairs, args.seeds,
                                        log=lambda line: print(line, flush=True))  # fmt: skip
        results[variant]["seconds"] = time.time() - start
    print(
        f"\n{args.pairs} pairs x {len(args.seeds)} seeds, {args.frames} frames (middle frames: all but the ends)"
    )
    print("| variant | middle frames with an object | morphs that keep one throughout | A's or B's colour "
          "| mean step | largest step | jump |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for variant, r in results.items():
        print(f"| {variant} | {100 * r['kept']:.1f}% | {100 * r['all_kept']:.1f}% | {100 * r['ends_colour']:.1f}% "
              f"| {r['step_mean']:.4f} | {r['step_max']:.4f} | {r['jump']:.2f} |")  # fmt: skip
    if args.json:
        text = json.dumps({"args": vars(args), "results": results}, indent=1)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
