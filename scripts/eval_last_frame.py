"""How well does `animate --last` end on its last still? The first and last frames of held-out shapes-world clips,
animated with their captions; PSNR of the first and last output frames against the stills, for the latent the
pipeline keeps as the last latent frame and for the alternatives it was chosen over.

    python scripts/eval_last_frame.py [--model default] [--clips 8] [--seed 0]

A causal VAE's last latent frame holds the last 4 pixel frames and depends on every frame before it, so a still
has no one latent there. Candidates, each held (noised to each step's sigma) as the last latent frame:

  clip     the last latent of the clip [first, last, last, ...] (what VideoPipeline.animate keeps)
  still    the last latent of a clip of the last still alone (1 + 4 frames)
  image    the last still encoded as an image (one frame: the latent the decoder reads as a first frame)

and, for scale, the VAE's own round trip of the last still as an image.
"""

from __future__ import annotations

import argparse

import torch

from vidlatent import VideoPipeline
from vidlatent.data.shapes import ShapesWorld
from vidlatent.diffusion.flow import add_noise
from vidlatent.pipelines.encode import psnr


def frame_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return psnr((a + 1) / 2, (b + 1) / 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of clip i is seed + i")
    args = ap.parse_args()
    pipe = VideoPipeline.from_pretrained(args.model)
    pipe.progress = False
    cfg = pipe.config
    world = ShapesWorld(cfg.height, cfg.width, cfg.frames, split="heldout", seed=11)
    results: dict[str, list[float]] = {
        "clip": [],
        "still": [],
        "image": [],
        "first frame": [],
        "VAE alone": [],
    }
    for i in range(args.clips):
        video, caption = world.clip(i)
        first, last = video[None, :, :1], video[None, :, -1:]
        # the shipped path, end to end
        out = pipe.animate(first, caption, last_image=last, seed=args.seed + i)
        results["clip"].append(frame_psnr(out[0, :, -1], last[0, :, 0]))
        results["first frame"].append(frame_psnr(out[0, :, 0], first[0, :, 0]))
        results["VAE alone"].append(frame_psnr(pipe.decode(pipe.encode(last))[0, :, 0], last[0, :, 0]))
        # the alternatives: the same run with another latent held as the last latent frame
        z_first = pipe.encode(first)
        candidates = {
            "still": pipe.encode(last.expand(-1, -1, 5, -1, -1))[:, :, -1:],
            "image": pipe.encode(last),
        }
        for name, z_last in candidates.items():
            noise, generator = pipe._noise(
                pipe._latent_shape(1, cfg.frames, cfg.height, cfg.width), args.seed + i
            )

            def hook(step, sigma, x, z_first=z_first, z_last=z_last, noise=noise):
                x = x.clone()
                level = torch.full((1,), 0.0 if cfg.first_frame == "clean" else sigma)
                x[:, :, :1] = add_noise(z_first, noise[:, :, :1], level)
                x[:, :, -1:] = add_noise(z_last, noise[:, :, -1:], torch.full((1,), sigma))
                return x

            opts = pipe._options(None, None, None, None, False)
            z = pipe._sample(noise, [caption], None, opts, generator, hook=hook)
            results[name].append(frame_psnr(pipe.decode(z)[0, :, -1], last[0, :, 0]))
        print(f"{i}: {caption!r} " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items()), flush=True)
    labels = {"clip": "last frame, clip (what animate keeps)", "still": "last frame, still", "image": "last frame, image",
              "first frame": "first frame", "VAE alone": "VAE round trip of the last still"}  # fmt: skip
    print(f"mean PSNR over {args.clips} held-out pairs (dB):")
    for name, values in results.items():
        print(f"  {labels[name]}: {sum(values) / len(values):.2f}")


if __name__ == "__main__":
    main()
