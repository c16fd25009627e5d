"""Step caching, measured on the default model: end-to-end time, denoiser block evaluations and the held-out
oracle score, uncached and at a few thresholds (``eval.shapes.score_split``: N held-out prompts x seeds).

Block evaluations are counted by hooks on the blocks (a block run on b samples counts b), not by the cache.

    python scripts/bench_cache.py --count 16 --seeds 0 1 2 --thresholds 0.1 0.15 0.2
"""

from __future__ import annotations

import argparse
import time

from vidlatent import VideoPipeline
from vidlatent.eval.shapes import pool, score_split


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=16, help="held-out prompts")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.15, 0.2])
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    pipe = VideoPipeline.from_pretrained("default")
    pipe.progress = False
    evals = [0]
    for block in pipe.dit.blocks:
        block.register_forward_hook(lambda m, inputs, out: evals.__setitem__(0, evals[0] + out.shape[0]))
    base = None
    print("| cache | time (s) | speed-up | block evals | fewer evals | colour | shape | motion | all |")
    print("|---|---|---|---|---|---|---|---|---|")
    for threshold in [None, *args.thresholds]:
        pipe.cache = threshold
        evals[0] = 0
        t0 = time.perf_counter()
        runs = [score_split(pipe, "heldout", args.count, batch=args.batch, seed=s) for s in args.seeds]
        seconds = time.perf_counter() - t0
        r = pool(runs, args.seeds)
        base = base or (seconds, evals[0])
        rates = " | ".join(f"{r[k]:.1%}" for k in ("colour", "shape", "motion", "all"))
        print(f"| {threshold or 'off'} | {seconds:.0f} | {base[0] / seconds:.2f}x | {evals[0]} | "
              f"{base[1] / evals[0]:.2f}x | {rates} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
