"""The shipped default model: it is installed with the package, small, and it really does what it is asked.

The 8-item counts in the docstrings below were measured with the stage-11 pair (denoiser dit-fine2); the stage-12
denoiser (dit-cpu) that ships now passes the same bars. The 216-item figures are MODEL_CARD.md's at the time."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vidlatent
from vidlatent.checkpoint import shipped_model
from vidlatent.data.shapes import SHAPES, ShapesWorld, caption, eval_prompts, oracle
from vidlatent.eval.control import heldout_controls, score_control
from vidlatent.pipelines.encode import psnr

DEFAULT_MODEL = shipped_model("default")  # the shipped model's pipeline folder


def test_weights_ship_inside_the_package_and_are_small():
    files = list(DEFAULT_MODEL.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"vae", "dit", "text_encoder", "control"}
    assert sum(f.stat().st_size for f in files) <= 37 * 2**20  # 36.1 MiB: the control branch adds 8.7
    assert (DEFAULT_MODEL / "pipeline.json").is_file() and (DEFAULT_MODEL / "MODEL_CARD.md").is_file()
    package = Path(vidlatent.__file__).parent  # the whole package, weights included, stays under 40 MiB
    size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    assert size <= 40 * 2**20, f"{size / 2**20:.1f} MiB"


@pytest.mark.slow
def test_default_control_follows_held_out_silhouettes(default_pipe):
    """The shipped silhouette control on 8 held-out clips of the control set (their captions and silhouettes), with
    the pipeline's control defaults; the same prompts without the control for comparison. Measured here: mean IoU
    0.782 with the control, 0.082 without, colour 8 of 8 both (216 clips: MODEL_CARD.md). A control that
    does nothing scores like the prompt alone (about 0.2), so the bar catches a branch that stopped working."""
    pipe = default_pipe
    assert (pipe.config.control_scale, pipe.config.control_guidance) == (2.0, 1.0)
    captions, controls, _, colours = heldout_controls(24).stack(0, 24)
    captions, controls, colours = captions[::3], controls[::3], colours[::3]
    controlled = pipe.control(captions, controls, seed=0, progress=False)
    plain = pipe.generate(captions, seed=0, progress=False)
    scored = {name: [score_control(v, c, k) for v, c, k in zip(videos, controls, colours)]
              for name, videos in (("control", controlled), ("none", plain))}  # fmt: skip
    iou = {name: float(np.mean([r["iou"] for r in rows])) for name, rows in scored.items()}
    assert iou["control"] >= 0.7 and iou["none"] <= 0.4, iou
    assert sum(r["colour"] for r in scored["control"]) >= 7, scored["control"]


@pytest.mark.slow
def test_default_pipeline_follows_held_out_prompts(default_pipe):
    """A handful of held-out prompts (combinations never trained on), read back by the oracle.

    The bars are just under the shipped model's measured level on these 8 prompts with this seed (8 clips with
    an object; 8 with the asked colour, 7 with the asked shape, 8 with the asked motion; on 216 held-out prompts
    MODEL_CARD.md has 100% / 79% / 90%), which a random or broken model does not reach (about 17% colour, 33%
    shape, 11% motion): it catches a model that stopped working.
    """
    pipe = default_pipe
    assert (pipe.config.frames, pipe.config.height, pipe.config.width) == (17, 64, 64)
    prompts = eval_prompts("heldout", count=32)[::4]  # 8 prompts, 8 different combinations
    videos = pipe.generate([p for p, _ in prompts], seed=0, progress=False)
    assert videos.shape == (8, 3, 17, 64, 64) and torch.isfinite(videos).all()
    found = [oracle(video) for video in videos]
    right = {
        key: sum(bool(f) and f[0][key] == asked[i] for f, (_, asked) in zip(found, prompts))
        for i, key in enumerate(("colour", "shape", "motion"))
    }
    assert sum(bool(f) for f in found) >= 7, found
    assert right["colour"] >= 7 and right["shape"] >= 6 and right["motion"] >= 7, (right, found)


def test_default_pipeline_makes_images_of_the_asked_colour(default_pipe):
    """Text to image (one frame) on the same 8 held-out prompts: measured 7 images with an object, 7 of the asked
    colour (216 prompts: 96%; a random model about 17%). Shape (4 of 8 here, 63% on 216) is not asserted: a bar
    under it would sit near chance (33%)."""
    pipe = default_pipe
    prompts = eval_prompts("heldout", count=32)[::4]
    images = pipe.generate([p for p, _ in prompts], seed=0, frames=1, progress=False)
    assert images.shape == (8, 3, 1, 64, 64) and torch.isfinite(images).all()
    found = [oracle(image) for image in images]
    colour = sum(bool(f) and f[0]["colour"] == asked[0] for f, (_, asked) in zip(found, prompts))
    assert sum(bool(f) for f in found) >= 6 and colour >= 6, found


@pytest.mark.slow
def test_default_pipeline_animates_held_out_stills(default_pipe):
    """Image to video from the first frames of 8 held-out clips with their captions: measured 8 of the clip's
    colour, 8 of its motion (216 clips: 100% / 99%; a random model about 17% / 11%), and the first frame is the
    still's VAE reconstruction (27.2-34.5 dB here)."""
    pipe = default_pipe
    world = ShapesWorld(64, 64, 17, split="heldout", seed=2024)
    stills = torch.stack([world.clip(i)[0][:, :1] for i in range(8)])
    truth = [world.scene(i).objects[0] for i in range(8)]
    videos = pipe.animate(stills, [world.scene(i).caption for i in range(8)], seed=0, progress=False)
    assert videos.shape == (8, 3, 17, 64, 64) and torch.isfinite(videos).all()
    found = [oracle(video) for video in videos]
    right = {
        key: sum(bool(f) and f[0][key] == getattr(t, key) for f, t in zip(found, truth))
        for key in ("colour", "motion")
    }
    assert right["colour"] >= 7 and right["motion"] >= 7, (right, found)
    first = [psnr(v[:, :1], still, data_range=2.0) for v, still in zip(videos, stills)]
    assert min(first) > 26, first


@pytest.mark.slow
def test_default_pipeline_edits_held_out_clips_at_strength_half(default_pipe):
    """Edit (SDEdit) at strength 0.5 of the same 8 held-out clips, each towards the next shape (circle -> square
    -> triangle) with its own colour and motion: measured 8 clips with an object, 8 of the clip's colour, 8 of its
    motion, 5 of the new shape (72 clips in MODEL_CARD.md: 100% / 96% kept, 72% new shape). At this strength the
    noise has hidden the outline but not the colour or the path, so a sensible edit keeps those and re-draws the
    shape; an edit that changed nothing would show 0 new shapes, a broken one would lose colour and motion."""
    pipe = default_pipe
    world = ShapesWorld(64, 64, 17, split="heldout", seed=2024)
    clips = torch.stack([world.clip(i)[0] for i in range(8)])
    truth = [world.scene(i).objects[0] for i in range(8)]
    shapes = [SHAPES[(SHAPES.index(t.shape) + 1) % 3] for t in truth]
    rng = np.random.default_rng(0)
    prompts = [caption([dataclasses.replace(t, shape=s)], rng) for t, s in zip(truth, shapes)]
    videos = pipe.edit(clips, prompts, 0.5, seed=0, progress=False)
    assert videos.shape == (8, 3, 17, 64, 64) and torch.isfinite(videos).all()
    found = [oracle(video) for video in videos]
    kept = {
        key: sum(bool(f) and f[0][key] == getattr(t, key) for f, t in zip(found, truth))
        for key in ("colour", "motion")
    }
    new_shape = sum(bool(f) and f[0]["shape"] == s for f, s in zip(found, shapes))
    assert sum(bool(f) for f in found) >= 7, found
    assert kept["colour"] >= 7 and kept["motion"] >= 7 and new_shape >= 4, (kept, new_shape, found)


def test_default_vae_reconstructs_held_out_clips(default_pipe):
    vae = default_pipe.vae
    world = ShapesWorld(64, 64, 17, split="heldout", seed=99)
    video = torch.stack([world.clip(i)[0] for i in range(3)])
    with torch.no_grad():
        recon = vae.decode(vae.encode(video).mode())
    value = psnr(recon, video, data_range=2.0)
    # 31.48 dB measured here with the stage-10 and stage-11 decoders (31.9 before); 32.12 dB on the 64 clips of
    # MODEL_CARD.md
    assert value > 31.2, value


@pytest.mark.slow
def test_cli_generate_uses_the_default_model(tmp_path):
    out = tmp_path / "out.mp4"
    cmd = [sys.executable, "-m", "vidlatent.cli", "generate", "a red circle moving right", "-o", str(out)]
    proc = subprocess.run(cmd + ["--seed", "0", "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from vidlatent.data.io import read_video

    video = read_video(out)[0]
    assert video.shape == (3, 17, 64, 64)
