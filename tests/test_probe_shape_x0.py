"""scripts/probe_shape_x0.py: one-step predictions of world clips, read by the oracle."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vidlatent import VideoPipeline
from vidlatent.data.shapes import ShapesWorld, oracle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import probe_shape_x0  # noqa: E402


def test_clips_of_finds_the_asked_one_object_clips():
    world = ShapesWorld(height=64, width=64, frames=5, split="train", seed=1)
    clips, captions = probe_shape_x0.clips_of(world, "red", "square", 2)
    assert clips.shape == (2, 3, 5, 64, 64) and all("red" in c for c in captions)
    assert all(o[0]["colour"] == "red" and o[0]["shape"] == "square" for o in map(oracle, clips))


def test_near_clean_predictions_read_as_the_clip_and_pure_noise_ones_do_not():
    """At sigma 0.02 the one-step prediction of the shipped model is the clip itself to the oracle (a wrong sign
    or scale in x0 = x_sigma - sigma * velocity would lose it); a square drawn from noise with a circle's caption
    is no square. With ``decoder_only`` the denoiser is left out."""
    torch.manual_seed(0)
    pipe = VideoPipeline.from_pretrained("default")
    world = ShapesWorld(height=64, width=64, frames=17, split="train", seed=1)
    clips, captions = probe_shape_x0.clips_of(world, "orange", "square", 3)
    assert probe_shape_x0.read_predictions(pipe, clips, captions, "square", [0.02]) == [3]
    circles = [
        c.replace("square", "circle").replace("box", "circle").replace("block", "circle") for c in captions
    ]
    assert probe_shape_x0.read_predictions(pipe, clips, circles, "square", [0.98]) == [0]
    # the VAE alone: clean latents decode to the squares; latents drowned in noise of std 3 to none
    assert probe_shape_x0.read_predictions(
        pipe, clips, captions, "square", [0.0, 3.0], decoder_only=True
    ) == [3, 0]
