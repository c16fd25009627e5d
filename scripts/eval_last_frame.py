"""How well does `animate --last` end on its last still? The first and last frames of held-out shapes-world clips,
animated with their captions; PSNR of the first and last output frames against the stills, for the latent the
pipeline keeps as the last latent frame and for the alternatives it was chosen over (vidlatent.eval.last_frame).

    python scripts/eval_last_frame.py [--model default] [--clips 8] [--seed 0]
"""

from __future__ import annotations

import argparse

from vidlatent import VideoPipeline
from vidlatent.eval.last_frame import LABELS, last_frame_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of clip i is seed + i")
    args = ap.parse_args()
    pipe = VideoPipeline.from_pretrained(args.model)
    pipe.progress = False
    results = last_frame_scores(pipe, args.clips, args.seed, log=lambda line: print(line, flush=True))
    print(f"mean PSNR over {args.clips} held-out pairs (dB):")
    for name, values in results.items():
        print(f"  {LABELS[name]}: {sum(values) / len(values):.2f}")


if __name__ == "__main__":
    main()
