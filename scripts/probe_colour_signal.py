"""How much of each colour's object a VAE's latents carry, frame by frame: the signal a denoiser has to find.

    python scripts/probe_colour_signal.py                      # 300 one-object training clips, the shipped VAE
    python scripts/probe_colour_signal.py --model FOLDER --clips 96 --json signal.json

Each one-object clip of the shapes world (training split) is encoded twice, as drawn and with its object left out
(the same background), both by the pipeline's ``encode`` (so in the normalized latents the denoiser works in); the
difference is the object's own signal. Printed per asked colour: the median over clips of its squared norm
(summed over channels and cells) in each latent frame, and frame 0's share of the later frames' median. The causal
VAE encodes frame 0 alone; a colour whose signal there is small is one the denoiser can hardly see at any noise
level, so it forms last and worst (issue 26: malformed first frames are almost all purple and green clips).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from vidlatent import VideoPipeline
from vidlatent.checkpoint import atomic_write
from vidlatent.data.shapes import COLOURS, ShapesWorld, render, to_tensor


def one_object_clips(
    world: ShapesWorld, n: int, colour: str | None = None, shape: str | None = None, patience: int = 50
) -> list[int]:
    """Indices of ``world``'s first ``n`` one-object clips (of ``colour`` and ``shape`` where given); RuntimeError
    when ``patience * n`` clips hold fewer."""  # fmt: skip
    found, i = [], 0
    while len(found) < n:
        objects = world.scene(i).objects
        if len(objects) == 1 and colour in (None, objects[0].colour) and shape in (None, objects[0].shape):
            found.append(i)
        i += 1
        if i > patience * n:
            what = " ".join(x for x in (colour, shape) if x)
            raise RuntimeError(
                f"found {len(found)} one-object {what + ' ' if what else ''}clips in {i}; asked for {n}"
            )
    return found


def object_signal(pipe, world: ShapesWorld, clips: int, batch: int = 25) -> dict[str, np.ndarray]:
    """{colour: (n, latent frames)} squared norms of the latent difference each one-object clip's object makes."""
    found = [world.scene(i) for i in one_object_clips(world, clips)]
    out = collections.defaultdict(list)
    f, h, w = world.frames, world.height, world.width
    for k in range(0, len(found), batch):
        scenes = found[k : k + batch]
        drawn = torch.stack([to_tensor(render(s, f, h, w)) for s in scenes])
        empty = torch.stack([to_tensor(render(dataclasses.replace(s, objects=[]), f, h, w)) for s in scenes])
        with torch.no_grad():
            diff = pipe.encode(drawn.to(pipe.device)) - pipe.encode(empty.to(pipe.device))
        for scene, d in zip(scenes, diff.float().cpu()):
            out[scene.objects[0].colour].append(d.pow(2).sum(dim=(0, 2, 3)).numpy())
    return {colour: np.stack(rows) for colour, rows in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="pipeline folder whose VAE encodes (default: shipped)")
    ap.add_argument("--clips", type=int, default=300, help="one-object clips (about 50 per colour at 300)")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=3, help="the training world's seed")
    ap.add_argument("--json", default=None, help="write the medians here")
    args = ap.parse_args()
    if args.clips < 1:
        ap.error(f"--clips must be >= 1; got {args.clips}")
    pipe = VideoPipeline.from_pretrained(args.model)
    world = ShapesWorld(height=args.size, width=args.size, frames=args.frames, split="train", seed=args.seed)
    signal = object_signal(pipe, world, args.clips)
    print("object signal in the normalized latents (squared norm over channels and cells), median over clips")
    results = {}
    for colour in COLOURS:
        if colour not in signal:
            continue
        v = signal[colour]
        first, later = (
            float(np.median(v[:, 0])),
            float(np.median(v[:, 1:])) if v.shape[1] > 1 else float("nan"),
        )
        per_frame = [round(float(x), 1) for x in np.median(v, axis=0)]
        results[colour] = {"clips": len(v), "per_frame": per_frame, "first_over_later": first / later}
        print(f"  {colour:7s} n={len(v):3d}  frame 0 {first:8.1f}  per latent frame {per_frame}  "
              f"frame 0 / later {first / later:.3f}")  # fmt: skip
    if args.json:
        text = json.dumps({"model": args.model, "clips": args.clips, "colours": results}, indent=2)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
