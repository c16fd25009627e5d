"""How well ``animate --last`` ends on its last still: the first and last frames of held-out shapes-world clips,
animated with their captions; the PSNR of the first and last output frames against the stills, for the latent
the pipeline keeps as the last latent frame and for the alternatives it was chosen over.

A causal VAE's last latent frame holds the last 4 pixel frames and depends on every frame before it, so a still
has no one latent there. Candidates, each held (noised to each step's sigma) as the last latent frame:

  clip     the last latent of the clip [first, last, last, ...] (what VideoPipeline.animate keeps)
  still    the last latent of a clip of the last still alone (1 + 4 frames)
  image    the last still encoded as an image (one frame: the latent the decoder reads as a first frame)

and, for scale, the VAE's own round trip of the last still as an image.
"""

from __future__ import annotations

import torch

from ..data.shapes import ShapesWorld
from ..diffusion.flow import add_noise
from ..metrics import psnr

LABELS = {"clip": "last frame, clip (what animate keeps)", "still": "last frame, still", "image": "last frame, image",
          "first frame": "first frame", "VAE alone": "VAE round trip of the last still"}  # fmt: skip
WORLD_SEED = 11  # the held-out clips whose first and last frames are the stills


def frame_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two frames in [-1, 1], on [0, 1]."""
    return psnr((a + 1) / 2, (b + 1) / 2)


def _held_last(pipe, first, caption: str, z_last: torch.Tensor, seed: int) -> torch.Tensor:
    """The pipeline's animate run with ``z_last`` held (noised to each step's sigma) as the last latent frame."""
    cfg = pipe.config
    z_first = pipe.encode(first)
    noise, generator = pipe._noise(pipe._latent_shape(1, cfg.frames, cfg.height, cfg.width), seed)

    def hook(step, sigma, x):
        x = x.clone()
        level = torch.full((1,), 0.0 if cfg.first_frame == "clean" else sigma)
        x[:, :, :1] = add_noise(z_first, noise[:, :, :1], level)
        x[:, :, -1:] = add_noise(z_last, noise[:, :, -1:], torch.full((1,), sigma))
        return x

    opts = pipe._options(None, {"progress": False}, "animate")
    return pipe.decode(pipe._sample(noise, [caption], opts, generator, hook=hook))


def last_frame_scores(pipe, clips: int = 8, seed: int = 0, log=print) -> dict[str, list[float]]:
    """Per ``LABELS`` key, the PSNRs (dB) over ``clips`` held-out pairs (clip ``i`` sampled with seed ``seed +
    i``); ``log`` gets a line per clip."""
    cfg = pipe.config
    world = ShapesWorld(cfg.height, cfg.width, cfg.frames, split="heldout", seed=WORLD_SEED)
    results: dict[str, list[float]] = {name: [] for name in LABELS}
    for i in range(clips):
        video, caption = world.clip(i)
        first, last = video[None, :, :1], video[None, :, -1:]
        # the shipped path, end to end
        out = pipe.animate(first, caption, last_image=last, seed=seed + i, progress=False)
        results["clip"].append(frame_psnr(out[0, :, -1], last[0, :, 0]))
        results["first frame"].append(frame_psnr(out[0, :, 0], first[0, :, 0]))
        results["VAE alone"].append(frame_psnr(pipe.decode(pipe.encode(last))[0, :, 0], last[0, :, 0]))
        # the alternatives: the same run with another latent held as the last latent frame
        candidates = {
            "still": pipe.encode(last.expand(-1, -1, 5, -1, -1))[:, :, -1:],
            "image": pipe.encode(last),
        }
        for name, z_last in candidates.items():
            results[name].append(
                frame_psnr(_held_last(pipe, first, caption, z_last, seed + i)[0, :, -1], last[0, :, 0])
            )
        log(f"{i}: {caption!r} " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in results.items()))
    return results
