"""The shapes world: determinism, the held-out split, captions, and the oracle on ground truth."""

import itertools

import numpy as np
import pytest
import torch

from vidlatent.data.shapes import (
    COLOURS,
    HELDOUT,
    MOTIONS,
    SHAPES,
    TRAIN_COMBOS,
    ShapesWorld,
    eval_prompts,
    grammar_words,
    oracle,
    parse_prompt,
)


def test_clips_are_deterministic_and_shaped():
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for i in (0, 7, 1234):
        (va, ca), (vb, cb) = a.clip(i), b.clip(i)
        assert torch.equal(va, vb) and ca == cb
        assert va.shape == (3, 17, 64, 64) and va.dtype == torch.float32
        assert -1 <= va.min() and va.max() <= 1
    assert not torch.equal(ShapesWorld(seed=4).clip(0)[0], a.clip(0)[0])
    assert ShapesWorld(height=48, width=80, frames=5).clip(0)[0].shape == (3, 5, 48, 80)
    assert ShapesWorld(frames=1).clip(0)[0].shape == (3, 1, 64, 64)  # an image is a one-frame clip
    with pytest.raises(ValueError, match="unknown split"):
        ShapesWorld(split="test")


def test_world_has_every_attribute_and_paraphrases():
    world = ShapesWorld(seed=0)
    scenes = [world.scene(i) for i in range(400)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objects} == set(COLOURS) and len(COLOURS) >= 6
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.motion for o in objects} == set(MOTIONS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {s.background["kind"] for s in scenes} == {"solid", "gradient", "stripes", "checks"}
    captions = {s.caption for s in scenes}
    assert any("ball" in c for c in captions) and any("circle" in c for c in captions)
    assert any("to the left" in c for c in captions) and any("moving left" in c for c in captions)
    vocab = set(grammar_words())
    assert all(set(c.split()) <= vocab for c in captions)


def test_heldout_combinations_never_appear_in_training():
    held = set(HELDOUT)
    assert len(held) >= 30 and not held & set(TRAIN_COMBOS)
    assert held | set(TRAIN_COMBOS) == set(itertools.product(COLOURS, SHAPES, MOTIONS))
    # every pair of attributes of a held-out combination is still seen in training
    for c in held:
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert any(t[i] == c[i] and t[j] == c[j] for t in TRAIN_COMBOS)
    world = ShapesWorld(split="train", seed=5)
    for i in range(500):
        for o in world.scene(i).objects:
            assert (o.colour, o.shape, o.motion) not in held
    heldout = ShapesWorld(split="heldout", seed=5)
    assert all(len(s.objects) == 1 and (s.objects[0].colour, s.objects[0].shape, s.objects[0].motion) in held
               for s in map(heldout.scene, range(50)))  # fmt: skip


def test_eval_prompts_parse_back_to_their_combination():
    for split in ("heldout", "train"):
        prompts = eval_prompts(split, count=216)
        assert len(prompts) == 216 and len({p for p, _ in prompts}) > 150
        for prompt, combo in prompts:
            assert parse_prompt(prompt) == combo, prompt
        combos = {c for _, c in prompts}
        assert combos <= (set(HELDOUT) if split == "heldout" else set(TRAIN_COMBOS))


@pytest.mark.parametrize("split", ["heldout", "train"])
def test_oracle_reads_ground_truth(split):
    """The oracle must be right on the world's own clips before it may judge a model."""
    world = ShapesWorld(split=split, seed=11)
    total, right = 0, {"colour": 0, "shape": 0, "motion": 0}
    for i in range(80):
        scene = world.scene(i)
        found = {o["colour"]: o for o in oracle(world.render(scene))}
        for obj in scene.objects:
            total += 1
            got = found.get(obj.colour)
            if got is None:
                continue
            right["colour"] += 1
            right["shape"] += got["shape"] == obj.shape
            right["motion"] += got["motion"] == obj.motion
    need = 1.0 if split == "heldout" else 0.93  # single objects; several objects may overlap
    for key, n in right.items():
        assert n / total >= need, (key, n, total)


def test_oracle_accepts_tensors_and_sees_nothing_in_grey():
    world = ShapesWorld(split="heldout", seed=2)
    video, _ = world.clip(0)
    scene = world.scene(0)
    got = oracle(video)
    assert [(o["colour"], o["shape"], o["motion"]) for o in got] == [
        (scene.objects[0].colour, scene.objects[0].shape, scene.objects[0].motion)
    ]
    assert oracle(np.full((5, 32, 32, 3), 128, dtype=np.uint8)) == []
    # a still object reads as "still", not as a direction
    still = np.full((9, 64, 64, 3), 40, dtype=np.uint8)
    still[:, 20:40, 20:40] = COLOURS["green"]
    assert oracle(still) == [
        {
            "colour": "green",
            "shape": "square",
            "motion": "still",
            "area": pytest.approx(400 / 4096),
            "frames": 9,
            "count": 1,
            "size": "medium",  # 20 px wide: radius 10/0.9 px = 0.17 of 64
        }
    ]
