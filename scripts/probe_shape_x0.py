"""Can the denoiser draw a shape from its own latents? One-step predictions of training clips, read by the oracle.

    python scripts/probe_shape_x0.py                                   # squares of every colour, the shipped model
    python scripts/probe_shape_x0.py --model FOLDER --shape circle --sigmas 0.3 0.5 --clips 24 --json x0.json
    python scripts/probe_shape_x0.py --colours purple --caption-colour red     # purple squares captioned as red

For each asked colour, the first ``--clips`` one-object clips of the shapes world (training split) that show that
colour and ``--shape`` are encoded, noised to each ``--sigmas`` level (one seeded noise draw a level) and denoised
in one step with their own captions (guidance 1: the conditional prediction alone): ``x0 = x_sigma - sigma *
velocity``. The prediction is decoded and the oracle reads its largest object's shape. Printed per colour: how many
predictions read as the asked shape at each level. At low noise the prediction is nearly the clip; where it stops
reading right is where the denoiser no longer knows the shape from what it sees and what it is told. With
``--caption-colour`` the captions name that colour instead (the clips stay as drawn), to tell the caption's part
from the latents' (issue 26: purple squares read 6 / 16 at sigma 0.5 with their captions and 2 / 16 captioned as
red, red squares 16 / 16). ``--decoder-only`` leaves the denoiser out: the normalized latents get white noise of
std ``--sigmas`` and are decoded as they are (the VAE's part: how large an error a shape's latents survive).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from probe_colour_signal import one_object_clips  # a script beside this one

from vidlatent import VideoPipeline
from vidlatent.checkpoint import atomic_write
from vidlatent.data.shapes import COLOURS, SHAPES, ShapesWorld, oracle
from vidlatent.diffusion.flow import add_noise


def clips_of(world: ShapesWorld, colour: str, shape: str, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` one-object clips of ``world`` showing a ``colour`` ``shape``, and their captions."""
    clips = [world.clip(i) for i in one_object_clips(world, n, colour, shape, patience=1000)]
    return torch.stack([video for video, _ in clips]), [text for _, text in clips]


@torch.no_grad()
def read_predictions(
    pipe,
    clips: torch.Tensor,
    captions: list[str],
    shape: str,
    sigmas,
    seed: int = 0,
    decoder_only: bool = False,
) -> list[int]:
    """For each sigma, how many one-step predictions of ``clips`` the oracle reads as ``shape`` (``decoder_only``:
    how many of their latents with white noise of std sigma added)."""
    x0 = pipe.encode(clips.to(pipe.device))
    context, mask = pipe.encode_text(captions)
    found = []
    for k, level in enumerate(sigmas):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + k)).to(x0)
        sigma = torch.full((len(x0),), float(level), device=x0.device)
        if decoder_only:
            pred = x0 + float(level) * noise
        else:
            x_sigma = add_noise(x0, noise, sigma)
            pred = x_sigma - float(level) * pipe.dit(x_sigma, sigma, context, mask).float()
        reads = [oracle(v) for v in pipe.decode(pred).float().cpu()]
        found.append(sum(bool(r) and r[0]["shape"] == shape for r in reads))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="pipeline folder (default: shipped)")
    ap.add_argument("--colours", nargs="+", default=list(COLOURS), choices=list(COLOURS))
    ap.add_argument("--shape", default="square", choices=SHAPES)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                    help="noise levels (--decoder-only: white noise stds)")  # fmt: skip
    ap.add_argument("--clips", type=int, default=16, help="clips per colour")
    ap.add_argument("--caption-colour", default=None, choices=list(COLOURS),
                    help="caption the clips with this colour instead of their own")  # fmt: skip
    ap.add_argument("--decoder-only", action="store_true",
                    help="no denoiser: decode the latents with white noise of std --sigmas added")  # fmt: skip
    ap.add_argument("--seed", type=int, default=1, help="the training world's seed (the recipe's: 1)")
    ap.add_argument("--json", default=None, help="write the counts here")
    args = ap.parse_args()
    if args.clips < 1:
        ap.error(f"--clips must be >= 1; got {args.clips}")
    if args.decoder_only and not all(s >= 0 for s in args.sigmas):
        ap.error(f"--sigmas are white noise stds with --decoder-only: >= 0; got {args.sigmas}")
    if not args.decoder_only and not all(0 < s < 1 for s in args.sigmas):
        ap.error(f"--sigmas must lie in (0, 1); got {args.sigmas}")
    pipe = VideoPipeline.from_pretrained(args.model)
    pipe.dit.eval()
    world = ShapesWorld(height=64, width=64, frames=17, split="train", seed=args.seed)
    results = {}
    what = "latents with white noise of std" if args.decoder_only else "one-step predictions at sigma"
    print(f"{what} {args.sigmas} read as {args.shape}, of {args.clips} clips a colour")
    for colour in args.colours:
        clips, captions = clips_of(world, colour, args.shape, args.clips)
        if args.caption_colour:
            captions = [c.replace(colour, args.caption_colour) for c in captions]
        found = read_predictions(
            pipe, clips, captions, args.shape, args.sigmas, decoder_only=args.decoder_only
        )
        results[colour] = found
        print(
            f"  {colour:7s} "
            + "  ".join(f"sigma {s}: {n:3d}/{args.clips}" for s, n in zip(args.sigmas, found))
        )
    if args.json:
        text = json.dumps({"model": args.model, "shape": args.shape, "sigmas": args.sigmas, "clips": args.clips,
                           "caption_colour": args.caption_colour, "decoder_only": args.decoder_only,
                           "found": results}, indent=2)  # fmt: skip
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
