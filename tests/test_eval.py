"""The shapes-world scoring of vidlatent.eval: the oracle reads true clips right, and the split scorers count
what a pipeline's videos show (a stand-in pipeline that hands back the true clips, so no sampling is needed)."""

import dataclasses
import types

import pytest
import torch

from vidlatent import VideoPipeline
from vidlatent.data.shapes import SHAPES, ShapesWorld
from vidlatent.eval import LABELS, last_frame_scores, pool, read_back, score_split, split_items, tally
from vidlatent.eval.card import breakdown_table
from vidlatent.eval.shapes import ANIMATE_SEED, VAE_SEED, edit_target, score_vae

KEYS = ("colour", "shape", "motion")


def heldout_clips(count: int) -> torch.Tensor:
    world = ShapesWorld(64, 64, 17, split="heldout", seed=ANIMATE_SEED)
    return torch.stack([world.clip(i)[0] for i in range(count)])


class TrueClips:
    """A pipeline whose every job returns held-out clips of the world: the ones animate and edit start from (a
    batch starting at item s has seed s)."""

    def animate(self, stills, prompts, seed=0, progress=True):
        return heldout_clips(seed + len(prompts))[seed:]

    def edit(self, clips, prompts, strength, seed=0, progress=True):
        return clips

    def generate(self, prompts, seed=0, progress=True, frames=17):
        return heldout_clips(seed + len(prompts))[seed:, :, :frames]


def test_the_oracle_reads_true_held_out_clips_right():
    items = split_items("animate", 8)
    rows = [read_back(clip, asked, KEYS) for clip, (_, asked) in zip(heldout_clips(8), items)]
    rates = tally(rows, KEYS)
    assert min(rates[k] for k in (*KEYS, "all")) >= 0.98 and rates["nothing"] == 0, rates


def test_animate_split_scores_the_true_clips_and_their_first_frames():
    r = score_split(TrueClips(), "animate", count=4, batch=3)
    assert r["prompts"] == 4 and r["all"] == 1.0 and r["nothing"] == 0.0 and r["examples_missed"] == []
    assert r["first_psnr"] > 60  # the first frame is the still itself


def test_edit_split_asks_for_the_next_shape_and_an_unedited_clip_misses_it():
    items = split_items("edit-shape", 4, seed=0)
    truth = [read_back(clip, asked, KEYS)["found"] for clip, (_, asked) in zip(heldout_clips(4), items)]
    assert [asked[1] for _, asked in items] == [SHAPES[(SHAPES.index(t[1]) + 1) % 3] for t in truth]
    r = score_split(TrueClips(), "edit-shape", count=4, batch=4)  # the stand-in edits nothing
    assert r["shape"] == 0.0 and r["colour"] == 1.0 and r["motion"] == 1.0 and len(r["examples_missed"]) == 4


def test_image_split_scores_colour_and_shape_only():
    r = score_split(TrueClips(), "image", count=2, batch=2)
    assert "motion" not in r and r["prompts"] == 2 and 0 <= r["all"] <= 1


def test_edit_target_recolours_three_along_and_keeps_the_motion():
    obj = ShapesWorld(64, 64, 17, split="heldout", seed=ANIMATE_SEED).scene(0).objects[0]
    colour, shape, motion = edit_target(obj, "edit-colour")
    assert colour != obj.colour and shape == obj.shape and motion == obj.motion


def test_pool_averages_seeds_and_keeps_each():
    runs = [{"prompts": 2, "colour": 1.0, "shape": 0.5, "motion": 0.0, "all": 0.0, "nothing": 0.0,
             "examples_missed": []}, {"prompts": 2, "colour": 0.5, "shape": 0.5, "motion": 1.0, "all": 0.5,
             "nothing": 0.5, "examples_missed": []}]  # fmt: skip
    pooled = pool(runs, [0, 1])
    assert pooled["colour"] == 0.75 and pooled["seeds"] == [0, 1] and pooled["per_seed"][1]["motion"] == 1.0
    assert pool(runs[:1], [0]) is runs[0]


@pytest.mark.slow  # four sampling runs: seconds on a quiet CPU, a minute on a busy one
def test_last_frame_scores_every_candidate_on_a_tiny_pipeline():
    pipe = VideoPipeline.from_pretrained("tiny")
    pipe.config = dataclasses.replace(pipe.config, steps=1, frames=5, height=32, width=32)
    lines = []
    scores = last_frame_scores(pipe, clips=1, log=lines.append)
    assert list(scores) == list(LABELS) and all(len(v) == 1 and v[0] > 0 for v in scores.values())
    assert len(lines) == 1


class IdentityVAE:
    """A stand-in VAE that gives each clip back as it is (``blank``: a clip of zeros, mid-gray, no object)."""

    device = torch.device("cpu")

    def __init__(self, blank: bool = False):
        self.blank = blank

    def encode(self, x):
        return types.SimpleNamespace(mode=lambda: x)

    def decode(self, z):
        return torch.zeros_like(z) if self.blank else z


def test_score_vae_reads_true_clips_back_by_colour_shape_and_pair():
    r = score_vae(IdentityVAE(), 12)
    assert r["clips"] == 12 and r["oracle_colour"] == r["oracle_shape"] == r["oracle_motion"] == 1.0
    assert sum(g["n"] for g in r["by_pair"].values()) == sum(g["n"] for g in r["by_colour"].values()) == 12
    assert all(g["shape"] == 1.0 for g in r["by_pair"].values())
    world = ShapesWorld(64, 64, 17, split="heldout", seed=VAE_SEED)
    first = world.scene(0).objects[0]
    assert r["by_pair"][f"{first.colour} {first.shape}"]["n"] >= 1
    table = "\n".join(breakdown_table(r))  # the model card's table of it
    assert f"| {first.colour} |" in table and "| shape read right |" in table
    assert r["frames"]["clips"] == 12 and r["frames"]["ghost"] == r["frames"]["malformed"] == 0.0
    assert sum(f["clips"] for f in r["frames_by_colour"].values()) == 12
    lost = score_vae(IdentityVAE(blank=True), 4)
    assert lost["oracle_shape"] == 0.0 and all(g["shape"] == 0.0 for g in lost["by_shape"].values())
    assert lost["frames"]["first_missing"] == 1.0
